"""Supervised cross-entropy from hidden states and the lm_head: ``linear_cross_entropy``, ``LinearCrossEntropy``.

The same fused op as the RL path (:func:`entropy_ops.linear_logprobs_and_entropy`) underneath, so
SFT before RL runs the same kernels and never holds the ``[N, V]`` logits. With
``s = cap(h W^T + b) / tau`` (``cap`` the optional soft-cap ``c tanh(x / c)``), target ``y``,
``lse = logsumexp_v s_v`` and ``logp_y = s_y - lse`` (the op's output), the per-token loss is::

    loss = -logp_y                                         (cross-entropy)
         + eps (s_y - mean_v s_v)                          (label smoothing eps)
         + z lse^2                                         (z-loss z, PaLM)

Label smoothing: PyTorch's ``(1 - eps) (-logp_y) + eps (-(1/V) sum_v logp_v)`` rewritten with
``-(1/V) sum_v logp_v = lse - mean_v s_v`` and ``lse = s_y - logp_y``. Without a soft-cap the row
mean is linear in ``h``: ``mean_v s_v = (h . mean_v W_v + mean_v b_v) / tau``, one ``[D]`` mean of
the weight and a dot product per row, no vocabulary pass. With a soft-cap the mean of
``c tanh(z_v / c)`` needs one, which the op does not return: ``label_smoothing`` with
``logit_softcap`` is refused (``ValueError``).

z-loss: the op returns ``logp_y`` (not ``lse``), so ``lse = s_y - logp_y`` with the target logit
``s_y`` recomputed per row from ``h``, ``W[y]`` and ``b[y]`` (``O(N D)``, differentiable). Its
gradient is exact: the op's backward gives ``-2 z lse (1[v=y] - p_v)``, the ``s_y`` path
``+2 z lse 1[v=y]``, summing to ``2 z lse p_v = d(z lse^2)/ds_v``.

Masking and reduction as ``torch.nn.functional.cross_entropy`` (no class weights): a target equal
to ``ignore_index`` (any int, a class id too) contributes 0 and no gradient; ``"mean"`` divides the sum by the number of
non-ignored targets (NaN when there are none, as in PyTorch), ``"sum"`` adds, ``"none"`` returns
the per-token loss. The loss is fp32 (fp64 for fp64 inputs on the CPU path) whatever the input
dtype.
"""
from __future__ import annotations

import torch

from ._validation import check_softcap, check_temperature, widen_targets
from .linear_ops import linear_logprobs_and_entropy

REDUCTIONS = ("mean", "sum", "none")
# The fused op wants ignore_index outside [0, V); an ignore_index inside it (PyTorch allows one, e.g.
# a padding id) is mapped to this value first. Never a valid id, and not -100, so that a stray -100
# target is still reported as out of range rather than silently ignored.
_IGNORED = -(2**62)


def _check_coefficient(name: str, value, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 or (
            upper is not None and value > upper) or value == float("inf"):
        bound = f"in [0, {upper}]" if upper is not None else "a finite number >= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def target_logits(hidden, weight, targets, *, bias=None, ignore_index=-100, logit_softcap=None,
                  temperature=1.0) -> torch.Tensor:
    """``s_y = cap(h . W[y] + b[y]) / tau`` per row, fp32 (fp64 for fp64 inputs), 0 where ignored.

    ``O(N D)``: gathers the target rows of ``weight``; differentiable in ``hidden``, ``weight``, ``bias``.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    targets = widen_targets(targets).view(targets.shape)  # a narrow dtype must not wrap ignore_index
    keep = targets != ignore_index
    safe = torch.where(keep, targets, 0).reshape(-1)
    # ignored rows enter as zeros: whatever they hold (NaN, inf), no NaN reaches d weight through 0 * h
    h = torch.where(keep.reshape(-1, 1), hidden.reshape(-1, hidden.shape[-1]).to(acc), 0.0)
    z = (h * weight.index_select(0, safe).to(acc)).sum(-1)
    if bias is not None:
        z = z + bias.index_select(0, safe).to(acc)
    if logit_softcap is not None:
        z = torch.tanh(z / logit_softcap) * logit_softcap
    return torch.where(keep.reshape(-1), z / temperature, 0.0).view(targets.shape)


def _row_mean_logits(hidden, weight, bias, temperature, keep) -> torch.Tensor:
    """``mean_v s_v = (h . mean_v W_v + mean_v b_v) / tau`` (no soft-cap), fp32 / fp64 ``[...]``; rows not in
    ``keep`` use ``h = 0`` (their value is discarded, and a NaN there must not reach the weight's gradient)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    with torch.autocast(hidden.device.type, enabled=False):  # in acc even inside an autocast region
        mean = torch.where(keep.unsqueeze(-1), hidden.to(acc), 0.0) @ weight.to(acc).mean(0)
    if bias is not None:
        mean = mean + bias.to(acc).mean()
    return mean / temperature


def reduce_loss(loss: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"none"``: ``loss``; ``"sum"``: its sum; ``"mean"``: the sum over the count of ``keep`` (NaN if 0)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / keep.sum()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    allow_tf32: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under ``softmax(cap(hidden @ weight.T + bias) / temperature)``, logits-free.

    Equals ``torch.nn.functional.cross_entropy(logits.float() / temperature, targets.flatten(),
    ignore_index=, reduction=, label_smoothing=)`` with ``logits = cap(hidden @ weight.T + bias)``
    flattened to ``[N, V]`` (plus ``z_loss * logsumexp^2`` per token when ``z_loss > 0``), without
    materializing the logits (module docstring for the math).

    Args:
        hidden: ``[..., D]``; weight ``[V, D]``; bias ``[V]`` or ``None`` (same dtype and device).
        targets: ``[...]`` integer ids in ``[0, V)`` or ``ignore_index`` (not shifted here).
        reduction: ``"mean"`` (over non-ignored targets) | ``"sum"`` | ``"none"`` (``[...]``).
        label_smoothing: ``eps`` in ``[0, 1]``, PyTorch's definition; not with ``logit_softcap``.
        z_loss: coefficient ``>= 0`` of ``logsumexp(s)^2`` per token.
        logit_softcap, temperature, allow_tf32, backend: as in :func:`entropy_ops.linear_logprobs_and_entropy`.

    Returns:
        fp32 loss (fp64 for fp64 inputs on the CPU path): a scalar, or ``[...]`` for ``"none"``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = _check_coefficient("label_smoothing", label_smoothing, 1.0)
    z_loss = _check_coefficient("z_loss", z_loss)
    temperature = check_temperature(temperature)
    logit_softcap = check_softcap(logit_softcap)
    if label_smoothing and logit_softcap is not None:
        raise ValueError("label_smoothing with logit_softcap is not supported: the smoothing term needs the mean "
                         "of the soft-capped logits over the vocabulary, which the fused op does not compute")
    if isinstance(targets, torch.Tensor) and not (targets.dtype.is_floating_point or targets.dtype.is_complex
                                                  or targets.dtype == torch.bool):
        targets = widen_targets(targets).view(targets.shape)  # compare with ignore_index after widening
    if (isinstance(ignore_index, int) and not isinstance(ignore_index, bool) and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and 0 <= ignore_index < weight.shape[0] and isinstance(targets, torch.Tensor)):
        targets = torch.where(targets == ignore_index, _IGNORED, targets)
        ignore_index = _IGNORED
    logp, _ = linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                          ignore_index=ignore_index, return_entropy=False,
                                          logit_softcap=logit_softcap, allow_tf32=allow_tf32, backend=backend)
    keep = targets.to(logp.device) != ignore_index
    loss = -logp
    if label_smoothing or z_loss:
        s_y = target_logits(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                            logit_softcap=logit_softcap, temperature=temperature).to(logp.dtype)
        if label_smoothing:
            s_mean = _row_mean_logits(hidden, weight, bias, temperature, keep).to(logp.dtype)
            loss = loss + torch.where(keep, label_smoothing * (s_y - s_mean), 0.0)
        if z_loss:
            loss = loss + torch.where(keep, z_loss * (s_y - logp).square(), 0.0)
    return reduce_loss(loss, keep, reduction)


class LinearCrossEntropy(torch.nn.Module):
    """:func:`linear_cross_entropy` as a module: the options are fixed at construction.

    ``forward(hidden [..., D], weight [V, D], targets [...], bias=None)`` -> loss (see the functional).
    """

    def __init__(self, *, reduction: str = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, logit_softcap: float | None = None, temperature: float = 1.0,
                 allow_tf32: bool = False, backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.options = dict(reduction=reduction, ignore_index=ignore_index,
                            label_smoothing=_check_coefficient("label_smoothing", label_smoothing, 1.0),
                            z_loss=_check_coefficient("z_loss", z_loss), logit_softcap=check_softcap(logit_softcap),
                            temperature=check_temperature(temperature), allow_tf32=allow_tf32, backend=backend)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
