"""PyTorch twin of ``kernels/softmax_stats.py``: the per-row statistics contract.

Used by the chunked CPU path of every op. Same math, same outputs:

    s = z / tau,  lse = logsumexp(s),  H = lse - sum_i p_i s_i = log S - T / S
    with m = max s, S = sum exp(s - m), T = sum exp(s - m) (s - m)

    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau,  log p_i = (s_i - m) - log S

The saved per-row statistics are ``(m, log S, H)`` (``lse = m + log S``): keeping
``m`` and ``log S`` apart lets both passes form ``s - lse`` as ``(s - m) - log S``,
as accurate as PyTorch's own fp32 ``log_softmax``. Each function works on one ``[n, V]`` fp32 block and modifies it in place
(the caller owns the block), so the working set is that block and O(n) more.
"""
from typing import NamedTuple

import torch

# exp(-1e4) is exactly 0 in fp32 (and fp64), so clamping shifted logits at this
# value changes no probability, and keeps ``0 * -inf`` (NaN) out of the sums.
_NEG_CLAMP = -1.0e4


def scaled_block(z: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """A fresh fp32 (fp64 for fp64 input) copy of ``z * inv_tau`` that the caller may overwrite."""
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    s = torch.empty(z.shape, dtype=dtype, device=z.device)
    s.copy_(z)
    if inv_tau != 1.0:
        s.mul_(inv_tau)
    return s


class RowStats(NamedTuple):
    """Per-row statistics ``[n]``: running max ``m``, ``log S`` and the entropy ``H``."""

    m: torch.Tensor
    log_S: torch.Tensor
    H: torch.Tensor

    @property
    def lse(self) -> torch.Tensor:
        return self.m + self.log_S

    def logprob(self, s_y: torch.Tensor) -> torch.Tensor:
        """``s_y - lse`` computed as ``(s_y - m) - log S``: no rounding of a large ``lse`` first."""
        return (s_y - self.m) - self.log_S


def block_stats_(s: torch.Tensor) -> RowStats:
    """Statistics of every row of the scaled block ``s`` ``[n, V]``; destroys ``s``.

    A row made only of ``-inf`` gives ``lse = -inf`` and ``H = 0``; a row with a NaN or ``+inf`` entry NaN.
    """
    m = s.amax(dim=1, keepdim=True)
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    d = s.sub_(m_ref).clamp_min_(_NEG_CLAMP)  # d = s - m  (clamped; exp(d) exact)
    e = torch.exp(d)
    S = e.sum(dim=1)
    T = e.mul_(d).sum(dim=1)  # torch's cascaded sum: ~1e-7 relative (a BLAS dot here loses ~3e-5 at V=32k)
    log_S = torch.log(S)  # -inf for an all -inf row
    H = torch.where(S == 0, torch.zeros_like(S), log_S - T / S)  # NaN S (NaN / +inf logits) stays NaN
    return RowStats(m_ref.view(-1), log_S, H)


def block_online_stats_(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial statistics ``(m, S, T)`` ``[n]`` of the scaled block ``s`` ``[n, v]``; destroys ``s``.

    For a block that holds only some columns of its rows (a vocab chunk, or a
    vocab-parallel shard): ``m = max s`` (``-inf`` when the block row is all
    ``-inf``), ``S = sum exp(s - m)``, ``T = sum exp(s - m) (s - m)``. Combine
    partials with :func:`merge_stats`, finish with :func:`finalize_stats`.
    """
    m = s.amax(dim=1)
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    d = s.sub_(m_ref.unsqueeze(1)).clamp_min_(_NEG_CLAMP)  # d = s - m  (clamped; exp(d) exact)
    e = torch.exp(d)
    S = e.sum(dim=1)
    T = e.mul_(d).sum(dim=1)  # cascaded sum, as in block_stats_
    return m, S, T


def merge_stats(m1, S1, T1, m2, S2, T2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine two partial ``(m, S, T)`` (elementwise, same shape) into those of the union of their columns.

    With ``m = max(m1, m2)`` and ``a_k = exp(m_k - m)``: ``S = a_1 S_1 + a_2 S_2``,
    ``T = a_1 (T_1 + (m_1 - m) S_1) + a_2 (T_2 + (m_2 - m) S_2)``. An empty
    partial (``m = -inf``, ``S = 0``) contributes nothing; two empty ones give an
    empty one. Twin of ``merge_stats`` in ``kernels/softmax_stats.py``.
    """
    m = torch.maximum(m1, m2)
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    zero = torch.zeros_like(m)
    # m_k - m <= 0, clamped: a partial whose max lies below m by more than fp32 holds (finite logits of
    # both signs near the limits: the difference overflows to -inf) gets a_k = 0 and a finite shift,
    # so a_k (T_k + shift_k S_k) is 0, not 0 * inf.
    shift1 = torch.where(S1 == 0, zero, (m1 - m_ref).clamp_min(_NEG_CLAMP))
    shift2 = torch.where(S2 == 0, zero, (m2 - m_ref).clamp_min(_NEG_CLAMP))
    a1, a2 = torch.exp(shift1), torch.exp(shift2)
    S = a1 * S1 + a2 * S2
    T = a1 * (T1 + shift1 * S1) + a2 * (T2 + shift2 * S2)
    return m, S, T


def finalize_stats(m: torch.Tensor, S: torch.Tensor, T: torch.Tensor) -> RowStats:
    """:class:`RowStats` from merged ``(m, S, T)``: ``log S`` and ``H = log S - T / S`` (``H = 0`` when ``S = 0``;
    NaN when ``S`` is NaN)."""
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    log_S = torch.log(S)  # -inf for an all -inf row
    H = torch.where(S == 0, torch.zeros_like(S), log_S - T / S)
    return RowStats(m_ref, log_S, H)


def softcap_(z: torch.Tensor, cap: float, with_grad: bool = False):
    """``z <- cap * tanh(z / cap)`` in place (logit soft-capping, Gemma 2); returns ``(z, dcap)``.

    ``dcap = 1 - tanh^2(z / cap)`` (a new block: the derivative of the cap) when
    ``with_grad``, else ``None``. Twin of ``softcap_tanh`` in ``kernels/softmax_stats.py``.
    """
    t = z.div_(cap).tanh_()
    dcap = torch.addcmul(torch.ones((), dtype=t.dtype), t, t, value=-1.0) if with_grad else None
    return t.mul_(cap), dcap


def block_grad_(
    s: torch.Tensor,
    targets: torch.Tensor | None,
    stats: RowStats,
    g_logp: torch.Tensor | None,
    g_H: torch.Tensor | None,
    inv_tau: float,
    *,
    in_block: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dz`` for the scaled block ``s`` ``[n, V]``, written into ``s``'s storage and returned.

    ``log p = (s - m) - log S`` from the saved row statistics (never ``s - lse``:
    rounding a large ``lse`` to fp32 would cost ~``ulp(lse)`` relative in ``p``).
    ``targets`` ``[n]`` (int64, in range) is needed only with ``g_logp``;
    ``g_logp``/``g_H`` ``[n]`` fp32 or ``None`` (treated as zero). Rows that must
    get no gradient carry zeros in both upstream gradients. When the block holds
    only some columns of its rows (a vocab chunk), ``in_block`` ``[n]`` bool marks
    the rows whose target is among them: only those get the ``+ g_logp`` term
    (the ``targets`` of the others may be any in-block column).
    """
    log_p = s.sub_(stats.m.unsqueeze(1)).sub_(stats.log_S.unsqueeze(1)).clamp_min_(_NEG_CLAMP)
    p = torch.exp(log_p)
    # dz = -inv_tau * p * (g_logp + g_H (log p + H)), then + inv_tau * g_logp at the target.
    # The per-row scalars are folded first so the block sees two passes: one addcmul, one mul.
    zero = torch.zeros_like(stats.H)
    c = (zero if g_logp is None else g_logp) + (zero if g_H is None else g_H * stats.H)
    if g_H is not None:
        coef = torch.addcmul((-inv_tau * c).unsqueeze(1), (-inv_tau * g_H).unsqueeze(1), log_p, out=log_p)
        dz = coef.mul_(p)
    else:
        dz = p.mul_((-inv_tau * c).unsqueeze(1))
    if g_logp is not None:
        g_target = g_logp if in_block is None else torch.where(in_block, g_logp, 0.0)  # vocab chunks
        dz.scatter_add_(1, targets.unsqueeze(1), (inv_tau * g_target).unsqueeze(1).to(dz.dtype))
    return dz
