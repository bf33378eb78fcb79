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
    """Return ``(log_S, H)`` from the online statistics; ``lse = m + log_S``.

    The saved statistics of a row are ``(m, log_S, H)``: backward forms
    ``log p = (s - m) - log_S`` (see :func:`logit_grad`), never ``s - lse``.
    An all ``-inf`` row gives ``log_S = -inf``, ``H = 0``.
    """
    log_S = tl.where(S > 0.0, tl.log(tl.where(S > 0.0, S, 1.0)), float("-inf"))
    H = tl.where(S > 0.0, log_S - T / tl.where(S > 0.0, S, 1.0), 0.0)
    return log_S, H


@triton.jit
def target_logprob(s_y, m, log_S):
    """``s_y - lse`` computed as ``(s_y - m) - log S``: no rounding of a large ``lse`` first."""
    return (s_y - m) - log_S


@triton.jit
def logit_grad(s, valid, is_target, m, log_S, H, g_logp, g_H, inv_tau):
    """``dz`` for one block of scaled logits ``s`` (fp32), from the row's ``(m, log_S, H)``.

    ``log p_i = (s_i - m) - log_S``;
    ``dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) * inv_tau``; lanes
    with ``p_i = 0`` (``-inf`` logits) get ``g_logp * 1[i = y] * inv_tau`` only.
    """
    log_p = (s - m) - log_S
    p = tl.where(valid, tl.exp(log_p), 0.0)
    log_p = tl.where(p > 0.0, log_p, 0.0)
    dz = -p * (g_logp + g_H * (log_p + H))
    dz = tl.where(is_target, dz + g_logp, dz)
    return dz * inv_tau


@triton.jit
def tile_stats_rows(s, valid):
    """``(m, S, T)`` of every row of a 2-D tile ``s`` ``[R, C]`` (fp32), masked lanes given by ``valid``.

    The same statistics as :func:`online_stats_update` started from an empty
    row (``m = -inf``, ``S = T = 0``), reduced along ``axis=1``; fold the
    result into running statistics with :func:`merge_stats`.
    """
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, axis=1)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    d = tl.where(s == float("-inf"), 0.0, s - m_ref[:, None])
    e = tl.exp(s - m_ref[:, None])
    return m, tl.sum(e, axis=1), tl.sum(e * d, axis=1)


@triton.jit
def merge_stats(m1, S1, T1, m2, S2, T2):
    """Combine two partial ``(m, S, T)`` (elementwise, any shape) into those of the union.

    With ``m = max(m1, m2)`` and ``a_k = exp(m_k - m)``::

        S = a_1 S_1 + a_2 S_2
        T = a_1 (T_1 + (m_1 - m) S_1) + a_2 (T_2 + (m_2 - m) S_2)

    An empty partial (``m_k = -inf``, ``S_k = 0``) contributes nothing, and two
    empty partials give an empty one, without NaN.
    """
    m = tl.maximum(m1, m2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    a1 = tl.exp(m1 - m_ref)
    a2 = tl.exp(m2 - m_ref)
    shift1 = tl.where(S1 == 0.0, 0.0, m1 - m_ref)
    shift2 = tl.where(S2 == 0.0, 0.0, m2 - m_ref)
    S = a1 * S1 + a2 * S2
    T = a1 * (T1 + shift1 * S1) + a2 * (T2 + shift2 * S2)
    return m, S, T


@triton.jit
def softcap_tanh(x):
    """``(tanh(x), 1 - tanh(x)^2)`` in fp32, accurate to a few ulp for every ``x``.

    Logit soft-capping (Gemma 2) computes ``c * tanh(z / c)``; its derivative is
    ``1 - tanh^2(z / c)``. With ``e = exp(-2|x|)``: ``tanh|x| = (1 - e) / (1 + e)``
    and ``1 - tanh^2 x = 4 e / (1 + e)^2`` (no cancellation near ``|x| = inf``).
    Below ``|x| = 0.25`` the first form cancels, so the odd Taylor series up to
    ``x^9`` is used there (truncation error below ``1e-8`` relative). Written
    with ``exp`` because the Triton interpreter has no ``libdevice.tanh``.
    """
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    x2 = x * x
    series = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))
    t = tl.where(x < 0.0, -t, t)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))
