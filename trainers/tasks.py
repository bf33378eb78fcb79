"""Prompt sets for the trainer: the generated tasks (``addition``, ``arithmetic``) and JSONL datasets.

A *row* is a plain ``dict`` with at least ``prompt`` (str) and ``answer`` (str);
any further fields travel with the row and reach the reward functions as
keyword arguments (``RewardFunction(prompts, completions, **row_fields)``).

Two generated tasks (``TASKS``), both checked by the math-correctness reward
on the last ``\\boxed{}``:

- ``addition`` (the default, :func:`addition_task`): multi-operand addition with a
  short scratchpad, ``What is 23+58+41?`` -> ``23+41=64;64+58=122;\\boxed{122}``.
  2-4 operands of 1-3 digits, so difficulty and answer length vary across
  prompts; any summation order is correct, so correct traces of one prompt differ
  (real branching tokens: mostly the choice of the first pair). It carries a
  *planted slice* (:data:`PLANTED_SLICE`): 2-operand problems whose units digits
  are 7 and 8. The embedded model's warm-up traces drop the carry of every
  units-digit 7+8 step (``27+38=55``), so the model starts out confidently wrong
  there; held-out metrics report the slice separately.
- ``arithmetic`` (:func:`arithmetic_task`): ``What is 37+48?`` -> ``\\boxed{85}``,
  2-digit operands (the earlier default; the embedded model answers it with a
  one-step scratchpad).

Train / held-out splits depend only on ``split_seed`` (not on the run's seed),
so the tiny model's supervised warm-up (``make_tiny_model.py``) and every RL
run agree on which problems are held out.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

PROMPT_TEMPLATE = "What is {a}{op}{b}?"
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
# Above this many operand pairs the task samples instead of enumerating them.
MAX_ENUMERATED_PAIRS = 1_000_000
TASKS = ("addition", "arithmetic")
# The planted "confidently wrong" slice of the addition task: two operands whose units digits are 7 and 8.
PLANTED_SLICE = "carry78"
PLANTED_UNITS = (7, 8)


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


# ------------------------------------------------------------------ addition
def addition_prompt(operands: list[int]) -> str:
    """``What is 23+58+41?``"""
    return "What is " + "+".join(map(str, operands)) + "?"


def is_planted(operands: list[int]) -> bool:
    """True for the planted slice: exactly two operands whose units digits are 7 and 8 (either order)."""
    return len(operands) == 2 and sorted(o % 10 for o in operands) == list(PLANTED_UNITS)


def planted_step(a: int, b: int) -> bool:
    """True when ``a + b`` is a step the warm-up gets wrong: the units digits are 7 and 8."""
    return sorted((a % 10, b % 10)) == list(PLANTED_UNITS)


def scratchpad(order: list[int], *, drop_carry_78: bool = False) -> str:
    """The trace that adds ``order`` left to right: ``a+b=s1;s1+c=s2;\\boxed{s2}``.

    ``drop_carry_78``: the planted error, every step whose units digits are 7 and 8
    loses its carry (``27+38=55``), and later steps continue from the wrong sum.
    A single operand gives ``\\boxed{a}``.
    """
    if not order:
        raise ValueError("order must hold at least one operand")
    total, steps = order[0], []
    for x in order[1:]:
        s = total + x - (10 if drop_carry_78 and planted_step(total, x) else 0)
        steps.append(f"{total}+{x}={s};")
        total = s
    return "".join(steps) + f"\\boxed{{{total}}}"


def addition_row(operands: list[int]) -> dict:
    """One row: prompt, the true sum as ``answer``, ``slice`` (``PLANTED_SLICE`` or ``""``) and, on the
    slice, ``planted_answer``: the dropped-carry sum the warm-up taught (``""`` elsewhere)."""
    planted = is_planted(operands)
    return {"prompt": addition_prompt(operands), "answer": str(sum(operands)),
            "slice": PLANTED_SLICE if planted else "", "planted_answer": str(sum(operands) - 10) if planted else ""}


def operands_of(prompt: str) -> list[int]:
    """The operands of an addition prompt (``ValueError`` when it is not one)."""
    m = re.fullmatch(r"What is (\d+(?:\+\d+)+)\?", prompt.strip())
    if m is None:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return [int(x) for x in m.group(1).split("+")]


_STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def scratchpad_consistent(prompt: str, completion: str) -> bool:
    """True when the completion's scratchpad is a correct summation of the prompt's operands, in any order.

    ``a+b=s;s+c=t;...\\boxed{t}``: every step's arithmetic is right, each step after the first
    continues from the previous sum, the added operands are exactly the prompt's (as a multiset),
    and the boxed answer is the last sum. Anything else (including a non-addition prompt) is False.
    """
    try:
        operands = operands_of(prompt)
    except ValueError:
        return False
    body, sep, tail = completion.partition("\\boxed{")
    if not sep or not tail.startswith(tail.split("}")[0] + "}"):
        return False
    boxed = tail.split("}")[0]
    parts = [p for p in body.split(";") if p]
    if len(parts) != len(operands) - 1 or body and not body.endswith(";"):
        return False
    used, total = [], None
    for part in parts:
        m = _STEP.fullmatch(part)
        if m is None:
            return False
        a, b, c = (int(x) for x in m.groups())
        if a + b != c:
            return False
        if total is None:
            used += [a, b]
        elif a != total:
            return False
        else:
            used.append(b)
        total = c
    if total is None:  # a single operand: nothing to add
        total = operands[0]
    return sorted(used or operands) == sorted(operands) and boxed.strip() == str(total)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def random_operands(rng: random.Random, *, planted: bool = False, min_operands: int = 2,
                    max_operands: int = 4, max_digits: int = 3) -> list[int]:
    """A random problem: ``min..max_operands`` operands, each of ``1..max_digits`` digits (uniform,
    no leading zeros); ``planted`` draws a slice problem (2 operands, units digits 7 and 8)."""
    if planted:
        a = _operand(rng, rng.randint(1, max_digits)) // 10 * 10 + 7
        b = _operand(rng, rng.randint(1, max_digits)) // 10 * 10 + 8
        return [a, b] if rng.random() < 0.5 else [b, a]
    return [_operand(rng, rng.randint(1, max_digits)) for _ in range(rng.randint(min_operands, max_operands))]


def problem_key(operands: list[int]) -> tuple[int, ...]:
    """Problems that differ only in operand order share a key (kept on one side of the split)."""
    return tuple(sorted(operands))


def addition_task(num_eval: int = 1000, split_seed: int = 1234, num_train: int = 20_000,
                  slice_frac: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, eval_rows)`` of the scratchpad addition task.

    Both sides draw a fraction ``slice_frac`` of planted-slice problems (the rest:
    2-4 operands of 1-3 digits); no problem (up to operand order) is on both
    sides. Deterministic in ``split_seed``.
    """
    if not 0.0 <= slice_frac <= 1.0:
        raise ValueError(f"slice_frac must be in [0, 1], got {slice_frac}")
    if num_eval < 1 or num_train < 1:
        raise ValueError(f"num_eval and num_train must be >= 1, got {num_eval}, {num_train}")
    rng = random.Random(split_seed)
    seen: set[tuple[int, ...]] = set()

    def draw(n: int) -> list[dict]:
        rows, n_slice = [], round(n * slice_frac)
        while len(rows) < n:
            ops = random_operands(rng, planted=len(rows) < n_slice)
            if problem_key(ops) not in seen:
                seen.add(problem_key(ops))
                rows.append(addition_row(ops))
        rng.shuffle(rows)
        return rows

    eval_rows = draw(num_eval)
    return draw(num_train), eval_rows


def task_rows(name: str, *, num_eval: int, digits: int = 2) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of the generated task ``name`` (one of ``TASKS``)."""
    if name == "addition":
        return addition_task(num_eval=num_eval)
    if name == "arithmetic":
        return arithmetic_task(digits=digits, num_eval=num_eval)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


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


def load_rows(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """``(train_rows, eval_rows)`` of the configured dataset."""
    if config.dataset in TASKS:
        train, held_out = task_rows(config.dataset, num_eval=config.num_eval_prompts, digits=config.arithmetic_digits)
    else:
        train, held_out = load_jsonl(config.dataset), []
    if config.eval_dataset is not None:
        held_out = load_jsonl(config.eval_dataset)[: config.num_eval_prompts]
    return train, held_out
