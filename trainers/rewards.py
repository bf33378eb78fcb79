"""Reward functions: the ``RewardFunction`` protocol, the built-ins, and their weighted sum.

A reward function maps a batch of completions to one float each::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

``fields`` are the dataset row fields (``answer``, ...), one list entry per
completion, plus ``completion_lengths`` (generated tokens, ``<eos>`` included).
Functions take what they need by keyword and ignore the rest (``**_``).

Built-ins (``REWARDS``): ``correctness`` (1 when the completion's final answer
equals the reference, checked with math-verify), ``format`` (1 when the
completion has a final answer in the expected format), ``length`` (DAPO's
soft over-length penalty, in ``[-1, 0]``) and ``scratchpad`` (1 when an addition
trace is arithmetically consistent, any summation order). ``"package.module:attribute"``
names any other function.
"""
from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

ANSWER_FORMATS = ("boxed", "gsm8k", "last_number")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_LAST_NUMBER = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?|[+-]?\.\d+")


@runtime_checkable
class RewardFunction(Protocol):
    """``(prompts, completions, **row_fields) -> list[float]``, one reward per completion."""

    def __call__(self, prompts: list[str], completions: list[str], **fields: Any) -> list[float]: ...


# ------------------------------------------------------------ answer extraction
def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or ``None``.

    ``"so \\boxed{\\frac{1}{2}}."`` -> ``"\\frac{1}{2}"``; an unclosed box gives ``None``.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The final answer of ``text`` in ``answer_format``; ``None`` when it has none.

    ``"boxed"``: the last ``\\boxed{}``; ``"gsm8k"``: what follows the last ``####``;
    ``"last_number"``: the last number (commas as thousands separators allowed).
    """
    if answer_format == "boxed":
        return extract_boxed(text)
    if answer_format == "gsm8k":
        if "####" not in text:
            return None
        return text.rsplit("####", 1)[1].strip() or None
    if answer_format == "last_number":
        found = _LAST_NUMBER.findall(text)
        return found[-1] if found else None
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def reference_answer(answer: str) -> str:
    """A dataset's reference answer, whatever its format: a box's content, what follows ``####``, or itself."""
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    return answer.strip()


def normalize_answer(answer: str) -> str:
    """Lower-case, without ``$``, spaces, ``\\left``/``\\right``, ``\\!``, thousands commas and a final period."""
    s = answer.lower()
    for junk in ("$", "\\left", "\\right", "\\!", "\\,", "\\;", " ", "\n", "\t"):
        s = s.replace(junk, "")
    s = re.sub(r"(?<=\d),(?=\d{3}(\D|$))", "", s)
    return s.rstrip(".")


def answers_match(predicted: str | None, reference: str) -> bool:
    """True when ``predicted`` and ``reference`` are the same mathematical answer.

    Equal normalized strings match at once, and two plain decimal numbers are
    compared exactly as fractions (cheap, and what math-verify would conclude);
    anything else goes to math-verify (``verify(parse(ref), parse(pred))``,
    ``\\frac{1}{2}`` = ``0.5`` = ``1/2``). Without math-verify installed, or when
    it fails, the normalized string comparison stands.
    """
    if predicted is None:
        return False
    a, b = normalize_answer(predicted), normalize_answer(reference)
    if a == b:
        return True
    if _NUMBER.match(a) and _NUMBER.match(b):
        return Fraction(a) == Fraction(b)
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${reference}$"), parse(f"${predicted}$")))
    except Exception:  # math-verify raises on some malformed LaTeX; the string comparison said no
        return False


# ------------------------------------------------------------------- built-ins
class MathCorrectness:
    """1.0 when the completion's final answer (``answer_format``) matches the row's ``answer``, else 0.0."""

    def __init__(self, answer_format: str = "boxed") -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        self.answer_format = answer_format

    def extract(self, completion: str) -> str | None:
        return extract_answer(completion, self.answer_format)

    def __call__(self, prompts, completions, *, answer=None, **_):
        if answer is None:
            raise ValueError("the correctness reward needs an 'answer' field in every dataset row")
        return [float(answers_match(self.extract(c), reference_answer(a))) for c, a in zip(completions, answer)]


class FormatReward:
    """1.0 when the completion has a final answer in ``answer_format`` (a closed ``\\boxed{}``), else 0.0."""

    def __init__(self, answer_format: str = "boxed") -> None:
        self.correctness = MathCorrectness(answer_format)  # for its validated format and extractor

    def __call__(self, prompts, completions, **_):
        return [float(self.correctness.extract(c) is not None) for c in completions]


class LengthPenalty:
    """DAPO's soft over-length penalty on the generated token count ``L``, in ``[-1, 0]``.

    ``0`` while ``L <= max_length - buffer``, then falling linearly to ``-1`` at ``L = max_length``
    (and ``-1`` beyond). ``max_length`` defaults to the trainer's ``max_new_tokens``.
    """

    def __init__(self, max_length: int, buffer: int | None = None) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self.buffer = max(1, max_length // 4) if buffer is None else buffer
        if not 1 <= self.buffer <= max_length:
            raise ValueError(f"buffer must be in [1, max_length={max_length}], got {self.buffer}")

    def __call__(self, prompts, completions, *, completion_lengths=None, **_):
        lengths = completion_lengths if completion_lengths is not None else [len(c) for c in completions]
        start = self.max_length - self.buffer
        return [-min(1.0, max(0.0, (n - start) / self.buffer)) for n in lengths]


class ScratchpadReward:
    """1.0 when an addition completion's scratchpad is consistent (``tasks.scratchpad_consistent``:
    right arithmetic at every step, the prompt's operands in any order, the boxed answer = the last sum)."""

    def __init__(self, answer_format: str = "boxed") -> None:
        del answer_format  # the scratchpad's own format

    def __call__(self, prompts, completions, **_):
        from .tasks import scratchpad_consistent

        return [float(scratchpad_consistent(p, c)) for p, c in zip(prompts, completions)]


REWARDS = {"correctness": MathCorrectness, "format": FormatReward, "length": LengthPenalty,
           "scratchpad": ScratchpadReward}


class CombinedReward:
    """A weighted sum of named reward functions; also returns each component."""

    def __init__(self, functions: dict[str, RewardFunction], weights: dict[str, float]) -> None:
        if set(functions) != set(weights):
            raise ValueError("functions and weights must have the same names")
        self.functions, self.weights = functions, weights

    def __call__(self, prompts: list[str], completions: list[str], **fields) -> tuple[list[float], dict[str, list[float]]]:
        components = {}
        for name, fn in self.functions.items():
            values = [float(v) for v in fn(prompts, completions, **fields)]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            components[name] = values
        total = [sum(self.weights[n] * components[n][i] for n in components) for i in range(len(completions))]
        return total, components


def check_reward_name(name: str) -> None:
    """Raise ``ValueError`` for a name that is neither a built-in nor a ``module:attribute`` path."""
    if name not in REWARDS and ":" not in name:
        raise ValueError(f"rewards: unknown reward {name!r}; built-ins are {sorted(REWARDS)}, "
                         "or give 'package.module:function'")


def build_rewards(weights: dict[str, float], *, answer_format: str = "boxed", max_new_tokens: int = 256) -> CombinedReward:
    """``CombinedReward`` from ``{name: weight}`` (built-in names or ``"module:attribute"``)."""
    functions: dict[str, RewardFunction] = {}
    for name in weights:
        check_reward_name(name)
        if name == "length":
            functions[name] = LengthPenalty(max_new_tokens)
        elif name in REWARDS:
            functions[name] = REWARDS[name](answer_format)
        else:
            module, attr = name.split(":", 1)
            fn = getattr(importlib.import_module(module), attr)
            if not callable(fn):
                raise TypeError(f"rewards: {name!r} is not callable")
            functions[name] = fn
    return CombinedReward(functions, dict(weights))
