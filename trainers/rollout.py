"""Rollout: sample completions from the policy.

``RolloutEngine`` is the small interface the trainer uses (``generate`` ->
``Rollout``), so that another engine (vLLM, SGLang) can replace
``HFGenerateEngine`` (transformers ``generate``) without touching the step loop.

Layout of a ``Rollout`` (``B`` = prompts x samples, grouped contiguously by
prompt): the prompt ids left-padded to ``P`` columns, then the completion ids
right-padded to ``T`` columns (``T`` = the longest completion). A completion
runs up to and including its first end-of-sequence token, or to
``max_new_tokens`` when it never stopped. Concatenated, ``[prompt | completion]``
is exactly what the policy is scored on, with position ids counted from the
first real prompt token, as ``generate`` counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Rollout:
    prompts: list[str]  # [B], each prompt repeated num_samples times
    completions: list[str]  # [B] decoded text, special tokens skipped
    prompt_ids: torch.Tensor  # [B, P] long, left-padded
    prompt_mask: torch.Tensor  # [B, P] bool
    completion_ids: torch.Tensor  # [B, T] long, pad after the end
    completion_mask: torch.Tensor  # [B, T] bool, True through the first end-of-sequence token
    truncated: torch.Tensor  # [B] bool, stopped by max_new_tokens, not by an end token

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The sub-rollout of the given row indices (for dynamic sampling)."""
        idx = rows.tolist()
        return Rollout(
            [self.prompts[i] for i in idx], [self.completions[i] for i in idx],
            self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows],
            self.completion_mask[rows], self.truncated[rows],
        )


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """``(input_ids, attention_mask, position_ids)`` of ``[prompt | completion]``, ``[B, P + T]``.

    Positions count from each row's first real prompt token (left padding gets 0),
    the convention of transformers' ``generate``.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    return input_ids, attention_mask, position_ids


class RolloutEngine(Protocol):
    def generate(self, prompts: list[str], *, num_samples: int = 1, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False) -> Rollout: ...


def end_token_ids(model, tokenizer) -> list[int]:
    """The end-of-sequence ids: the generation config's (one or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model's generation config and the tokenizer both lack an eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos)


def completion_mask_from_ids(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """True up to and including each row's first end token (every position when it has none)."""
    is_end = torch.isin(ids, torch.tensor(eos_ids, device=ids.device))
    ended_before = (is_end.long().cumsum(1) - is_end.long()) > 0
    return ~ended_before


class HFGenerateEngine:
    """Sampling with transformers ``generate`` (KV cache, temperature / top-p / top-k)."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad

    @torch.no_grad()
    def generate(self, prompts, *, num_samples=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0,
                 greedy=False) -> Rollout:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
        prompt_ids = enc["input_ids"].repeat_interleave(num_samples, 0).to(device)
        prompt_mask = enc["attention_mask"].repeat_interleave(num_samples, 0).to(device)
        sampling = {} if greedy else {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k) or None}
        out = self.model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=not greedy, max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, **sampling,
        )
        completion_ids = out[:, prompt_ids.shape[1]:]
        mask = completion_mask_from_ids(completion_ids, self.eos_ids)
        ended = torch.isin(completion_ids, torch.tensor(self.eos_ids, device=device)).any(1)
        width = int(mask.sum(1).max()) if mask.numel() else 0
        completion_ids = completion_ids[:, :width].masked_fill(~mask[:, :width], self.pad_id)
        mask = mask[:, :width]
        texts = self.tokenizer.batch_decode(
            [row[m].tolist() for row, m in zip(completion_ids, mask)], skip_special_tokens=True
        )
        return Rollout(
            prompts=[p for p in prompts for _ in range(num_samples)], completions=texts,
            prompt_ids=prompt_ids, prompt_mask=prompt_mask.bool(),
            completion_ids=completion_ids, completion_mask=mask, truncated=~ended,
        )
