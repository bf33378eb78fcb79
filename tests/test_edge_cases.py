"""Edges of the logits op on both paths (Triton under the interpreter, chunked CPU): ignored rows that
hold NaN/inf, finite logits near the fp32 limits, narrow target dtypes, double backward, in-place
backward misuse, temperature overflow, and the ``validate=`` switch (no host sync off the CPU)."""
import pytest
import torch

import entropy_ops
from entropy_ops import softmax_stats, token_ops
from entropy_ops import vocab_parallel as vp
from entropy_ops.token_ops import TokenOpParams, token_forward_torch
from oracle import TOL, assert_close, logprobs_entropy_reference

BACKENDS = ["torch", "triton"]
op = entropy_ops.token_logprobs_and_entropy


def run(logits, targets, backend, *, grads=(1.0, 1.0), **kw):
    """``(logp, H, dlogits)`` of ``g_logp . logp + g_H . H``; the gradient of a fresh leaf copy."""
    x = logits.detach().clone().requires_grad_(True)
    logp, H = op(x, targets, backend=backend, **kw)
    (grads[0] * logp.sum() + grads[1] * H.sum()).backward()
    return logp.detach(), H.detach(), x.grad


# ---------------------------------------------------------------- 1. ignored rows
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ignored_rows_give_zero_whatever_their_logits_hold(backend, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(6, 300, generator=g) * 3).to(dtype)
    targets = torch.tensor([5, -100, 17, -100, -100, 299])
    logits[1] = float("nan")
    logits[3, ::2] = float("inf")
    logits[3, 1::2] = float("-inf")
    logits[4, :7] = float("nan")
    logits[4, 7:] = 3e38 if dtype == torch.float32 else 3e38  # bf16 shares fp32's range
    logp, H, grad = run(logits, targets, backend)
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (H[ignored] == 0).all()
    assert (grad[ignored] == 0).all(), "ignored rows must get exactly zero gradient"
    clean = torch.where(ignored[:, None], torch.zeros((), dtype=dtype), logits)
    ref = clean.double().requires_grad_(True)
    r_logp, r_H = logprobs_entropy_reference(ref, targets)
    (r_logp.sum() + r_H.sum()).backward()
    assert_close(logp, r_logp, TOL[dtype]["fwd"], "logp")
    assert_close(H, r_H, TOL[dtype]["fwd"], "H")
    assert_close(grad, ref.grad.to(dtype).double(), TOL[dtype]["grad"], "dlogits", rowwise=True)


# ---------------------------------------------------------------- 2. finite logits near the fp32 limits
def extreme_rows(seed):
    """fp32 rows mixing +-3e38 with ordinary values: every ``s - m`` below the max overflows to -inf."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, 70, generator=g)
    z[0, 3] = 3.0e38
    z[0, 40:] = -3.0e38
    z[1, :] = -3.0e38
    z[1, 9] = -2.9e38  # the whole row near the lowest fp32: the max is finite and very negative
    z[2, 11] = 3.3e38
    z[2, 12] = 3.3e38  # two tied maxima: logp = log 1/2, H = log 2
    z[2, 20:30] = -3.3e38
    z[3, 50] = 2e38
    z[3, 0] = -2e38  # moderate: 2e38 - (-2e38) overflows fp32
    targets = torch.tensor([3, 9, 11, 50, 7])
    return z, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_finite_logits_near_fp32_limits(backend, temperature):
    z, targets = extreme_rows(2)
    logp, H, grad = run(z, targets, backend, temperature=temperature)
    ref = z.double().requires_grad_(True)
    r_logp, r_H = logprobs_entropy_reference(ref, targets, temperature)
    (r_logp.sum() + r_H.sum()).backward()
    assert_close(logp, r_logp, 1e-5, "logp")
    assert_close(H, r_H, 1e-5, "H")
    assert torch.isfinite(grad).all()
    assert_close(grad, ref.grad, 1e-5, "dlogits", rowwise=True)


def test_torch_merge_of_partials_at_opposite_fp32_limits():
    lo = softmax_stats.block_online_stats_(torch.tensor([[-3.0e38, -3.1e38, -2.0e38]]))
    hi = softmax_stats.block_online_stats_(torch.tensor([[3.0e38, 0.0, 2.9e38]]))
    for a, b in ((lo, hi), (hi, lo)):
        m, S, T = softmax_stats.merge_stats(*a, *b)
        stats = softmax_stats.finalize_stats(m, S, T)
        assert torch.isfinite(stats.H).all() and torch.isfinite(stats.lse).all()
        assert torch.equal(stats.m, torch.tensor([3.0e38])) and abs(float(S) - 1.0) < 1e-6
        assert abs(float(stats.H)) < 1e-6


def test_vocab_parallel_combine_across_shards_at_opposite_fp32_limits():
    """The vocab-parallel statistics algebra (no collectives): shard 0 holds only ~-3e38, shard 1 ~+3e38."""
    z, targets = extreme_rows(3)
    z[:, :35] = -3.0e38 + torch.arange(35.0) * 1e36
    z[4, 35:] = torch.linspace(-3, 3, 35)
    targets = torch.tensor([40, 45, 50, 60, 7])  # row 4's target lives on the ~-3e38 shard
    params = TokenOpParams(1.0, -100, "torch")
    parts, owns = [], []
    for a, b in ((0, 35), (35, 70)):
        fwd, _, owned = vp.shard_targets(targets, a, b - a, -100)
        logp_r, H_r, m_r, log_S_r = token_forward_torch(z[:, a:b].unsqueeze(0), fwd, params)
        parts.append(vp.shard_partials(logp_r, m_r, log_S_r, H_r, owned))
        owns.append(owned)
    m_global = torch.stack([p[0] for p in parts]).amax(0)
    summed = sum(vp.rescale_partials(p, o, m_global) for p, o in zip(parts, owns))
    stats, logp = vp.finish_partials(m_global, summed, targets != -100)
    r_logp, r_H = logprobs_entropy_reference(z, targets)
    assert_close(stats.H, r_H, 1e-5, "H")
    assert_close(logp, r_logp, 1e-5, "logp")


# ---------------------------------------------------------------- 3. target dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str)
def test_targets_of_every_integer_dtype(backend, tdtype):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 200, generator=g)
    wide = torch.tensor([156, 3, 100, 127]) if tdtype == torch.uint8 else torch.tensor([-100, 3, 100, 127])
    targets = wide.to(tdtype)
    logp, H, grad = run(logits, targets, backend)
    # uint8 156 is -100 modulo 256: after widening it is a kept target, not ignore_index
    r_logp, r_H = logprobs_entropy_reference(logits, wide)
    assert_close(logp, r_logp, 1e-5, "logp")
    assert_close(H, r_H, 1e-5, "H")
    assert (grad[0] != 0).any() if tdtype == torch.uint8 else (grad[0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.uint8, torch.int16, torch.int64], ids=str)
def test_out_of_range_targets_are_refused_after_widening(backend, tdtype):
    logits = torch.randn(3, 100)
    targets = torch.tensor([1, 200, 2]).to(tdtype)  # 200 >= V: out of range in every dtype
    for validate in ("auto", True):
        with pytest.raises(ValueError, match="targets must be in"):
            op(logits, targets, backend=backend, validate=validate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_value_checks_a_bad_target_gives_nan_and_is_never_read(backend):
    logits = torch.randn(4, 100)
    targets = torch.tensor([1, 10**12, -100, -7])  # far outside the buffer: a read would fault
    logp, H, grad = run(logits, targets, backend, validate=False)
    bad = torch.tensor([False, True, False, True])
    assert torch.isnan(logp[bad]).all() and torch.isnan(H[bad]).all() and torch.isnan(grad[bad]).all()
    r_logp, r_H = logprobs_entropy_reference(logits[:1], targets[:1])
    assert_close(logp[:1], r_logp, 1e-5, "logp")
    assert_close(H[:1], r_H, 1e-5, "H")
    assert logp[2] == 0 and H[2] == 0 and (grad[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_value_checks_a_row_with_no_finite_logit_gives_nan(backend):
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    targets = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="no finite logit"):
        op(logits, targets, backend=backend)
    logp, H, _ = run(logits, targets, backend, validate=False)
    assert torch.isnan(logp[1]) and torch.isnan(H[1]) and torch.isfinite(logp[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_without_value_checks_a_nan_or_inf_logit_gives_nan_not_an_empty_row(backend, bad):
    # S = sum exp(s - m) is NaN for such a row: it must not be read as an empty row (H = 0, or a
    # vocab shard that contributes nothing), so both outputs and every statistic are NaN.
    logits = torch.randn(3, 300)
    logits[1, 257] = bad
    with pytest.raises(ValueError, match="row 1"):
        op(logits, torch.tensor([1, 2, 3]), backend=backend)
    logp, H, grad = run(logits, torch.tensor([1, 2, 3]), backend, validate=False)
    assert torch.isnan(logp[1]) and torch.isnan(H[1]) and torch.isnan(grad[1]).all()
    assert torch.isfinite(logp[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()
    m, S, T = softmax_stats.block_online_stats_(logits[1:2].clone())
    assert torch.isnan(softmax_stats.finalize_stats(m, S, T).H).all()


# ---------------------------------------------------------------- 4. double backward
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused_loudly(backend):
    x = torch.randn(3, 40, requires_grad=True)
    logp, H = op(x, torch.tensor([1, 2, 3]), backend=backend)
    (gx,) = torch.autograd.grad((logp + H).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="token_logprobs_and_entropy has no second derivative"):
        torch.autograd.grad((gx * x).sum(), x)  # x also enters directly: a graph exists, the op must refuse
    logp, H = op(x, torch.tensor([1, 2, 3]), backend=backend)
    (gx2,) = torch.autograd.grad((logp + H).sum(), x, create_graph=True)  # first order alone is fine
    assert torch.equal(gx2.detach(), gx.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_second_derivative_through_the_upstream_gradient_is_refused(backend):
    # d/dw of d(w . logp)/dz differentiates the backward with respect to its upstream gradient:
    # refused, not pruned (allow_unused=True would otherwise hand back None, a silent zero).
    x = torch.randn(3, 40, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    logp, _ = op(x, torch.tensor([1, 2, 3]), backend=backend)
    (gx,) = torch.autograd.grad((w * logp).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="token_logprobs_and_entropy has no second derivative"):
        torch.autograd.grad(gx.sum(), w, allow_unused=True)


# ---------------------------------------------------------------- 5. inplace_backward misuse
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_refuses_overlapping_rows_and_leaves(backend):
    leaf = torch.randn(1, 64, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    expanded = (leaf * 1.0).expand(3, 64)  # three rows in one row's memory
    with pytest.raises(ValueError, match="inplace_backward"):
        op(expanded, targets, backend=backend, inplace_backward=True)
    base = torch.randn(200, requires_grad=True) * 1.0
    overlapping = base.as_strided((3, 64), (32, 1))  # row r starts inside row r - 1
    with pytest.raises(ValueError, match="inplace_backward"):
        op(overlapping, targets, backend=backend, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward"):
        op(torch.randn(3, 64, requires_grad=True), targets, backend=backend, inplace_backward=True)
    op(expanded, targets, backend=backend)  # without inplace_backward an expanded input is fine


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_write_is_seen_by_autograd_version_check(backend):
    leaf = torch.randn(3, 64, requires_grad=True)
    buffer = leaf.exp()  # exp saves its output for its own backward: the buffer we overwrite
    logp, H = op(buffer, torch.tensor([1, 2, 3]), backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logp.sum() + H.sum()).backward()


# ---------------------------------------------------------------- 6. temperature
@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_that_overflows_fp32_is_named(backend):
    logits = torch.randn(3, 50)
    logits[1, 4] = 2e38
    with pytest.raises(ValueError, match="temperature=0.5 makes logits / temperature overflow"):
        op(logits, torch.tensor([1, 2, 3]), temperature=0.5, backend=backend)
    with pytest.raises(ValueError, match="temperature must be >="):
        op(logits, torch.tensor([1, 2, 3]), temperature=1e-39, backend=backend)
    # 1 / temperature rounding to 0 in fp32 would turn a masked -inf logit into -inf * 0 = NaN
    with pytest.raises(ValueError, match="temperature must be <="):
        op(logits, torch.tensor([1, 2, 3]), temperature=1e50, backend=backend)
    logp, _ = op(logits, torch.tensor([1, 2, 3]), temperature=1.0, backend=backend)  # fine unscaled
    assert torch.isfinite(logp).all()


# ---------------------------------------------------------------- the validate= switch
def test_validate_argument_is_checked():
    with pytest.raises(ValueError, match="validate must be"):
        op(torch.randn(2, 5), torch.tensor([1, 2]), validate="yes")


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel: records launches, touches no data (meta tensors have none)."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid)
        return launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_off_the_cpu(backend, monkeypatch):
    """On meta tensors any host synchronization (``bool``, ``item``, ``nonzero``, ``tolist``) raises, so a
    forward and backward that complete there make none: the non-CPU path of every op under ``"auto"``."""
    from entropy_ops.kernels import token_logprobs_entropy as kmod

    fwd, bwd = _RecordingKernel(), _RecordingKernel()
    monkeypatch.setattr(kmod, "_token_logprobs_entropy_fwd", fwd)
    monkeypatch.setattr(kmod, "_token_logprobs_entropy_bwd", bwd)
    logits = torch.empty(2, 7, 300, device="meta", requires_grad=True)
    targets = torch.empty(2, 7, dtype=torch.int32, device="meta")
    logp, H = op(logits * 1.0, targets, temperature=0.7, backend=backend, inplace_backward=True)
    (logp.sum() + H.sum()).backward()
    assert logits.grad.shape == logits.shape
    if backend == "triton":
        assert fwd.grids == [(14,)] and bwd.grids == [(14, 1)]
    with pytest.raises((RuntimeError, NotImplementedError)):  # the control: value checks do sync
        op(logits, targets, backend=backend, validate=True)


def test_launches_run_under_the_tensors_device(monkeypatch):
    seen = []

    class FakeTensor:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or token_ops.contextlib.nullcontext())
    with token_ops._on_device(FakeTensor()):
        pass
    assert seen == [torch.device("cuda", 1)]
    assert isinstance(token_ops._on_device(torch.empty(1)), token_ops.contextlib.nullcontext)


# ---------------------------------------------------------------- the hidden-state forms: the same edges
def _hidden_forms(backend):
    """``name -> f(hidden, weight, targets, **kw) -> (logp, H)`` for every public hidden-state op."""
    from entropy_ops.token_chunking import chunked_linear_logprobs_and_entropy

    return {
        "linear": lambda h, w, t, **kw: entropy_ops.linear_logprobs_and_entropy(h, w, t, backend=backend, **kw),
        "chunked": lambda h, w, t, **kw: chunked_linear_logprobs_and_entropy(h, w, t, token_chunk_size=2,
                                                                             backend=backend, **kw),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_state_ops_refuse_double_backward(backend):
    g = torch.Generator().manual_seed(31)
    weight = torch.randn(20, 8, generator=g)
    targets = torch.tensor([1, 2, 3, 4])
    for name, fn in _hidden_forms(backend).items():
        h = torch.randn(4, 8, generator=g, requires_grad=True)
        logp, H = fn(h, weight, targets)
        (gh,) = torch.autograd.grad((logp + H).sum(), h, create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad((gh * h).sum(), h)  # h also enters directly: a graph exists, the op must refuse
    h = torch.randn(2, 2, 8, generator=g, requires_grad=True)
    for one_pass in (True, False):
        loss, _ = entropy_ops.policy_loss(targets=torch.tensor([[1, 2], [3, 4]]), mask=torch.ones(2, 2, dtype=torch.bool),
                                          advantages=torch.tensor([1.0, -1.0]), hidden=h, weight=weight,
                                          old_logprobs=torch.full((2, 2), -3.0), backend=backend, one_pass=one_pass)
        (gh,) = torch.autograd.grad(loss, h, create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad((gh * h).sum(), h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_state_ops_name_a_temperature_overflow(backend):
    hidden = torch.ones(4, 4)
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(32))
    weight[2] = 1e37  # finite fp32 logits of 4e37; / 1e-3 overflows
    targets = torch.tensor([1, 2, 3, 4])
    for name, fn in _hidden_forms(backend).items():
        with pytest.raises(ValueError, match="temperature=0.001 makes logits / temperature overflow"):
            fn(hidden, weight, targets, temperature=1e-3)
        fn(hidden, weight, targets, temperature=1.0)  # fine unscaled
    with pytest.raises(ValueError, match="temperature=0.001 makes logits / temperature overflow"):
        entropy_ops.policy_loss(targets=targets.view(2, 2), mask=torch.ones(2, 2, dtype=torch.bool),
                                advantages=torch.ones(2), hidden=hidden.view(2, 2, 4),
                                weight=weight.clone().requires_grad_(), backend=backend, one_pass=True,
                                config=entropy_ops.PolicyLossConfig(temperature=1e-3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_state_ops_without_value_checks_a_row_with_no_finite_logit_gives_nan(backend):
    bias = torch.zeros(10)
    hidden = torch.randn(3, 4, generator=torch.Generator().manual_seed(33))
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(34))
    bias = torch.full((10,), float("-inf"))
    for name, fn in _hidden_forms(backend).items():
        logp, H = fn(hidden, weight, torch.tensor([1, 2, 3]), bias=bias, validate=False)
        assert torch.isnan(logp).all() and torch.isnan(H).all(), (name, logp, H)  # H read 0 before


def test_hidden_state_cpu_path_ignores_an_autocast_region():
    # The kernels never autocast; the CPU path's matmuls must not either (bf16 logits under autocast).
    g = torch.Generator().manual_seed(35)
    hidden, weight = torch.randn(6, 64, generator=g), torch.randn(100, 64, generator=g) / 8
    targets = torch.randint(0, 100, (6,), generator=g)
    for name, fn in _hidden_forms("torch").items():
        plain = fn(hidden, weight, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = fn(hidden, weight, targets)
        for a, b in zip(cast, plain):
            assert_close(a, b, 1e-6, f"{name} inside autocast")
