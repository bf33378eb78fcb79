"""Per-token log-prob and entropy from hidden states and the lm_head, fused: ``linear_logprobs_and_entropy``.

Math (``h [N, D]``, ``W [V, D]``, ``b [V]``, optional soft-cap ``c``, temperature ``tau``, target ``y``)::

    z = h W^T + b,   z <- c tanh(z / c)  (soft-cap),   s = z / tau
    logp = s_y - logsumexp(s),   H = logsumexp(s) - sum_i p_i s_i
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau * (1 - tanh^2(z_raw_i / c))
    dh = dz W,   dW = dz^T h,   db = sum over tokens of dz

Equals ``token_logprobs_and_entropy(hidden @ weight.T + bias, targets, ...)`` (docs/math.md
section 1, "From hidden states") without ever holding the ``[N, V]`` logits or their gradient.
The CUDA path (``linear_triton``) walks the vocabulary in chunks of ``Vc`` columns: forward, large
matmul tiles with a statistics epilogue; backward, a kernel that recomputes each chunk's logits and
writes ``dz`` into an ``[N, Vc]`` buffer, then ``dW[chunk] = dz^T h`` (written once, weight dtype) and
``dh += dz W[chunk]`` (fp32) as two matmuls. No atomics: gradients are bitwise reproducible. Its
memory formula is in ``linear_triton``'s docstring. The CPU path walks ``[n, v]`` blocks of at most
``CPU_BLOCK_ELEMENTS`` fp32 elements: vocab chunks outside, token chunks inside, merging per-chunk
``(m, S, T)`` with ``softmax_stats.merge_stats``; backward recomputes each block,
``dh += dz W_chunk`` and ``dW_chunk += dz^T h_chunk`` (a fixed order: deterministic). Forward saves
``(m, log S, H)`` per row, fp32. The backward launches add into caller-provided accumulators
(``dh_out``, ``dw_out``, ``db_out``) when given instead of fresh buffers, so a caller that runs them
chunk by chunk (``token_chunking``) holds one ``[V, D]`` fp32 ``dW``, not one per chunk.

Module layout: launch functions (usable without autograd), the CPU functions, the
``autograd.Function``, then the public functional.
"""
from dataclasses import dataclass

import torch

from . import linear_triton, softmax_stats
from ._dispatch import resolve_backend
from ._layout import as_rows3d
from ._validation import (
    check_accumulator,
    check_finite_rows,
    first_order_only,
    linear_row_max_abs,
    check_lm_head,
    check_softcap,
    check_targets,
    check_temperature,
    value_checks_enabled,
    widen_targets,
)

# CPU path: every [n, v], [n, D] and [v, D] working block holds at most this many elements
# (4 MiB in fp32). Chosen on this project's 2-core dev machine at N=2048, D=256, V=32000, fp32,
# fwd+bwd (launch functions), one thread, CPU time, median of 3: 2^18 2.20 s, 2^19 2.05 s,
# 2^20 2.03 s, 2^21 2.08 s (naive PyTorch, one run: 2.87 s). At most ~6 such blocks are alive at
# once (h chunk, logits, exp / p, soft-cap derivative, and for 16-bit weights the fp32 weight
# chunk and its dW accumulator); tests/test_linear_memory.py measures the peak.
CPU_BLOCK_ELEMENTS = 1 << 20
CPU_LIVE_BLOCKS = 6


@dataclass(frozen=True)
class LinearOpParams:
    """Non-tensor options of one call, carried through autograd.

    ``vocab_chunk``: columns per chunk on the Triton path (``None``: ``linear_triton.vocab_chunk_size``'s
    default); ``matmul``: the gradient matmuls' implementation there (``"auto"`` = cuBLAS on CUDA).
    """

    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "torch"  # already resolved: "triton" or "torch"
    logit_softcap: float | None = None
    allow_tf32: bool = False
    vocab_chunk: int | None = None
    matmul: str = "auto"
    check_values: bool = False  # run the host-synchronizing value checks (validate=, resolved)

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.temperature


# ---------------------------------------------------------------- Triton launches
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _accumulator(name, out, needed: bool, shape, dtype, device, *, contiguous: bool):
    """The gradient buffer of one launch: ``out`` (checked) when given, else fresh zeros; ``None`` if not needed."""
    if not needed:
        return None
    if out is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    check_accumulator(name, out, shape, dtype, device, contiguous=contiguous)
    return out


def linear_forward_triton(h3d, weight, bias, targets, params: LinearOpParams, *, config=None):
    """Forward launches (``linear_triton.forward_tiles``). ``h3d`` ``[A, B, D]`` and ``weight`` ``[V, D]``
    with unit stride on ``D``; ``targets`` ``[A*B]`` int64. ``config``: ``(forward, dz)`` tile configs.

    Returns fp32 ``(logp [N], H [N], stats [3, N])``; ``stats`` = ``(m, log S, H)`` of every row
    (ignored rows included: their logits are the bias); ``logp``/``H`` are 0 on ignored rows.
    """
    logp, H, stats, _ = linear_triton.forward_tiles(h3d, weight, bias, targets, params, config=config)
    return logp, H, stats


def linear_backward_triton(h3d, weight, bias, targets, stats, g_logp, g_H, params: LinearOpParams, needs,
                           *, config=None, dh_out=None, dw_out=None, db_out=None):
    """Backward launches (``linear_triton.backward_chunks``); ``needs`` = ``(hidden, weight, bias)`` flags.

    Returns ``(dh fp32 [N, D], dW [V, D] in the weight's dtype, db fp32 [V])``, ``None`` where not needed.
    ``dh_out`` / ``dw_out`` / ``db_out`` (fp32, contiguous, of those shapes, on the inputs' device) are the
    caller's accumulators instead: this call's gradient is *added* to what they hold (no new ``[N, D]`` /
    ``[V, D]`` / ``[V]`` buffer) and they are returned. One given for a gradient not in ``needs`` is left alone.
    ``dw_out`` may also have the weight's own dtype: the call's ``dW`` (fp32 accumulation inside each
    matmul) is then rounded into it once.
    """
    A, B, D = h3d.shape
    n_rows, V = A * B, weight.shape[0]
    dev = h3d.device
    for name, out, need, shape in (("dh_out", dh_out, needs[0], (n_rows, D)), ("dw_out", dw_out, needs[1], (V, D)),
                                   ("db_out", db_out, needs[2], (V,))):
        if out is not None and need:
            dtype = weight.dtype if name == "dw_out" and out.dtype == weight.dtype else torch.float32
            check_accumulator(name, out, shape, dtype, dev, contiguous=True)
    return linear_triton.backward_chunks(
        h3d, weight, bias, targets, stats, g_logp, g_H, params, needs, config=config,
        vocab_chunk=params.vocab_chunk, matmul=params.matmul,
        dh_out=dh_out if needs[0] else None, dw_out=dw_out if needs[1] else None, db_out=db_out if needs[2] else None)


# ---------------------------------------------------------------- CPU (chunked torch)
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_chunks(n_rows: int, n_cols: int, dim: int, block_elements: int) -> tuple[int, int]:
    """``(rows, cols)`` per block: ``[rows, cols]``, ``[rows, D]`` and ``[cols, D]`` within the budget where possible."""
    cols = max(1, min(n_cols, block_elements // max(dim, 256)))
    rows = max(1, min(n_rows, block_elements // max(cols, dim)))
    return rows, cols


def _logits_block(h, keep, w, b, params: LinearOpParams, with_grad: bool):
    """``(s, dcap, h_c)`` for one block: ``s = cap(h_c w^T + b) / tau`` in the compute dtype, the soft-cap
    derivative (``None`` without soft-cap or ``with_grad``), and ``h_c``: ``h`` upcast, ignored rows zeroed."""
    h_c = torch.where(keep.unsqueeze(1), h, torch.zeros((), dtype=h.dtype)).to(w.dtype)
    z = torch.addmm(b, h_c, w.t()) if b is not None else torch.mm(h_c, w.t())
    dcap = None
    if params.logit_softcap is not None:
        z, dcap = softmax_stats.softcap_(z, params.logit_softcap, with_grad)
    if params.inv_tau != 1.0:
        z.mul_(params.inv_tau)
    return z, dcap, h_c


def _local_targets(targets, keep, v0: int, v1: int):
    """Targets as columns of the chunk ``[v0, v1)`` (clamped in range) and the rows whose target lies there."""
    hit = keep & (targets >= v0) & (targets < v1)
    return (targets - v0).clamp_(0, v1 - v0 - 1), hit


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def linear_forward_torch(h2d, weight, bias, targets, params: LinearOpParams, *, block_elements=CPU_BLOCK_ELEMENTS):
    """CPU forward: same outputs as :func:`linear_forward_triton` (fp64 for fp64 inputs); ``h2d`` ``[N, D]``.
    Its matmuls run in the compute dtype inside an autocast region too, as the kernels do."""
    with torch.autocast(h2d.device.type, enabled=False):
        return _linear_forward_torch(h2d, weight, bias, targets, params, block_elements)


def _linear_forward_torch(h2d, weight, bias, targets, params: LinearOpParams, block_elements):
    n_rows, V = h2d.shape[0], weight.shape[0]
    cdtype = _compute_dtype(h2d.dtype)
    keep = targets != params.ignore_index
    m = torch.full((n_rows,), float("-inf"), dtype=cdtype)
    S, T, s_y = (torch.zeros(n_rows, dtype=cdtype) for _ in range(3))
    rows, cols = _cpu_chunks(n_rows, V, h2d.shape[1], block_elements)
    for v0, v1 in _chunks(V, cols):
        w = weight[v0:v1].to(cdtype)
        b = None if bias is None else bias[v0:v1].to(cdtype)
        for n0, n1 in _chunks(n_rows, rows):
            s, _, _ = _logits_block(h2d[n0:n1], keep[n0:n1], w, b, params, with_grad=False)
            local, hit = _local_targets(targets[n0:n1], keep[n0:n1], v0, v1)
            s_y[n0:n1] += torch.where(hit, s.gather(1, local.unsqueeze(1)).squeeze(1), 0.0)
            part = softmax_stats.block_online_stats_(s)
            m[n0:n1], S[n0:n1], T[n0:n1] = softmax_stats.merge_stats(m[n0:n1], S[n0:n1], T[n0:n1], *part)
    stats = softmax_stats.finalize_stats(m, S, T)
    bad = keep & ((targets < 0) | (targets >= V))  # the kernels' guard: NaN, never a silent number
    bad_h = bad | (keep & (S == 0))  # no finite logit: NaN entropy (not the empty row's 0), as the logits op
    m_out = stats.m.masked_fill(bad, float("nan"))
    logp = stats.logprob(s_y).masked_fill_(bad, float("nan")).masked_fill_(~keep, 0.0)
    H = stats.H.masked_fill(bad_h, float("nan")).masked_fill_(~keep, 0.0)
    return logp, H, torch.stack((m_out, stats.log_S, stats.H.masked_fill(bad_h, float("nan"))))


def linear_backward_torch(h2d, weight, bias, targets, stats, g_logp, g_H, params: LinearOpParams, needs,
                          *, block_elements=CPU_BLOCK_ELEMENTS, dh_out=None, dw_out=None, db_out=None):
    """CPU backward: ``(dh [N, D], dW [V, D], db [V])`` (``None`` where not needed).

    ``dh`` and ``db`` are in the compute dtype (fp32; fp64 for fp64 inputs), ``dW`` in the weight's
    dtype (accumulated per vocab chunk in the compute dtype, then stored). ``dh_out`` / ``dw_out`` /
    ``db_out``: the caller's buffers in the compute dtype (any strides), into which this call's
    gradient is *added* (blocks ``addmm_`` straight into them, no ``[N, D]`` / ``[V, D]`` / ``[V]``
    buffer of its own); they are returned in place of the fresh ones (``dW`` then in the compute dtype).
    ``dw_out`` in the weight's own dtype: each vocab block's fp32 ``dW`` is rounded into it once.
    Not autocast (as :func:`linear_forward_torch`).
    """
    with torch.autocast(h2d.device.type, enabled=False):
        return _linear_backward_torch(h2d, weight, bias, targets, stats, g_logp, g_H, params, needs, block_elements,
                                      dh_out, dw_out, db_out)


def _linear_backward_torch(h2d, weight, bias, targets, stats, g_logp, g_H, params: LinearOpParams, needs,
                           block_elements, dh_out, dw_out, db_out):
    n_rows, D = h2d.shape
    V = weight.shape[0]
    cdtype = _compute_dtype(h2d.dtype)
    need_h, need_w, need_b = needs
    keep = targets != params.ignore_index
    if g_logp is not None:
        g_logp = torch.where(keep, g_logp.to(cdtype), 0.0)
    if g_H is not None:
        g_H = torch.where(keep, g_H.to(cdtype), 0.0)
    m, log_S, H = stats.to(cdtype)
    dh = _accumulator("dh_out", dh_out, need_h, (n_rows, D), cdtype, h2d.device, contiguous=False)
    if need_w and dw_out is None:
        dw = torch.zeros(V, D, dtype=weight.dtype)
    elif need_w and dw_out.dtype == weight.dtype != cdtype:  # accumulate in the weight's own dtype
        check_accumulator("dw_out", dw_out, (V, D), weight.dtype, h2d.device, contiguous=False)
        dw = dw_out
    else:
        dw = _accumulator("dw_out", dw_out, need_w, (V, D), cdtype, h2d.device, contiguous=False)
    db = _accumulator("db_out", db_out, need_b, (V,), cdtype, h2d.device, contiguous=False)
    rows, cols = _cpu_chunks(n_rows, V, D, block_elements)
    for v0, v1 in _chunks(V, cols):
        w = weight[v0:v1].to(cdtype)
        b = None if bias is None else bias[v0:v1].to(cdtype)
        dw_acc = None
        if need_w:
            dw_acc = dw[v0:v1] if dw.dtype == cdtype else torch.zeros(v1 - v0, D, dtype=cdtype)
        for n0, n1 in _chunks(n_rows, rows):
            sl = slice(n0, n1)
            s, dcap, h_c = _logits_block(h2d[sl], keep[sl], w, b, params, with_grad=True)
            local, hit = _local_targets(targets[sl], keep[sl], v0, v1)
            dz = softmax_stats.block_grad_(
                s, local, softmax_stats.RowStats(m[sl], log_S[sl], H[sl]),
                None if g_logp is None else g_logp[sl], None if g_H is None else g_H[sl],
                params.inv_tau, in_block=hit,
            )
            if dcap is not None:
                dz.mul_(dcap)
            if need_h:
                dh[sl].addmm_(dz, w)
            if need_w:
                dw_acc.addmm_(dz.t(), h_c)
            if need_b:
                db[v0:v1] += dz.sum(dim=0)
        if need_w and dw_acc.data_ptr() != dw[v0:v1].data_ptr():
            if dw_out is not None:  # the caller's weight-dtype accumulator: one rounding per call
                dw[v0:v1] += dw_acc
            else:
                dw[v0:v1].copy_(dw_acc)
    return dh, dw, db


# ---------------------------------------------------------------- autograd
def _unit_stride_d(x3d: torch.Tensor) -> torch.Tensor:
    """The kernels read ``D`` with unit stride: copy the (rare) operand whose last dim is strided."""
    return x3d if x3d.stride(-1) == 1 or x3d.shape[-1] == 1 else x3d.contiguous()


def linear_forward(hidden, weight, bias, flat_targets, params: LinearOpParams):
    """Forward on the resolved backend: ``hidden`` ``[..., D]`` (any leading strides) -> ``(logp, H, stats)``."""
    if params.backend == "triton":
        return linear_forward_triton(_unit_stride_d(as_rows3d(hidden)), _unit_stride_d(weight), bias,
                                     flat_targets, params)
    return linear_forward_torch(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets, params)


def linear_backward(hidden, weight, bias, flat_targets, stats, g_logp, g_H, params: LinearOpParams, needs,
                    *, dh_out=None, dw_out=None, db_out=None):
    """Backward on the resolved backend -> ``(dh [N, D], dW [V, D], db [V])`` (``None`` where not needed):
    ``dh``, ``db`` in the accumulation dtype (fp32; fp64 for fp64 inputs on the torch path), ``dW`` in the
    weight's dtype.

    ``dh_out`` ``[N, D]``, ``dw_out`` ``[V, D]``, ``db_out`` ``[V]``: optional caller buffers in the
    accumulation dtype (fp32; fp64 for fp64 inputs on the torch path; ``dw_out`` also in the weight's
    dtype), contiguous on the Triton path; this call's gradient is added into them and they are returned
    (see the two launch functions).
    """
    outs = dict(dh_out=dh_out, dw_out=dw_out, db_out=db_out)
    if params.backend == "triton":
        return linear_backward_triton(_unit_stride_d(as_rows3d(hidden)), _unit_stride_d(weight), bias,
                                      flat_targets, stats, g_logp, g_H, params, needs, **outs)
    return linear_backward_torch(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_targets,
                                 stats, g_logp, g_H, params, needs, **outs)


class LinearLogprobsEntropy(torch.autograd.Function):
    """``(hidden [..., D], weight [V, D], bias [V] | None, targets [...]) -> (logp [...], H [...])``, fp32.

    Differentiable once: the backward is itself not differentiable (``first_order_only``: a second
    derivative raises instead of silently being zero, also when the upstream gradients carry no graph)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LinearOpParams):
        ctx.set_materialize_grads(False)
        flat_targets = widen_targets(targets)
        logp, H, stats = linear_forward(hidden, weight, bias, flat_targets, params)
        if params.check_values:
            check_finite_rows(stats[0] + stats[1], flat_targets != params.ignore_index, "logits (hidden @ weight.T)",
                              temperature=params.temperature,
                              row_max_abs=lambda i: linear_row_max_abs(hidden.reshape(-1, hidden.shape[-1])[i], weight,
                                                                       bias, params.logit_softcap))
        ctx.save_for_backward(hidden, weight, bias, flat_targets, stats)
        ctx.params = params
        lead = hidden.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    @first_order_only("linear_logprobs_and_entropy")
    def backward(ctx, grad_logp, grad_H):
        hidden, weight, bias, flat_targets, stats = ctx.saved_tensors
        params: LinearOpParams = ctx.params
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        if not any(needs) or (grad_logp is None and grad_H is None):
            return None, None, None, None, None
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(torch.float32).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(torch.float32).contiguous()
        dh, dw, db = linear_backward(hidden, weight, bias, flat_targets, stats, g_logp, g_H, params, needs)
        dh = None if dh is None else dh.to(hidden.dtype).view(hidden.shape)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None


# ---------------------------------------------------------------- public functional
def linear_op_params(hidden, weight, bias, targets, *, temperature, ignore_index, logit_softcap, allow_tf32,
                     backend, vocab_chunk=None, matmul="auto", validate="auto") -> LinearOpParams:
    """Check the arguments of the hidden-state op (shared with the one-pass policy loss) -> its params."""
    check_lm_head(hidden, weight, bias)
    temperature = check_temperature(temperature)
    logit_softcap = check_softcap(logit_softcap)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    check_values = value_checks_enabled(validate, hidden.device)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device, validate=check_values)
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be fp32, bf16 or fp16 on the Triton backend, got torch.float64")
    return LinearOpParams(temperature, ignore_index, resolved, logit_softcap, allow_tf32,
                          check_vocab_chunk(vocab_chunk), check_matmul(matmul), check_values)


def check_vocab_chunk(vocab_chunk) -> int | None:
    """``vocab_chunk`` must be ``None`` or an int >= 1."""
    if vocab_chunk is None:
        return None
    if isinstance(vocab_chunk, bool) or not isinstance(vocab_chunk, int):
        raise TypeError(f"vocab_chunk must be an int or None, got {type(vocab_chunk).__name__}")
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1 (vocab columns per chunk), got {vocab_chunk}")
    return vocab_chunk


def check_matmul(matmul) -> str:
    """``matmul`` must be one of ``linear_triton.MATMULS``."""
    if matmul not in linear_triton.MATMULS:
        raise ValueError(f"matmul must be one of {linear_triton.MATMULS}, got {matmul!r}")
    return matmul


def linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    logit_softcap: float | None = None,
    allow_tf32: bool = False,
    backend: str = "auto",
    vocab_chunk: int | None = None,
    matmul: str = "auto",
    validate="auto",
):
    """Per-token log-prob of ``targets`` and entropy of ``softmax(cap(hidden @ weight.T + bias) / temperature)``.

    Equals ``token_logprobs_and_entropy(hidden @ weight.T + bias, targets, temperature=...)`` (with the
    soft-cap applied to the logits first), without materializing the ``[..., V]`` logits in forward or
    backward.

    Args:
        hidden: ``[..., D]`` fp32, bf16 or fp16 (fp64 on the CPU path), any strides.
        weight: ``[V, D]`` (the lm_head layout), same dtype and device as ``hidden``.
        targets: ``[...]`` integer ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]``, same dtype and device.
        temperature: ``tau > 0``; the op sees ``logits / tau``.
        ignore_index: positions with this target give 0 for both outputs and no gradient.
        return_entropy: when False the second output is ``None`` (the kernels are the same).
        logit_softcap: ``c > 0`` applies ``c * tanh(z / c)`` to the logits before the temperature
            (Gemma 2), with its gradient ``1 - tanh^2(z / c)``; ``None`` for no cap.
        allow_tf32: fp32 inputs only, Triton path only (the CPU path is always fp32). The default
            multiplies in full IEEE fp32 (``tl.dot(..., input_precision="ieee")``, FMA units, several
            times slower than tensor cores). ``True`` uses TF32 tensor cores: each operand keeps 10
            of its 23 mantissa bits, so a logit is off by about ``8e-4`` (rms; ``4e-3`` worst) times
            ``sqrt(sum_k (h_k w_k)^2)`` when the operands are truncated, 3x less when rounded; for
            random data with logits of spread 3 (D = 4096, V = 32000) that is up to ``1e-2`` absolute
            in ``logp`` and ``H``, and ``4e-2`` in ``logp`` at spread 10 (D = 1024). These numbers
            come from emulating TF32 operands on the CPU; not yet measured on a GPU.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch on CPU; ``ENTROPY_OPS_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.
        vocab_chunk: Triton path: vocab columns per backward chunk ``Vc`` (rounded up to whole tiles);
            the backward holds one ``[N, Vc]`` ``dz`` buffer. ``None``: the largest ``Vc`` with
            ``N Vc 2 <= max(N D, 16 MiB)`` bytes (bf16 ``dz``; ``Vc = D / 2``). The forward is one launch
            over the whole vocabulary whatever ``Vc``. Peak extra memory, bytes beyond the inputs and the
            returned gradients (16-bit inputs, no bias)::

                N D 4 + N D 2 + N Vc 2                     (fp32 dh, h operand of dW, dz)

            e.g. 235 MB at N=8192, D=4096, V=131072 (Vc=2048); full formula in ``linear_triton``.
        matmul: Triton path: the two gradient matmuls per chunk in ``"cublas"`` (``"auto"`` on CUDA) or
            ``"triton"`` (``kernels/linear_matmul.py``); on CPU tensors ``"auto"`` is fp32 PyTorch.
        validate: the checks that read tensor data (targets in ``[0, V)``, a finite logit in every kept
            row), which synchronize with the host on CUDA. ``True``: always; ``False``: never;
            ``"auto"`` (default): on CPU tensors only. Without them a kept row whose target is out of
            range gives NaN outputs and NaN gradients (the kernels never read it), as does a kept
            row with no finite logit. Metadata checks always run.

    Raises ``ValueError`` (with the value checks on) for a target out of range or a non-ignored row
    whose logits are not finite (NaN/inf inputs).

    Returns:
        ``(logp, entropy)``, fp32 ``[...]`` (fp64 for fp64 inputs on the CPU path).
        Gradients flow to ``hidden``, ``weight`` and ``bias`` (any subset), once (no double backward):
        the matmuls run in the input dtype with fp32 accumulation, ``dz`` rounded to the input dtype on
        the Triton path (to bf16 for fp16 inputs, whose range would flush small ``dz`` to zero).
        Both paths are deterministic: no atomics, every reduction in a fixed order.
    """
    params = linear_op_params(hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
                              logit_softcap=logit_softcap, allow_tf32=allow_tf32, backend=backend,
                              vocab_chunk=vocab_chunk, matmul=matmul, validate=validate)
    logp, H = LinearLogprobsEntropy.apply(hidden, weight, bias, targets, params)
    return logp, (H if return_entropy else None)
