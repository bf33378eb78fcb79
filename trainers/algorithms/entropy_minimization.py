"""Entropy minimization without labels: EM-FT and EM-RL (Agarwal et al., arXiv 2505.15134).

Neither uses a reward function (``uses_rewards = False``): the only signal is
the model's own entropy on outputs it sampled itself.

**EM-FT** trains directly on the token entropy of the sampled outputs (paper:
one sample per prompt, ~40 steps with early stopping): the per-response mean
of the token entropies, averaged over the responses (``n`` responses with at
least one valid token, ``L_i`` valid tokens of response ``i``)::

    L = (1/n) sum_i (1/L_i) sum_t m_{i,t} H_{i,t}
      + kl_coef * (1/n) sum_i (1/L_i) sum_t m_{i,t} k3_{i,t}                optional, needs a reference model
    k3_{i,t} = exp(d) - d - 1,  d = logp_ref - logp  (capped at 20)         (>= 0, "k3" estimator)

``H`` and ``logp`` are the fused op's outputs *with* gradient
(``dL/dz_j = -p_j (log p_j + H) / (n L_i)`` per token of response ``i`` from the
entropy term, through the op's backward). The trainer weights micro-batches by
their share of the responses (``loss_aggregation = "sequence"``). ``k3`` on the sampled tokens estimates ``KL(pi || pi_ref)``
without bias when the tokens are drawn from ``pi``, which holds on the first
update of each rollout batch (the sampler is the current policy); it is a
non-negative per-token estimate in any case.

**EM-RL** is RL whose reward is the negative entropy of the rollout policy on
each sample, with the RLOO baseline (paper: N = 4 samples, PPO clip 0.2, KL
0.001, lr 1e-6)::

    sequence estimator:  r_i = sum_t logp_old(y_{i,t})        (the paper's negative trajectory entropy; default)
    token estimator:     r_i = -sum_t H_old_{i,t}
    A_i = r_i - mean_{j != i} r_j                              leave-one-out, broadcast to tokens

``reduction="mean"`` divides both by the response length instead (an option:
the official repository has no EM-RL code). The sum ranks responses by length
as well as by confidence (a shorter answer has fewer negative terms).

Default learning rates (``default_learning_rate``, used when the config leaves
``learning_rate`` unset): chosen on the embedded task as the largest rate of a
short sweep at which held-out accuracy did not collapse (``docs/algorithms.md``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from entropy_ops.policy_loss import LOG_RATIO_CAP

from ..advantages import rloo_advantages
from ._checks import check_mask, check_number, check_tokens
from .base import Algorithm, RolloutBatch

ESTIMATORS = ("sequence", "token")
EM_FT_LR = 1e-5  # measured defaults, see the module docstring
EM_RL_LR = 1e-5
REDUCTIONS = ("mean", "sum")


def k3_kl(logp: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(d) - d - 1``, ``d = ref - logp`` capped at ``LOG_RATIO_CAP`` (20) as in
    ``entropy_ops.policy_loss``, so one token far below the reference cannot overflow (>= 0)."""
    log_ratio = (ref_logprobs - logp).clamp(max=LOG_RATIO_CAP)
    return torch.exp(log_ratio) - log_ratio - 1.0


def _response_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1/n) sum_i (1/L_i) sum_t m x`` over the ``n`` rows with a valid token (0 when none)."""
    lengths = mask.sum(1)
    rows = lengths > 0
    per_row = torch.where(mask, x, 0.0).sum(1) / lengths.clamp_min(1).to(x.dtype)
    return torch.where(rows, per_row, 0.0).sum() / rows.sum().clamp_min(1).to(x.dtype)


def em_ft_loss(entropy: torch.Tensor, mask: torch.Tensor, *, logp: torch.Tensor | None = None,
               ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0):
    """EM-FT loss of one micro-batch: per-response mean entropy averaged over responses
    (+ ``kl_coef`` * the same mean of the k3 KL).

    Args:
        entropy: ``[b, T]`` fp32 per-token entropy *with* gradient (the fused op's output).
        mask: ``[b, T]`` bool valid completion tokens; a micro-batch with none gives loss 0.
        logp, ref_logprobs: ``[b, T]`` policy (with gradient) and reference log-probs of the
            sampled tokens; required when ``kl_coef > 0``.
        kl_coef: weight of the KL term (``>= 0``).

    Returns ``(loss, metrics)``: a 0-dim tensor and ``{"entropy": ..., "kl": ...}`` (detached
    0-dim tensors; ``"kl"`` only with the KL term).
    """
    check_mask(mask)
    check_tokens("entropy", entropy, mask)
    kl_coef = check_number("kl_coef", kl_coef, low=0.0)
    mean_entropy = _response_mean(entropy, mask)
    loss = mean_entropy
    metrics: dict[str, Any] = {"entropy": mean_entropy.detach()}
    if kl_coef > 0.0:
        if logp is None or ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs logp and ref_logprobs (load a reference model)")
        check_tokens("logp", logp, mask)
        check_tokens("ref_logprobs", ref_logprobs, mask)
        kl = _response_mean(k3_kl(logp, ref_logprobs.to(logp.dtype)), mask)
        loss = loss + kl_coef * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def em_rl_rewards(logprobs: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor, *,
                  estimator: str = "sequence", reduction: str = "sum") -> torch.Tensor:
    """EM-RL rewards ``[B]`` (fp32; fp64 for fp64 inputs): ``reduce_t logp_old`` or ``-reduce_t H_old``.

    ``logprobs`` / ``entropy`` ``[B, T]`` of the rollout policy (``entropy`` is needed only by the
    token estimator); ``reduction`` ``"mean"`` divides by ``max(sum_t m, 1)``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_mask(mask)
    source = logprobs if estimator == "sequence" else entropy
    check_tokens("logprobs" if estimator == "sequence" else "entropy", source, mask)
    dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    total = torch.where(mask, source.to(dtype), 0.0).sum(dim=1)
    if reduction == "mean":
        total = total / mask.sum(dim=1).clamp_min(1).to(dtype)
    return total if estimator == "sequence" else -total


def em_rl_advantages(logprobs: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor,
                     group_size: int, *, estimator: str = "sequence", reduction: str = "sum") -> torch.Tensor:
    """EM-RL advantages ``[B]`` fp32: :func:`em_rl_rewards` minus the leave-one-out group mean
    (``entropy_ops.trainers.advantages.rloo_advantages``; needs ``group_size >= 2``)."""
    rewards = em_rl_rewards(logprobs, entropy, mask, estimator=estimator, reduction=reduction)
    return rloo_advantages(rewards, group_size)


class EMFT(Algorithm):
    """EM-FT: minimize the token entropy of self-sampled outputs (:func:`em_ft_loss`).

    Options: ``kl_coef`` (0.0; > 0 needs a reference model). Overrides :meth:`loss`; its
    advantages are zeros (unused).
    """

    name = "em-ft"
    loss_preset = "grpo"  # unused: the custom loss replaces the policy loss
    uses_rewards = False
    loss_aggregation = "sequence"
    default_learning_rate = EM_FT_LR

    def __init__(self, *, kl_coef: float = 0.0, **unknown) -> None:
        super().__init__(**unknown)
        self.kl_coef = check_number("kl_coef", kl_coef, low=0.0)

    @property
    def needs_reference(self) -> bool:
        """True when :meth:`loss` needs ``ref_logprobs`` (the trainer must load a reference model)."""
        return self.kl_coef > 0.0

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return torch.zeros(batch.completion_mask.shape[0], dtype=torch.float32,
                           device=batch.completion_mask.device)

    def loss(self, logp, entropy, mask, ref_logprobs=None, **_):
        return em_ft_loss(entropy, mask, logp=logp, ref_logprobs=ref_logprobs, kl_coef=self.kl_coef)


class EMRL(Algorithm):
    """EM-RL: negative entropy as the only reward, RLOO baseline (:func:`em_rl_advantages`).

    Options: ``estimator`` ("sequence" | "token"), ``reduction`` ("sum", default | "mean").
    ``loss_overrides`` are the paper's PPO settings for ``PolicyLossConfig.preset``.
    """

    name = "em-rl"
    loss_preset = "grpo"
    loss_overrides: ClassVar[dict[str, float]] = {"eps_low": 0.2, "eps_high": 0.2, "beta": 0.001}
    uses_rewards = False
    default_learning_rate = EM_RL_LR

    def __init__(self, *, estimator: str = "sequence", reduction: str = "sum", **unknown) -> None:
        super().__init__(**unknown)
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.estimator, self.reduction = estimator, reduction

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return em_rl_advantages(batch.old_logprobs, batch.old_entropy, batch.completion_mask,
                                batch.group_size, estimator=self.estimator, reduction=self.reduction)
