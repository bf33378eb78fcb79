"""Group-relative advantage estimators, as plain functions of the rewards.

``rewards`` is ``[B]`` with ``B = num_groups * group_size``, rows of one prompt
contiguous (``g*G .. g*G + G - 1``). Every function returns ``[B]`` fp32, one
advantage per completion (the trainer broadcasts it to the completion's tokens).

- GRPO (Shao et al. 2024): ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)``, ``std``
  the sample standard deviation (``G - 1`` in the denominator, as ``torch.std``).
- Dr.GRPO (Liu et al. 2025): ``A_i = r_i - mean_g(r)`` (no division by the std).
- RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g(r))``.

A group whose rewards are all equal gets zero advantages from every estimator:
it carries no learning signal, and DAPO's dynamic sampling drops it
(:func:`groups_with_signal`).
"""
from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups, G]`` fp32 view of ``rewards``, after checking the shapes."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    return rewards.float().view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r - group mean) / (group std + eps)``; ``scale=False`` skips the division (Dr.GRPO)."""
    r = _grouped(rewards, group_size)
    centered = r - r.mean(1, keepdim=True)
    if scale:
        centered = centered / (r.std(1, keepdim=True) + eps)
    return centered.reshape(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr.GRPO: ``r - group mean``."""
    return grpo_advantages(rewards, group_size, scale=False)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: ``r_i`` minus the mean of the other ``G - 1`` rewards of its group."""
    r = _grouped(rewards, group_size)
    others_mean = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - others_mean).reshape(-1)


def groups_with_signal(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[num_groups]`` bool: True where the group's rewards are not all equal."""
    r = _grouped(rewards, group_size)
    return (r != r[:, :1]).any(1)
