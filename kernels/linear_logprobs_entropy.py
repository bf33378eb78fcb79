"""Triton kernels: per-token log-prob and entropy from hidden states and the lm_head, fused.

With ``z = h W^T (+ b)`` (``h [N, D]``, ``W [V, D]``), optional soft-cap
``z <- c tanh(z / c)``, and ``s = z / tau``, the kernels compute the quantities of
``softmax_stats`` (``H``, ``logp = s_y - lse``, ``lse = m + log S``) and their gradients
without ever holding the ``[N, V]`` logits: each ``[BLOCK_N, BLOCK_V]`` logits
tile lives in registers only (``tl.dot`` over ``D`` in ``BLOCK_D`` steps, fp32
accumulation; operands in the input dtype, fp32 operands as full IEEE fp32 or,
opt-in, TF32).

Forward, split over the vocab (``_linear_logprobs_entropy_fwd``, then
``_linear_logprobs_entropy_merge``). Program ``(i, k)`` owns token block ``i``
and the ``k``-th contiguous range of ``cols_per_split`` vocab columns; it streams
the tiles of its range, folding each into per-row partial ``(m, S, T)``
(``tile_stats_rows`` + ``merge_stats``), and picks up ``s_y`` from the tile that
holds the target. A second, O(rows * splits) kernel merges the partials of a row
and writes ``logp``, ``H`` and the saved ``(m, log S, H)``. Why a split: one program per token block
gives ``ceil(N / BLOCK_N)`` programs, 16 for N = 2048, i.e. an eighth of an
H100's 132 SMs; the split multiplies the grid until it covers the SMs (see
``vocab_splits``), at the cost of a ``[3, splits, N]`` fp32 buffer. With enough
token blocks the split is 1 and the merge is a trivial epilogue.

Backward (``_linear_logprobs_entropy_bwd``), one program per
``[BLOCK_N, BLOCK_V]`` tile (token block fastest, so programs that run together
share the ``W`` tile in L2). It recomputes the tile's ``s``, forms
``dz = logit_grad(...)`` (times ``1 - tanh^2(z / c)`` under the soft-cap), rounds
it to the input dtype, and then, per ``BLOCK_D`` slice of ``D``::

    dh[rows, d]  += dz   @ W[cols, d]      (atomic add, fp32 buffer [N, D])
    dW[cols, d]  += dz^T @ h[rows, d]      (atomic add, fp32 buffer [V, D])
    db[cols]     += sum_rows dz            (atomic add, fp32 buffer [V])

Atomics are needed because a ``dh`` row gets one contribution per vocab tile and
a ``dW`` row one per token block, and neither ``[BLOCK_N, D]`` nor
``[BLOCK_V, D]`` fits in one program's registers. The order of the fp32 atomic
adds depends on scheduling, so the gradients are **not bitwise deterministic**
run to run (they differ by the rounding of fp32 sums taken in another order);
the forward is deterministic (the merge walks the splits in order). The fp32
accumulators are the whole extra memory of the backward: ``[N, D]`` and
``[V, D]`` (for 16-bit inputs the latter is a copy-sized extra ``4 V D`` bytes,
cast to the weight's dtype at the end). ``GRAD_HIDDEN`` / ``GRAD_WEIGHT`` /
``GRAD_BIAS`` are constexpr: work for an input that needs no gradient is not
compiled in.

Rows are ``(outer, inner)`` pairs with two strides (``entropy_ops._layout``), so
``hidden[:, :-1]`` is read in place; ``D`` must have unit stride in ``h`` and
``W`` (the launcher copies the rare operand that does not). Row offsets are
int64. Ignored rows load ``h = 0`` (their logits are the bias), give 0 outputs
and zero gradients.
"""
from typing import NamedTuple

import triton
import triton.language as tl

from .softmax_stats import finalize_stats, logit_grad, merge_stats, softcap_tanh, target_logprob, tile_stats_rows


class LinearConfig(NamedTuple):
    """Tile sizes and launch options of one kernel."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# Tile choices: the usual Triton matmul tiles, shrunk until tests/tools/compile_kernels.py
# reported no spills (stack and local memory 0) at sm_80 and sm_90 for every configuration of
# compile_specs(). The [BLOCK_N, BLOCK_V] fp32 logits tile and its softmax/gradient temporaries
# live in registers, so the tile is half a plain matmul's: 128 x 128 at 8 warps spilled. Not tuned
# on a GPU: no device was lent to the session that wrote this; tune with benchmarks/ first.
_CONFIGS = {
    # (element_size, allow_tf32) -> (forward, backward)
    (2, False): (LinearConfig(128, 64, 32, 8, 3), LinearConfig(64, 128, 32, 8, 2)),
    (4, True): (LinearConfig(128, 64, 16, 8, 3), LinearConfig(64, 64, 32, 8, 2)),
    # IEEE fp32 runs on the FMA units (no tensor cores); 64 x 64 x 32 at 4 warps spilled.
    (4, False): (LinearConfig(64, 64, 16, 8, 2), LinearConfig(64, 64, 16, 8, 2)),
}
MERGE_BLOCK = 256  # rows per merge program: a few loads and exps per row, any size works
MERGE_WARPS = 4


def launch_config(element_size: int, allow_tf32: bool = False) -> tuple[LinearConfig, LinearConfig]:
    """``(forward, backward)`` tile configurations for operands of ``element_size`` bytes.

    ``allow_tf32`` only matters for fp32 (4-byte) operands.
    """
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 (bf16/fp16) or 4 (fp32) bytes, got {element_size}")
    return _CONFIGS[(element_size, bool(allow_tf32) and element_size == 4)]


def vocab_splits(n_rows: int, n_cols: int, config: LinearConfig, num_sms: int) -> int:
    """Number of vocab ranges of the forward grid: enough programs to cover ``num_sms``.

    ``splits = min(ceil(num_sms / token_blocks), vocab_tiles)``, at least 1.
    """
    token_blocks = max(1, triton.cdiv(n_rows, config.block_n))
    vocab_tiles = max(1, triton.cdiv(n_cols, config.block_v))
    return max(1, min(triton.cdiv(num_sms, token_blocks), vocab_tiles))


def input_precision(element_size: int, allow_tf32: bool) -> str:
    """``tl.dot`` input precision: ``"tf32"`` only for fp32 operands with ``allow_tf32``, else ``"ieee"``."""
    return "tf32" if (element_size == 4 and allow_tf32) else "ieee"


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation. ``DOT_FP32`` upcasts the operands first: set only under
    the Triton interpreter for bf16, whose ``tl.dot`` multiplies bf16 bit patterns (triton#11584); the
    products of bf16 numbers are exact in fp32, so the result is the same up to summation order."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, row_off, row_ok, cols, col_ok,
    D, stride_w_v, inv_tau, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Scaled logits ``s = cap(h W^T + b) / tau`` of one ``[BLOCK_N, BLOCK_V]`` tile (fp32), and
    ``1 - tanh^2(z / c)`` (the soft-cap derivative; 1.0 without soft-cap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    w_off = cols.to(tl.int64) * stride_w_v
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        h = tl.load(h_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + w_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, INPUT_PRECISION, DOT_FP32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dcap = 1.0
    if HAS_SOFTCAP:
        t, dcap = softcap_tanh(acc * (1.0 / softcap))
        acc = softcap * t
    return acc * inv_tau, dcap


@triton.jit
def _rows(pid_n, n_rows, n_inner, targets_ptr, ignore_index, stride_h_outer, stride_h_inner,
          BLOCK_N: tl.constexpr):
    """Row ids (int64), in-range mask, targets, kept mask and int64 row offsets of token block ``pid_n``."""
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    keep = in_rows & (target != ignore_index)
    row_off = (rows // n_inner) * stride_h_outer + (rows % n_inner) * stride_h_inner
    return rows, in_rows, target, keep, row_off


@triton.jit
def _linear_logprobs_entropy_fwd(
    # pointers
    h_ptr,  # [rows, D] as (outer, inner) rows, any strides; fp32 / bf16 / fp16
    w_ptr,  # [V, D], any strides, same dtype
    b_ptr,  # [V] same dtype (unused unless HAS_BIAS)
    targets_ptr,  # [rows] int64
    part_ptr,  # [3, splits, rows] fp32 out: partial m, S, T (last dim contiguous)
    s_y_ptr,  # [rows] fp32 out: s at the target, written by the split that holds it
    # shapes
    n_rows, n_inner, D, V, cols_per_split,
    # strides
    stride_h_outer, stride_h_inner, stride_w_v, stride_part_stat, stride_part_split,  # D is unit-stride
    # scalars
    inv_tau, softcap, ignore_index,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program ``(i, k)``: token block ``i`` against vocab columns ``[k cols_per_split, (k+1) cols_per_split)``.

    Per row: partial ``m = max s``, ``S = sum exp(s - m)``, ``T = sum exp(s - m)(s - m)``
    over the range (``cols_per_split`` is a multiple of ``BLOCK_V``), and ``s_y``.
    """
    split = tl.program_id(1)
    rows, in_rows, target, keep, row_off = _rows(tl.program_id(0), n_rows, n_inner, targets_ptr, ignore_index,
                                                 stride_h_outer, stride_h_inner, BLOCK_N)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    S = tl.zeros((BLOCK_N,), tl.float32)
    T = tl.zeros((BLOCK_N,), tl.float32)
    s_y = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        s, _ = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, keep, cols, col_ok,
                            D, stride_w_v, inv_tau, softcap,
                            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, INPUT_PRECISION, DOT_FP32)
        tile_m, tile_S, tile_T = tile_stats_rows(s, col_ok[None, :])
        m, S, T = merge_stats(m, S, T, tile_m, tile_S, tile_T)
        s_y += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)

    part = part_ptr + split.to(tl.int64) * stride_part_split + rows
    tl.store(part, m, mask=in_rows)
    tl.store(part + stride_part_stat, S, mask=in_rows)
    tl.store(part + 2 * stride_part_stat, T, mask=in_rows)
    tl.store(s_y_ptr + rows, s_y, mask=keep & (target >= v_begin) & (target < v_end))


@triton.jit
def _linear_logprobs_entropy_merge(
    # pointers
    part_ptr,  # [3, splits, rows] fp32: partial m, S, T from the forward
    s_y_ptr,  # [rows] fp32 (read only for kept rows)
    targets_ptr,  # [rows] int64
    logp_ptr,  # [rows] fp32 out (0 for ignored rows)
    entropy_ptr,  # [rows] fp32 out (0 for ignored rows)
    stats_ptr,  # [3, rows] fp32 out, every row: m, log S, H (saved for backward)
    # shapes
    n_rows, n_splits,
    # strides
    stride_part_stat, stride_part_split,
    # scalars
    ignore_index,
    # meta
    BLOCK: tl.constexpr,
):
    """One program = ``BLOCK`` rows: merge the ``n_splits`` partials in split order (deterministic),
    then ``H = log S - T / S`` and ``logp = (s_y - m) - log S`` (``lse = m + log S``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_rows = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    keep = in_rows & (target != ignore_index)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    S = tl.zeros((BLOCK,), tl.float32)
    T = tl.zeros((BLOCK,), tl.float32)
    part = part_ptr + rows
    for _ in range(0, n_splits):
        m, S, T = merge_stats(m, S, T,
                              tl.load(part, mask=in_rows, other=float("-inf")),
                              tl.load(part + stride_part_stat, mask=in_rows, other=0.0),
                              tl.load(part + 2 * stride_part_stat, mask=in_rows, other=0.0))
        part += stride_part_split  # pointer arithmetic: 64-bit, no int32 product
    log_S, H = finalize_stats(m, S, T)
    s_y = tl.load(s_y_ptr + rows, mask=keep, other=0.0)
    tl.store(logp_ptr + rows, tl.where(keep, target_logprob(s_y, m, log_S), 0.0), mask=in_rows)
    tl.store(entropy_ptr + rows, tl.where(keep, H, 0.0), mask=in_rows)
    row_stats = stats_ptr + rows  # planes n_rows apart; pointer steps, no int32 product
    tl.store(row_stats, m, mask=in_rows)
    tl.store(row_stats + n_rows, log_S, mask=in_rows)
    tl.store(row_stats + n_rows + n_rows, H, mask=in_rows)


@triton.jit
def _linear_logprobs_entropy_bwd(
    # pointers
    h_ptr,  # [rows, D] as (outer, inner) rows, any strides
    w_ptr,  # [V, D], any strides
    b_ptr,  # [V] (unused unless HAS_BIAS)
    targets_ptr,  # [rows] int64
    stats_ptr,  # [3, rows] fp32 from the forward: m, log S, H
    grad_logp_ptr,  # [rows] fp32 upstream (zeros when logp got no gradient)
    grad_entropy_ptr,  # [rows] fp32 upstream (zeros when H got no gradient)
    dh_ptr,  # [rows, D] fp32 contiguous, zero-initialized, accumulated (GRAD_HIDDEN)
    dw_ptr,  # [V, D] fp32 contiguous, zero-initialized, accumulated (GRAD_WEIGHT)
    db_ptr,  # [V] fp32, zero-initialized, accumulated (GRAD_BIAS)
    # shapes
    n_rows, n_inner, D, V,
    # strides
    stride_h_outer, stride_h_inner, stride_w_v,  # D is unit-stride
    # scalars
    inv_tau, softcap, ignore_index,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr, GRAD_BIAS: tl.constexpr,
):
    """One program = one ``[BLOCK_N, BLOCK_V]`` tile: recompute ``s``, then (``s = c tanh(z / c) / tau``)::

        dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau * (1 - tanh^2(z_i / c))
        dh += dz @ W_tile,  dW_tile += dz^T @ h,  db_tile += sum_rows dz       (fp32 atomics)
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    rows, in_rows, target, keep, row_off = _rows(pid % n_row_blocks, n_rows, n_inner, targets_ptr, ignore_index,
                                                 stride_h_outer, stride_h_inner, BLOCK_N)
    cols = (pid // n_row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    s, dcap = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, keep, cols, col_ok,
                           D, stride_w_v, inv_tau, softcap,
                           BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, INPUT_PRECISION, DOT_FP32)
    row_stats = stats_ptr + rows
    # Ignored and padding rows get m = +inf, so p = 0 and (g = 0, no target) dz = 0 exactly.
    m = tl.load(row_stats, mask=keep, other=float("inf"))
    log_S = tl.load(row_stats + n_rows, mask=keep, other=0.0)
    H = tl.load(row_stats + n_rows + n_rows, mask=keep, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=keep, other=0.0)
    g_H = tl.load(grad_entropy_ptr + rows, mask=keep, other=0.0)
    dz = logit_grad(s, col_ok[None, :], cols[None, :] == target[:, None],
                    m[:, None], log_S[:, None], H[:, None], g_logp[:, None], g_H[:, None], inv_tau)
    if HAS_SOFTCAP:
        dz = dz * dcap
    if GRAD_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(h_ptr.dtype.element_ty)  # the gradient matmuls run in the input dtype, fp32 accumulation

    if GRAD_HIDDEN or GRAD_WEIGHT:
        w_off = cols.to(tl.int64) * stride_w_v
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            if GRAD_HIDDEN:
                w = tl.load(w_ptr + w_off[:, None] + d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                dh = _dot(dz_in, w, None, INPUT_PRECISION, DOT_FP32)
                tl.atomic_add(dh_ptr + rows[:, None] * D + d[None, :], dh,
                              mask=keep[:, None] & d_ok[None, :], sem="relaxed")
            if GRAD_WEIGHT:
                h = tl.load(h_ptr + row_off[:, None] + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
                dw = _dot(tl.trans(dz_in), h, None, INPUT_PRECISION, DOT_FP32)
                tl.atomic_add(dw_ptr + cols.to(tl.int64)[:, None] * D + d[None, :], dw,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")


def compile_specs() -> list[dict]:
    """Every kernel configuration the dispatcher can launch on CUDA, for ahead-of-time compile checks.

    Each entry: ``kernel``, ``signature`` (argument -> Triton type), ``constexprs``, ``num_warps``,
    ``options``. Strides are typed ``i64``. ``DOT_FP32`` is always False here (interpreter only).
    """
    specs = []
    for dt, elem, tf32 in (("fp32", 4, False), ("fp32", 4, True), ("bf16", 2, False), ("fp16", 2, False)):
        fwd_cfg, bwd_cfg = launch_config(elem, tf32)
        common_sig = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "targets_ptr": "*i64"}
        strides = {k: "i64" for k in ("stride_h_outer", "stride_h_inner", "stride_w_v")}
        scalars = {"inv_tau": "fp32", "softcap": "fp32", "ignore_index": "i64"}
        fwd_sig = {**common_sig, "part_ptr": "*fp32", "s_y_ptr": "*fp32", "n_rows": "i32", "n_inner": "i32",
                   "D": "i32", "V": "i32", "cols_per_split": "i32", **strides,
                   "stride_part_stat": "i64", "stride_part_split": "i64", **scalars}
        bwd_sig = {**common_sig, "stats_ptr": "*fp32", "grad_logp_ptr": "*fp32",
                   "grad_entropy_ptr": "*fp32", "dh_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32",
                   "n_rows": "i32", "n_inner": "i32", "D": "i32", "V": "i32", **strides, **scalars}
        for has_softcap in (False, True):
            for has_bias in (False, True):
                meta = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap,
                            INPUT_PRECISION=input_precision(elem, tf32), DOT_FP32=False)
                specs.append(_spec(_linear_logprobs_entropy_fwd, fwd_sig, fwd_cfg, meta))
                for g_h, g_w, g_b in ((1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)):
                    if g_b and not has_bias:
                        continue
                    grads = dict(GRAD_HIDDEN=bool(g_h), GRAD_WEIGHT=bool(g_w), GRAD_BIAS=bool(g_b))
                    specs.append(_spec(_linear_logprobs_entropy_bwd, bwd_sig, bwd_cfg, {**meta, **grads}))
    merge_sig = {"part_ptr": "*fp32", "s_y_ptr": "*fp32", "targets_ptr": "*i64", "logp_ptr": "*fp32",
                 "entropy_ptr": "*fp32", "stats_ptr": "*fp32", "n_rows": "i32", "n_splits": "i32",
                 "stride_part_stat": "i64", "stride_part_split": "i64", "ignore_index": "i64", "BLOCK": "constexpr"}
    specs.append(dict(kernel=_linear_logprobs_entropy_merge, signature=merge_sig, constexprs={"BLOCK": MERGE_BLOCK},
                      num_warps=MERGE_WARPS))
    return specs


def _spec(kernel, signature, cfg: LinearConfig, meta: dict) -> dict:
    constexprs = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, **meta)
    return dict(kernel=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                constexprs=constexprs, num_warps=cfg.num_warps, options={"num_stages": cfg.num_stages})
