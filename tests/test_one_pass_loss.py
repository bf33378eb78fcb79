"""The one-pass policy loss (gradient formed in the forward, per token chunk) against the two-pass form:
loss, metrics and the gradients of hidden, weight and bias, for every preset that allows it, on both paths
(chunked CPU, Triton under the interpreter), with several token chunks; and the automatic fallback. With
several chunks on the Triton path: against the float64 oracle, bitwise reproducible, its buffers against
``onepass_peak_bytes`` (traced), no [N, V] nor fp32 [V, D] buffer; the default chunk and its performance model."""
import zlib

import pytest
import torch

from entropy_ops import policy_onepass
from entropy_ops.policy_loss import PolicyLossConfig, policy_loss
from oracle import assert_close

B, T, D, V = 3, 5, 32, 200


def make_batch(dtype=torch.float32, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 3.0 / D**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    # old/ref log-probs near the policy's own: ratios around 1, some clipped either way
    with torch.no_grad():
        z = hidden.double() @ weight.double().T + bias.double()
        logp = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0].float()
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, advantages=adv,
                old_logprobs=old, ref_logprobs=ref)


def run(batch, config, one_pass, **opts):
    leaves = {k: batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    loss, metrics = policy_loss(**{**batch, **leaves}, config=config, one_pass=one_pass, **opts)
    loss.backward()
    return loss.detach(), metrics, {k: v.grad for k, v in leaves.items()}


def assert_same(a, b, rel):
    assert_close(a[0], b[0], rel, "loss")
    assert set(a[1]) == set(b[1])
    for k in a[1]:
        assert_close(a[1][k], b[1][k], rel, k)
    for k in a[2]:
        assert a[2][k].dtype == b[2][k].dtype
        got, expected = (a[2][k].T, b[2][k].T) if k == "weight" else (a[2][k], b[2][k])
        assert_close(got, expected.double(), rel, f"d_{k}", rowwise=k != "bias")


VARIANTS = {
    "plain": {},
    "kl+entropy": dict(beta=0.04, entropy_coef=0.01),
    "dual+temperature": dict(dual_clip=3.0, temperature=0.8),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("preset", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_one_pass_equals_two_pass(preset, variant, backend):
    config = PolicyLossConfig.preset(preset, **VARIANTS[variant])
    batch = make_batch(seed=zlib.crc32(f"{preset}-{variant}".encode()) % 1000, per_token_adv=variant == "plain")
    opts = dict(backend=backend, logit_softcap=5.0 if variant == "kl+entropy" else None)
    one = run(batch, config, True, token_chunk=4, **opts)  # 4 chunks of <= 4 tokens (15 tokens)
    two = run(batch, config, False, **opts)
    assert_same(one, two, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_one_pass_16_bit(dtype):
    """16-bit inputs on the Triton path: the one-pass workspace keeps s - m_tile in bf16 and dz in bf16;
    loss and metrics as the two-pass form to fp32 precision, gradients to the 16-bit tolerance."""
    batch = make_batch(dtype, seed=3)
    config = PolicyLossConfig.preset("dapo", beta=0.04)
    one = run(batch, config, True, backend="triton", token_chunk=8)
    two = run(batch, config, False, backend="triton")
    assert_close(one[0], two[0], 1e-5, "loss")
    for k in one[1]:
        assert_close(one[1][k], two[1][k], 1e-5, k)
    for k in one[2]:
        assert one[2][k].dtype == dtype
        got, expected = (one[2][k].T, two[2][k].T) if k == "weight" else (one[2][k], two[2][k])
        assert_close(got, expected, 1e-2, f"d_{k}", rowwise=k != "bias")


def test_on_policy_and_partial_requires_grad():
    """old_logprobs=None (ratio 1) and only the weight needing a gradient."""
    batch = make_batch(seed=5)
    batch["old_logprobs"] = None
    for backend in ("torch", "triton"):
        results = []
        for one_pass in (True, False):
            w = batch["weight"].clone().requires_grad_(True)
            loss, _ = policy_loss(**{**batch, "weight": w}, config="grpo", one_pass=one_pass, backend=backend)
            loss.backward()
            results.append((loss.detach(), w.grad))
        assert_close(results[0][0], results[1][0], 1e-5, "loss")
        assert_close(results[0][1].T, results[1][1].T, 1e-5, "d_weight", rowwise=True)


@pytest.mark.parametrize("config", [PolicyLossConfig.preset("gspo"), PolicyLossConfig(top_entropy_quantile=0.5)],
                         ids=["gspo", "entropy-mask"])
def test_sequence_ratio_and_entropy_mask_fall_back(monkeypatch, config):
    """Configurations whose token gradients need every token: auto uses two passes, one_pass=True refuses."""
    batch = make_batch(seed=7)
    calls = []
    original = policy_onepass.OnePassLinearGradients.apply
    monkeypatch.setattr(policy_onepass.OnePassLinearGradients, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    auto = run(batch, config, None, backend="torch")
    assert not calls
    assert_same(auto, run(batch, config, False, backend="torch"), 0.0)
    with pytest.raises(ValueError, match="one_pass=True needs"):
        run(batch, config, True, backend="torch")


def test_auto_uses_one_pass_when_allowed(monkeypatch):
    batch = make_batch(seed=9)
    calls = []
    original = policy_onepass.OnePassLinearGradients.apply
    monkeypatch.setattr(policy_onepass.OnePassLinearGradients, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    run(batch, "dapo", None, backend="torch")
    assert calls == [1]
    with torch.no_grad():  # no gradient needed: the plain forward
        policy_loss(**batch, config="dapo", backend="torch")
    assert calls == [1]


def test_bad_one_pass_arguments():
    batch = make_batch(seed=11)
    with pytest.raises(TypeError, match="one_pass must be"):
        policy_loss(**batch, config="dapo", one_pass="yes")
    with pytest.raises(ValueError, match="token_chunk"):
        policy_loss(**batch, config="dapo", one_pass=True, token_chunk=0)
    logits = torch.randn(B, T, V)
    plain = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "bias")}
    with pytest.raises(ValueError, match="hidden-state path"):
        policy_loss(**plain, logits=logits, config="dapo", one_pass=True)


def test_an_explicit_form_refuses_the_other_forms_chunk_argument():
    """one_pass=False with token_chunk, or one_pass=True with vocab_chunk, is refused by name (with
    one_pass=None the argument of the form not taken is unused)."""
    batch = make_batch()
    with pytest.raises(ValueError, match="token_chunk"):
        policy_loss(**batch, config="dapo", one_pass=False, token_chunk=4, backend="torch")
    with pytest.raises(ValueError, match="vocab_chunk"):
        policy_loss(**batch, config="dapo", one_pass=True, vocab_chunk=128, backend="torch")
    loss, _ = policy_loss(**batch, config="gspo", one_pass=None, token_chunk=4, backend="torch")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("one_pass", [True, False])
def test_narrow_target_dtype_is_widened(one_pass):
    """uint8 targets: the masked fill with ignore_index = -100 happens after widening (no wrap to 156,
    which would be a real class), on both forms."""
    batch = make_batch(seed=13)
    narrow = {**batch, "targets": batch["targets"].to(torch.uint8)}
    a = run(batch, "dapo", one_pass, backend="torch")
    b = run(narrow, "dapo", one_pass, backend="torch")
    assert_same(a, b, 0.0)


# ---------------------------------------------------------------- several token chunks (the default at large N)
def test_default_token_chunk_from_the_workspace_budget():
    """The largest multiple of 128 with n V e_g <= ONEPASS_WORKSPACE_BYTES, at least 128, at most N."""
    budget = policy_onepass.ONEPASS_WORKSPACE_BYTES
    assert budget == 256 * 2**20
    for n_rows, v, e in ((8192, 131072, 2), (32768, 152064, 2), (32768, 152064, 4), (10**6, 50257, 2)):
        n = policy_onepass.default_token_chunk(n_rows, v, e)
        assert n % 128 == 0 and n * v * e <= budget < (n + 128) * v * e
    assert policy_onepass.default_token_chunk(8192, 131072, 2) == 1024  # 8 chunks at the shape
    assert policy_onepass.default_token_chunk(32768, 152064, 2) == 768
    assert policy_onepass.default_token_chunk(100, 131072, 2) == 100  # N small: one chunk
    assert policy_onepass.default_token_chunk(10**6, 2**22, 4) == 128  # at least 128 rows
    assert policy_onepass.default_token_chunk(0, 100, 2) == 1


def oracle_batch(dtype, seed):
    """Odd sizes (B=3, T=7: 21 tokens, D=24, V=333), masked tokens, per-token advantages."""
    g = torch.Generator().manual_seed(seed)
    b, t, d, v = 3, 7, 24, 333
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2.0 / d**0.5).to(dtype)
    bias = (0.5 * torch.randn(v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    with torch.no_grad():
        z = hidden.double() @ weight.double().T + bias.double()
        logp = torch.log_softmax(z / 0.7, -1).gather(-1, targets[..., None])[..., 0].float()
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask,
                advantages=torch.randn(b, t, generator=g), old_logprobs=logp + 0.3 * torch.randn(b, t, generator=g),
                ref_logprobs=logp + 0.2 * torch.randn(b, t, generator=g))


ORACLE_CONFIG = dict(beta=0.04, entropy_coef=0.01, temperature=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_several_chunks_match_the_float64_oracle_and_two_passes(dtype):
    """Token chunks of 5 rows (T = 7: 6 chunks of 5 and 2 tokens), temperature 0.7, masked tokens, KL and
    entropy terms, Triton path: loss and metrics against the float64 oracle to fp32 precision (they come
    from fp32 statistics), gradients within 1e-5 (fp32) / 1e-2 (16-bit: dW rounded once per chunk);
    and against the two-pass loss."""
    from oracle import TOL
    from test_policy_loss import check, check_grad, check_loss, ref_loss, ref_token_stats

    batch = oracle_batch(dtype, seed=41)
    config = PolicyLossConfig.preset("dapo", **ORACLE_CONFIG)
    one = run(batch, config, True, backend="triton", token_chunk=5)
    two = run(batch, config, False, backend="triton")
    refs = {k: batch[k].double().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    z = refs["hidden"] @ refs["weight"].T + refs["bias"]
    logp, H = ref_token_stats(z, batch["targets"], batch["mask"], config.temperature)
    ref_l, ref_m, magnitude = ref_loss(logp, H, batch["mask"], batch["advantages"], batch["old_logprobs"],
                                       batch["ref_logprobs"], config)
    ref_l.backward()
    tol = TOL[dtype]
    check_loss(one[0], ref_l, magnitude, tol["fwd"])
    assert set(one[1]) == set(ref_m)
    for k in ref_m:
        check(one[1][k], ref_m[k], tol["fwd"], f"metrics[{k!r}]")
    for k, ref in refs.items():
        assert one[2][k].dtype == dtype
        check_grad(one[2][k], ref.grad, tol["grad"], f"d loss / d {k}")
    assert_close(one[0], two[0], 1e-5, "loss vs two-pass")
    for k in two[1]:
        assert_close(one[1][k], two[1][k], 1e-5, f"{k} vs two-pass")
    for k in two[2]:
        check_grad(one[2][k], two[2][k], tol["grad"], f"d {k} vs two-pass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_several_chunks_are_bitwise_reproducible(dtype):
    """Two runs with 6 token chunks: the same bits for the loss, the metrics and every gradient."""
    batch = oracle_batch(dtype, seed=43)
    config = PolicyLossConfig.preset("grpo", **ORACLE_CONFIG)
    first, second = (run(batch, config, True, backend="triton", token_chunk=5) for _ in range(2))
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    assert all(torch.equal(first[2][k], second[2][k]) for k in first[2])


def traced_one_pass(monkeypatch, dtype, n_rows=97, d=32, v=300, chunk=40):
    """Run the one-pass form (Triton path, bias, chunks of ``chunk`` rows: 40, 40, 17) with every
    ``torch.empty`` / ``torch.zeros`` traced; returns ``(per-chunk allocation lists, the rest, n_rows, d, v)``."""
    from entropy_ops import linear_triton
    from entropy_ops.linear_ops import linear_op_params
    from test_linear_determinism import trace_allocations

    g = torch.Generator().manual_seed(47)
    hidden = torch.randn(n_rows, d, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n_rows,), generator=g)
    targets[::5] = -100
    up = torch.randn(2, n_rows, generator=g)
    op = linear_op_params(hidden, weight, bias, targets, temperature=0.8, ignore_index=-100, logit_softcap=None,
                          allow_tf32=False, backend="triton")
    sizes = trace_allocations(monkeypatch)
    spans, original = [], linear_triton.onepass_chunk

    def marked(*args, **kwargs):
        start = len(sizes)
        out = original(*args, **kwargs)
        spans.append((start, len(sizes)))
        return out

    monkeypatch.setattr(linear_triton, "onepass_chunk", marked)
    anchor, _, _ = policy_onepass.OnePassLinearGradients.apply(
        hidden, weight, bias, targets, lambda r0, r1, lp, h: (up[0, r0:r1], up[1, r0:r1]),
        policy_onepass.OnePassParams(op, chunk))
    anchor.backward()
    monkeypatch.undo()
    per_chunk = [sizes[a:b] for a, b in spans]
    inside = {i for a, b in spans for i in range(a, b)}
    rest = [s for i, s in enumerate(sizes) if i not in inside]
    assert [h.grad.dtype for h in (hidden, weight)] == [dtype, dtype] and torch.isfinite(weight.grad).all()
    return per_chunk, rest, n_rows, d, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_chunk_buffers_follow_the_memory_formula(monkeypatch, dtype):
    """Each token chunk's buffers (traced torch.empty / torch.zeros; O(n) vectors and [3, n] statistics left
    out) add up to policy_onepass.onepass_peak_bytes at that chunk's rows; outside the chunks only the
    gradients themselves and O(N) statistics are allocated; the formula at the issue's two shapes."""
    if dtype == torch.bfloat16:
        assert round(policy_onepass.onepass_peak_bytes(8192, 4096, 131072, dtype) / 1e6) == 289
        assert round(policy_onepass.onepass_peak_bytes(32768, 3584, 152064, dtype) / 1e6) == 250
    per_chunk, rest, n_rows, d, v = traced_one_pass(monkeypatch, dtype)
    rows = [40, 40, 17]
    assert len(per_chunk) == len(rows)
    for n, allocs in zip(rows, per_chunk):
        big = [a for a in allocs if len(a.shape) >= 2 and a.shape != (3, n)]
        expected = policy_onepass.onepass_peak_bytes(n, d, v, dtype, bias=True)
        assert sum(a.nbytes for a in big) == expected, big
    assert policy_onepass.onepass_peak_bytes(n_rows, d, v, dtype, token_chunk=40, bias=True) == \
        policy_onepass.onepass_peak_bytes(40, d, v, dtype, bias=True)
    outside = sorted((a.shape, a.dtype) for a in rest if len(a.shape) >= 2 and a.shape != (3, n_rows))
    assert outside == sorted([((n_rows, d), dtype), ((v, d), dtype)])  # d hidden, d weight: the gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_several_chunks_hold_no_full_logits_nor_fp32_weight_buffer(monkeypatch, dtype):
    """With 3 token chunks nothing allocates N V elements (the logits) or V D 4 bytes (an fp32 [V, D]), the
    fp32 weight's own gradient excepted (it is the accumulator)."""
    per_chunk, rest, n_rows, d, v = traced_one_pass(monkeypatch, dtype)
    allocs = [a for chunk in per_chunk for a in chunk] + rest
    assert not [a for a in allocs if a.nbytes // a.dtype.itemsize == n_rows * v]
    fp32_w = [a for a in allocs if a.nbytes == v * d * 4]
    assert fp32_w == ([] if dtype != torch.float32 else [a for a in rest if a.shape == (v, d)])


def test_performance_model_follows_the_default_chunks():
    """benchmarks.perf_linear models the one-pass loss in the library's default token chunks: at N=8192,
    D=4096, V=131072 bf16, 8 chunks of 1024 rows; the first writes dW, each later one reads and writes the
    bf16 [V, D] (2 V D e bytes); every chunk reads all of W twice (forward tiles, dh) and pays its launches."""
    from benchmarks.gpus import GPUS
    from benchmarks.perf_linear import ONEPASS_SMALL_LAUNCHES, SMALL_LAUNCH_S, one_pass_pieces
    from benchmarks.shapes import Shape

    n, v, d, e = 8192, 131072, 4096, 2
    pieces = one_pass_pieces(Shape(n, v, d), "bf16", GPUS["H100"], [])
    by_kind = lambda key: [p for p in pieces if p.name.startswith(key)]  # noqa: E731
    dw = by_kind("dW (+)=")
    assert [p.name.split("[")[1] for p in dw] == ["first chunk of 1024]", "7 chunks of 1024]"]
    assert sum(p.hbm_bytes for p in dw) == n * v * e + n * d * e + v * d * e + 7 * 2 * v * d * e
    assert sum(p.hbm_bytes for p in by_kind("dh_c")) == n * v * e + 8 * v * d * e + n * d * e
    assert sum(p.flops for p in pieces) == 6 * n * d * v
    launches = sum(p.time_s for p in by_kind("small launches"))
    assert launches == pytest.approx(8 * ONEPASS_SMALL_LAUNCHES * SMALL_LAUNCH_S)
    one = one_pass_pieces(Shape(n, v, d), "bf16", GPUS["H100"], [], token_chunk=n)
    assert len(one) == 5 and sum(p.time_s for p in one) < sum(p.time_s for p in pieces)


# Dispatcher-level ops that launch no GPU kernel (views, allocations, metadata).
_NO_LAUNCH = {"empty.memory_format", "empty_strided.default", "view.default", "_unsafe_view.default",
              "as_strided.default", "detach.default", "t.default", "transpose.int", "expand.default", "slice.Tensor",
              "select.int", "unsqueeze.default", "squeeze.dim", "alias.default", "permute.default",
              "lift_fresh.default", "_reshape_alias.default", "unbind.int", "empty_like.default", "new_empty.default",
              "new_empty_strided.default", "sym_size.int", "sym_stride.int"}


def _launches(monkeypatch, config, chunk, with_ref):
    """Kernel launches of one one-pass ``policy_loss`` call on the Triton path: every Triton launch and every
    gradient matmul counts 1 (what runs inside them is not counted), every other op at the dispatcher level
    counts 1 unless it is a view or an allocation (a conservative count of a CUDA run's launches: a Python
    scalar's ``scalar_tensor`` launches nothing on CUDA)."""
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    from entropy_ops import linear_triton

    count, inside = [0], [0]

    def counted(fn):
        def run(*args, **kwargs):
            count[0] += 1
            inside[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside[0] -= 1
        return run

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0] and str(func).removeprefix("aten.") not in _NO_LAUNCH:
                count[0] += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted(interpreter.GridExecutor.__call__))
    monkeypatch.setattr(linear_triton, "matmul_into", counted(linear_triton.matmul_into))
    batch = make_batch(torch.bfloat16, seed=11)
    if not with_ref:
        batch["ref_logprobs"] = None
    leaves = {k: batch[k].requires_grad_(True) for k in ("hidden", "weight", "bias")}
    with Ops():
        policy_loss(**{**batch, **leaves, "bias": None}, config=config, one_pass=True, backend="triton",
                    token_chunk=chunk)
    return count[0]


def test_small_launches_per_chunk_are_the_models():
    """The performance model charges ONEPASS_SMALL_LAUNCHES small launches per token chunk besides the chunk's
    four large pieces (forward tiles, dz kernel, two matmuls): it is the count measured here for the GRPO
    preset (one chunk of 15 rows against three of 5), within 3; KL, entropy bonus and dual clip add more."""
    from benchmarks.perf_linear import ONEPASS_SMALL_LAUNCHES

    mp = pytest.MonkeyPatch()
    try:
        per_chunk = (_launches(mp, "grpo", T, False) - _launches(mp, "grpo", B * T, False)) / (B - 1)
        heavy_cfg = PolicyLossConfig(beta=0.04, entropy_coef=0.01, dual_clip=3.0)
        heavy = (_launches(mp, heavy_cfg, T, True) - _launches(mp, heavy_cfg, B * T, True)) / (B - 1)
    finally:
        mp.undo()
    small = per_chunk - 4
    assert small == int(small) and ONEPASS_SMALL_LAUNCHES - 3 <= small <= ONEPASS_SMALL_LAUNCHES, (small, heavy - 4)
    assert heavy - 4 > small
