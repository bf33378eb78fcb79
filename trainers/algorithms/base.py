"""The plug-in contract between the trainer's step loop and an RL algorithm.

An algorithm turns one rollout batch (rewards, and for the entropy-aware ones
the rollout policy's per-token entropies and log-probs) into advantages, per
sequence ``[B]`` or per token ``[B, T]``. The step loop (rollout, the fused
policy loss, optimizer, checkpoints) is the same for every algorithm; an
algorithm never re-implements any of it. An algorithm that trains on a loss
other than the clipped policy loss (EM-FT) overrides :meth:`Algorithm.loss`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class RolloutBatch:
    """One batch of ``B = num_prompts * G`` sampled completions, grouped contiguously by prompt.

    Rows ``g*G .. g*G + G - 1`` are the G completions of prompt ``g``. Per-token
    tensors are ``[B, T]`` over completion positions only (``T`` = the longest
    completion), zero where ``completion_mask`` is False.
    """

    prompts: list[str]
    completions: list[str]
    group_size: int
    rewards: torch.Tensor  # [B] fp32: weighted sum of the reward functions
    correct: torch.Tensor  # [B] bool: the answer-correctness reward says "correct" (GTPO's O+ / O-)
    completion_mask: torch.Tensor  # [B, T] bool
    old_logprobs: torch.Tensor  # [B, T] fp32, rollout policy, no grad
    old_entropy: torch.Tensor  # [B, T] fp32, rollout policy, no grad
    answers: list[str | None] = field(default_factory=list)  # extracted final answers, for SEED-GRPO
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]
    extras: dict[str, list[Any]] = field(default_factory=dict)  # dataset row fields, repeated G times

    @property
    def num_groups(self) -> int:
        return len(self.completions) // self.group_size


class Algorithm:
    """Base class. Subclasses set ``name`` and ``loss_preset`` and implement :meth:`advantages`.

    ``options`` are the algorithm's own hyper-parameters (from the trainer
    config's ``algo_options`` mapping); unknown keys raise ``ValueError``.
    """

    name: ClassVar[str] = ""
    loss_preset: ClassVar[str] = "grpo"  # the entropy_ops.PolicyLossConfig preset it trains with
    uses_rewards: ClassVar[bool] = True  # False: the reward functions are not needed (EM-FT, EM-RL)
    # PolicyLossConfig fields the algorithm sets on top of its preset (the user's `loss:` keys still win).
    loss_overrides: ClassVar[dict[str, Any]] = {}
    # The learning rate used when the config leaves `learning_rate` unset (null).
    default_learning_rate: ClassVar[float] = 1e-4
    # How the trainer weights micro-batches of a custom loss: "token" (the loss is a token mean)
    # or "sequence" (the loss is a mean over responses).
    loss_aggregation: ClassVar[str] = "token"

    @property
    def has_custom_loss(self) -> bool:
        """True when :meth:`loss` replaces the clipped policy loss (the trainer then calls it)."""
        return type(self).loss is not Algorithm.loss

    @property
    def needs_reference(self) -> bool:
        """True when the algorithm itself needs reference-model log-probs (e.g. EM-FT's KL term)."""
        return False

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"algo_options: unknown key(s) {sorted(options)} for algorithm {self.name!r}")

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        """Return advantages ``[B]`` (broadcast to every token) or ``[B, T]`` (per token)."""
        raise NotImplementedError

    def step_metrics(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Per-step diagnostics of the algorithm's mechanism (logged by the trainer); none by default."""
        return {}

    def loss(self, logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
             ref_logprobs: torch.Tensor | None = None, *, advantages: torch.Tensor | None = None,
             old_logprobs: torch.Tensor | None = None):
        """A custom training loss, or ``None`` to train with the clipped policy loss (the default).

        ``logp``, ``entropy``: ``[b, T]`` fp32 with grad for one micro-batch (from the fused op);
        ``mask`` its ``[b, T]`` bool; ``ref_logprobs`` ``[b, T]`` when a reference model is loaded;
        ``advantages`` (``[b]`` or ``[b, T]``) and ``old_logprobs`` ``[b, T]`` of the micro-batch.
        Returns ``(loss, metrics: dict[str, float | Tensor])`` when overridden.
        """
        return None
