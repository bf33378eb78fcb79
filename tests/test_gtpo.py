"""GTPO and GRPO-S (trainers/algorithms/gtpo.py) against hand-computed cases and a float64 loop oracle."""
import statistics

import pytest
import torch

from entropy_ops.trainers.algorithms.base import RolloutBatch
from entropy_ops.trainers.algorithms.gtpo import (
    GRPOS,
    GTPO,
    grpo_s_advantages,
    grpo_s_rewards,
    grpo_s_sequence_loss,
    gtpo_advantages,
    gtpo_token_rewards,
)

from oracle import assert_matches_hand_values

F64 = torch.float64


def assert_close(actual, expected, rtol, atol=1e-12):
    assert_matches_hand_values(actual, expected, rtol, atol)


def hand_group():
    """One group, G = 4: responses 0, 1 correct (rewards 1.0, 0.8), 2, 3 incorrect; lengths 3, 2, 3, 1."""
    rewards = torch.tensor([1.0, 0.8, 0.0, 0.0], dtype=F64)
    correct = torch.tensor([True, True, False, False])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    entropy = torch.tensor([[0.5, 1.0, 2.0], [1.5, 3.0, 0.0], [0.5, 2.0, 1.0], [2.0, 0.0, 0.0]], dtype=F64)
    return rewards, correct, entropy, mask


# Token rewards of hand_group() with a1 = 1, a2 = 0.1, worked out by hand:
#  t=0: O+ = {0, 1}, H = 0.5, 1.5 -> shares 1/4, 3/4, d=2: 1 + 0.1*2/4 = 1.05, 0.8 + 0.1*2*3/4 = 0.95
#       O- = {2, 3}, 1/H = 2, 0.5 -> shares 0.8, 0.2, h=2: -1 - 0.16 = -1.16, -1 - 0.04 = -1.04
#  t=1: O+ = {0, 1}, H = 1, 3 -> shares 1/4, 3/4: 1.05, 0.95;  O- = {2} alone (h=1, share 1): -1.1
#  t=2: O+ = {0} alone (d=1, share 1): 1.1;  O- = {2} alone: -1.1
HAND_TOKEN_REWARDS = [[1.05, 1.05, 1.1], [0.95, 0.95, 0.0], [-1.16, -1.1, -1.1], [-1.04, 0.0, 0.0]]


def test_gtpo_token_rewards_hand_case():
    rewards, correct, entropy, mask = hand_group()
    out = gtpo_token_rewards(rewards, correct, entropy, mask, 4, a1=1.0, a2=0.1, eps=1e-12)
    assert out.dtype == F64
    assert_close(out, HAND_TOKEN_REWARDS, rtol=1e-10)


def test_gtpo_advantages_hand_case():
    """Joint standardization (default): one mean and one (Bessel) std over the 9 valid tokens of O+ and O-."""
    rewards, correct, entropy, mask = hand_group()
    values = [1.05, 1.05, 1.1, 0.95, 0.95, -1.16, -1.1, -1.1, -1.04]  # row-major valid tokens
    m, sd = statistics.mean(values), statistics.stdev(values)  # 0.7/9, ...
    expected = [[(r - m) / sd if r else 0.0 for r in row] for row in HAND_TOKEN_REWARDS]
    for scope in ("batch", "group"):  # one group: both scopes agree
        out = gtpo_advantages(rewards, correct, entropy, mask, 4, a1=1.0, a2=0.1, eps=1e-12, scope=scope)
        assert_close(out, expected, rtol=1e-9)
        assert (out[correct.unsqueeze(1) & mask] > 0).all() and (out[~correct.unsqueeze(1) & mask] < 0).all()


def test_gtpo_separate_literal_form_hand_case():
    """normalization="separate" (the literal Eq. 6 reading): each set standardized on its own."""
    rewards, correct, entropy, mask = hand_group()
    pos = [1.05, 1.05, 1.1, 0.95, 0.95]  # O+ tokens, in row-major order
    neg = [-1.16, -1.1, -1.1, -1.04]
    mp, sp = statistics.mean(pos), statistics.stdev(pos)  # 1.02, sqrt(0.018 / 4)
    mn, sn = statistics.mean(neg), statistics.stdev(neg)  # -1.1, sqrt(0.0072 / 3)
    expected = [
        [(1.05 - mp) / sp, (1.05 - mp) / sp, (1.1 - mp) / sp],
        [(0.95 - mp) / sp, (0.95 - mp) / sp, 0.0],
        [(-1.16 - mn) / sn, (-1.1 - mn) / sn, (-1.1 - mn) / sn],
        [(-1.04 - mn) / sn, 0.0, 0.0],
    ]
    out = gtpo_advantages(rewards, correct, entropy, mask, 4, a1=1.0, a2=0.1, eps=1e-12, normalization="separate")
    assert_close(out, expected, rtol=1e-9)


def test_gtpo_joint_no_correct_token_negative_where_separate_fails():
    """The failure the joint form fixes: identical correct answers (equal entropies) get advantage 0 and
    wrong answers get positive advantages under the separate form; jointly, signs follow correctness."""
    G, T = 4, 5
    mask = torch.ones(2 * G, T, dtype=torch.bool)
    mask[3, 3:] = False
    mask[6, 2:] = False
    correct = torch.tensor([True, True, False, False, True, True, True, False])
    rewards = correct.to(F64)
    gen = torch.Generator().manual_seed(0)
    entropy = torch.rand(2 * G, T, generator=gen, dtype=F64) * mask
    entropy[0] = entropy[1] = entropy[4] = entropy[5] = torch.tensor([0.9, 0.05, 0.3, 0.01, 0.2], dtype=F64)
    pos, neg = correct.unsqueeze(1) & mask, ~correct.unsqueeze(1) & mask
    joint = gtpo_advantages(rewards, correct, entropy, mask, G, sign_guard=False)
    assert (joint[pos] > 0).all() and (joint[neg] < 0).all()
    assert_close(joint, gtpo_advantages(rewards, correct, entropy, mask, G), rtol=0.0)  # the guard had nothing to do
    separate = gtpo_advantages(rewards, correct, entropy, mask, G, normalization="separate")
    assert (separate[0:2][mask[0:2]].abs() < 1e-9).all()  # identical correct answers: all advantages 0
    assert (separate[neg] > 0).any()  # some wrong-answer tokens pushed up


def test_gtpo_sign_guard_only_acts_when_wrong_tokens_are_rare():
    """Joint mean (a1 + a2)(N+ - N-)/N passes a1 when N- < N+ a2 / (2 a1 + a2): the guard clamps there."""
    G, T = 4, 30
    mask = torch.ones(G, T, dtype=torch.bool)
    mask[3, 1:] = False  # one wrong answer of 1 token against 90 correct tokens
    correct = torch.tensor([True, True, True, False])
    entropy = torch.rand(G, T, generator=torch.Generator().manual_seed(1), dtype=F64) * mask
    raw = gtpo_advantages(correct.to(F64), correct, entropy, mask, G, sign_guard=False)
    guarded = gtpo_advantages(correct.to(F64), correct, entropy, mask, G)
    pos = correct.unsqueeze(1) & mask
    assert (raw[pos] < 0).any() and (guarded[pos] >= 0).all()
    assert_close(guarded, torch.where(pos, raw.clamp_min(0), raw), rtol=0.0)
    algo = GTPO()
    metrics = algo.step_metrics(make_batch(correct.float(), correct, entropy.float(), mask, G),
                                algo.advantages(make_batch(correct.float(), correct, entropy.float(), mask, G)))
    assert metrics["gtpo/neg_adv_correct_frac"] == 0.0 and metrics["gtpo/neg_adv_correct_frac_unguarded"] > 0
    assert metrics["gtpo/guard_frac"] > 0 and metrics["gtpo/weight_pos_std"] > 0


def test_gtpo_one_outcome_groups_get_zero():
    G, T = 4, 3
    mask = torch.ones(2 * G, T, dtype=torch.bool)
    correct = torch.tensor([True] * 4 + [False] * 4)
    entropy = torch.rand(2 * G, T, generator=torch.Generator().manual_seed(2), dtype=F64)
    for scope in ("group", "batch"):
        assert (gtpo_advantages(correct.to(F64), correct, entropy, mask, G, scope=scope) == 0).all()
    assert (grpo_s_advantages(correct.to(F64), correct, entropy, mask, G) == 0).all()


def gtpo_oracle(rewards, correct, entropy, mask, G, a1, a2, eps):
    """Paper Eq. 3 / 5 with explicit loops, float64, eps added to every entropy."""
    B, T = mask.shape
    H = entropy.double().clamp_min(0)
    out = torch.zeros(B, T, dtype=F64)
    for g0 in range(0, B, G):
        rows = range(g0, g0 + G)
        for t in range(T):
            pos = [i for i in rows if correct[i] and mask[i, t]]
            neg = [i for i in rows if not correct[i] and mask[i, t]]
            for i in pos:
                out[i, t] = a1 * float(rewards[i]) + a2 * len(pos) * (H[i, t] + eps) / sum(H[k, t] + eps for k in pos)
            for j in neg:
                inv = 1.0 / (H[j, t] + eps)
                out[j, t] = -a1 - a2 * len(neg) * inv / sum(1.0 / (H[k, t] + eps) for k in neg)
    return out


def random_batch(gen, n_groups, G, T, dtype=torch.float32):
    lengths = torch.randint(0, T + 1, (n_groups * G,), generator=gen)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    entropy = torch.rand(n_groups * G, T, generator=gen, dtype=F64).mul(3.0).to(dtype) * mask
    correct = torch.rand(n_groups * G, generator=gen) < 0.5
    rewards = torch.where(correct, torch.rand(n_groups * G, generator=gen, dtype=F64) + 0.5, 0.0).to(dtype)
    return rewards, correct, entropy, mask


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_gtpo_token_rewards_match_oracle(dtype, rtol):
    gen = torch.Generator().manual_seed(1)
    rewards, correct, entropy, mask = random_batch(gen, 3, 5, 7, dtype)
    entropy[0, 0] = 0.0  # a zero-entropy token
    out = gtpo_token_rewards(rewards, correct, entropy, mask, 5, a1=0.9, a2=0.3, eps=1e-6)
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, gtpo_oracle(rewards, correct, entropy, mask, 5, 0.9, 0.3, 1e-6), rtol=rtol, atol=1e-6 * rtol)
    assert (out[~mask] == 0).all()


def test_gtpo_conservation_per_position():
    """sum_{O+_t} r+ = a1 sum_{O+_t} r_i + a2 d_t and sum_{O-_t} r- = -(a1 + a2) h_t; with a1 + a2 = 1
    and binary rewards the tokens at each position add up to d_t - h_t (the sequence rewards +1 / -1)."""
    gen = torch.Generator().manual_seed(2)
    n_groups, G, T = 4, 6, 9
    _, correct, entropy, mask = random_batch(gen, n_groups, G, T, F64)
    graded = torch.rand(n_groups * G, generator=gen, dtype=F64)
    for a1, a2, rewards in [(0.7, 0.3, correct.double()), (1.0, 0.1, graded)]:
        out = gtpo_token_rewards(rewards, correct, entropy, mask, G, a1=a1, a2=a2, eps=1e-6).view(n_groups, G, T)
        pos = (correct.unsqueeze(1) & mask).view(n_groups, G, T)
        neg = (~correct.unsqueeze(1) & mask).view(n_groups, G, T)
        d, h = pos.sum(1).double(), neg.sum(1).double()
        r = rewards.view(n_groups, G, 1)
        assert_close((out * pos).sum(1), a1 * (r * pos).sum(1) + a2 * d, rtol=1e-12, atol=1e-12)
        assert_close((out * neg).sum(1), -(a1 + a2) * h, rtol=1e-12, atol=1e-12)
        if a1 + a2 == 1.0:
            assert_close(out.sum(1), d - h, rtol=1e-12, atol=1e-12)


def test_gtpo_entropy_ordering():
    """Within a position: more entropy -> more bonus on O+, more penalty on *low* entropy in O-."""
    rewards, correct, entropy, mask = hand_group()
    out = gtpo_token_rewards(rewards, correct, entropy, mask, 4)
    assert out[2, 0] < out[3, 0]  # H 0.5 (confident mistake) is punished harder than H 2.0


def test_gtpo_edge_cases_are_finite():
    # group 0: all incorrect; group 1: all correct with all-zero entropies; group 2: an empty response
    rewards = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    correct = torch.tensor([False, False, True, True, True, False])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    entropy = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0], [-1e-7, 0.5, 1.0]])  # -1e-7: fp32 rounding of a one-hot row
    out = gtpo_token_rewards(rewards, correct, entropy, mask, 2, a1=1.0, a2=0.1, eps=1e-6)
    assert torch.isfinite(out).all()
    # all-zero entropies in O+: uniform shares -> every correct token gets 1 + 0.1
    assert_close(out[2:4][mask[2:4]], torch.full((5,), 1.1, dtype=F64), rtol=1e-6)
    # zero entropy at (0, 0) vs 2.0 at (1, 0): the confident mistake takes almost all the penalty
    assert out[0, 0] < -1.19 and out[1, 0] > -1.0001
    # one response alive at a position: full share
    assert_close(out[0, 1], -1.1, rtol=1e-6)
    # group 2: the empty response has no tokens; the lone incorrect one is shaped alone
    assert (out[4] == 0).all() and torch.allclose(out[5], torch.full((3,), -1.1))
    adv = gtpo_advantages(rewards, correct, entropy, mask, 2, scope="group")
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all()


def test_gtpo_standardized_sets_have_zero_mean_and_unit_std():
    """Batch scope: jointly, the valid tokens of mixed groups have mean 0 and std 1; separately, each set has."""
    gen = torch.Generator().manual_seed(3)
    rewards, correct, entropy, mask = random_batch(gen, 5, 4, 11)
    ok = correct.view(5, 4)
    live = mask & (ok.any(1) & ~ok.all(1)).repeat_interleave(4).unsqueeze(1)
    joint = gtpo_advantages(rewards, correct, entropy, mask, 4, eps=1e-12, scope="batch", sign_guard=False)
    vals = joint[live].double()
    assert abs(vals.mean().item()) < 1e-5 and abs(vals.std().item() - 1.0) < 1e-5
    adv = gtpo_advantages(rewards, correct, entropy, mask, 4, eps=1e-12, scope="batch", normalization="separate")
    for sel in (correct.unsqueeze(1) & live, ~correct.unsqueeze(1) & live):
        vals = adv[sel].double()
        assert abs(vals.mean().item()) < 1e-5 and abs(vals.std().item() - 1.0) < 1e-5


def test_gtpo_group_scope_equals_per_group_batch_scope():
    gen = torch.Generator().manual_seed(4)
    rewards, correct, entropy, mask = random_batch(gen, 3, 4, 6)
    grouped = gtpo_advantages(rewards, correct, entropy, mask, 4, scope="group")
    for g in range(3):
        s = slice(4 * g, 4 * g + 4)
        alone = gtpo_advantages(rewards[s], correct[s], entropy[s], mask[s], 4, scope="batch")
        assert_close(grouped[s], alone, rtol=1e-6, atol=1e-6)


def test_grpo_s_hand_case():
    rewards, correct, entropy, mask = hand_group()
    # Hbar = 7/6, 9/4 (correct), 7/6, 2 (incorrect); n = m = 2
    # r0 = 1 + 0.1*2*(7/6)/(7/6 + 9/4) = 1 + 0.2*14/41;  r1 = 0.8 + 0.2*27/41
    # 1/Hbar = 6/7, 1/2 -> shares 12/19, 7/19;  r2 = -1 - 0.2*12/19;  r3 = -1 - 0.2*7/19
    expected = [1 + 0.2 * 14 / 41, 0.8 + 0.2 * 27 / 41, -1 - 0.2 * 12 / 19, -1 - 0.2 * 7 / 19]
    out = grpo_s_rewards(rewards, correct, entropy, mask, 4, b1=1.0, b2=0.1, eps=1e-12)
    assert_close(out, expected, rtol=1e-10)
    mu, sd = statistics.mean(expected), statistics.stdev(expected)
    adv = grpo_s_advantages(rewards, correct, entropy, mask, 4, b1=1.0, b2=0.1, eps=1e-12)
    assert adv.dtype == torch.float32
    assert_close(adv, [(x - mu) / sd for x in expected], rtol=1e-5, atol=1e-6)


def test_grpo_s_without_entropy_term_is_grpo():
    gen = torch.Generator().manual_seed(5)
    rewards, correct, entropy, mask = random_batch(gen, 3, 4, 5, F64)
    adv = grpo_s_advantages(rewards, correct, entropy, mask, 4, b1=1.0, b2=0.0, eps=1e-6)
    r = torch.where(correct, rewards, -1.0).view(3, 4)
    expected = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True).clamp_min(1e-3)
    mixed = (correct.view(3, 4).any(1) & ~correct.view(3, 4).all(1)).unsqueeze(1)
    assert_close(adv, torch.where(mixed, expected, 0.0).view(-1), rtol=1e-5, atol=1e-6)


def make_batch(rewards, correct, entropy, mask, G):
    B, T = mask.shape
    return RolloutBatch(prompts=["p"] * (B // G), completions=["c"] * B, group_size=G, rewards=rewards,
                        correct=correct, completion_mask=mask, old_logprobs=torch.zeros(B, T),
                        old_entropy=entropy)


def test_algorithm_classes():
    rewards, correct, entropy, mask = hand_group()
    batch = make_batch(rewards.float(), correct, entropy.float(), mask, 4)
    algo = GTPO(a2=0.2, scope="group")
    assert algo.name == "gtpo" and algo.uses_rewards
    assert_close(algo.advantages(batch),
                 gtpo_advantages(rewards, correct, entropy, mask, 4, a2=0.2, scope="group"), rtol=1e-5, atol=1e-6)
    algo_s = GRPOS(b2=0.3)
    assert algo_s.name == "grpo-s" and algo_s.advantages(batch).shape == (4,)
    with pytest.raises(ValueError, match="unknown key"):
        GTPO(alpha=1.0)
    with pytest.raises(ValueError, match="scope"):
        GTPO(scope="token")
    with pytest.raises(ValueError, match="normalization"):
        GTPO(normalization="per-set")
    with pytest.raises(ValueError, match="objective"):
        GRPOS(objective="geometric")
    assert GRPOS().has_custom_loss and not GRPOS(objective="token").has_custom_loss and not GTPO().has_custom_loss
    with pytest.raises(ValueError, match="eps"):
        GRPOS(eps=0.0)


def test_bad_inputs():
    rewards, correct, entropy, mask = hand_group()
    with pytest.raises(ValueError, match="multiple of group_size"):
        gtpo_token_rewards(rewards, correct, entropy, mask, 3)
    with pytest.raises(TypeError, match="correct must be a bool"):
        gtpo_token_rewards(rewards, correct.float(), entropy, mask, 4)
    with pytest.raises(ValueError, match="entropy must have the shape"):
        gtpo_token_rewards(rewards, correct, entropy[:, :2], mask, 4)
    with pytest.raises(TypeError, match="mask must be a bool"):
        gtpo_advantages(rewards, correct, entropy, mask.float(), 4)
    with pytest.raises(ValueError, match="rewards must have shape"):
        grpo_s_rewards(rewards[:3], correct, entropy, mask, 4)


def test_grpo_s_sequence_loss_matches_float64_hand_computation():
    """w_i = mean_t exp(logp - old), L = -(1/n) sum_i min(w_i A_i, clip(w_i) A_i); value and gradient."""
    logp = torch.tensor([[-0.5, -1.0, -0.2], [-0.3, -2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64,
                        requires_grad=True)
    old = torch.tensor([[-0.7, -1.0, -0.4], [-0.1, -1.5, 0.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 2.0, 3.0], dtype=F64)
    import math
    w0 = (math.exp(0.2) + 1.0 + math.exp(0.2)) / 3  # 1.148 < 1.28: unclipped
    w1 = (math.exp(-0.2) + math.exp(-0.5)) / 2  # 0.712 < 0.8 with A < 0: clipped (min picks 0.8 * -0.5)
    w2 = math.exp(-0.8)  # 0.449, A > 0: min(w A, clip A) = w A (unclipped)
    expected = -(w0 * 1.0 + 0.8 * -0.5 + w2 * 2.0) / 3  # row 3 has no tokens: left out
    loss, metrics = grpo_s_sequence_loss(logp, old, adv, mask)
    assert_close(loss.detach(), expected, rtol=1e-12)
    loss.backward()
    grad = torch.zeros(4, 3, dtype=F64)
    grad[0] = torch.tensor([math.exp(0.2), 1.0, math.exp(0.2)], dtype=F64) * -1.0 / 3 / 3  # -(1/n) A exp(.)/|o|
    grad[2, 0] = -2.0 * math.exp(-0.8) / 3  # row 1 is clipped: no gradient
    assert_close(logp.grad, grad, rtol=1e-12)
    assert abs(float(metrics["seq_clip_frac"]) - 1 / 3) < 1e-7
    assert abs(float(metrics["seq_ratio_max"]) - w0) < 1e-12


def test_grpo_s_loss_through_the_algorithm():
    algo = GRPOS()
    logp = torch.randn(3, 4, dtype=F64, requires_grad=True)
    mask = torch.ones(3, 4, dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0, 0.2])
    loss, _ = algo.loss(logp, torch.zeros(3, 4), mask, advantages=adv, old_logprobs=logp.detach())
    assert_close(loss.detach(), -float(adv.double().mean()), rtol=1e-12)  # ratio 1 everywhere
    with pytest.raises(ValueError, match="advantages and old_logprobs"):
        algo.loss(logp, torch.zeros(3, 4), mask)
