"""GRPO, Dr.GRPO and RLOO: sequence-level advantages from the group's rewards.

Each is a thin :class:`Algorithm` around a plain function of
``entropy_ops.trainers.advantages``; the advantage is one number per
completion ``[B]``, which the policy loss broadcasts to its tokens.
"""
from __future__ import annotations

import torch

from ..advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages
from .base import Algorithm, RolloutBatch


class GRPO(Algorithm):
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean(r)) / (std(r) + eps)`` per group.

    Option ``eps`` (default ``1e-6``): added to the group's standard deviation.
    """

    name = "grpo"
    loss_preset = "grpo"

    def __init__(self, eps: float = 1e-6, **options) -> None:
        super().__init__(**options)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
            raise ValueError(f"algo_options.eps must be a float >= 0, got {eps!r}")
        self.eps = float(eps)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return grpo_advantages(batch.rewards, batch.group_size, eps=self.eps)


class DrGRPO(Algorithm):
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): ``A_i = r_i - mean(r)``,
    trained with the length-unbiased ``seq-mean-token-sum-norm`` aggregation."""

    name = "dr-grpo"
    loss_preset = "dr_grpo"

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return dr_grpo_advantages(batch.rewards, batch.group_size)


class RLOO(Algorithm):
    """RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i}(r_j)``, the leave-one-out baseline."""

    name = "rloo"
    loss_preset = "grpo"

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return rloo_advantages(batch.rewards, batch.group_size)
