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
        SeedGRPO(alpha=-0.1)
    SeedGRPO(alpha=1.5)  # x is clamped at 1, so the linear f never flips a sign
    with pytest.raises(ValueError, match="estimator"):
        SeedGRPO(estimator="kernel")
    with pytest.raises(ValueError, match="gamma"):
        SeedGRPO(modulation="focal", gamma=0.0)
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


def test_monte_carlo_estimator_hand_case():
    """Kuhn et al.: SE = -(1/K) sum_k log p(C_k) over the K classes found; plug-in: -sum p log p."""
    ids = torch.tensor([0, 0, 0, 1, 0, 1, 2, 3])  # two groups of 4: p = (3/4, 1/4) and four classes of 1/4
    se_mc = semantic_entropy(ids, 4, None, estimator="monte-carlo")
    se_pi = semantic_entropy(ids, 4, None, estimator="plugin")
    assert_close(se_mc, [-(math.log(0.75) + math.log(0.25)) / 2, math.log(4)], rtol=1e-12)
    assert_close(se_pi, [entropy_of([0.75, 0.25]), math.log(4)], rtol=1e-12)
    assert se_mc[0] > se_pi[0]  # the rare class weighs as much as the common one
    # the Monte-Carlo form can pass log G: one very unlikely class
    lp = torch.tensor([0.0, 0.0, 0.0, -30.0], dtype=F64)
    assert semantic_entropy(torch.tensor([0, 0, 0, 1]), 4, lp, estimator="monte-carlo").item() > math.log(4)
    # ... and the factor stays in [0, 1] (x clamped at 1)
    rewards, mask = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=F64), torch.ones(4, 1, dtype=torch.bool)
    adv = seed_grpo_advantages(rewards, torch.tensor([0, 0, 0, 1]), lp.view(4, 1), mask, 4, alpha=1.0,
                               estimator="monte-carlo", length_normalized=False)
    assert (adv == 0).all()


@pytest.mark.parametrize("modulation,f", [("linear", lambda x: 1 - x), ("exp", lambda x: math.exp(-x)),
                                          ("focal", lambda x: (1 - x) ** 2), ("inverse", lambda x: 1 / (1 + x))])
def test_modulations_hand_case(modulation, f):
    ids = torch.tensor([0, 0, 1, 2])  # count weighting: p = 1/2, 1/4, 1/4
    se = entropy_of([0.5, 0.25, 0.25])
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    mask = torch.ones(4, 2, dtype=torch.bool)
    adv, se_out, factor = seed_grpo_advantages(rewards, ids, torch.zeros(4, 2, dtype=F64), mask, 4, alpha=1.0,
                                               modulation=modulation, weighting="count", return_factor=True)
    x = se / math.log(4)
    assert_close(se_out, [se], rtol=1e-12)
    assert_close(factor, [f(x)], rtol=1e-6)
    assert_close(adv, [0.5 * f(x), 0.5 * f(x), -0.5 * f(x), -0.5 * f(x)], rtol=1e-6)


def test_default_alpha_spans_a_range_and_is_logged():
    """alpha = 1 (default): agreeing groups keep factor 1, a 2-2 split gets 1 - log 2 / log 4 = 0.5."""
    algo = SeedGRPO(weighting="count")
    assert algo.alpha == 1.0
    answers = ["3", "3", "3", "3", "3", "3", "4", "4"]
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    batch = RolloutBatch(prompts=["p", "q"], completions=["c"] * 8, group_size=4, rewards=rewards,
                         correct=rewards > 0, completion_mask=torch.ones(8, 2, dtype=torch.bool),
                         old_logprobs=torch.zeros(8, 2), old_entropy=torch.zeros(8, 2), answers=answers)
    adv = algo.advantages(batch)
    assert_close(adv, [0, 0, 0, 0, 0.25, 0.25, -0.25, -0.25], rtol=1e-6)
    metrics = algo.step_metrics(batch, adv)
    assert_close(torch.tensor([metrics["seed/factor_min"], metrics["seed/factor_max"]]), [0.5, 1.0], rtol=1e-6)
    assert_close(torch.tensor(metrics["seed/factor_signal_mean"]), 0.5, rtol=1e-6)
