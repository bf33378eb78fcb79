"""The logits op against the float64 oracle, on both paths (Triton under the interpreter, chunked CPU)."""
import zlib

import pytest
import torch

import entropy_ops
from entropy_ops.token_ops import TokenOpParams, token_backward_torch, token_backward_triton
from entropy_ops.token_ops import token_forward_torch, token_forward_triton
from entropy_ops._layout import as_rows3d
from entropy_ops.softmax_stats import RowStats
from oracle import TOL, assert_close, logprobs_entropy_reference

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(n, v, dtype, seed, *, scale=3.0, ignore_frac=0.2, neg_inf=True):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * scale).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        targets[torch.rand(n, generator=g) < ignore_frac] = -100
    if neg_inf and v > 2:
        # masked vocab entries: a random subset of some rows, never the target
        rows = torch.rand(n, generator=g) < 0.5
        cols = torch.rand(v, generator=g) < 0.3
        block = rows[:, None] & cols[None, :]
        block[torch.arange(n), targets.clamp_min(0)] = False
        block[:, 0] = block[:, 0] & (targets != 0)
        logits = logits.masked_fill(block, float("-inf"))
    return logits, targets


def check_against_oracle(logits, targets, backend, temperature, seed, *, which=("logp", "H")):
    dtype = logits.dtype
    x = logits.detach().clone().requires_grad_(True)
    logp, H = entropy_ops.token_logprobs_and_entropy(x, targets, temperature=temperature, backend=backend)
    assert logp.dtype == torch.float32 and H.dtype == torch.float32
    ref_x = logits.detach().double().requires_grad_(True)
    ref_logp, ref_H = logprobs_entropy_reference(ref_x, targets, temperature)
    assert_close(logp, ref_logp, TOL[dtype]["fwd"], "logp")
    assert_close(H, ref_H, TOL[dtype]["fwd"], "entropy")

    g = torch.Generator().manual_seed(seed + 1)
    g_logp = torch.randn(logp.shape, generator=g)
    g_H = torch.randn(H.shape, generator=g)
    loss = sum((out * gr).sum() for out, gr, name in ((logp, g_logp, "logp"), (H, g_H, "H")) if name in which)
    ref_loss = sum((out * gr.double()).sum() for out, gr, name in ((ref_logp, g_logp, "logp"), (ref_H, g_H, "H"))
                   if name in which)
    loss.backward()
    ref_loss.backward()
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    expected = ref_x.grad.to(dtype).double() if dtype != torch.float32 else ref_x.grad
    assert_close(x.grad, expected, TOL[dtype]["grad"], "dlogits", rowwise=True)
    ignored = targets == -100
    assert (x.grad[ignored] == 0).all(), "ignored rows must get zero gradient"
    assert (logp[ignored] == 0).all() and (H[ignored] == 0).all()


SHAPES = [(1, 1), (5, 7), (257, 1000), (5, 32003), (1, 32003)]
TEMPERATURES = [0.5, 1.0, 1.7]


def oracle_cases():
    """Full grid on the CPU path; on the interpreted Triton path (each program runs in numpy,
    ~10 ms per row) the 257-row shape runs once per dtype, at a temperature != 1."""
    for dtype in DTYPES:
        for temperature in TEMPERATURES:
            for n, v in SHAPES:
                yield "torch", dtype, temperature, n, v
                if n < 100 or temperature == 1.7:
                    yield "triton", dtype, temperature, n, v


@pytest.mark.parametrize("backend,dtype,temperature,n,v", list(oracle_cases()))
def test_matches_float64_oracle(backend, dtype, temperature, n, v):
    seed = zlib.crc32(repr((backend, str(dtype), temperature, n, v)).encode()) % 10_000  # stable across runs
    logits, targets = make_inputs(n, v, dtype, seed)
    check_against_oracle(logits, targets, backend, temperature, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", [("logp",), ("H",)])
def test_one_output_unused(backend, which):
    logits, targets = make_inputs(9, 300, torch.float32, seed=3)
    check_against_oracle(logits, targets, backend, 1.3, seed=3, which=which)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_entropy_no_cancellation(backend):
    # Large, nearly peaked logits: lse ~ 50 while H ~ 1e-3; summing p*s would cancel catastrophically.
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 513, generator=g) * 2 + 40.0
    logits[:, 7] += 9.0
    targets = torch.full((6,), 7)
    check_against_oracle(logits, targets, backend, 1.0, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_three_dims(backend, dtype):
    # logits[:, :-1] of a [B, T, V] buffer and a strided vocab: no flattening view exists.
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(3, 6, 2 * 301, generator=g) * 2).to(dtype)
    logits = base[:, :-1, ::2]
    assert not logits.is_contiguous()
    targets = torch.randint(0, 301, (3, 5), generator=g)
    targets[1, 2] = -100
    x = logits.detach().clone().requires_grad_(True)
    ref = logits.detach().contiguous().requires_grad_(True)
    out = entropy_ops.token_logprobs_and_entropy(logits, targets, temperature=0.8, backend=backend)
    ref_logp, ref_H = logprobs_entropy_reference(ref, targets, 0.8)
    assert out[0].shape == (3, 5)
    assert_close(out[0], ref_logp, TOL[dtype]["fwd"], "logp")
    assert_close(out[1], ref_H, TOL[dtype]["fwd"], "entropy")
    # gradient through a strided leaf view
    leaf = base.detach().clone().requires_grad_(True)
    lp, H = entropy_ops.token_logprobs_and_entropy(leaf[:, :-1, ::2], targets, temperature=0.8, backend=backend)
    (lp.sum() + 0.5 * H.sum()).backward()
    (ref_logp.sum() + 0.5 * ref_H.sum()).backward()
    expected = torch.zeros_like(leaf, dtype=torch.float64)
    expected[:, :-1, ::2] = ref.grad.double()
    expected = expected.to(dtype).double()
    assert_close(leaf.grad, expected, TOL[dtype]["grad"], "dlogits", rowwise=True)
    del x


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_logits(backend):
    logits, targets = make_inputs(7, 777, torch.float32, seed=8)
    ref = logits.clone().requires_grad_(True)
    ref_logp, ref_H = entropy_ops.token_logprobs_and_entropy(ref, targets, backend=backend)
    (ref_logp.sum() - ref_H.sum()).backward()

    leaf = logits.clone().requires_grad_(True)
    buffer = leaf * 1.0  # a non-leaf buffer the op may overwrite in backward
    logp, H = entropy_ops.token_logprobs_and_entropy(buffer, targets, backend=backend, inplace_backward=True)
    (logp.sum() - H.sum()).backward()
    assert_close(leaf.grad, ref.grad, 1e-6, "inplace dlogits")
    assert_close(buffer.detach(), ref.grad, 1e-6, "buffer now holds the gradient")


@pytest.mark.parametrize("forward,backward", [(token_forward_torch, token_backward_torch),
                                              (token_forward_triton, token_backward_triton)])
def test_every_output_element_is_written(forward, backward):
    logits, targets = make_inputs(13, 2500, torch.bfloat16, seed=21)
    logits3d = as_rows3d(logits)
    params = TokenOpParams(temperature=1.1)
    poison = tuple(torch.full((13,), float("nan")) for _ in range(4))
    outputs = forward(logits3d, targets, params, out=poison)
    assert all(t is p for t, p in zip(outputs, poison))
    assert all(torch.isfinite(t).all() for t in outputs)
    logp, H, m, log_S = outputs
    out3d = torch.full_like(logits3d, float("nan"))
    backward(logits3d, targets, RowStats(m, log_S, H), torch.randn(13), torch.randn(13), params, out3d)
    assert torch.isfinite(out3d).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_thin_forms_share_the_kernels(backend):
    logits, targets = make_inputs(6, 50, torch.float32, seed=4, ignore_frac=0.0)
    logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, temperature=0.9, backend=backend)
    assert torch.equal(entropy_ops.token_logprobs(logits, targets, temperature=0.9, backend=backend), logp)
    assert torch.equal(entropy_ops.token_entropy(logits, temperature=0.9, backend=backend), H)
    assert entropy_ops.token_logprobs_and_entropy(logits, targets, return_entropy=False, backend=backend)[1] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_paths_agree_and_no_grad_input(backend):
    logits, targets = make_inputs(33, 999, torch.float32, seed=9)
    logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, backend=backend)
    assert not logp.requires_grad and not H.requires_grad
    other = "torch" if backend == "triton" else "triton"
    logp2, H2 = entropy_ops.token_logprobs_and_entropy(logits, targets, backend=other)
    assert_close(logp, logp2, 1e-6, "logp across paths")
    assert_close(H, H2, 1e-6, "entropy across paths")


def test_gradcheck_float64_cpu_path():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10])

    def fn(z):
        return entropy_ops.token_logprobs_and_entropy(z, targets, temperature=0.7, backend="torch")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_from_environment(monkeypatch, backend):
    logits, targets = make_inputs(3, 20, torch.float32, seed=1)
    monkeypatch.setenv("ENTROPY_OPS_BACKEND", backend)
    seen = []
    import entropy_ops.token_ops as token_ops

    original = token_ops.TokenLogprobsEntropy.apply

    def spy(logits, targets, params):
        seen.append(params.backend)
        return original(logits, targets, params)

    monkeypatch.setattr(token_ops.TokenLogprobsEntropy, "apply", spy)
    entropy_ops.token_logprobs_and_entropy(logits, targets)
    assert seen == [backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_with_huge_logits_get_zero_gradient(backend):
    logits = (torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) + 100.0).requires_grad_(True)
    targets = torch.tensor([1, -100, 7, -100])
    logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, backend=backend)
    (logp.sum() + H.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[targets == -100] == 0).all()
