"""EM-FT and EM-RL (trainers/algorithms/entropy_minimization.py)."""
import math

import pytest
import torch

from entropy_ops import token_logprobs_and_entropy
from entropy_ops.trainers.algorithms.base import RolloutBatch
from entropy_ops.trainers.algorithms.entropy_minimization import (
    EMFT,
    EMRL,
    em_ft_loss,
    em_rl_advantages,
    em_rl_rewards,
    k3_kl,
)

from oracle import assert_matches_hand_values

F64 = torch.float64
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert_matches_hand_values(actual, expected, rtol, atol)


def test_em_ft_loss_hand_case():
    entropy = torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0], [0.5, 0.5, 1.0], [7.0, 7.0, 7.0]],
                           dtype=F64, requires_grad=True)
    logp = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, 0.0, 0.0], [-0.1, -0.2, -0.3], [0.0, 0.0, 0.0]],
                        dtype=F64, requires_grad=True)
    ref = torch.tensor([[-2.0, -0.5, 0.0], [-1.0, 0.0, 0.0], [-0.1, -0.1, -0.3], [0.0, 0.0, 0.0]], dtype=F64)
    loss, metrics = em_ft_loss(entropy, MASK)
    # per-response means 3/2, 3, 2/3 (row 3 has no valid token and is left out), averaged over 3 responses
    assert_close(loss, (1.5 + 3.0 + 2 / 3) / 3)
    loss.backward()
    weight = torch.tensor([[1 / 6] * 3, [1 / 3] * 3, [1 / 9] * 3, [0.0] * 3], dtype=F64)  # 1 / (n L_i)
    assert_close(entropy.grad, torch.where(MASK, weight, 0.0))
    # k3(logp, ref) = exp(ref - logp) - (ref - logp) - 1 at the valid tokens, response by response
    k3 = [[math.exp(-1) + 1 - 1, 0.0], [math.exp(1) - 1 - 1], [0.0, math.exp(0.1) - 0.1 - 1, 0.0]]
    kl = sum(sum(row) / len(row) for row in k3) / 3
    loss, metrics = em_ft_loss(entropy, MASK, logp=logp, ref_logprobs=ref, kl_coef=0.5)
    assert_close(metrics["kl"], kl)
    assert_close(metrics["entropy"], (1.5 + 3.0 + 2 / 3) / 3)
    assert_close(loss, (1.5 + 3.0 + 2 / 3) / 3 + 0.5 * kl)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp)
    expected = torch.where(MASK, 0.5 * (1 - torch.exp(ref - logp.detach())) * weight, 0.0)
    assert_close(logp.grad, expected)


def test_em_ft_gradient_through_the_fused_op():
    """The EM-FT loss on the fused op's entropy has the gradient of the float64 formula."""
    gen = torch.Generator().manual_seed(0)
    b, T, V, tau = 3, 5, 37, 0.7
    logits = (torch.randn(b, T, V, generator=gen) * 2).requires_grad_(True)
    logits_ref = logits.detach().double().requires_grad_(True)
    targets = torch.randint(0, V, (b, T), generator=gen)
    mask = torch.rand(b, T, generator=gen) < 0.7
    logp, H = token_logprobs_and_entropy(logits, targets, temperature=tau, backend="torch")
    loss, _ = em_ft_loss(H, mask)
    loss.backward()
    s = logits_ref / tau
    H_ref = -(torch.softmax(s, -1) * torch.log_softmax(s, -1)).sum(-1)
    rows = mask.sum(1) > 0
    per_row = (H_ref * mask).sum(1) / mask.sum(1).clamp_min(1)  # per-response mean, then mean over responses
    loss_ref = per_row[rows].sum() / rows.sum()
    loss_ref.backward()
    assert_close(loss, loss_ref, rtol=1e-5)
    assert_close(logits.grad, logits_ref.grad, rtol=1e-4, atol=1e-7)


def test_em_ft_empty_mask_and_errors():
    entropy = torch.ones(2, 3, requires_grad=True)
    loss, _ = em_ft_loss(entropy, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert (entropy.grad == 0).all()
    with pytest.raises(ValueError, match="ref_logprobs"):
        em_ft_loss(entropy, MASK[:2], kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        em_ft_loss(entropy, MASK[:2], kl_coef=-1.0)
    with pytest.raises(ValueError, match="entropy must have the shape"):
        em_ft_loss(entropy, MASK)


def test_k3_is_nonnegative_zero_at_equality_and_capped():
    gen = torch.Generator().manual_seed(1)
    a, b = -torch.rand(100, generator=gen, dtype=F64) * 5, -torch.rand(100, generator=gen, dtype=F64) * 5
    assert (k3_kl(a, b) >= 0).all() and (k3_kl(a, a) == 0).all()
    far = k3_kl(torch.tensor([-500.0]), torch.tensor([-0.1]))  # d = 499.9 -> capped at 20
    assert_close(far, [math.exp(20) - 20 - 1], rtol=1e-6)


def test_em_rl_rewards_hand_case():
    logprobs = torch.tensor([[-1.0, -3.0, 9.0], [-2.0, 9.0, 9.0], [-0.5, -0.5, -2.0], [9.0, 9.0, 9.0]], dtype=F64)
    entropy = torch.tensor([[0.2, 0.4, 9.0], [1.0, 9.0, 9.0], [0.3, 0.3, 0.6], [9.0, 9.0, 9.0]], dtype=F64)
    # default: the paper's sums, r = sum_t logp (sequence) and r = -sum_t H (token)
    assert_close(em_rl_rewards(logprobs, entropy, MASK), [-4.0, -2.0, -3.0, 0.0])
    assert_close(em_rl_rewards(logprobs, entropy, MASK, reduction="mean"), [-2.0, -2.0, -1.0, 0.0])
    assert_close(em_rl_rewards(logprobs, entropy, MASK, estimator="token"), [-0.6, -1.0, -1.2, 0.0])
    assert_close(em_rl_rewards(logprobs, entropy, MASK, estimator="token", reduction="mean"), [-0.3, -1.0, -0.4, 0.0])
    assert_close(em_rl_rewards(logprobs, None, MASK, estimator="sequence"), [-4.0, -2.0, -3.0, 0.0])
    assert EMRL().reduction == "sum" and EMRL().estimator == "sequence"
    assert EMRL.loss_aggregation == "token" and EMFT.loss_aggregation == "sequence"
    assert EMFT.default_learning_rate < 1e-4 and EMRL.default_learning_rate < 1e-4


def test_rloo_advantages():
    logprobs = torch.tensor([[1.0], [2.0], [3.0], [6.0]], dtype=F64)  # rewards 1, 2, 3, 6 (mean of one token)
    mask = torch.ones(4, 1, dtype=torch.bool)
    # leave-one-out baselines: 11/3, 10/3, 3, 2
    assert_close(em_rl_advantages(logprobs, None, mask, 4), [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], rtol=1e-6)
    assert_close(em_rl_advantages(logprobs, None, mask, 2), [-1.0, 1.0, -3.0, 3.0], rtol=1e-6)
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(12, 1, generator=gen, dtype=F64)
    adv = em_rl_advantages(r, None, torch.ones(12, 1, dtype=torch.bool), 4).view(3, 4)
    g = r.view(3, 4)
    assert_close(adv, 4 / 3 * (g - g.mean(1, keepdim=True)), rtol=1e-5, atol=1e-6)  # = G / (G - 1) (r - mean)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        em_rl_advantages(r, None, torch.ones(12, 1, dtype=torch.bool), 1)


def make_batch(logprobs, entropy, mask, G):
    B, T = mask.shape
    return RolloutBatch(prompts=["p"] * (B // G), completions=["c"] * B, group_size=G, rewards=torch.zeros(B),
                        correct=torch.zeros(B, dtype=torch.bool), completion_mask=mask, old_logprobs=logprobs,
                        old_entropy=entropy)


def test_algorithm_classes():
    gen = torch.Generator().manual_seed(3)
    logprobs = -torch.rand(8, 6, generator=gen)
    entropy = torch.rand(8, 6, generator=gen)
    mask = torch.rand(8, 6, generator=gen) < 0.8
    batch = make_batch(logprobs, entropy, mask, 4)
    rl = EMRL(estimator="token", reduction="sum")
    assert rl.name == "em-rl" and not rl.uses_rewards and rl.loss_overrides["beta"] == 0.001
    assert_close(rl.advantages(batch), em_rl_advantages(logprobs, entropy, mask, 4, estimator="token",
                                                        reduction="sum"), rtol=1e-6)
    ft = EMFT(kl_coef=0.0)
    assert ft.name == "em-ft" and not ft.uses_rewards and not ft.needs_reference and EMFT(kl_coef=0.1).needs_reference
    assert torch.equal(ft.advantages(batch), torch.zeros(8))
    loss, metrics = ft.loss(logprobs, entropy, mask)
    assert_close(loss, em_ft_loss(entropy, mask)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown key"):
        EMRL(kl_coef=0.1)
    with pytest.raises(ValueError, match="estimator"):
        EMRL(estimator="trajectory")
    with pytest.raises(ValueError, match="reduction"):
        em_rl_rewards(logprobs, entropy, mask, reduction="max")
