"""Triton kernels: per-token log-prob and entropy from logits ``[rows, V]``.

Forward (one program per row, one streaming pass over the vocab)::

    s   = z / tau
    lse = logsumexp(s) = m + log S        online: running max m, S, T (softmax_stats)
    H   = lse - sum_i softmax(s)_i s_i = log S - T / S
    logp = s[y] - lse = (s_y - m) - log S

Backward (a 2-D grid: one program per (row, vocab block), no loop; reads the
block once and writes ``dz`` once)::

    log p_i = (s_i - m) - log S         from the saved fp32 (m, log S, H) of the row
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau

Rows are addressed as ``(outer, inner)`` pairs with two int64 strides, so a
``[B, T, V]`` view such as ``logits[:, :-1]`` is read in place without a copy
and ``N * V`` past 2^31 cannot overflow. Accumulation is fp32 whatever the
logits' dtype. Rows whose target equals ``ignore_index`` load nothing, give 0
for every output and a zero gradient. A kept row whose target lies outside
``[0, V)`` reads nothing either (the target is never dereferenced) and gives
NaN outputs and a NaN gradient: the device-side guard that lets the op skip a
host-synchronizing range check (``validate=``).

Speed design (memory-bound: the floor is reading the logits once forward, and
reading them once plus writing ``dz`` once backward):

- Forward: the row is streamed as ``[R, VEC]`` tiles, ``VEC`` = 16 bytes of
  logits, so each thread owns whole 16-byte vectors (``LDG.E.128``) and keeps its
  own running ``(m, S, T)`` per vector lane (:func:`lane_stats_update`): the
  per-tile max and sums reduce inside the thread, one exp per element, no
  shuffle and no barrier in the loop. Full tiles run unmasked (their loads stay
  vectorized whatever ``V``); one masked tile handles the tail. The lanes are
  merged once after the loop (one block reduction per row). 16-byte loads need
  16-byte aligned rows: a row stride that is a multiple of 8 elements (16-bit) or
  4 (fp32), as every real vocabulary size is; other strides fall back to narrower
  loads (still correct).
- Backward: no row loop. Each program recomputes ``p`` for one ``BLOCK`` of one
  row from the 3 saved fp32 statistics and writes ``dz`` (vectorized unmasked
  store except in a row's last block).

Compiled code (sm_90, as the runtime specializes a contiguous ``[32768, V]`` launch: unit vocab
stride a constant, strides and pointers divisible by 16; ``python -m benchmarks.static``), bf16:

- forward (BLOCK 4096, 8 warps): 32 registers, 8 CTAs/SM; loop body 168 instructions per thread
  per iteration = 16 logits (two ``LDG.E.128``) -> 10.5 instructions and 1.125 ``MUFU.EX2`` per
  logit, no barrier and no shuffle in the loop; one block reduction after it (5 ``BAR.SYNC``).
  Per row with the prologue, the masked tail and the epilogue (426 instructions): 11.2 per logit
  at V = 152064, 12.8 at V = 32000, 10.9 at V = 262144. fp16 10.0, fp32 (BLOCK 2048) 10.6 per
  logit in the loop.
- backward (BLOCK 8192, 8 warps): 32 registers, 8 CTAs/SM, four ``LDG.E.128`` and four
  ``STG.E.128`` per thread, no loop; 469 instructions per thread on a full block = 14.7 per
  logit (prologue included), one ``MUFU.EX2`` per logit; the per-row barrier pair only in the
  one program that holds the target.

Model (time = max(bytes / copy bandwidth, instructions / issue rate, MUFU / MUFU rate); 132 SMs,
4 warp-instructions and 16 MUFU results per SM per clock at 1.755 GHz; copy bandwidth 3.0 TB/s
H100, 4.3 TB/s H200; N = 32768, bf16): every kernel is bandwidth-bound, fwd+bwd at 100% of the
copy floor on both GPUs at V = 32000, 152064 and 262144. The least issue headroom is the
H200 forward at V = 32000 (issue 0.45 ms vs bytes 0.49 ms: 92% of the issue rate needed);
elsewhere the issue time is 37-81% of the bytes time. Modeled, not yet measured on a GPU.
"""
import triton
import triton.language as tl

from .softmax_stats import FLOAT32_LOWEST, clamp_shift, fast_exp, lane_stats_update, reduce_lane_stats

# Vector width: 16 bytes per thread per load (LDG.E.128), 8 bf16/fp16 or 4 fp32.
_VECTOR_BYTES = 16
# Forward tile: 8 KiB of logits per program per loop iteration (4096 bf16 / 2048 fp32 = two
# 16-byte vectors per thread at 8 warps), so a program keeps 8 KiB in flight and an SM with
# 6-8 resident programs 48-64 KiB, above the ~30 KiB that an H200's bandwidth-latency product
# needs per SM (4.3 TB/s / 132 SMs x ~1 us). Registers stay low (see compile_specs). Chosen from
# the compiled code; not yet measured on a GPU.
_FWD_TILE_BYTES = 8192
# Backward block: 16 KiB of logits per program (8192 bf16 / 4096 fp32, four 16-byte vectors per
# thread at 8 warps): few programs per row (19 at V = 152064 bf16), one read and one write each.
_BWD_BLOCK_BYTES = 16384
_MIN_BLOCK = 256


def _vector(element_size: int) -> int:
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 or 4 bytes, got {element_size}")
    return _VECTOR_BYTES // element_size


def launch_config(n_cols: int, element_size: int) -> tuple[int, int]:
    """Forward ``(BLOCK, num_warps)`` for rows of ``n_cols`` elements of ``element_size`` bytes.

    ``BLOCK`` (elements per loop iteration) is the next power of two of ``n_cols`` clamped to
    ``[256, 8192 // element_size]``; longer rows are streamed. The tile is ``[BLOCK // VEC, VEC]``.
    """
    _vector(element_size)
    block = min(max(triton.next_power_of_2(max(n_cols, 1)), _MIN_BLOCK), _FWD_TILE_BYTES // element_size)
    return block, (8 if block * element_size >= 8192 else 4)


def backward_launch_config(n_cols: int, element_size: int) -> tuple[int, int]:
    """Backward ``(BLOCK, num_warps)``: the block one program writes, ``[256, 16384 // element_size]``."""
    _vector(element_size)
    block = min(max(triton.next_power_of_2(max(n_cols, 1)), _MIN_BLOCK), _BWD_BLOCK_BYTES // element_size)
    return block, (8 if block * element_size >= 16384 else 4)


@triton.jit
def _token_logprobs_entropy_fwd(
    # pointers
    logits_ptr,  # [rows, V] (strided), fp32 / bf16 / fp16
    targets_ptr,  # [rows] int64
    logp_ptr,  # [rows] fp32 out
    entropy_ptr,  # [rows] fp32 out
    max_ptr,  # [rows] fp32 out: m, saved for backward
    log_s_ptr,  # [rows] fp32 out: log S, saved for backward (lse = m + log S)
    # shapes
    n_inner,  # rows are (outer, inner) = divmod(row, n_inner)
    V,
    # strides (elements)
    stride_z_outer,
    stride_z_inner,
    stride_z_v,
    # scalars
    inv_tau,  # 1 / temperature, > 0
    ignore_index,
    # meta
    BLOCK: tl.constexpr,  # logits per loop iteration
    VEC: tl.constexpr,  # logits per 16-byte vector
):
    """One program = one row: per-lane online ``(m, S, T)`` over ``V // BLOCK`` full tiles and a masked tail."""
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    row_ptr = logits_ptr + outer * stride_z_outer + inner * stride_z_inner
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    ok = keep & (target >= 0) & (target < V)  # guard: an out-of-range target is never dereferenced
    n_valid = tl.where(ok, V, 0)  # an ignored (or guarded) row loads nothing

    R: tl.constexpr = BLOCK // VEC
    tile = tl.arange(0, R)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [R, VEC], VEC contiguous per thread
    tile_offs = tile.to(tl.int64) * stride_z_v  # loop-invariant
    m = tl.full([R], FLOAT32_LOWEST, tl.float32)
    S = tl.zeros([R], tl.float32)
    T = tl.zeros([R], tl.float32)
    n_full = n_valid // BLOCK
    for i in range(0, n_full):
        z = tl.load(row_ptr + tl.cast(i * BLOCK, tl.int64) * stride_z_v + tile_offs)
        m, S, T = lane_stats_update(m, S, T, z.to(tl.float32), inv_tau)
    tail = n_full * BLOCK
    z = tl.load(row_ptr + tl.cast(tail, tl.int64) * stride_z_v + tile_offs, mask=tail + tile < n_valid, other=float("-inf"))
    m, S, T = lane_stats_update(m, S, T, z.to(tl.float32), inv_tau)
    m_row, S_row, T_row = reduce_lane_stats(m, S, T)

    # S_row = 0: no finite logit (or nothing loaded). Such a row reports m = -inf, log S = -inf,
    # the empty partial of softmax_stats; a kept one gets NaN log-prob and entropy. A NaN or +inf
    # logit makes S_row NaN: that row is not empty, its NaN reaches every statistic (a vocab-parallel
    # merge must see it, not drop the shard as empty).
    has_mass = S_row != 0.0
    log_S = tl.log(tl.where(has_mass, S_row, 1.0))
    log_S = tl.where(has_mass, log_S, float("-inf"))
    m_row = tl.where(has_mass, m_row, float("-inf"))
    H = tl.where(has_mass, log_S - T_row / tl.where(has_mass, S_row, 1.0), float("nan"))
    z_y = tl.load(row_ptr + tl.where(ok, target, 0) * stride_z_v).to(tl.float32)
    logp = (z_y * inv_tau - m_row) - log_S
    nan = float("nan")
    tl.store(logp_ptr + row, tl.where(keep, tl.where(ok, logp, nan), 0.0))
    tl.store(entropy_ptr + row, tl.where(keep, tl.where(ok, H, nan), 0.0))
    tl.store(max_ptr + row, tl.where(keep, tl.where(ok, m_row, nan), 0.0))
    tl.store(log_s_ptr + row, tl.where(keep, tl.where(ok, log_S, nan), 0.0))


@triton.jit
def _grad_block(z, m, log_S, H, g_logp, g_H, inv_tau, HAS_GRAD_ENTROPY: tl.constexpr):
    """``dz`` of raw logits ``z`` (fp32) without the target term: ``p (A + B log p)``.

    ``A = -(g_logp + g_H H) / tau`` and ``B = -g_H / tau`` are per-row scalars; ``log p`` is
    clamped at ``-1e4`` (``p = 0`` exactly there), so a ``-inf`` logit gives ``0``, never
    ``0 * -inf``. Per element: FFMA, FADD, clamp, FMUL + MUFU.EX2, FFMA, FMUL.
    """
    log_p = clamp_shift((z * inv_tau - m) - log_S)
    p = fast_exp(log_p)
    if HAS_GRAD_ENTROPY:
        dz = p * (-(g_logp + g_H * H) * inv_tau - (g_H * inv_tau) * log_p)
    else:
        dz = p * (-g_logp * inv_tau)
    return dz


@triton.jit
def _token_logprobs_entropy_bwd(
    # pointers
    logits_ptr,  # [rows, V] (strided), read
    targets_ptr,  # [rows] int64; any id outside [0, V) matches no column
    max_ptr,  # [rows] fp32, m from the forward
    log_s_ptr,  # [rows] fp32, log S from the forward
    entropy_ptr,  # [rows] fp32, from the forward
    grad_logp_ptr,  # [rows] fp32 upstream (unused unless HAS_GRAD_LOGP)
    grad_entropy_ptr,  # [rows] fp32 upstream (unused unless HAS_GRAD_ENTROPY)
    dlogits_ptr,  # [rows, V] (strided) out; may alias logits_ptr (inplace_backward)
    # shapes
    n_inner,
    V,
    # strides (elements)
    stride_z_outer,
    stride_z_inner,
    stride_z_v,
    stride_dz_outer,
    stride_dz_inner,
    stride_dz_v,
    # scalars
    inv_tau,
    ignore_index,
    # meta
    BLOCK: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    """Program ``(row, j)`` writes ``dz`` of columns ``[j BLOCK, (j + 1) BLOCK)`` of ``row``.

    The block is written without the target term; the one program per row whose block holds
    the target re-writes that element with ``+ g_logp / tau`` after a block barrier (no compare
    per element). Each element is read, then written, by the same thread, programs own disjoint
    blocks, and the target's logit is read before a barrier that precedes every store, so
    ``dlogits_ptr == logits_ptr`` (in-place) is safe for inputs whose rows do not overlap in
    memory. An ignored row reads nothing and gets zeros.
    """
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    outer = row // n_inner
    inner = row % n_inner
    z_ptr = logits_ptr + outer * stride_z_outer + inner * stride_z_inner + tl.cast(start, tl.int64) * stride_z_v
    dz_ptr = dlogits_ptr + outer * stride_dz_outer + inner * stride_dz_inner + tl.cast(start, tl.int64) * stride_dz_v
    cols = tl.arange(0, BLOCK)
    z_offs = cols.to(tl.int64) * stride_z_v
    dz_offs = cols.to(tl.int64) * stride_dz_v
    out_ty = dlogits_ptr.dtype.element_ty
    target = tl.load(targets_ptr + row)
    if target == ignore_index:
        tl.store(dz_ptr + dz_offs, tl.zeros([BLOCK], out_ty), mask=start + cols < V)
    else:
        m = tl.load(max_ptr + row)
        log_S = tl.load(log_s_ptr + row)
        H = tl.load(entropy_ptr + row)
        g_logp = 0.0
        g_H = 0.0
        if HAS_GRAD_LOGP:
            g_logp = tl.load(grad_logp_ptr + row)
        if HAS_GRAD_ENTROPY:
            g_H = tl.load(grad_entropy_ptr + row)
        # The target's column in this block, or -1; its dz (with the + g_logp / tau term) is
        # formed from a scalar read made before any store of the block (in-place safe).
        local = tl.where((target >= start) & (target < start + BLOCK), target - start, -1)
        z_y = tl.load(z_ptr + tl.maximum(local, 0) * stride_z_v, mask=local >= 0, other=0.0).to(tl.float32)
        dz_y = _grad_block(z_y, m, log_S, H, g_logp, g_H, inv_tau, HAS_GRAD_ENTROPY) + g_logp * inv_tau
        if HAS_GRAD_LOGP:
            if local >= 0:
                tl.debug_barrier()  # every thread has read z_y before any thread overwrites it (in-place)
        if start + BLOCK <= V:  # every block but a row's last: unmasked, vectorized
            z = tl.load(z_ptr + z_offs).to(tl.float32)
            dz = _grad_block(z, m, log_S, H, g_logp, g_H, inv_tau, HAS_GRAD_ENTROPY)
            tl.store(dz_ptr + dz_offs, dz.to(out_ty))
        else:
            in_row = start + cols < V
            z = tl.load(z_ptr + z_offs, mask=in_row, other=float("-inf")).to(tl.float32)
            dz = _grad_block(z, m, log_S, H, g_logp, g_H, inv_tau, HAS_GRAD_ENTROPY)
            tl.store(dz_ptr + dz_offs, dz.to(out_ty), mask=in_row)
        if HAS_GRAD_LOGP:
            if local >= 0:
                tl.debug_barrier()  # the block's stores are done: the target's value lands last
                tl.store(dz_ptr + local * stride_dz_v, dz_y.to(out_ty))


def compile_specs() -> list:
    """Every kernel configuration the dispatcher can launch, as :class:`kernels._aot.LaunchSpec`.

    Arguments are what ``entropy_ops.token_ops`` passes for a contiguous ``[32768, V]`` launch at
    a representative ``V`` per block size (``V = 152064`` for the streaming configurations, a
    smaller multiple of 16 where the block covers the whole row), unit vocab stride (which the
    runtime specializes to a constant), ``temperature = 0.7``, ``ignore_index = -100``.
    """
    from ._aot import LaunchSpec, Pointer

    specs = []
    n_rows = 32768
    for elem, names in ((4, ("fp32",)), (2, ("bf16", "fp16"))):
        vec = _vector(elem)
        for dt in names:
            fwd_seen, bwd_seen = set(), set()
            for v in (152064, 2000, 1008, 400, 208):  # one V per reachable (BLOCK, num_warps), longest first
                block, warps = launch_config(v, elem)
                if (block, warps) not in fwd_seen:
                    fwd_seen.add((block, warps))
                    specs.append(LaunchSpec(
                        kernel=_token_logprobs_entropy_fwd,
                        args=dict(logits_ptr=Pointer(dt), targets_ptr=Pointer("i64"), logp_ptr=Pointer("fp32"),
                                  entropy_ptr=Pointer("fp32"), max_ptr=Pointer("fp32"), log_s_ptr=Pointer("fp32"),
                                  n_inner=n_rows, V=v, stride_z_outer=n_rows * v, stride_z_inner=v, stride_z_v=1,
                                  inv_tau=1 / 0.7, ignore_index=-100, BLOCK=block, VEC=vec),
                        num_warps=warps, label=f"forward V={v}"))
                block, warps = backward_launch_config(v, elem)
                if (block, warps) in bwd_seen:
                    continue
                bwd_seen.add((block, warps))
                for g_logp, g_h in ((True, True), (True, False), (False, True)):
                    specs.append(LaunchSpec(
                        kernel=_token_logprobs_entropy_bwd,
                        args=dict(logits_ptr=Pointer(dt), targets_ptr=Pointer("i64"), max_ptr=Pointer("fp32"),
                                  log_s_ptr=Pointer("fp32"), entropy_ptr=Pointer("fp32"),
                                  grad_logp_ptr=Pointer("fp32"), grad_entropy_ptr=Pointer("fp32"),
                                  dlogits_ptr=Pointer(dt), n_inner=n_rows, V=v,
                                  stride_z_outer=n_rows * v, stride_z_inner=v, stride_z_v=1,
                                  stride_dz_outer=n_rows * v, stride_dz_inner=v, stride_dz_v=1,
                                  inv_tau=1 / 0.7, ignore_index=-100,
                                  BLOCK=block, HAS_GRAD_LOGP=g_logp, HAS_GRAD_ENTROPY=g_h),
                        num_warps=warps, label=f"backward V={v}"))
    return specs
