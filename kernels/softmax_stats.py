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
and exactly 0 to ``T``: every shifted logit ``s - m <= 0`` is clamped at ``-1e4``
(``exp`` of it is exactly 0 in fp32) before it multiplies anything, so no
``0 * -inf`` is ever formed, not even when finite logits of both signs near the
fp32 limits make ``s - m`` overflow.

Gradient (``g_logp``, ``g_H`` upstream, ``y`` the target)::

    d logp / d z_i = (1[i = y] - p_i) / tau
    d H    / d z_i = -p_i (log p_i + H) / tau
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau
"""
import triton
import triton.language as tl


# exp(-1e4) is exactly 0 in fp32, so clamping a shifted logit ``s - m <= 0`` at this value
# changes no probability, and turns every ``0 * -inf`` (an empty lane, a masked ``-inf`` logit,
# or ``s - m`` overflowing for finite logits of both signs near the fp32 limits) into ``0 * -1e4``.
# ``propagate_nan=ALL`` keeps a NaN logit NaN (a plain max would drop it and hide it).
NEG_CLAMP = tl.constexpr(-1.0e4)
# The running max of a lane that has seen nothing yet: finite, so ``s - m`` is never ``inf - inf``.
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def fast_exp(x):
    """``exp(x)`` as ``exp2(x log2 e)``: one FMUL and one ``MUFU.EX2`` (``ex2.approx.ftz``).

    ``tl.exp`` lowers to the non-flushing ``ex2.approx.f32``, which ptxas wraps in a range
    check (FSETP and two predicated FMULs per element). Here results below ``2^-126`` flush
    to 0: a probability that small changes no fp32 sum of the softmax and no gradient entry
    by more than ``1e-38`` absolute.
    """
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def clamp_shift(d):
    """``max(d, -1e4)`` for shifted logits ``d <= 0``, NaN-preserving (see ``NEG_CLAMP``)."""
    return tl.maximum(d, NEG_CLAMP, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def lane_stats_update(m, S, T, z, inv_tau):
    """Fold a tile ``z`` ``[R, VEC]`` (raw logits, fp32) into per-lane statistics ``m, S, T`` ``[R]``.

    Each lane (one row of the tile, i.e. one thread's ``VEC`` consecutive logits when the tile
    is laid out ``[1, VEC]`` per thread) keeps its own running ``(m, S, T)`` in units of
    ``s = z * inv_tau``: the reductions along ``axis=1`` stay inside a thread, so the streaming
    loop has no shuffle and no barrier. Per element: one FFMA (``s - m``), one clamp, one exp,
    one add and one FFMA; per lane, one rescale (``exp(m - m')``) per tile. ``m`` starts at the
    lowest finite fp32 (never ``-inf``, so ``s - m`` is never ``-inf - -inf``); masked entries
    are ``-inf`` in ``z``. Requires ``inv_tau > 0`` (then ``max(z) * inv_tau = max(s)``).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1) * inv_tau)
    d = clamp_shift(z * inv_tau - m_new[:, None])
    e = fast_exp(d)
    shift = clamp_shift(m - m_new)
    alpha = fast_exp(shift)
    T = alpha * (T + shift * S) + tl.sum(e * d, axis=1)
    S = alpha * S + tl.sum(e, axis=1)
    return m_new, S, T


@triton.jit
def reduce_lane_stats(m, S, T):
    """Merge per-lane ``(m, S, T)`` ``[R]`` into the row's ``(m, S, T)`` (scalars); one block reduction."""
    m_row = tl.max(m, axis=0)
    shift = clamp_shift(m - m_row)
    alpha = fast_exp(shift)
    S_row = tl.sum(alpha * S, axis=0)
    T_row = tl.sum(alpha * (T + shift * S), axis=0)
    return m_row, S_row, T_row


@triton.jit
def finalize_stats(m, S, T):
    """Return ``(log_S, H)`` from the online statistics; ``lse = m + log_S``.

    The saved statistics of a row are ``(m, log_S, H)``: backward forms
    ``log p = (s - m) - log_S`` (see :func:`logit_grad`), never ``s - lse``.
    An all ``-inf`` row gives ``log_S = -inf``, ``H = 0``; a NaN ``S`` (a NaN or ``+inf`` logit) gives NaN
    for both, never the statistics of an empty row.
    """
    empty = S == 0.0
    log_S = tl.where(empty, float("-inf"), tl.log(tl.where(empty, 1.0, S)))
    H = tl.where(empty, 0.0, log_S - T / tl.where(empty, 1.0, S))
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
    p = tl.where(valid, fast_exp(log_p), 0.0)
    log_p = tl.where(p > 0.0, log_p, 0.0)
    dz = -p * (g_logp + g_H * (log_p + H))
    dz = tl.where(is_target, dz + g_logp, dz)
    return dz * inv_tau


@triton.jit
def tile_stats_rows(s, valid):
    """``(m, S, T)`` of every row of a 2-D tile ``s`` ``[R, C]`` (fp32), masked lanes given by ``valid``.

    The same statistics as :func:`lane_stats_update` started from an empty
    row (``m = -inf``, ``S = T = 0``), reduced along ``axis=1``; fold the
    result into running statistics with :func:`merge_stats`.
    """
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, axis=1)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    d = clamp_shift(s - m_ref[:, None])  # -inf lanes and overflowing finite differences: exp = 0, e * d = 0
    e = fast_exp(d)
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
    # m_k - m <= 0; clamped so that a partial whose max is -inf, or lies below m by more than fp32
    # can hold (both signs near the limits), gives a_k = 0 and 0 * (T_k + (-1e4) S_k) = 0, not 0 * inf.
    shift1 = tl.where(S1 == 0.0, 0.0, clamp_shift(m1 - m_ref))
    shift2 = tl.where(S2 == 0.0, 0.0, clamp_shift(m2 - m_ref))
    a1 = fast_exp(shift1)
    a2 = fast_exp(shift2)
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
