"""Triton kernels: per-token log-prob and entropy from hidden states and the lm_head, fused.

With ``z = h W^T (+ b)`` (``h [N, D]``, ``W [V, D]``), optional soft-cap
``z <- c tanh(z / c)``, and ``s = z / tau``, the kernels compute the quantities of
``softmax_stats`` (``H``, ``logp = s_y - lse``, ``lse = m + log S``) and the logit
gradient without ever holding the ``[N, V]`` logits. Every kernel works on
``[BLOCK_N, BLOCK_V]`` tiles (tokens x vocabulary); a tile is a full-``D`` matmul
(``tl.dot`` in ``BLOCK_D`` steps, fp32 accumulation, operands in the input dtype; on
sm_90 ``tl.dot`` lowers to wgmma) followed by an epilogue:

- ``_linear_logprobs_entropy_fwd``: one program walks a *strip* of ``tiles_per_prog``
  consecutive vocab tiles of one token block, folding each tile's per-row ``(m, S, T)``
  into running statistics in registers (in tile order), and writes them once into a
  ``[3, strips, N]`` partial buffer (one writer per entry); ``s_y`` comes from the tile
  that holds the target. With ``STORE_LOGITS`` (the one-pass loss; one tile per
  program) the tile's ``s - m_tile`` also goes into a logits workspace.
- ``_linear_stats_merge``: folds a row's strip partials in strip order
  (deterministic) and writes ``logp``, ``H`` and the saved ``(m, log S, H)``.
- ``_linear_logit_grad`` (the backward walks the vocabulary in chunks of ``Vc`` columns,
  one tile per program): recomputes the tile from the saved statistics, forms
  ``dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau * (1 - tanh^2(z_i / c))``
  in fp32 and stores it in the gradient-matmul dtype into an ``[N, Vc]`` buffer;
  its fp32 column sums per token block go to an ``[N / BLOCK_N, Vc]`` buffer for ``db``.
- ``_linear_onepass_grad``: the same ``dz`` from a workspace written by the forward
  (``STORE_LOGITS``), in place, for the one-pass loss.
The two gradient matmuls per chunk (``dW[chunk] = dz^T h``, ``dh += dz W[chunk]``) run in
cuBLAS or in ``kernels/linear_matmul.py``.

No kernel uses atomics: every output element has one writer, the cross-tile
reductions (statistics across vocab tiles and strips, ``db`` across token blocks, ``dW``
across tokens inside one matmul, ``dh`` across chunks in chunk order) run in a fixed
order, so forward and backward are bitwise deterministic.

Program order (``_grouped_tile``): programs are numbered so that ``GROUP_N`` token
blocks sweep the vocab tiles (forward: strips) together (the Triton matmul tutorial's
grouped order): the programs resident at once share ``GROUP_N`` ``h`` blocks and a few
``W`` tiles in L2 instead of streaming them from HBM per tile.

Rows are ``(outer, inner)`` pairs with two strides (``entropy_ops._layout``), so
``hidden[:, :-1]`` is read in place; ``D`` has unit stride in ``h`` and ``W``. Row
offsets are int64. Ignored rows load ``h = 0`` (their logits are the bias), give 0
outputs and exactly zero ``dz``.
"""
from typing import NamedTuple

import triton
import triton.language as tl

from ._aot import LaunchSpec, Pointer
from .softmax_stats import finalize_stats, logit_grad, merge_stats, softcap_tanh, target_logprob, tile_stats_rows


class LinearConfig(NamedTuple):
    """Tile sizes and launch options of the tile kernels (forward and ``dz``)."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# Tiles (not yet tuned on a GPU; benchmarks/ will settle them). 16-bit: the
# Triton-matmul-tutorial Hopper shape cut to BLOCK_V 128 because the fp32 logits tile and its softmax
# temporaries live in registers next to the accumulator: 128 x 128 x 64 at 8 warps is two m64n128k16
# wgmma per warp group per k-step; the compile check (tests/test_kernel_compile.py, sm_90) shows no spills.
# fp32 + TF32: half the K step (4-byte operands, same shared memory per stage). IEEE fp32 runs on the FMA
# units (no tensor cores): a smaller tile.
_CONFIGS = {
    # (element_size, allow_tf32) -> tiles of the forward and of the dz kernel
    (2, False): (LinearConfig(128, 128, 64, 8, 3), LinearConfig(128, 128, 64, 8, 3)),
    (4, True): (LinearConfig(128, 128, 32, 8, 3), LinearConfig(128, 128, 32, 8, 3)),
    (4, False): (LinearConfig(64, 64, 16, 8, 2), LinearConfig(64, 64, 16, 8, 2)),
}
GROUP_N = 8  # token blocks per program group (L2 reuse of W tiles, see _grouped_tile)
MERGE_BLOCK = 256  # rows per merge program: a few loads and exps per row, any size works
MERGE_WARPS = 4
ONEPASS_WARPS = 8  # the one-pass dz kernel: elementwise over [BLOCK_N, BLOCK_V] tiles of the workspace


def launch_config(element_size: int, allow_tf32: bool = False) -> tuple[LinearConfig, LinearConfig]:
    """``(forward, dz)`` tile configurations for operands of ``element_size`` bytes.

    ``allow_tf32`` only matters for fp32 (4-byte) operands.
    """
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 (bf16/fp16) or 4 (fp32) bytes, got {element_size}")
    return _CONFIGS[(element_size, bool(allow_tf32) and element_size == 4)]


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
def _grouped_tile(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """``(token block, vocab tile)`` of program ``pid``: ``GROUP`` token blocks walk the vocab tiles together."""
    per_group = GROUP * n_col_blocks
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


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
def _logits_tile(
    h_ptr, w_ptr, b_ptr, row_off, row_ok, cols, col_ok,
    D, stride_w_v, inv_tau, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Scaled logits ``s = cap(h W^T + b) / tau`` of one ``[BLOCK_N, BLOCK_V]`` tile (fp32, full ``D``), and
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
def _linear_logprobs_entropy_fwd(
    # pointers
    h_ptr,  # [rows, D] as (outer, inner) rows, any strides; fp32 / bf16 / fp16
    w_ptr,  # [V, D], D unit-stride, same dtype
    b_ptr,  # [V] same dtype (unused unless HAS_BIAS)
    targets_ptr,  # [rows] int64
    part_ptr,  # [3, strips, rows] fp32 out: the strip's m, S, T (last dim contiguous)
    s_y_ptr,  # [rows] fp32 out: s at the target, written by the tile that holds it
    ws_ptr,  # [rows, >= v_end] out (STORE_LOGITS): s - m_tile in the workspace dtype
    # shapes
    n_rows, n_inner, D, v_begin, v_end, tiles_per_prog,
    # strides
    stride_h_outer, stride_h_inner, stride_w_v, stride_part_stat, stride_part_tile, stride_ws_row,
    # scalars
    inv_tau, softcap, ignore_index,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
):
    """One program = token block ``i`` x strip ``j``: the vocab tiles ``[j P, (j + 1) P)`` (``P =
    tiles_per_prog``, the last strip shorter) of ``[v_begin, v_end)``, in order.

    Per row: the strip's ``m = max s``, ``S = sum exp(s - m)``, ``T = sum exp(s - m)(s - m)`` (each tile's
    folded into the running ones by ``merge_stats``) into ``part[:, j, rows]``, and ``s_y`` when the target
    falls in one of the strip's tiles. ``STORE_LOGITS`` needs ``tiles_per_prog = 1`` (the one-pass dz kernel
    reads each tile's own ``m`` from ``part``).
    """
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    n_tiles = tl.cdiv(v_end - v_begin, BLOCK_V)
    n_strips = tl.cdiv(n_tiles, tiles_per_prog)
    pid_n, pid_v = _grouped_tile(tl.program_id(0), n_row_blocks, n_strips, GROUP)
    rows, in_rows, target, keep, row_off = _rows(pid_n, n_rows, n_inner, targets_ptr, ignore_index,
                                                 stride_h_outer, stride_h_inner, BLOCK_N)
    first = pid_v * tiles_per_prog
    m_run = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    S_run = tl.zeros((BLOCK_N,), tl.float32)
    T_run = tl.zeros((BLOCK_N,), tl.float32)
    for tile in range(first, tl.minimum(first + tiles_per_prog, n_tiles)):
        c0 = v_begin + tile * BLOCK_V
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        s, _ = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, keep, cols, col_ok, D, stride_w_v, inv_tau, softcap,
                            BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, INPUT_PRECISION, DOT_FP32)
        m, S, T = tile_stats_rows(s, col_ok[None, :])
        m_run, S_run, T_run = merge_stats(m_run, S_run, T_run, m, S, T)
        s_y = tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
        tl.store(s_y_ptr + rows, s_y, mask=keep & (target >= c0) & (target < c0 + BLOCK_V))
        if STORE_LOGITS:
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            ws = ws_ptr + rows[:, None] * stride_ws_row + cols[None, :]
            tl.store(ws, (s - m_ref[:, None]).to(ws_ptr.dtype.element_ty), mask=in_rows[:, None] & col_ok[None, :])
    part = part_ptr + pid_v.to(tl.int64) * stride_part_tile + rows
    tl.store(part, m_run, mask=in_rows)
    tl.store(part + stride_part_stat, S_run, mask=in_rows)
    tl.store(part + 2 * stride_part_stat, T_run, mask=in_rows)


@triton.jit
def _linear_stats_merge(
    # pointers
    part_ptr,  # [3, parts, rows] fp32: the strips' (or tiles') statistics
    s_y_ptr,  # [rows] fp32 (kept rows only)
    targets_ptr,  # [rows] int64
    logp_ptr,  # [rows] fp32 out (0 for ignored rows)
    entropy_ptr,  # [rows] fp32 out (0 for ignored rows)
    stats_ptr,  # [3, rows] fp32 out, every row: m, log S, H (saved for backward)
    # shapes
    n_rows, n_tiles, V,
    # strides
    stride_part_stat, stride_part_tile,
    # scalars
    ignore_index,
    # meta
    BLOCK: tl.constexpr,
):
    """One program = ``BLOCK`` rows: fold the ``n_tiles`` partials in order (deterministic), then
    ``H = log S - T / S`` and ``logp = (s_y - m) - log S``.

    Guard (no host-side range check needed): a kept row whose target lies outside ``[0, V)`` gets NaN
    ``logp``, ``H`` and ``m`` (so its backward ``dz`` is NaN too); its ``s_y`` was never written."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_rows = rows < n_rows
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    S = tl.zeros((BLOCK,), tl.float32)
    T = tl.zeros((BLOCK,), tl.float32)
    part = part_ptr + rows
    for _ in range(0, n_tiles):
        m, S, T = merge_stats(m, S, T,
                              tl.load(part, mask=in_rows, other=float("-inf")),
                              tl.load(part + stride_part_stat, mask=in_rows, other=0.0),
                              tl.load(part + 2 * stride_part_stat, mask=in_rows, other=0.0))
        part += stride_part_tile  # pointer arithmetic: 64-bit, no int32 product
    target = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    keep = in_rows & (target != ignore_index)
    log_S, H = finalize_stats(m, S, T)
    bad = keep & ((target < 0) | (target >= V))
    m = tl.where(bad, float("nan"), m)
    H = tl.where(bad | (keep & (S == 0.0)), float("nan"), H)  # no finite logit: NaN, not the empty row's 0
    s_y = tl.load(s_y_ptr + rows, mask=keep & ~bad, other=0.0)
    tl.store(logp_ptr + rows, tl.where(keep, target_logprob(s_y, m, log_S), 0.0), mask=in_rows)
    tl.store(entropy_ptr + rows, tl.where(keep, H, 0.0), mask=in_rows)
    row_stats = stats_ptr + rows  # planes n_rows apart; pointer steps, no int32 product
    tl.store(row_stats, m, mask=in_rows)
    tl.store(row_stats + n_rows, log_S, mask=in_rows)
    tl.store(row_stats + n_rows + n_rows, H, mask=in_rows)


@triton.jit
def _row_grad_inputs(stats_ptr, grad_logp_ptr, grad_entropy_ptr, rows, keep, n_rows):
    """Saved ``(m, log S, H)`` and upstream gradients of a token block; ignored and padding rows get
    ``m = +inf`` (so ``p = 0``) and zero gradients, hence ``dz = 0`` exactly."""
    row_stats = stats_ptr + rows
    m = tl.load(row_stats, mask=keep, other=float("inf"))
    log_S = tl.load(row_stats + n_rows, mask=keep, other=0.0)
    H = tl.load(row_stats + n_rows + n_rows, mask=keep, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=keep, other=0.0)
    g_H = tl.load(grad_entropy_ptr + rows, mask=keep, other=0.0)
    return m, log_S, H, g_logp, g_H


@triton.jit
def _linear_logit_grad(
    # pointers
    h_ptr,  # [rows, D] as (outer, inner) rows, any strides
    w_ptr,  # [V, D], D unit-stride
    b_ptr,  # [V] (unused unless HAS_BIAS)
    targets_ptr,  # [rows] int64
    stats_ptr,  # [3, rows] fp32 from the forward: m, log S, H
    grad_logp_ptr,  # [rows] fp32 upstream (zeros when logp got no gradient)
    grad_entropy_ptr,  # [rows] fp32 upstream (zeros when H got no gradient)
    dz_ptr,  # [rows, >= v_end - v_begin] out: dz of the chunk in the gradient-matmul dtype
    db_part_ptr,  # [row blocks, >= v_end - v_begin] fp32 out (GRAD_BIAS): column sums of the token block
    # shapes
    n_rows, n_inner, D, v_begin, v_end,
    # strides
    stride_h_outer, stride_h_inner, stride_w_v, stride_dz_row, stride_db_part,
    # scalars
    inv_tau, softcap, ignore_index,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    GRAD_BIAS: tl.constexpr,
):
    """One program = one tile: recompute ``s``, then (``s = c tanh(z / c) / tau``, ``t = s tau / c``)::

        dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau * (1 - t_i^2)

    stored (rounded to ``dz_ptr``'s dtype) at ``dz[rows, cols - v_begin]``; with ``GRAD_BIAS`` the fp32
    column sums over the block's rows go to ``db_part[i, cols - v_begin]``.
    """
    n_row_blocks = tl.cdiv(n_rows, BLOCK_N)
    n_col_blocks = tl.cdiv(v_end - v_begin, BLOCK_V)
    pid_n, pid_v = _grouped_tile(tl.program_id(0), n_row_blocks, n_col_blocks, GROUP)
    rows, in_rows, target, keep, row_off = _rows(pid_n, n_rows, n_inner, targets_ptr, ignore_index,
                                                 stride_h_outer, stride_h_inner, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_ok = cols < v_end
    s, _ = _logits_tile(h_ptr, w_ptr, b_ptr, row_off, keep, cols, col_ok, D, stride_w_v, inv_tau, softcap,
                        BLOCK_N, BLOCK_V, BLOCK_D, HAS_BIAS, HAS_SOFTCAP, INPUT_PRECISION, DOT_FP32)
    m, log_S, H, g_logp, g_H = _row_grad_inputs(stats_ptr, grad_logp_ptr, grad_entropy_ptr, rows, keep, n_rows)
    dz = logit_grad(s, col_ok[None, :], cols[None, :] == target[:, None],
                    m[:, None], log_S[:, None], H[:, None], g_logp[:, None], g_H[:, None], inv_tau)
    if HAS_SOFTCAP:
        # 1 - tanh^2(z / c) from s = c tanh(z / c) / tau, as in _linear_onepass_grad: keeping softcap_tanh's
        # own derivative tile alive through logit_grad costs a second fp32 tile of registers (255 registers
        # and a stack spill at 128 x 128 on sm_90). Absolute error ~1e-7 (an ulp of tanh), where dz is tiny.
        t = s * (1.0 / (inv_tau * softcap))
        dz = dz * (1.0 - t * t)
    tl.store(dz_ptr + rows[:, None] * stride_dz_row + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=in_rows[:, None] & col_ok[None, :])
    if GRAD_BIAS:
        tl.store(db_part_ptr + pid_n.to(tl.int64) * stride_db_part + local, tl.sum(dz, axis=0), mask=col_ok)


@triton.jit
def _linear_onepass_grad(
    # pointers
    ws_ptr,  # [rows, V] in/out: s - m_tile from the forward (STORE_LOGITS) -> dz, same dtype
    part_ptr,  # [3, tiles, rows] fp32: the forward's tile statistics (only m is read)
    targets_ptr,  # [rows] int64
    stats_ptr,  # [3, rows] fp32: m, log S, H
    grad_logp_ptr,  # [rows] fp32
    grad_entropy_ptr,  # [rows] fp32
    db_part_ptr,  # [row blocks, V] fp32 out (GRAD_BIAS)
    # shapes
    n_rows, V,
    # strides
    stride_ws_row, stride_part_tile, stride_db_part,
    # scalars
    inv_tau, tau_over_cap, ignore_index,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GRAD_BIAS: tl.constexpr,
):
    """One program = one ``[BLOCK_N, BLOCK_V]`` tile of the workspace (``BLOCK_V`` = the forward's, so tile
    ``j`` of the workspace is partial ``j``): ``s = ws + m_tile``, then ``dz`` as in ``_linear_logit_grad``
    with the soft-cap derivative ``1 - (s tau / c)^2`` (``s tau / c = tanh(z / c)``), written in place."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    target = tl.load(targets_ptr + rows, mask=in_rows, other=ignore_index)
    keep = in_rows & (target != ignore_index)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    m_tile = tl.load(part_ptr + pid_v.to(tl.int64) * stride_part_tile + rows, mask=in_rows, other=0.0)
    m_tile = tl.where(m_tile == float("-inf"), 0.0, m_tile)
    ws = ws_ptr + rows[:, None] * stride_ws_row + cols[None, :]
    ok = in_rows[:, None] & col_ok[None, :]
    s = tl.load(ws, mask=ok, other=0.0).to(tl.float32) + m_tile[:, None]  # masked lanes: p = 0 via col_ok
    m, log_S, H, g_logp, g_H = _row_grad_inputs(stats_ptr, grad_logp_ptr, grad_entropy_ptr, rows, keep, n_rows)
    dz = logit_grad(s, col_ok[None, :], cols[None, :] == target[:, None],
                    m[:, None], log_S[:, None], H[:, None], g_logp[:, None], g_H[:, None], inv_tau)
    if HAS_SOFTCAP:
        t = s * tau_over_cap
        dz = dz * (1.0 - t * t)
    tl.store(ws, dz.to(ws_ptr.dtype.element_ty), mask=ok)
    if GRAD_BIAS:
        tl.store(db_part_ptr + pid_n.to(tl.int64) * stride_db_part + cols, tl.sum(tl.where(ok, dz, 0.0), axis=0),
                 mask=col_ok)


def gemm_dtype_name(dtype_name: str) -> str:
    """The dtype of ``dz`` and of the gradient matmuls' operands: bf16 for fp16 inputs (fp16 would flush
    ``dz ~ g p`` to zero, see ``entropy_ops.linear_ops``), else the input dtype."""
    return "bf16" if dtype_name == "fp16" else dtype_name


def compile_specs() -> list[LaunchSpec]:
    """Every configuration of the tile kernels the dispatcher can launch on CUDA, at N=8192, D=4096,
    V=131072: the forward in 8 strips of 128 tiles (``entropy_ops.linear_triton.forward_strips``), the
    backward in vocab chunks of Vc=2048 (second chunk: ``v_begin`` = 2048), contiguous ``hidden``.

    The constexpr flags multiply: per input dtype / precision (fp32 IEEE, fp32 TF32, bf16, fp16) the
    forward has 8 (bias x soft-cap x STORE_LOGITS, the last for the one-pass loss, one tile per program:
    ``tiles_per_prog`` = 1, which the JIT makes a constant), the ``dz`` kernel 6 (bias x soft-cap x bias
    gradient when there is a bias); ``_linear_onepass_grad`` 8 (workspace bf16 / fp32 x soft-cap x bias
    gradient), the merge 1: 65 in all, every one launchable. ``DOT_FP32`` is always False here
    (interpreter only)."""
    n, d, vc, v = 8192, 4096, 2048, 131072
    specs = []
    for dt, elem, tf32 in (("fp32", 4, False), ("fp32", 4, True), ("bf16", 2, False), ("fp16", 2, False)):
        fwd, bwd = launch_config(elem, tf32)
        gd = gemm_dtype_name(dt)
        for has_bias in (False, True):
            for has_softcap in (False, True):
                meta = dict(HAS_BIAS=has_bias, HAS_SOFTCAP=has_softcap, INPUT_PRECISION=input_precision(elem, tf32),
                            DOT_FP32=False, GROUP=GROUP_N)
                common = dict(h_ptr=Pointer(dt), w_ptr=Pointer(dt), b_ptr=Pointer(dt), targets_ptr=Pointer("i64"))
                for store in (False, True):
                    # the whole vocabulary in one launch; one-pass (workspace [n, V]): one tile per program,
                    # else 8 strips of 128 tiles
                    per_prog = 1 if store else v // fwd.block_v // 8
                    parts = v // fwd.block_v // per_prog
                    # without a workspace the dispatcher passes the partial buffer as a placeholder, stride 0
                    args = dict(common, part_ptr=Pointer("fp32"), s_y_ptr=Pointer("fp32"),
                                ws_ptr=Pointer(gd if store else "fp32"),
                                n_rows=n, n_inner=n, D=d, v_begin=0, v_end=v, tiles_per_prog=per_prog,
                                stride_h_outer=n * d,
                                stride_h_inner=d, stride_w_v=d, stride_part_stat=parts * n, stride_part_tile=n,
                                stride_ws_row=v if store else 0, inv_tau=1.0, softcap=30.0, ignore_index=-100,
                                BLOCK_N=fwd.block_n, BLOCK_V=fwd.block_v, BLOCK_D=fwd.block_d, **meta,
                                STORE_LOGITS=store)
                    label = f"forward [{dt}{' tf32' if tf32 else ''}]" + (" one-pass" if store else "")
                    specs.append(LaunchSpec(_linear_logprobs_entropy_fwd, args, fwd.num_warps, fwd.num_stages, label))
                for grad_bias in ((False, True) if has_bias else (False,)):
                    args = dict(common, stats_ptr=Pointer("fp32"), grad_logp_ptr=Pointer("fp32"),
                                grad_entropy_ptr=Pointer("fp32"), dz_ptr=Pointer(gd),
                                db_part_ptr=Pointer("fp32" if grad_bias else gd),  # dz as placeholder
                                n_rows=n, n_inner=n, D=d, v_begin=vc, v_end=2 * vc, stride_h_outer=n * d,
                                stride_h_inner=d, stride_w_v=d, stride_dz_row=vc, stride_db_part=vc,
                                inv_tau=1.0, softcap=30.0, ignore_index=-100,
                                BLOCK_N=bwd.block_n, BLOCK_V=bwd.block_v, BLOCK_D=bwd.block_d, **meta,
                                GRAD_BIAS=grad_bias)
                    specs.append(LaunchSpec(_linear_logit_grad, args, bwd.num_warps, bwd.num_stages,
                                            f"dz [{dt}{' tf32' if tf32 else ''}]"))
    for gd, cfg in (("bf16", launch_config(2)[0]), ("fp32", launch_config(4)[0])):
        for has_softcap in (False, True):
            for grad_bias in (False, True):
                args = dict(ws_ptr=Pointer(gd), part_ptr=Pointer("fp32"), targets_ptr=Pointer("i64"),
                            stats_ptr=Pointer("fp32"), grad_logp_ptr=Pointer("fp32"), grad_entropy_ptr=Pointer("fp32"),
                            db_part_ptr=Pointer("fp32" if grad_bias else gd), n_rows=n, V=v, stride_ws_row=v,
                            stride_part_tile=n,
                            stride_db_part=v, inv_tau=1.0, tau_over_cap=1 / 30.0, ignore_index=-100,
                            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, HAS_SOFTCAP=has_softcap, GRAD_BIAS=grad_bias)
                specs.append(LaunchSpec(_linear_onepass_grad, args, ONEPASS_WARPS, 1, f"one-pass dz [{gd}]"))
    args = dict(part_ptr=Pointer("fp32"), s_y_ptr=Pointer("fp32"), targets_ptr=Pointer("i64"),
                logp_ptr=Pointer("fp32"), entropy_ptr=Pointer("fp32"), stats_ptr=Pointer("fp32"), n_rows=n,
                n_tiles=8, V=v, stride_part_stat=8 * n, stride_part_tile=n, ignore_index=-100, BLOCK=MERGE_BLOCK)
    specs.append(LaunchSpec(_linear_stats_merge, args, MERGE_WARPS, 1, "merge"))
    return specs
