"""Vocab-parallel (tensor-parallel lm_head) per-token log-prob and entropy.

Each rank ``r`` of a process group holds the columns ``[v_r, v_r + V_r)`` of the logits (or the rows
of the lm_head weight that produce them); the shards tile ``[0, V)`` in any rank order, sizes may
differ. With ``s = z / tau`` (soft-capped first in the linear form) and target ``y``::

    per rank, one fused pass over its shard:  m_r = max s,  S_r = sum exp(s - m_r),
                                             T_r = sum exp(s - m_r) (s - m_r),  d_r = s_y - m_r (owner only)
    m = max_r m_r                                                          all-reduce MAX
    [S, T, s_y - m, owners] = sum_r a_r [S_r, T_r + (m_r - m) S_r, 0, 0] + [0, 0, 1[y in r] (d_r + m_r - m), 1[y in r]],
                      a_r = exp(m_r - m)                                   one all-reduce SUM of [4, N]
    logp = (s_y - m) - log S,   H = log S - T / S                        (docs/math.md section 1)

The target's logit enters through the sum: only its owner adds a non-zero, so the sum is exact.
The partials come from the existing launch functions, which return finished statistics
``(m_r, log S_r, H_r)`` and the shard-local ``logp_r``; they are turned back into
``S_r = exp(log S_r)``, ``T_r = S_r (log S_r - H_r)``, ``d_r = logp_r + log S_r`` (exact up to
fp32 rounding of ``log S_r`` and ``H_r``: a few ulp of ``log V_r``, no cancellation since
``H_r >= log S_r >= 0``), then combined with ``softmax_stats.merge_stats``/``finalize_stats``.

Backward needs no collective for the logits: each rank writes the gradient of its own columns,
``dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau`` with the *global* ``(m, log S, H)``,
the ``1[i = y]`` term only on the target's owner (other ranks pass a target id outside
``[0, V_r)``, so no column matches; ignored rows stay zero everywhere). In the linear form
``dh = sum_r dz_r W_r`` is a partial sum on each rank and is all-reduced in backward, in fp32,
like the input gradient of Megatron's column-parallel linear; ``dW_r``, ``db_r`` are local.

Conventions (as in Megatron's vocab-parallel cross-entropy): ``targets`` (global ids), ``hidden``,
``temperature`` and the other options are identical on every rank; the outputs are replicated,
and every rank builds the same loss from them (each backward uses its own upstream gradient as
is). With the value checks on (``validate=``; by default on CPU tensors) every call validates the
shard layout with one all-gather of ``(vocab_start, V_r)`` and the targets against the resulting ``V``
(a host sync); without them a kept row whose target is owned by no rank or by several (``owners != 1``)
gives NaN. Local argument errors raise before any collective, so a rank-dependent error leaves the
others waiting.
A group of one rank calls the single-process op (bitwise the same results).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import softmax_stats
from ._dispatch import resolve_backend
from ._layout import as_rows3d
from ._validation import (
    check_finite_rows,
    check_float_tensor,
    first_order_only,
    check_lm_head,
    check_softcap,
    check_targets,
    check_temperature,
    linear_row_max_abs,
    max_abs_finite,
    value_checks_enabled,
    widen_targets,
)
from .linear_ops import (
    LinearOpParams,
    linear_backward,
    linear_forward,
    linear_logprobs_and_entropy,
)
from .softmax_stats import RowStats
from .token_ops import (
    TokenOpParams,
    _row_blocks,
    _zero_ignored_rows_,
    token_backward_triton,
    token_forward_torch,
    token_forward_triton,
    token_logprobs_and_entropy,
)


@dataclass(frozen=True)
class VocabParallelParams:
    """Non-tensor options of one call: the shard's first global id, the group, and the op's own options."""

    vocab_start: int
    group: object  # a torch.distributed ProcessGroup
    op: TokenOpParams | LinearOpParams
    check_values: bool = True  # the host-synchronizing checks (validate=, resolved)


# ---------------------------------------------------------------- statistics across ranks
def shard_targets(targets: torch.Tensor, vocab_start: int, n_local: int, ignore_index: int):
    """``(forward, backward, owned)`` ``[N]`` for this shard, from the global ids ``targets`` ``[N]`` int64.

    Rows whose target this shard owns (``owned``) get ``y - vocab_start`` in both target vectors.
    Other kept rows get column 0 in the forward one (any in-range column: its ``logp_r`` is discarded)
    and a negative id that is not ``ignore_index`` in the backward one (no column matches it, so the
    row keeps its ``-p_i`` terms and gets no ``+ g_logp``). Ignored rows keep ``ignore_index``.
    """
    keep = targets != ignore_index
    local = targets - vocab_start
    owned = keep & (local >= 0) & (local < n_local)
    not_here = -1 if ignore_index != -1 else -2
    ignored = torch.full_like(targets, ignore_index)
    forward = torch.where(owned, local, torch.where(keep, torch.zeros_like(local), ignored))
    backward = torch.where(owned, local, torch.where(keep, torch.full_like(local, not_here), ignored))
    return forward.contiguous(), backward.contiguous(), owned


def shard_partials(logp_r, m_r, log_S_r, H_r, owned) -> torch.Tensor:
    """``[4, N]``: this shard's partial ``(m, S, T)`` and ``d = s_y - m_r`` (0 where not ``owned``).

    From the finished statistics of the launch functions: ``S = exp(log S)``, ``T = S (log S - H)``,
    ``d = logp + log S``. A shard row of only ``-inf`` (``S = 0``) gets ``m = -inf``, ``T = 0`` and,
    if it owns the target, ``d = -inf``.
    """
    S = torch.exp(log_S_r)
    empty = S == 0
    zero = torch.zeros_like(S)
    neg_inf = torch.full_like(S, float("-inf"))
    T = torch.where(empty, zero, S * (log_S_r - H_r))
    d = torch.where(owned, torch.where(empty, neg_inf, logp_r + log_S_r), zero)
    return torch.stack((torch.where(empty, neg_inf, m_r), S, T, d))


def rescale_partials(part: torch.Tensor, owned: torch.Tensor, m_global: torch.Tensor) -> torch.Tensor:
    """``[4, N]`` summands of the all-reduce: ``(S, T)`` of :func:`shard_partials` moved to the reference
    ``m_global`` (``merge_stats`` with an empty partial at ``m_global``), ``s_y - m_global`` on the
    target's owner, exactly 0 elsewhere (so the sum over ranks adds zeros to one value: exact), and
    ``1`` where this rank owns the target (summed: the number of owners, which must be 1)."""
    m, S, T, d = part
    zero = torch.zeros_like(S)
    _, S_g, T_g = softmax_stats.merge_stats(m, S, T, m_global, zero, zero)
    m_ref = torch.where(torch.isneginf(m_global), zero, m_global)
    d_g = torch.where(owned, d + (m - m_ref), zero)
    return torch.stack((S_g, T_g, d_g, owned.to(S.dtype)))


def finish_partials(m_global: torch.Tensor, summed: torch.Tensor,
                    keep: torch.Tensor | None = None) -> tuple[RowStats, torch.Tensor]:
    """Global ``RowStats`` and ``logp = (s_y - m) - log S`` from the reduced ``m`` and the summed ``[4, N]``.

    With ``keep`` (rows whose target is not ignored), a kept row whose target no rank owned, or more than
    one did (a target outside ``[0, V)``, or shards that do not tile the vocabulary, when the
    host-synchronizing checks are off), or with no finite logit on any shard, gets NaN ``m``, ``H`` and
    ``logp`` (so a NaN gradient), as in the single-process ops: the device-side guard of ``validate=``.
    """
    S, T, d, owners = summed
    stats = softmax_stats.finalize_stats(m_global, S, T)
    if keep is None:
        return stats, d - stats.log_S
    bad = keep & ((owners != 1) | (S == 0))  # S = 0: no finite logit on any shard (H would read 0)
    nan = torch.full_like(S, float("nan"))
    stats = RowStats(torch.where(bad, nan, stats.m), stats.log_S, torch.where(bad, nan, stats.H))
    return stats, torch.where(bad, nan, d - stats.log_S)


def combine_shards(part: torch.Tensor, owned: torch.Tensor, group, keep: torch.Tensor | None = None):
    """All-reduce MAX of ``m``, then one all-reduce SUM of the rescaled ``[4, N]``: global stats and logp."""
    m_global = part[0].clone()
    dist.all_reduce(m_global, op=dist.ReduceOp.MAX, group=group)
    summed = rescale_partials(part, owned, m_global)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
    return finish_partials(m_global, summed, keep)


def _saved_stats(stats: RowStats, keep: torch.Tensor) -> torch.Tensor:
    """``[3, N]`` statistics for backward; ignored rows get ``m = +inf`` so every path recomputes ``p = 0``."""
    m = torch.where(keep, stats.m, torch.full_like(stats.m, float("inf")))
    return torch.stack((m, stats.log_S, stats.H))


def _finish(part, owned, targets, params: VocabParallelParams, what: str, local_row_max_abs):
    """Reduce the partials; return ``(logp, H, saved stats [3, N])`` with ignored rows zeroed.

    ``local_row_max_abs(idx)``: ``max |finite logit|`` of row ``idx`` in this shard (a float), reduced over
    the group only when a row fails the value check, to tell a ``temperature`` overflow from bad logits.
    """
    keep = targets != params.op.ignore_index
    stats, logp = combine_shards(part, owned, params.group, keep)
    if params.check_values:  # same data on every rank: all raise together (and all join the MAX below)
        def row_max_abs(idx: int) -> float:
            largest = torch.tensor([local_row_max_abs(idx)], dtype=torch.float64, device=part.device)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=params.group)
            return float(largest[0])

        check_finite_rows(stats.lse, keep, what, temperature=params.op.temperature, row_max_abs=row_max_abs)
    zero = torch.zeros_like(logp)
    return torch.where(keep, logp, zero), torch.where(keep, stats.H, zero), _saved_stats(stats, keep)


# ---------------------------------------------------------------- logits form
def _token_shard_backward_torch(logits3d, local_targets, stats: RowStats, g_logp, g_H, params: TokenOpParams,
                                out3d):
    """CPU backward of one shard: ``token_backward_torch`` with targets outside ``[0, V_r)`` matching no column.

    (``token_backward_torch`` scatters at the target, so it needs in-range ids; ``block_grad_``'s
    ``in_block`` mask is the shared way to say "this row's target lies elsewhere".)
    """
    V = logits3d.shape[-1]
    keep = local_targets != params.ignore_index
    here = keep & (local_targets >= 0) & (local_targets < V)
    cols = local_targets.clamp(0, V - 1)
    stats = RowStats(torch.where(keep, stats.m, float("inf")), stats.log_S, stats.H)  # ignored rows: p = 0
    g_logp = None if g_logp is None else torch.where(keep, g_logp, 0.0)
    g_H = None if g_H is None else torch.where(keep, g_H, 0.0)
    B = logits3d.shape[1]
    for start, z in _row_blocks(logits3d):
        sl = slice(start, start + z.shape[0])
        dz = softmax_stats.block_grad_(
            softmax_stats.scaled_block(z, params.inv_tau), cols[sl],
            RowStats(stats.m[sl], stats.log_S[sl], stats.H[sl]),
            None if g_logp is None else g_logp[sl], None if g_H is None else g_H[sl],
            params.inv_tau, in_block=here[sl],
        )
        _zero_ignored_rows_(dz, keep[sl])
        a, b0 = divmod(start, B)
        out3d[a, b0:b0 + z.shape[0]].copy_(dz)
    return out3d


class VocabParallelTokenLogprobsEntropy(torch.autograd.Function):
    """``(logits_shard [..., V_r], targets [...]) -> (logp [...], H [...])``, fp32, replicated on every rank."""

    @staticmethod
    def forward(ctx, logits_shard, targets, params: VocabParallelParams):
        op: TokenOpParams = params.op
        logits3d = as_rows3d(logits_shard)
        flat = widen_targets(targets)
        fwd_t, bwd_t, owned = shard_targets(flat, params.vocab_start, logits_shard.shape[-1], op.ignore_index)
        forward = token_forward_triton if op.backend == "triton" else token_forward_torch
        logp_r, H_r, m_r, log_S_r = forward(logits3d, fwd_t, op)
        part = shard_partials(logp_r, m_r, log_S_r, H_r, owned)
        logp, H, saved = _finish(part, owned, flat, params, "logits",
                                 lambda idx: max_abs_finite(logits3d.reshape(-1, logits3d.shape[-1])[idx]))
        ctx.save_for_backward(logits_shard, bwd_t, saved)
        ctx.params = params
        lead = logits_shard.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    @first_order_only("vocab_parallel_logprobs_and_entropy")
    def backward(ctx, grad_logp, grad_H):
        logits_shard, bwd_t, saved = ctx.saved_tensors
        op: TokenOpParams = ctx.params.op
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_H is None):
            return None, None, None
        stats = RowStats(*saved.unbind(0))
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(saved.dtype).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(saved.dtype).contiguous()
        out = torch.empty(logits_shard.shape, dtype=logits_shard.dtype, device=logits_shard.device)
        with torch.no_grad():
            if op.backend == "triton":  # the kernel only compares column ids with the target
                token_backward_triton(as_rows3d(logits_shard), bwd_t, stats, g_logp, g_H, op, as_rows3d(out))
            else:
                _token_shard_backward_torch(as_rows3d(logits_shard), bwd_t, stats, g_logp, g_H, op, as_rows3d(out))
        return out, None, None


# ---------------------------------------------------------------- linear (hidden-state) form
class VocabParallelLinearLogprobsEntropy(torch.autograd.Function):
    """``(hidden [..., D], weight_shard [V_r, D], bias_shard [V_r] | None, targets [...]) -> (logp, H)``, fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: VocabParallelParams):
        ctx.set_materialize_grads(False)
        op: LinearOpParams = params.op
        flat = widen_targets(targets)
        fwd_t, bwd_t, owned = shard_targets(flat, params.vocab_start, weight.shape[0], op.ignore_index)
        logp_r, _, st = linear_forward(hidden, weight, bias, fwd_t, op)
        part = shard_partials(logp_r, st[0], st[1], st[2], owned)  # st[2]: H of every row (logp_r's H is masked)
        logp, H, saved = _finish(part, owned, flat, params, "logits (hidden @ weight_shard.T)",
                                 lambda idx: linear_row_max_abs(hidden.reshape(-1, hidden.shape[-1])[idx], weight,
                                                                bias, op.logit_softcap))
        ctx.save_for_backward(hidden, weight, bias, bwd_t, saved)
        ctx.params = params
        lead = hidden.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    @first_order_only("vocab_parallel_linear_logprobs_and_entropy")
    def backward(ctx, grad_logp, grad_H):
        hidden, weight, bias, bwd_t, saved = ctx.saved_tensors
        params: VocabParallelParams = ctx.params
        op: LinearOpParams = params.op
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        if not any(needs):
            return None, None, None, None, None
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(torch.float32).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(torch.float32).contiguous()
        if g_logp is None and g_H is None:  # still join the dh all-reduce below: other ranks may have gradients
            g_H = torch.zeros(bwd_t.shape, dtype=torch.float32, device=bwd_t.device)
        with torch.no_grad():
            dh, dw, db = linear_backward(hidden, weight, bias, bwd_t, saved.contiguous(), g_logp, g_H, op, needs)
            if dh is not None:  # dh = sum over ranks of dz_r W_r, reduced in fp32 (fp64 for fp64 inputs)
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=params.group)
        dh = None if dh is None else dh.to(hidden.dtype).view(hidden.shape)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None


# ---------------------------------------------------------------- validation
def _group_and_size(process_group, vocab_start: int):
    """``(group, world size)``; a group of one rank owns the whole vocabulary, so ``vocab_start`` must be 0."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "vocab-parallel ops need torch.distributed to be initialized (torch.distributed.init_process_group) "
            "before the call; for one process use token_logprobs_and_entropy / linear_logprobs_and_entropy"
        )
    group = dist.group.WORLD if process_group is None else process_group
    world = dist.get_world_size(group)
    if world == 1 and vocab_start != 0:
        raise ValueError(f"vocab_start must be 0 in a group of one rank, got {vocab_start}")
    return group, world


def _check_vocab_start(vocab_start) -> int:
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    return vocab_start


def check_shard_layout(vocab_start: int, n_local: int, group, device: torch.device) -> int:
    """All-gather every rank's ``(vocab_start, V_r)``; return ``V`` if the shards tile ``[0, V)``, else raise.

    One collective of ``2 * world_size`` int64 and a host sync. Every rank gets the same list, so every
    rank raises the same ``ValueError``.
    """
    mine = torch.tensor([vocab_start, n_local], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    per_rank = [tuple(int(v) for v in t.tolist()) for t in gathered]
    end = 0
    for start, size in sorted(per_rank):
        if start != end:
            raise ValueError(
                "the vocab shards must tile [0, V) without gaps or overlaps; got (vocab_start, V_r) per rank "
                f"{per_rank}: a shard starts at {start} where {end} was expected"
            )
        end += size
    return end


def _n_classes(vocab_start: int, n_local: int, group, device: torch.device, check_values: bool) -> int:
    """``V`` from the checked shard layout (a collective and a host sync), or, without the value checks,
    the smallest ``V`` this rank can vouch for (``vocab_start + V_r``: used only to check ``ignore_index``)."""
    if check_values:
        return check_shard_layout(vocab_start, n_local, group, device)
    return vocab_start + n_local


# ---------------------------------------------------------------- public functionals
def vocab_parallel_logprobs_and_entropy(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    process_group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    validate="auto",
):
    """:func:`~entropy_ops.token_logprobs_and_entropy` over logits split by vocab across ranks.

    Equals ``token_logprobs_and_entropy(cat(logits shards of all ranks, ordered by vocab_start), targets)``
    without gathering the logits: one fused pass over the local shard, an all-reduce MAX of ``[N]``
    and an all-reduce SUM of ``[4, N]`` (module docstring). Call it on every rank of the group.

    Args:
        logits_shard: ``[..., V_r]`` this rank's logits for the global ids ``[vocab_start, vocab_start + V_r)``,
            fp32, bf16 or fp16 (fp64 on the CPU path), any strides.
        targets: ``[...]`` global ids in ``[0, V)`` or ``ignore_index``, the same on every rank.
        vocab_start: first global id of this rank's shard. The shards of the group must tile ``[0, V)``
            (any order, any sizes >= 1); checked on every call with one all-gather.
        process_group: the tensor-parallel group; ``None`` is the default group.
        temperature, ignore_index, backend: as in ``token_logprobs_and_entropy``.
        validate: as in ``token_logprobs_and_entropy``. The value checks here also include the shard
            layout (one all-gather and a host sync); without them (``"auto"`` on CUDA, or ``False``) a row
            whose target no rank owns exactly once (out of range, or shards that do not tile ``[0, V)``)
            gives NaN, found on the device from the owner count carried in the all-reduce.

    Returns:
        ``(logp, entropy)`` fp32 ``[...]`` (fp64 for fp64 inputs on the CPU path), identical on every
        rank; 0 on ignored rows. Backward gives each rank the gradient of its own shard,
        ``dz_i = (g_logp (1[i=y] - p_i) - g_H p_i (log p_i + H)) / tau``, with no collective.
    """
    check_float_tensor("logits_shard", logits_shard)
    temperature = check_temperature(temperature)
    vocab_start = _check_vocab_start(vocab_start)
    group, world = _group_and_size(process_group, vocab_start)
    if world == 1:
        return token_logprobs_and_entropy(logits_shard, targets, temperature=temperature,
                                          ignore_index=ignore_index, backend=backend, validate=validate)
    check_values = value_checks_enabled(validate, logits_shard.device)
    n_classes = _n_classes(vocab_start, logits_shard.shape[-1], group, logits_shard.device, check_values)
    check_targets(targets, logits_shard.shape[:-1], n_classes, ignore_index, logits_shard.device,
                  validate=check_values)
    resolved = resolve_backend(backend, logits_shard.device)
    if resolved == "triton" and logits_shard.dtype == torch.float64:
        raise TypeError("logits_shard must be fp32, bf16 or fp16 on the Triton backend, got torch.float64")
    params = VocabParallelParams(vocab_start, group, TokenOpParams(temperature, ignore_index, resolved),
                                 check_values)
    return VocabParallelTokenLogprobsEntropy.apply(logits_shard, targets, params)


def vocab_parallel_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    bias_shard: torch.Tensor | None = None,
    process_group=None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    backend: str = "auto",
    validate="auto",
):
    """:func:`~entropy_ops.linear_logprobs_and_entropy` with the lm_head split by vocab rows across ranks.

    Equals ``linear_logprobs_and_entropy(hidden, cat(weight shards), targets, bias=cat(bias shards))``
    (shards ordered by ``vocab_start``): neither the ``[N, V]`` nor the ``[N, V_r]`` logits ever exist.
    Call it on every rank of the group.

    Args:
        hidden: ``[..., D]`` the same on every rank (the input of a column-parallel lm_head).
        weight_shard: ``[V_r, D]`` the lm_head rows of the global ids ``[vocab_start, vocab_start + V_r)``,
            same dtype and device as ``hidden``.
        targets: ``[...]`` global ids in ``[0, V)`` or ``ignore_index``, the same on every rank.
        vocab_start: first global id of this rank's rows; the shards must tile ``[0, V)`` (checked).
        bias_shard: optional ``[V_r]``.
        process_group: the tensor-parallel group; ``None`` is the default group.
        temperature, ignore_index, logit_softcap, backend: as in ``linear_logprobs_and_entropy``.
        validate: as in :func:`vocab_parallel_logprobs_and_entropy` (with more than one rank).

    Returns:
        ``(logp, entropy)`` fp32 ``[...]``, identical on every rank. Backward: ``d weight_shard`` and
        ``d bias_shard`` are local; ``d hidden = sum_r dz_r W_r`` is all-reduced (SUM, fp32) over the
        group, so every rank gets the full gradient of the replicated ``hidden``.
    """
    check_lm_head(hidden, weight_shard, bias_shard, "weight_shard", "bias_shard")
    temperature = check_temperature(temperature)
    logit_softcap = check_softcap(logit_softcap)
    vocab_start = _check_vocab_start(vocab_start)
    group, world = _group_and_size(process_group, vocab_start)
    if world == 1:
        return linear_logprobs_and_entropy(hidden, weight_shard, targets, bias=bias_shard, temperature=temperature,
                                           ignore_index=ignore_index, logit_softcap=logit_softcap, backend=backend,
                                           validate=validate)
    check_values = value_checks_enabled(validate, hidden.device)
    n_classes = _n_classes(vocab_start, weight_shard.shape[0], group, hidden.device, check_values)
    check_targets(targets, hidden.shape[:-1], n_classes, ignore_index, hidden.device, validate=check_values)
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be fp32, bf16 or fp16 on the Triton backend, got torch.float64")
    op = LinearOpParams(temperature, ignore_index, resolved, logit_softcap)
    params = VocabParallelParams(vocab_start, group, op, check_values)
    return VocabParallelLinearLogprobsEntropy.apply(hidden, weight_shard, bias_shard, targets, params)
