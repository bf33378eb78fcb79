"""SEED-GRPO (trainers/algorithms/seed_grpo.py): clustering, semantic entropy, advantage modulation."""
import math

import pytest
import torch

from entropy_ops.trainers.algorithms.base import RolloutBatch
from entropy_ops.trainers.algorithms.seed_grpo import (
    SeedGRPO,
    cluster_answers,
    exact_equivalence,
    math_equivalence,
    seed_grpo_advantages,
    semantic_entropy,
)

from oracle import assert_matches_hand_values

F64 = torch.float64


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    assert_matches_hand_values(actual, expected, rtol, atol)


def hand_group():
    """G = 4 answers "1/2", "0.5", "3", None (classes 0, 0, 1, 2), rewards 1, 1, 0, 0."""
    answers = ["1/2", "0.5", "3", None]
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-0.5, -1.5, 9.0], [-2.0, 9.0, 9.0], [-1.0, -1.0, -1.0], [-3.0, -1.0, 9.0]], dtype=F64)
    return answers, rewards, mask, logprobs  # 9.0 at masked positions must be ignored


def entropy_of(ps):
    return -sum(p * math.log(p) for p in ps if p > 0)


def test_clustering():
    eq = math_equivalence
    answers = ["1/2", "\\frac{1}{2}", "3", "0.5", None, "x+1", "1+x", None]
    assert cluster_answers(answers, eq) == [0, 0, 1, 0, 2, 3, 3, 4]
    assert cluster_answers(["a", " a", "b"], exact_equivalence) == [0, 0, 1]
    assert cluster_answers(["yes", "YES", "no"], lambda a, b: a.lower() == b.lower()) == [0, 0, 1]
    assert cluster_answers([None, None], exact_equivalence) == [0, 1]


def test_hand_case_likelihood_weighted():
    answers, rewards, mask, logprobs = hand_group()
    ids = torch.tensor(cluster_answers(answers, math_equivalence))
    assert ids.tolist() == [0, 0, 1, 2]
    # length-normalized log-probs: -1, -2, -1, -2  ->  p(C) proportional to e^-1 + e^-2, e^-1, e^-2
    w = [math.exp(-1), math.exp(-2), math.exp(-1), math.exp(-2)]
    Z = sum(w)
    se = entropy_of([(w[0] + w[1]) / Z, w[2] / Z, w[3] / Z])
    factor = 1 - 0.5 * se / math.log(4)
    adv = seed_grpo_advantages(rewards, ids, logprobs, mask, 4, alpha=0.5)
    assert_close(adv, [0.5 * factor, 0.5 * factor, -0.5 * factor, -0.5 * factor])
    assert_close(semantic_entropy(ids, 4, torch.tensor([-1.0, -2.0, -1.0, -2.0], dtype=F64)), [se])
    # summed log-probs: -2, -2, -3, -4
    w = [math.exp(-2), math.exp(-2), math.exp(-3), math.exp(-4)]
    Z = sum(w)
    se = entropy_of([(w[0] + w[1]) / Z, w[2] / Z, w[3] / Z])
    adv = seed_grpo_advantages(rewards, ids, logprobs, mask, 4, alpha=0.5, length_normalized=False,
                               modulation="exp")
    assert_close(adv, [0.5 * math.exp(-0.5 * se / math.log(4))] * 2 + [-0.5 * math.exp(-0.5 * se / math.log(4))] * 2)


def test_hand_case_count_weighted_with_std():
    answers, rewards, mask, logprobs = hand_group()
    ids = torch.tensor([0, 0, 1, 2])
    se = entropy_of([0.5, 0.25, 0.25])  # = 1.5 log 2, so SE / SE_max = 0.75
    assert abs(se / math.log(4) - 0.75) < 1e-12
    std = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected std of 1, 1, 0, 0
    eps = 1e-6
    adv = seed_grpo_advantages(rewards, ids, logprobs, mask, 4, alpha=0.2, modulation="inverse",
                               weighting="count", scale_by_std=True, eps=eps)
    a = 0.5 / (std + eps) / (1 + 0.2 * 0.75)
    assert_close(adv, [a, a, -a, -a])


def test_agreement_leaves_advantages_unchanged_and_disagreement_scales_down():
    gen = torch.Generator().manual_seed(0)
    G, T = 6, 5
    rewards = torch.rand(4 * G, generator=gen, dtype=F64)
    logprobs = -torch.rand(4 * G, T, generator=gen, dtype=F64) * 3
    mask = torch.rand(4 * G, T, generator=gen) < 0.8
    # group 0: all agree; groups 1..3: 2, 3, 6 distinct answers
    ids = torch.tensor([0] * 6 + [0, 0, 0, 1, 1, 1] + [0, 0, 1, 1, 2, 2] + list(range(6)))
    base = (rewards.view(4, G) - rewards.view(4, G).mean(1, keepdim=True)).view(-1)
    for weighting in ("count", "likelihood"):
        for modulation in ("linear", "exp", "inverse"):
            adv = seed_grpo_advantages(rewards, ids, logprobs, mask, G, alpha=0.8, weighting=weighting,
                                       modulation=modulation)
            ratio = (adv / base).view(4, G)
            assert_close(ratio[0], torch.ones(G))  # SE = 0
            assert torch.allclose(ratio, ratio[:, :1].expand(4, G))  # one factor per group
            if weighting == "count":  # p uniform over the classes: SE = log K grows with K
                assert ratio[1, 0] > ratio[2, 0] > ratio[3, 0]
            assert (ratio[1:, 0] < 1).all() and (ratio[1:, 0] > 0).all()
    # all distinct, count weighting: SE = SE_max, factor = f(alpha) exactly
    adv = seed_grpo_advantages(rewards, ids, logprobs, mask, G, alpha=0.8, weighting="count")
    assert_close(adv.view(4, G)[3], 0.2 * base.view(4, G)[3])


def test_likelihood_weighting_is_stable_for_long_answers():
    ids = torch.tensor([0, 1, 1, 2])
    seq = torch.tensor([-5000.0, -5001.0, -5001.0, -9000.0])  # exp underflows; log-space does not
    se = semantic_entropy(ids, 4, seq)
    w = [1.0, math.exp(-1), math.exp(-1), 0.0]
    Z = sum(w)
    assert_close(se, [entropy_of([w[0] / Z, (w[1] + w[2]) / Z])], rtol=1e-6)


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        seed_grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.zeros(2, 3),
                             torch.ones(2, 3, dtype=torch.bool), 1)


def make_batch(answers, rewards, mask, logprobs, G):
    B, T = mask.shape
    return RolloutBatch(prompts=["p"] * (B // G), completions=["c"] * B, group_size=G, rewards=rewards,
                        correct=rewards > 0, completion_mask=mask, old_logprobs=logprobs,
                        old_entropy=torch.zeros(B, T), answers=answers)


def test_algorithm_class():
    answers, rewards, mask, logprobs = hand_group()
    batch = make_batch(answers * 2, torch.cat([rewards, rewards]).float(), torch.cat([mask, mask]),
                       torch.cat([logprobs, logprobs]).float(), 4)
    algo = SeedGRPO(alpha=0.5)
    assert algo.name == "seed-grpo"
    adv = algo.advantages(batch)
    expected = seed_grpo_advantages(rewards, torch.tensor([0, 0, 1, 2]), logprobs, mask, 4, alpha=0.5)
    assert adv.dtype == torch.float32
    assert_close(adv, torch.cat([expected, expected]), rtol=1e-6)
    exact = SeedGRPO(alpha=0.5, equivalence="exact").advantages(batch)  # "1/2" != "0.5" as strings
    assert (exact[:2].abs() < adv[:2].abs()).all()
    batch.answers = answers
    with pytest.raises(ValueError, match="one extracted answer"):
        algo.advantages(batch)


def test_bad_options():
    with pytest.raises(ValueError, match="alpha"):
        SeedGRPO(alpha=1.5)  # the linear f would flip signs
    SeedGRPO(alpha=1.5, modulation="exp")
    with pytest.raises(ValueError, match="modulation"):
        SeedGRPO(modulation="cosine")
    with pytest.raises(ValueError, match="weighting"):
        SeedGRPO(weighting="uniform")
    with pytest.raises(ValueError, match="equivalence"):
        SeedGRPO(equivalence="nli")
    with pytest.raises(ValueError, match="unknown key"):
        SeedGRPO(beta=0.1)
    answers, rewards, mask, logprobs = hand_group()
    with pytest.raises(ValueError, match="class_ids must lie"):
        seed_grpo_advantages(rewards, torch.tensor([0, 0, 1, 4]), logprobs, mask, 4)
