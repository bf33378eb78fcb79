"""PyTorch twin of ``kernels/softmax_stats.py``: the per-row statistics contract.

Used by the chunked CPU path of every op. Same math, same outputs:

    s = z / tau,  lse = logsumexp(s),  H = lse - sum_i p_i s_i = log S - T / S
    with m = max s, S = sum exp(s - m), T = sum exp(s - m) (s - m)

    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau

Each function works on one ``[n, V]`` fp32 block and modifies it in place
(the caller owns the block), so the working set is that block and O(n) more.
"""
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


def block_stats_(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse, H)`` of every row of the scaled block ``s`` ``[n, V]``; destroys ``s``.

    A row made only of ``-inf`` gives ``lse = -inf`` and ``H = 0``.
    """
    m = s.amax(dim=1, keepdim=True)
    m_ref = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    d = s.sub_(m_ref).clamp_min_(_NEG_CLAMP)  # d = s - m  (clamped; exp(d) exact)
    e = torch.exp(d)
    S = e.sum(dim=1)
    T = torch.bmm(e.unsqueeze(1), d.unsqueeze(2)).view(-1)  # sum e * d without a buffer
    log_S = torch.log(S)
    lse = m_ref.view(-1) + log_S
    H = torch.where(S > 0, log_S - T / S, torch.zeros_like(S))
    return lse, H


def block_grad_(
    s: torch.Tensor,
    targets: torch.Tensor | None,
    lse: torch.Tensor,
    H: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_H: torch.Tensor | None,
    inv_tau: float,
) -> torch.Tensor:
    """``dz`` for the scaled block ``s`` ``[n, V]``, written into ``s`` and returned.

    ``targets`` ``[n]`` (int64, in range) is needed only with ``g_logp``;
    ``g_logp``/``g_H`` ``[n]`` fp32 or ``None`` (treated as zero). Rows that must
    get no gradient carry zeros in both upstream gradients.
    """
    log_p = s.sub_(lse.unsqueeze(1)).clamp_min_(_NEG_CLAMP)
    p = torch.exp(log_p)
    # dz = -p * (g_logp + g_H (log p + H)), then + g_logp at the target
    if g_H is not None:
        coef = log_p.add_(H.unsqueeze(1)).mul_(g_H.unsqueeze(1))
        if g_logp is not None:
            coef.add_(g_logp.unsqueeze(1))
        dz = coef.mul_(p).neg_()
    else:
        dz = p.mul_(-g_logp.unsqueeze(1))
    if g_logp is not None:
        dz.scatter_add_(1, targets.unsqueeze(1), g_logp.unsqueeze(1).to(dz.dtype))
    if inv_tau != 1.0:
        dz.mul_(inv_tau)
    return dz
