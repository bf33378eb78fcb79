"""``linear_cross_entropy`` / ``LinearCrossEntropy`` against float64 ``torch.nn.functional.cross_entropy`` of the
materialized logits (label smoothing by PyTorch's definition, z-loss from ``logsumexp``), values and gradients,
on the CPU path and on the Triton kernels under the interpreter."""
import pytest
import torch
import torch.nn.functional as F

from entropy_ops import LinearCrossEntropy, linear_cross_entropy
from oracle import TOL, assert_close

D, V = 16, 67


def make_inputs(lead, seed, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(*lead, D, generator=g) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    targets.view(-1)[::4] = -100
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              logit_softcap=None, temperature=1.0, ignore_index=-100):
    """float64, from the materialized logits with PyTorch's own cross-entropy."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    s = (z / temperature).reshape(-1, V)
    flat = targets.reshape(-1)
    loss = F.cross_entropy(s, flat, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    keep = flat != ignore_index
    loss = loss + torch.where(keep, z_loss * torch.logsumexp(s, -1).square(), 0.0)
    if reduction == "none":
        return loss.view(targets.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()


CASES = {
    "mean": dict(),
    "sum_bias": dict(reduction="sum", bias=True),
    "none_temperature": dict(reduction="none", temperature=0.7),
    "label_smoothing": dict(label_smoothing=0.1),
    "z_loss_softcap": dict(z_loss=1e-2, logit_softcap=4.0),
    "all": dict(reduction="none", bias=True, label_smoothing=0.2, z_loss=1e-3, temperature=1.3),
}


def check(case, backend, lead=(3, 5), seed=0, dtype=torch.float32):
    options = dict(CASES[case])
    hidden, weight, bias, targets = make_inputs(lead, seed, dtype, options.pop("bias", False))
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend, **options)
    ref = reference(hidden, weight, bias, targets, **options)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    tol = TOL[dtype]
    assert_close(loss, ref, tol["fwd"], f"{case} loss")
    upstream = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1))
    params = [p for p in (hidden, weight, bias) if p is not None]
    ours = torch.autograd.grad((loss * upstream).sum(), params)
    refs = torch.autograd.grad((ref * upstream.double()).sum(), params)
    for name, a, e in zip(("hidden", "weight", "bias"), ours, refs):
        assert a.dtype == dtype
        assert_close(a, e, tol["grad"], f"{case} d loss / d {name}", rowwise=a.dim() > 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_cross_entropy(case):
    check(case, "torch", seed=sorted(CASES).index(case))


@pytest.mark.parametrize("case", ["mean", "all", "z_loss_softcap"])
def test_triton_kernels_match(case):
    check(case, "triton", lead=(7,), seed=10 + sorted(CASES).index(case))


def test_bf16_within_tolerance():
    """bf16 hidden and weight: fp32 loss against float64 on the same (rounded) inputs."""
    check("all", "torch", seed=20, dtype=torch.bfloat16)


def test_one_token_and_all_ignored():
    hidden, weight, _, targets = make_inputs((1,), 21)
    targets[0] = 3
    assert_close(linear_cross_entropy(hidden, weight, targets), reference(hidden, weight, None, targets), 1e-5)
    targets[0] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, targets))  # mean over 0 targets, as in PyTorch
    assert torch.isnan(F.cross_entropy(hidden.detach() @ weight.detach().t(), targets))
    total = linear_cross_entropy(hidden, weight, targets, reduction="sum", z_loss=0.1, label_smoothing=0.1)
    assert total == 0
    total.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_module_and_custom_ignore_index():
    hidden, weight, bias, targets = make_inputs((2, 4), 22, bias=True)
    targets = torch.where(targets == -100, 5, targets)
    targets[0, 0] = 0  # ignore_index=0: class 0 is the padding id
    module = LinearCrossEntropy(reduction="sum", ignore_index=0, label_smoothing=0.05, z_loss=1e-2, backend="torch")
    assert "label_smoothing=0.05" in repr(module)
    assert_close(module(hidden, weight, targets, bias), reference(hidden, weight, bias, targets, reduction="sum",
                                                                  label_smoothing=0.05, z_loss=1e-2,
                                                                  ignore_index=0), 1e-5)


def test_bad_arguments_raise():
    hidden, weight, _, targets = make_inputs((4,), 23)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(hidden, weight, targets, z_loss=-1.0)
    with pytest.raises(ValueError, match="label_smoothing with logit_softcap"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, logit_softcap=30.0)
    with pytest.raises(ValueError, match="temperature"):
        LinearCrossEntropy(temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets.clamp(min=0) + V)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_with_nan_hidden_and_narrow_targets(backend):
    # Ignored rows may hold anything: with label smoothing / z-loss (the O(N D) target-logit and row-mean
    # terms) a NaN there must not reach d weight through 0 * NaN. Narrow unsigned targets are compared
    # with ignore_index after widening: uint8 156 is the id 156, not -100 wrapped.
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(4, D, generator=g)
    hidden[1] = float("nan")
    weight = (torch.randn(200, D, generator=g) / 2).requires_grad_()
    targets = torch.tensor([156, -100, 3, 199])
    opts = dict(label_smoothing=0.1, z_loss=1e-2, reduction="mean")
    for t in (targets, targets.to(torch.int16)):
        h = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(h, weight, t, backend=backend, **opts)
        (dw,) = torch.autograd.grad(loss, weight, retain_graph=True)
        assert torch.isfinite(dw).all() and bool((torch.autograd.grad(loss, h)[0][1] == 0).all())
    keep = torch.tensor([0, 2, 3])
    sub = linear_cross_entropy(hidden[keep], weight, targets[keep], backend=backend, **opts)
    assert_close(loss.detach(), sub.detach(), 1e-6, "ignored row changes nothing")
    u8 = torch.tensor([156, 7, 3, 199], dtype=torch.uint8)
    loss = linear_cross_entropy(hidden[keep].repeat(2, 1)[:4], weight, u8, backend=backend, reduction="none", **{
        k: v for k, v in opts.items() if k != "reduction"})
    ref = linear_cross_entropy(hidden[keep].repeat(2, 1)[:4], weight, u8.long(), backend=backend, reduction="none",
                               **{k: v for k, v in opts.items() if k != "reduction"})
    assert torch.equal(loss, ref)
    ref = linear_cross_entropy(hidden[keep].repeat(2, 1)[:4], weight, u8.long(), backend=backend, ignore_index=7,
                               reduction="none")
    loss = linear_cross_entropy(hidden[keep].repeat(2, 1)[:4], weight, u8, backend=backend, ignore_index=7,
                                reduction="none")  # an ignore_index inside the vocabulary, narrow targets
    assert torch.equal(loss, ref) and loss[1] == 0


def test_label_smoothing_term_ignores_an_autocast_region():
    # The smoothing term's row mean is a matmul: inside torch.autocast it must still run in fp32, as the
    # fused op does (the Triton path is not autocast; PyTorch's own fp32 cross-entropy is the reference).
    hidden, weight, _, targets = make_inputs((2, 3), seed=7)
    plain = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, backend="triton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1, backend="triton")
    assert_close(cast.detach(), plain.detach(), 1e-6, "loss inside autocast")
