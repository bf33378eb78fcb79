"""Shared ``@triton.jit`` helpers: the per-row softmax statistics contract.

Every kernel of entropy-ops (logits input or hidden-state input) reduces a row
of scaled logits ``s = z / tau`` to three fp32 numbers and recomputes the
gradient from them. This module is the single Triton definition of that math;
``entropy_ops/softmax_stats.py`` is its PyTorch twin for the CPU path.

Online statistics (one streaming pass, any number of vocab blocks)::

    m = max_i s_i                       running max
    S = sum_i exp(s_i - m)              rescaled partition sum
    T = sum_i exp(s_i - m) * (s_i - m)  rescaled first moment, *relative to m*

    lse = m + log S
    H   = lse - sum_i p_i s_i = log S - T / S

Keeping ``T`` relative to the running max (instead of summing ``p_i * s_i``)
avoids the cancellation of ``lse - E[s]`` when the logits are large: both
``log S`` and ``T / S`` are O(log V). When the max moves from ``m`` to ``m'``:
``S' = a S``, ``T' = a (T + (m - m') S)`` with ``a = exp(m - m')``.

``-inf`` logits (masked vocab entries) contribute ``exp(-inf) = 0`` to ``S``
and exactly 0 to ``T`` (the ``0 * -inf`` product is never formed).

Gradient (``g_logp``, ``g_H`` upstream, ``y`` the target)::

    d logp / d z_i = (1[i = y] - p_i) / tau
    d H    / d z_i = -p_i (log p_i + H) / tau
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau
"""
import triton
import triton.language as tl


@triton.jit
def online_stats_update(m, S, T, s, valid):
    """Fold one block ``s`` (fp32, masked lanes given by ``valid``) into ``(m, S, T)``.

    ``m`` may be ``-inf`` (nothing seen yet, or only ``-inf`` logits so far);
    the update never produces NaN in that case.
    """
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))
    # A row (so far) made only of -inf: keep the reference point finite.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(s - m_ref)
    d = tl.where(s == float("-inf"), 0.0, s - m_ref)
    alpha = tl.exp(m - m_ref)
    shift = tl.where(S == 0.0, 0.0, m - m_ref)
    S_new = alpha * S + tl.sum(e, axis=0)
    T_new = alpha * (T + shift * S) + tl.sum(e * d, axis=0)
    return m_new, S_new, T_new


@triton.jit
def finalize_stats(m, S, T):
    """Return ``(lse, H)`` from the online statistics (``lse = -inf`` for an all ``-inf`` row)."""
    log_S = tl.log(tl.where(S > 0.0, S, 1.0))
    lse = tl.where(S > 0.0, m + log_S, float("-inf"))
    H = tl.where(S > 0.0, log_S - T / S, 0.0)
    return lse, H


@triton.jit
def logit_grad(s, valid, is_target, lse, H, g_logp, g_H, inv_tau):
    """``dz`` for one block of scaled logits ``s`` (fp32), from the row's ``lse`` and ``H``.

    ``dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) * inv_tau``; lanes
    with ``p_i = 0`` (``-inf`` logits) get ``g_logp * 1[i = y] * inv_tau`` only.
    """
    log_p = s - lse
    p = tl.where(valid, tl.exp(log_p), 0.0)
    log_p = tl.where(p > 0.0, log_p, 0.0)
    dz = -p * (g_logp + g_H * (log_p + H))
    dz = tl.where(is_target, dz + g_logp, dz)
    return dz * inv_tau
