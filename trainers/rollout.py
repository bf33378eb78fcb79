"""Rollout: sample completions from the policy.

``RolloutEngine`` is the small interface the trainer uses (``generate`` ->
``Rollout``, and ``update_weights(model)`` after each optimizer step), so that
another engine can replace ``HFGenerateEngine`` (transformers ``generate``)
without touching the step loop. ``make_engine(name, model, tokenizer, **options)``
builds one by name: ``"hf"`` (default) or ``"vllm"`` (``trainers/vllm_engine.py``,
the optional extra ``entropy-ops[vllm]``).

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
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, greedy: bool = False) -> Rollout:
        """``len(prompts) * num_samples`` completions, rows grouped contiguously by prompt (layout above).

        ``top_k = 0`` means no top-k filter; ``greedy`` ignores temperature / top-p / top-k.
        """
        ...

    def update_weights(self, model) -> None:
        """Make the next ``generate`` sample from ``model``'s current parameters.

        The trainer calls it after every optimizer step. An engine that runs the
        policy module itself has nothing to do; one that keeps its own copy of
        the weights (vLLM) copies them in here.
        """
        ...


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


def pack_completions(rows: list[list[int]], eos_ids: list[int], pad_id: int,
                     stopped: list[bool] | None = None):
    """Per-row completion token lists -> ``(completion_ids [B, T], completion_mask [B, T], truncated [B])``.

    Each row is cut after its first end token (kept, as ``generate`` keeps it) and
    right-padded with ``pad_id`` to ``T = max_b len(row_b)``; the mask is True on
    the kept tokens. A row is truncated when it holds no end token and
    ``stopped[b]`` (the engine's own verdict, e.g. vLLM ``finish_reason == "stop"``)
    is not True. This is the layout ``HFGenerateEngine`` produces.
    """
    ends = set(int(e) for e in eos_ids)
    cut, ended = [], []
    for b, row in enumerate(rows):
        row = [int(t) for t in row]
        first = next((i for i, t in enumerate(row) if t in ends), None)
        cut.append(row if first is None else row[:first + 1])
        ended.append(first is not None or bool(stopped is not None and stopped[b]))
    width = max((len(r) for r in cut), default=0)
    ids = torch.full((len(cut), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.bool)
    for b, row in enumerate(cut):
        ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, :len(row)] = True
    return ids, mask, ~torch.tensor(ended, dtype=torch.bool)


class HFGenerateEngine:
    """Sampling with transformers ``generate`` (KV cache, temperature / top-p / top-k).

    It samples from the policy module itself, so ``update_weights`` is a no-op.
    """

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad

    def update_weights(self, model) -> None:
        """No-op: ``generate`` runs the policy module itself, which already holds the new weights."""

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


ROLLOUT_ENGINES = ("hf", "vllm")


def engine_options(name: str) -> tuple[str, ...]:
    """The option names ``make_engine(name, ...)`` accepts (``rollout_engine_options`` keys).

    Raises ``ValueError`` naming ``rollout_engine`` when ``name`` is not one of ``ROLLOUT_ENGINES``.
    """
    if name == "hf":
        return ()
    if name == "vllm":
        from .vllm_engine import VLLM_OPTIONS  # no vllm import: the module imports it lazily

        return VLLM_OPTIONS
    allowed = ", ".join(repr(n) for n in ROLLOUT_ENGINES)
    raise ValueError(f"rollout_engine: unknown engine {name!r}; expected one of {allowed}")


def check_engine_options(name: str, options: dict) -> None:
    """Raise ``ValueError`` for an unknown engine name or option key (``TypeError`` for a non-dict).

    Cheap (vLLM is not imported), so it can run at config validation, before any model is loaded.
    The option values are checked by the engine's constructor.
    """
    allowed = engine_options(name)
    if not isinstance(options, dict):
        raise TypeError(f"rollout_engine_options: expected a dict of options, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in allowed)
    if unknown:
        expected = ", ".join(allowed) if allowed else "none (pass an empty dict)"
        raise ValueError(f"rollout_engine_options: unknown option(s) {', '.join(unknown)} for rollout_engine="
                         f"{name!r}; allowed: {expected}")


def make_engine(name: str, model, tokenizer, **options) -> RolloutEngine:
    """The rollout engine ``name`` (``"hf"``: transformers ``generate``; ``"vllm"``: a colocated vLLM ``LLM``).

    ``options`` are ``rollout_engine_options``: none for ``"hf"``, ``VLLM_OPTIONS``
    for ``"vllm"``. Unknown names or options raise ``ValueError`` listing the
    allowed values; a missing vLLM raises ``ImportError`` with the install command.
    """
    check_engine_options(name, options)
    if name == "hf":
        return HFGenerateEngine(model, tokenizer)
    from .vllm_engine import VLLMEngine

    return VLLMEngine(model, tokenizer, **options)
