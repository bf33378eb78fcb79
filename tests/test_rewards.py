"""Reward functions on real answer strings: boxed fractions vs decimals, nested braces, no box."""
import sys
import types

import pytest

from entropy_ops.trainers.rewards import (CombinedReward, FormatReward, LengthPenalty, MathCorrectness,
                                          RewardFunction, answers_match, build_rewards, extract_answer,
                                          extract_boxed, normalize_answer, reference_answer)


@pytest.mark.parametrize("text, want", [
    ("The answer is \\boxed{1/2}.", "1/2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{3}, then \\boxed{\\sqrt{\\frac{a}{b}}} done", "\\sqrt{\\frac{a}{b}}"),  # the last box
    ("\\boxed{ 85 }", "85"),
    ("no box at all: 42", None),
    ("unclosed \\boxed{\\frac{1}{2}", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize("text, fmt, want", [
    ("so 3 + 4 = 7\n#### 7", "gsm8k", "7"),
    ("no marker", "gsm8k", None),
    ("it costs 1,250 dollars, or 1.5 each", "last_number", "1.5"),
    ("total: 1,250", "last_number", "1,250"),
    ("nothing numeric", "last_number", None),
])
def test_extract_answer_formats(text, fmt, want):
    assert extract_answer(text, fmt) == want


def test_extract_answer_rejects_unknown_format():
    with pytest.raises(ValueError, match="answer_format"):
        extract_answer("x", "xml")


@pytest.mark.parametrize("answer, want", [
    ("\\boxed{0.5}", "0.5"), ("Natalia sold 48 clips...\n#### 72", "72"), (" 85 ", "85"),
])
def test_reference_answer(answer, want):
    assert reference_answer(answer) == want


def test_normalize_answer():
    assert normalize_answer(" $1,000$. ") == "1000"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"


@pytest.mark.parametrize("pred, ref, want", [
    ("1/2", "0.5", True),  # math-verify: a fraction and a decimal
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{3}{4}", "\\dfrac{3}{4}", True),
    ("\\sqrt{4}", "2", True),
    ("x+1", "1+x", True),
    ("85", "85", True),
    ("85.0", "85", True),  # the plain-number fast path
    ("084", "84", True),
    ("1,000", "1000", True),
    ("84", "85", False),
    ("\\frac{1}{3}", "0.5", False),
    ("(1,2)", "(2,1)", False),
    (None, "5", False),
    ("", "5", False),
])
def test_answers_match(pred, ref, want):
    assert answers_match(pred, ref) is want


def test_correctness_reward_on_completions():
    fn = MathCorrectness()
    completions = [
        "The answer is \\boxed{1/2}",  # vs 0.5: equal
        "\\boxed{\\frac{1}{2}}",  # nested braces, vs 0.5: equal
        "I think it is 0.5",  # no box: 0
        "\\boxed{0.25}",  # wrong
        "\\boxed{85}",
        "\\boxed{\\frac{1}{2}",  # unclosed box: no answer
    ]
    answers = ["0.5", "0.5", "0.5", "0.5", "#### 85", "0.5"]
    assert fn(["q"] * 6, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert isinstance(fn, RewardFunction)
    with pytest.raises(ValueError, match="answer"):
        fn(["q"], ["\\boxed{1}"])


def test_correctness_with_other_format():
    fn = MathCorrectness("gsm8k")
    assert fn(["q", "q"], ["so #### 72", "\\boxed{72}"], answer=["72", "72"]) == [1.0, 0.0]


def test_format_reward():
    fn = FormatReward()
    assert fn(["q"] * 4, ["\\boxed{3}", "3", "\\boxed{", "a \\boxed{x^{2}} b"]) == [1.0, 0.0, 0.0, 1.0]


def test_length_penalty():
    fn = LengthPenalty(max_length=8, buffer=4)
    # 0 up to 8 - 4 = 4 tokens, then -(L - 4) / 4, -1 at 8 and beyond
    got = fn(["q"] * 6, ["c"] * 6, completion_lengths=[1, 4, 5, 6, 8, 12])
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    assert LengthPenalty(3)(["q"], ["abc"]) == [-1.0]  # no token counts: character counts
    with pytest.raises(ValueError, match="buffer"):
        LengthPenalty(8, buffer=9)


def test_combined_reward_weights():
    combined = build_rewards({"correctness": 1.0, "format": 0.5, "length": 0.1}, max_new_tokens=8)
    total, parts = combined(["q", "q"], ["\\boxed{5}", "5"], answer=["5", "5"], completion_lengths=[3, 8])
    assert parts == {"correctness": [1.0, 0.0], "format": [1.0, 0.0], "length": [0.0, -1.0]}
    assert total == pytest.approx([1.5, -0.1])


def test_custom_reward_by_import_path(monkeypatch):
    module = types.ModuleType("custom_rewards_for_test")
    module.always_two = lambda prompts, completions, **_: [2.0] * len(completions)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    combined = build_rewards({"custom_rewards_for_test:always_two": 3.0})
    total, parts = combined(["a", "b"], ["x", "y"])
    assert total == [6.0, 6.0] and parts == {"custom_rewards_for_test:always_two": [2.0, 2.0]}


def test_bad_rewards():
    with pytest.raises(ValueError, match="unknown reward 'corectness'"):
        build_rewards({"corectness": 1.0})
    bad = CombinedReward({"short": lambda p, c, **_: [1.0]}, {"short": 1.0})
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        bad(["a", "b"], ["x", "y"])
