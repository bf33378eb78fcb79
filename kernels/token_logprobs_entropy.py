"""Triton kernels: per-token log-prob and entropy from logits ``[rows, V]``.

Forward (one program per row, one streaming pass over the vocab)::

    s   = z / tau
    lse = logsumexp(s)                    online: running max m, S, T (softmax_stats)
    H   = lse - sum_i softmax(s)_i s_i
    logp = s[y] - lse

Backward (one program per row, reads the row once, writes ``dz`` once)::

    p_i  = exp((s_i - m) - log S)         recomputed from the saved fp32 m, log S
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau

Rows are addressed as ``(outer, inner)`` pairs with two strides, so a
``[B, T, V]`` view such as ``logits[:, :-1]`` is read in place without a copy;
the vocab stride is a runtime argument (Triton specializes it when it is 1).
Rows whose target equals ``ignore_index`` load nothing, give 0 for every output
and get a zero gradient. Accumulation is fp32 whatever the logits' dtype.
"""
import triton
import triton.language as tl

from .softmax_stats import finalize_stats, logit_grad, online_stats_update, target_logprob

# Largest block, in bytes of one row slice held per program: 16 KiB, i.e. 4096
# fp32 or 8192 bf16/fp16 elements, 16 elements per thread at the warps below.
# Chosen from the register budget (no spills at every configuration, checked by
# tests/test_kernel_compile.py for sm_80 and sm_90); not yet tuned on a GPU:
# no device was lent to the session that wrote this.
_MAX_BLOCK_BYTES = 16384
_MIN_BLOCK = 1024


def launch_config(n_cols: int, element_size: int) -> tuple[int, int]:
    """Return ``(BLOCK, num_warps)`` for a row of ``n_cols`` elements of ``element_size`` bytes.

    ``BLOCK`` is the next power of two of ``n_cols`` clamped to
    ``[1024, 16384 // element_size]``; rows longer than a block are streamed.
    """
    if element_size not in (2, 4):
        raise ValueError(f"element_size must be 2 or 4 bytes, got {element_size}")
    block = min(max(triton.next_power_of_2(max(n_cols, 1)), _MIN_BLOCK), _MAX_BLOCK_BYTES // element_size)
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def launch_configs(element_size: int) -> list[tuple[int, int]]:
    """Every ``(BLOCK, num_warps)`` that :func:`launch_config` can return for ``element_size``."""
    configs, block = [], _MIN_BLOCK
    while block <= _MAX_BLOCK_BYTES // element_size:
        configs.append(launch_config(block, element_size))
        block *= 2
    return configs


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
    # strides
    stride_z_outer,
    stride_z_inner,
    stride_z_v,
    # scalars
    inv_tau,
    ignore_index,
    # meta
    BLOCK: tl.constexpr,
):
    """One program = one row: online ``(m, S, T)`` over ``ceil(V / BLOCK)`` blocks."""
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    row_ptr = logits_ptr + outer * stride_z_outer + inner * stride_z_inner
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    n_valid = tl.where(keep, V, 0)  # an ignored row loads nothing

    m = tl.full([], float("-inf"), tl.float32)
    S = tl.zeros([], tl.float32)
    T = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < n_valid
        z = tl.load(row_ptr + cols.to(tl.int64) * stride_z_v, mask=valid, other=float("-inf"))
        m, S, T = online_stats_update(m, S, T, z.to(tl.float32) * inv_tau, valid)
    log_S, H = finalize_stats(m, S, T)

    z_y = tl.load(row_ptr + tl.where(keep, target, 0) * stride_z_v).to(tl.float32) * inv_tau
    tl.store(logp_ptr + row, tl.where(keep, target_logprob(z_y, m, log_S), 0.0))
    tl.store(entropy_ptr + row, tl.where(keep, H, 0.0))
    tl.store(max_ptr + row, tl.where(keep, m, 0.0))
    tl.store(log_s_ptr + row, tl.where(keep, log_S, 0.0))


@triton.jit
def _token_logprobs_entropy_bwd(
    # pointers
    logits_ptr,  # [rows, V] (strided), read
    targets_ptr,  # [rows] int64
    max_ptr,  # [rows] fp32, m from the forward
    log_s_ptr,  # [rows] fp32, log S from the forward
    entropy_ptr,  # [rows] fp32, from the forward
    grad_logp_ptr,  # [rows] fp32 upstream (unused unless HAS_GRAD_LOGP)
    grad_entropy_ptr,  # [rows] fp32 upstream (unused unless HAS_GRAD_ENTROPY)
    dlogits_ptr,  # [rows, V] (strided) out; may alias logits_ptr (inplace_backward)
    # shapes
    n_inner,
    V,
    # strides
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
    """One program = one row: recompute ``p`` block by block and write ``dz``.

    Each block is read and then written by the same program before the next
    block is touched, so ``dlogits_ptr == logits_ptr`` (in-place) is safe.
    """
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    z_ptr = logits_ptr + outer * stride_z_outer + inner * stride_z_inner
    dz_ptr = dlogits_ptr + outer * stride_dz_outer + inner * stride_dz_inner
    target = tl.load(targets_ptr + row)
    keep = target != ignore_index
    n_valid = tl.where(keep, V, 0)
    m = tl.load(max_ptr + row)
    log_S = tl.load(log_s_ptr + row)
    H = tl.load(entropy_ptr + row)
    g_logp = 0.0
    g_H = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.where(keep, tl.load(grad_logp_ptr + row), 0.0)
    if HAS_GRAD_ENTROPY:
        g_H = tl.where(keep, tl.load(grad_entropy_ptr + row), 0.0)

    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < V
        valid = cols < n_valid
        z = tl.load(z_ptr + cols.to(tl.int64) * stride_z_v, mask=valid, other=float("-inf"))
        dz = logit_grad(z.to(tl.float32) * inv_tau, valid, cols == target, m, log_S, H, g_logp, g_H, inv_tau)
        tl.store(dz_ptr + cols.to(tl.int64) * stride_dz_v, dz.to(dlogits_ptr.dtype.element_ty), mask=in_row)


def compile_specs() -> list[dict]:
    """Every kernel configuration the dispatcher can launch, for ahead-of-time compile checks.

    Each entry: ``kernel``, ``signature`` (argument -> Triton type), ``constexprs``,
    ``num_warps``. Integer strides are typed ``i64`` (the widest the launcher passes).
    """
    specs = []
    for elem, names in ((4, ("fp32",)), (2, ("bf16", "fp16"))):
        for dt in names:
            for block, warps in launch_configs(elem):
                fwd_sig = {
                    "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "logp_ptr": "*fp32", "entropy_ptr": "*fp32",
                    "max_ptr": "*fp32", "log_s_ptr": "*fp32", "n_inner": "i32", "V": "i32", "stride_z_outer": "i64",
                    "stride_z_inner": "i64", "stride_z_v": "i64", "inv_tau": "fp32", "ignore_index": "i64",
                    "BLOCK": "constexpr",
                }
                specs.append(dict(kernel=_token_logprobs_entropy_fwd, signature=fwd_sig,
                                  constexprs={"BLOCK": block}, num_warps=warps))
                bwd_sig = {
                    "logits_ptr": f"*{dt}", "targets_ptr": "*i64", "max_ptr": "*fp32", "log_s_ptr": "*fp32",
                    "entropy_ptr": "*fp32", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "dlogits_ptr": f"*{dt}",
                    "n_inner": "i32", "V": "i32",
                    "stride_z_outer": "i64", "stride_z_inner": "i64", "stride_z_v": "i64",
                    "stride_dz_outer": "i64", "stride_dz_inner": "i64", "stride_dz_v": "i64",
                    "inv_tau": "fp32", "ignore_index": "i64",
                    "BLOCK": "constexpr", "HAS_GRAD_LOGP": "constexpr", "HAS_GRAD_ENTROPY": "constexpr",
                }
                for g_logp, g_h in ((True, True), (True, False), (False, True)):
                    specs.append(dict(kernel=_token_logprobs_entropy_bwd, signature=bwd_sig,
                                      constexprs={"BLOCK": block, "HAS_GRAD_LOGP": g_logp, "HAS_GRAD_ENTROPY": g_h},
                                      num_warps=warps))
    return specs
