"""Token chunking: both helpers against the float64 oracle and the unchunked ops (values and gradients),
and the measured peak memory of the callable form (it follows the chunk size, not the token count)."""
import sys
import zlib

import pytest
import torch

from entropy_ops import linear_logprobs_and_entropy, token_logprobs_and_entropy
from entropy_ops.token_chunking import chunked_linear_logprobs_and_entropy, chunked_logprobs_and_entropy, token_chunks
from memory_utils import peak_extra_bytes
from oracle import TOL, assert_close, logprobs_entropy_reference

IGNORE = -100


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def make_inputs(B, T, D, V, dtype, seed, *, bias=True):
    """``hidden [B, T, D]`` as a non-flattenable view, a lm_head with logits of spread ~3, some ignored targets."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T + 1, D, generator=g).to(dtype)[:, 1:]
    weight = (torch.randn(V, D, generator=g) * 3.0 / D**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.25] = IGNORE
    targets[0, 0] = 1
    g_logp, g_H = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return hidden, weight, b, targets, g_logp, g_H


def run(fn, tensors, needs, g_logp, g_H, **kwargs):
    """``fn(*leaves, **kwargs)`` then backward of ``sum(g_logp logp + g_H H)``; ``(logp, H, grads)``."""
    leaves = [None if x is None else x.detach().requires_grad_(n) for x, n in zip(tensors, needs)]
    logp, H = fn(*leaves, **kwargs)
    loss = (H * g_H).sum() if g_logp is None else (logp * g_logp).sum() + (H * g_H).sum()
    loss.backward()
    return logp, H, [x.grad if x is not None and x.requires_grad else None for x in leaves]


def reference(hidden, weight, bias, targets, temperature, softcap):
    z = hidden @ weight.T + (0 if bias is None else bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return logprobs_entropy_reference(z, targets, temperature, IGNORE)


def compare(got, want, dtype, what, fwd_tol=None):
    (logp, H, grads), (r_logp, r_H, r_grads) = got, want
    tol = TOL[dtype]
    assert_close(logp, r_logp, fwd_tol or tol["fwd"], f"logp ({what})")
    assert_close(H, r_H, fwd_tol or tol["fwd"], f"H ({what})")
    for name, a, b in zip(("d hidden", "d weight", "d bias"), grads, r_grads):
        assert (a is None) == (b is None), name
        if a is not None:
            a, b = (a.T, b.T) if name == "d weight" else (a, b)  # dW: relative to each column's largest entry
            assert_close(a, b, tol["grad"], f"{name} ({what})", rowwise=True)


# ---------------------------------------------------------------- hidden-state form
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 13, 24])  # T = 9: pieces of a sequence (1, 5), one (13), two (24)
def test_chunked_linear_equals_unchunked_and_oracle(dtype, chunk):
    B, T, D, V = 3, 9, 24, 70
    hidden, weight, b, targets, g_logp, g_H = make_inputs(B, T, D, V, dtype, seed_of("linear", dtype, chunk))
    opts = dict(temperature=0.8, logit_softcap=4.0, ignore_index=IGNORE, backend="torch")
    needs = (True, True, True)

    def chunked(h, w, bb):
        return chunked_linear_logprobs_and_entropy(h, w, targets, bias=bb, token_chunk_size=chunk, **opts)

    def plain(h, w, bb):
        return linear_logprobs_and_entropy(h, w, targets, bias=bb, **opts)

    def oracle(h, w, bb):
        return reference(h, w, bb, targets, 0.8, 4.0)

    got = run(chunked, (hidden, weight, b), needs, g_logp, g_H)
    assert got[2][0].shape == hidden.shape and got[2][0].dtype == dtype
    compare(got, run(plain, (hidden, weight, b), needs, g_logp, g_H), dtype, "vs unchunked", TOL[torch.float32]["fwd"])
    compare(got, run(oracle, (hidden.double(), weight.double(), b.double()), needs, g_logp, g_H), dtype, "vs oracle")
    assert bool((got[2][0][targets == IGNORE] == 0).all()), "ignored rows must get a zero d hidden"


@pytest.mark.parametrize("needs", [(False, True, False), (True, False, False)])
def test_chunked_linear_partial_grads_entropy_only_no_bias(needs):
    hidden, weight, _, targets, _, g_H = make_inputs(2, 11, 16, 33, torch.float32, seed_of("partial", needs))
    opts = dict(temperature=1.3, ignore_index=IGNORE, backend="torch")
    got = run(lambda h, w, bb: chunked_linear_logprobs_and_entropy(h, w, targets, token_chunk_size=4, **opts),
              (hidden, weight, None), needs, None, g_H)
    want = run(lambda h, w, bb: reference(h, w, None, targets, 1.3, None), (hidden.double(), weight.double(), None),
               needs, None, g_H)
    compare(got, want, torch.float32, "vs oracle")


def test_chunked_linear_triton_interpreter():
    hidden, weight, b, targets, g_logp, g_H = make_inputs(2, 5, 16, 40, torch.float32, seed_of("triton"))
    opts = dict(temperature=0.7, logit_softcap=3.0, ignore_index=IGNORE, backend="triton")
    got = run(lambda h, w, bb: chunked_linear_logprobs_and_entropy(h, w, targets, bias=bb, token_chunk_size=3, **opts),
              (hidden, weight, b), (True, True, True), g_logp, g_H)
    want = run(lambda h, w, bb: reference(h, w, bb, targets, 0.7, 3.0), (hidden.double(), weight.double(), b.double()),
               (True, True, True), g_logp, g_H)
    compare(got, want, torch.float32, "triton vs oracle")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_chunked_linear_triton_interpreter_blocks_and_ignore_minus_one(dtype):
    """Triton path in bf16: the fp32 dW is split into vocab blocks (several launches per chunk with shifted
    targets; ``ignore_index=-1``, so ids elsewhere become -2), dh cast per chunk; fp32: dh added in place."""
    from entropy_ops.token_chunking import _dw_block_rows

    B, T, D, V, chunk = 2, 5, 16, 40, 3
    rows = _dw_block_rows(V, chunk, 2)
    assert -(-V // rows) >= 3  # bf16: three or more dW blocks
    hidden, weight, b, targets, g_logp, g_H = make_inputs(B, T, D, V, dtype, seed_of("triton-blocks", dtype))
    targets[targets == IGNORE] = -1
    targets[0, 1], targets[1, 2], targets[1, 3] = rows - 1, rows, 2 * rows - 1  # ids next to block edges: y - v0 = -1
    opts = dict(temperature=0.9, logit_softcap=5.0, ignore_index=-1, backend="triton")
    needs = (True, True, True)
    got = run(lambda h, w, bb: chunked_linear_logprobs_and_entropy(h, w, targets, bias=bb, token_chunk_size=chunk,
                                                                   **opts), (hidden, weight, b), needs, g_logp, g_H)
    assert [x.dtype for x in got[2]] == [dtype] * 3
    plain = run(lambda h, w, bb: linear_logprobs_and_entropy(h, w, targets, bias=bb, **opts),
                (hidden, weight, b), needs, g_logp, g_H)
    compare(got, plain, dtype, "triton vs unchunked triton", TOL[torch.float32]["fwd"])
    ref_targets = torch.where(targets == -1, IGNORE, targets)
    want = run(lambda h, w, bb: reference(h, w, bb, ref_targets, 0.9, 5.0),
               (hidden.double(), weight.double(), b.double()), needs, g_logp, g_H)
    compare(got, want, dtype, "triton vs oracle")
    assert bool((got[2][0][targets == -1] == 0).all()), "ignored rows must get a zero d hidden"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_linear_weight_grad_in_weight_dtype(backend, dtype):
    """``fp32_weight_grad=False``: each chunk's dW is rounded into the 16-bit gradient: within the 16-bit
    tolerance of the float64 oracle, deterministic, and (Triton path) never an fp32 [V, D] buffer."""
    B, T, D, V, chunk = 2, 6, 16, 40, 4  # three chunks
    hidden, weight, b, targets, g_logp, g_H = make_inputs(B, T, D, V, dtype, seed_of("w-dtype", backend, dtype))
    opts = dict(temperature=0.9, logit_softcap=5.0, ignore_index=IGNORE, backend=backend)
    needs = (True, True, True)

    def chunked(h, w, bb):
        return chunked_linear_logprobs_and_entropy(h, w, targets, bias=bb, token_chunk_size=chunk,
                                                   fp32_weight_grad=False, **opts)

    fp32_sized = []  # fp32 [V, D] buffers made by torch.zeros / torch.empty during forward + backward
    real = {name: getattr(torch, name) for name in ("zeros", "empty")}

    def watching(name):
        def factory(*shape, dtype=None, **kw):
            dims = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
            if dtype == torch.float32 and dims == (V, D):
                fp32_sized.append((name, dims))
            return real[name](*shape, dtype=dtype, **kw)
        return factory

    for name in real:
        setattr(torch, name, watching(name))
    try:
        got = run(chunked, (hidden, weight, b), needs, g_logp, g_H)
    finally:
        for name, fn in real.items():
            setattr(torch, name, fn)
    if backend == "triton":  # (the CPU path's fp32 vocab blocks are bounded by CPU_BLOCK_ELEMENTS, here all of V)
        assert not fp32_sized, f"an fp32 [V, D] accumulator was allocated: {fp32_sized}"
    assert [x.dtype for x in got[2]] == [dtype] * 3
    want = run(lambda h, w, bb: reference(h, w, bb, targets, 0.9, 5.0),
               (hidden.double(), weight.double(), b.double()), needs, g_logp, g_H)
    compare(got, want, dtype, "weight-dtype dW vs oracle")
    again = run(chunked, (hidden, weight, b), needs, g_logp, g_H)
    assert torch.equal(got[2][1], again[2][1]) and torch.equal(got[2][0], again[2][0])


def test_chunked_linear_fp32_weight_grad_must_be_bool():
    hidden, weight, _, targets, _, _ = make_inputs(1, 4, 8, 10, torch.float32, 0)
    with pytest.raises(TypeError, match="fp32_weight_grad"):
        chunked_linear_logprobs_and_entropy(hidden, weight, targets, token_chunk_size=2, fp32_weight_grad="no")


def test_chunked_linear_fp64_torch_in_place_dh():
    """fp64 on the CPU path: dh, dW, db accumulate in fp64 (dh straight into the gradient), to 1e-10."""
    hidden, weight, b, targets, g_logp, g_H = make_inputs(3, 7, 12, 29, torch.float64, seed_of("fp64"))
    opts = dict(temperature=1.2, ignore_index=IGNORE, backend="torch")
    needs = (True, True, True)
    got = run(lambda h, w, bb: chunked_linear_logprobs_and_entropy(h, w, targets, bias=bb, token_chunk_size=4,
                                                                   **opts), (hidden, weight, b), needs, g_logp, g_H)
    assert got[0].dtype == torch.float64 and [x.dtype for x in got[2]] == [torch.float64] * 3
    want = run(lambda h, w, bb: reference(h, w, bb, targets, 1.2, None), (hidden, weight, b), needs, g_logp, g_H)
    compare(got, want, torch.float64, "fp64 vs oracle")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_backward_adds_into_caller_buffers(backend):
    """``linear_backward(..., dh_out=, dw_out=, db_out=)`` adds the launch's gradients to what the buffers
    hold and returns those very buffers (no fresh [V, D]); wrong buffers raise, naming the argument."""
    from entropy_ops.linear_ops import LinearOpParams, linear_backward, linear_forward

    hidden, weight, b, targets, g_logp, g_H = make_inputs(1, 9, 16, 37, torch.float32, seed_of("out", backend))
    h2d, flat = hidden.reshape(-1, 16), targets.reshape(-1)
    params = LinearOpParams(temperature=0.8, ignore_index=IGNORE, backend=backend, logit_softcap=3.0)
    _, _, stats = linear_forward(h2d, weight, b, flat, params)
    args = (h2d, weight, b, flat, stats, g_logp.reshape(-1), g_H.reshape(-1), params, (True, True, True))
    fresh = linear_backward(*args)
    g = torch.Generator().manual_seed(seed_of("prefill", backend))
    before = [torch.randn(x.shape, generator=g) for x in fresh]
    outs = [x.clone() for x in before]
    got = linear_backward(*args, dh_out=outs[0], dw_out=outs[1], db_out=outs[2])
    for name, ret, out, pre, new in zip(("dh", "dW", "db"), got, outs, before, fresh):
        assert ret is out, f"{name}: the caller's buffer must be returned"
        assert_close(out - pre, new, 1e-5, f"{name} added", rowwise=out.dim() == 2)
        assert float(new.abs().max()) > 0.0
    with pytest.raises(TypeError, match="dw_out must have dtype torch.float32"):
        linear_backward(*args, dw_out=torch.zeros(37, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"db_out must have shape \(37,\)"):
        linear_backward(*args, db_out=torch.zeros(36))
    if backend == "triton":
        with pytest.raises(ValueError, match="dh_out must be contiguous"):
            linear_backward(*args, dh_out=torch.zeros(16, 9).t())


def test_token_chunks_cover_rows_once():
    x = torch.arange(4 * 7).view(4, 7, 1)
    for size in (1, 3, 7, 10, 15, 100):
        seen = []
        for r0, r1, index in token_chunks(x, size):
            rows = x[index].reshape(-1)
            assert 0 < r1 - r0 <= size and rows.tolist() == list(range(r0, r1))
            seen.extend(rows.tolist())
        assert seen == list(range(28))


# ---------------------------------------------------------------- logits from a callable
@pytest.mark.parametrize("dtype, inplace", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_callable_equals_unchunked_and_oracle(dtype, inplace):
    B, T, D, V = 2, 13, 16, 57
    hidden, weight, b, targets, g_logp, g_H = make_inputs(B, T, D, V, dtype, seed_of("callable", dtype, inplace))

    def head(h, w, bb):  # a non-plain head: soft-cap, and a final multiply (safe with inplace_backward)
        return torch.tanh((h @ w.T + bb) / 5.0) * 5.0

    def chunked(h, w, bb):
        flat = h.reshape(-1, D)  # a copy of the view: gradients still reach h
        return chunked_logprobs_and_entropy(lambda s, e: head(flat[s:e], w, bb), targets, token_chunk_size=6,
                                            temperature=0.9, ignore_index=IGNORE, inplace_backward=inplace,
                                            backend="torch")

    def plain(h, w, bb):
        return token_logprobs_and_entropy(head(h, w, bb), targets, temperature=0.9, ignore_index=IGNORE,
                                          backend="torch")

    def oracle(h, w, bb):
        return logprobs_entropy_reference(head(h, w, bb), targets, 0.9, IGNORE)

    needs = (True, True, True)
    got = run(chunked, (hidden, weight, b), needs, g_logp, g_H)
    assert got[0].shape == targets.shape and got[0].dtype == torch.float32
    compare(got, run(plain, (hidden, weight, b), needs, g_logp, g_H), dtype, "vs unchunked", TOL[torch.float32]["fwd"])
    if dtype == torch.float32:  # in bf16 the head itself (autograd's, not ours) rounds: unchunked is the yardstick
        compare(got, run(oracle, (hidden.double(), weight.double(), b.double()), needs, g_logp, g_H), dtype,
                "vs oracle")


def test_callable_without_grad_and_chunk_larger_than_n():
    g = torch.Generator().manual_seed(seed_of("nograd"))
    logits = torch.randn(10, 31, generator=g)
    targets = torch.randint(0, 31, (10,), generator=g)
    want = token_logprobs_and_entropy(logits, targets)
    with torch.no_grad():
        got = chunked_logprobs_and_entropy(lambda s, e: logits[s:e], targets, token_chunk_size=4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)  # same kernel per row: bitwise equal
    got = chunked_logprobs_and_entropy(lambda s, e: logits[s:e], targets, token_chunk_size=100)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_arguments():
    logits, targets = torch.randn(6, 9), torch.zeros(6, dtype=torch.int64)
    for size, exc in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="token_chunk_size"):
            chunked_logprobs_and_entropy(lambda s, e: logits[s:e], targets, token_chunk_size=size)
        with pytest.raises(exc, match="token_chunk_size"):
            chunked_linear_logprobs_and_entropy(torch.randn(6, 4), torch.randn(9, 4), targets, token_chunk_size=size)
    with pytest.raises(TypeError, match="logits_fn must be callable"):
        chunked_logprobs_and_entropy(logits, targets, token_chunk_size=2)
    with pytest.raises(ValueError, match=r"must return a \[2, V\] tensor"):
        chunked_logprobs_and_entropy(lambda s, e: logits, targets, token_chunk_size=2)
    with pytest.raises(ValueError, match="earlier chunks V = 9"):
        chunked_logprobs_and_entropy(lambda s, e: logits[s:e, : 9 - s // 2], targets, token_chunk_size=2)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 9\)"):
        chunked_linear_logprobs_and_entropy(torch.randn(6, 4), torch.randn(9, 4), targets + 9, token_chunk_size=2)


# ---------------------------------------------------------------- memory of the callable form
D_MEM, V_MEM = 32, 8000
SETUP = """
from entropy_ops.token_chunking import chunked_logprobs_and_entropy
g = torch.Generator().manual_seed(0)
hidden = torch.randn({N}, {D}, generator=g).requires_grad_(True)
weight = (torch.randn({V}, {D}, generator=g) * 0.3).requires_grad_(True)
targets = torch.randint(0, {V}, ({N},), generator=g)
# warm-up outside the measurement: the first non-reentrant checkpoint imports torch._dynamo (~150 MB of
# code, once per process), and BLAS/autograd allocate their workspaces
_h = torch.randn(8, {D}, requires_grad=True)
chunked_logprobs_and_entropy(lambda s, e: _h[s:e] @ weight.t(), targets[:8], token_chunk_size=4)[0].sum().backward()
weight.grad = None
del _h
"""
CODE = """
logp, H = chunked_logprobs_and_entropy(lambda s, e: hidden[s:e] @ weight.t(), targets, token_chunk_size={n})
(logp.sum() + 0.1 * H.sum()).backward()
"""
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # every block above 64 KiB is its own mapping, unmapped when freed


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
def test_callable_peak_memory_follows_chunk_size_not_tokens():
    def peak(N, n):
        return peak_extra_bytes(SETUP.format(N=N, D=D_MEM, V=V_MEM), CODE.format(n=n), ENV)

    small, long, wide = peak(2048, 256), peak(8192, 256), peak(8192, 1024)
    print(f"peak extra: N=2048 n=256 {small / 2**20:.1f} MiB, N=8192 n=256 {long / 2**20:.1f} MiB, "
          f"N=8192 n=1024 {wide / 2**20:.1f} MiB; all logits at N=8192: {8192 * V_MEM * 4 / 2**20:.0f} MiB")
    # 4x the tokens: only the O(N D) hidden gradient (+ autograd's zero-padded slice gradient) and O(N) outputs grow
    assert long - small <= 2 * (8192 - 2048) * D_MEM * 4 + 16 * 8192 + 2**20
    # 4x the chunk: the chunk's logits and their gradient, 2 n V 4 bytes, grow with it
    assert wide - long >= 0.9 * 2 * (1024 - 256) * V_MEM * 4
    # and the whole peak stays within the docstring's formula, plus the fused op's own CPU working set
    # (two fp32 blocks of token_ops.CPU_BLOCK_ELEMENTS) and 4 MiB of allocator slack
    from entropy_ops.token_ops import CPU_BLOCK_ELEMENTS
    budget = (2 * 256 * V_MEM * 4 + 2 * V_MEM * D_MEM * 4 + 2 * 8192 * D_MEM * 4 + 8 * 8192
              + 2 * CPU_BLOCK_ELEMENTS * 4 + 4 * 2**20)
    assert long <= budget
