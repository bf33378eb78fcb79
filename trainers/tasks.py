"""Prompt sets for the trainer: the generated arithmetic task and JSONL datasets.

A *row* is a plain ``dict`` with at least ``prompt`` (str) and ``answer`` (str);
any further fields travel with the row and reach the reward functions as
keyword arguments (``RewardFunction(prompts, completions, **row_fields)``).

The arithmetic task is the embedded default: prompts ``What is 37+48?`` whose
reference completion is ``\\boxed{85}``, so the math-correctness reward checks
it through its real ``\\boxed{}`` path. Its train / held-out split depends only
on ``split_seed`` (not on the run's seed), so the tiny model's supervised
warm-up (``make_tiny_model.py``) and every RL run agree on which pairs are held out.
"""
from __future__ import annotations

import itertools
import json
import os
import random

import torch

PROMPT_TEMPLATE = "What is {a}{op}{b}?"
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# Above this many operand pairs the task samples instead of enumerating them.
MAX_ENUMERATED_PAIRS = 1_000_000


def arithmetic_prompt(a: int, b: int, op: str = "+") -> dict:
    """One row: ``{"prompt": "What is a+b?", "answer": str(a + b)}``."""
    return {"prompt": PROMPT_TEMPLATE.format(a=a, op=op, b=b), "answer": str(OPERATIONS[op](a, b))}


def arithmetic_task(
    digits: int = 2, op: str = "+", num_eval: int = 200, split_seed: int = 1234, num_train: int = 20_000
) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, eval_rows)`` for ``a op b`` with ``digits``-digit operands (no leading zeros).

    Every operand pair is enumerated when there are at most ``MAX_ENUMERATED_PAIRS``
    (2-digit: 8100 pairs), shuffled with ``split_seed``; the first ``num_eval`` are
    held out and the rest are the training rows. Larger spaces draw
    ``num_eval + num_train`` distinct pairs instead.
    """
    if op not in OPERATIONS:
        raise ValueError(f"op must be one of {sorted(OPERATIONS)}, got {op!r}")
    if not isinstance(digits, int) or not 1 <= digits <= 9:
        raise ValueError(f"digits must be an int in [1, 9], got {digits!r}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits
    rng = random.Random(split_seed)
    n_values = hi - lo
    if n_values * n_values <= MAX_ENUMERATED_PAIRS:
        pairs = list(itertools.product(range(lo, hi), repeat=2))
        rng.shuffle(pairs)
    else:
        seen: set[tuple[int, int]] = set()
        pairs = []
        while len(pairs) < num_eval + num_train:
            pair = (rng.randrange(lo, hi), rng.randrange(lo, hi))
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    if num_eval >= len(pairs):
        raise ValueError(f"num_eval={num_eval} leaves no training pairs out of {len(pairs)}")
    rows = [arithmetic_prompt(a, b, op) for a, b in pairs]
    return rows[num_eval:], rows[:num_eval]


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file of rows; each line an object with string fields ``prompt`` and ``answer``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each line must be an object with a string 'prompt'")
            if "answer" in row and not isinstance(row["answer"], str):
                row["answer"] = str(row["answer"])
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


class PromptSampler:
    """Draws prompts for each step: a seeded shuffle of the rows, reshuffled at every epoch end.

    Its state (the generator and the position) goes into checkpoints, so a
    resumed run draws the same prompts it would have drawn without the stop.
    """

    def __init__(self, rows: list[dict], seed: int) -> None:
        if not rows:
            raise ValueError("PromptSampler needs at least one row")
        self.rows = rows
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(rows), generator=self.generator).tolist()
        self.position = 0

    def sample(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.order = torch.randperm(len(self.rows), generator=self.generator).tolist()
                self.position = 0
            out.append(self.rows[self.order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.position = int(state["position"])
