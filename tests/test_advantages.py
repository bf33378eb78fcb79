"""Advantage estimators (GRPO, Dr.GRPO, RLOO) against hand-computed cases and a float64 loop oracle."""
import math

import pytest
import torch

from entropy_ops.trainers.advantages import (dr_grpo_advantages, grpo_advantages, groups_with_signal,
                                             rloo_advantages)
from entropy_ops.trainers.algorithms import (ALGORITHMS, Algorithm, RolloutBatch, algorithm_class, get_algorithm,
                                             register)


def _close(got, want, tol=1e-6):
    got = got.double()
    want = torch.as_tensor(want, dtype=torch.float64)
    assert not torch.isnan(got).any()
    err = (got - want).abs()
    i = int(err.argmax())
    assert err.max() <= tol, f"worst index {i}: got {got[i].item()}, want {want[i].item()}"


# ---------------------------------------------------------------- hand cases
def test_grpo_hand_computed():
    # group 1: mean 0.5, sample std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.866025; group 2 all equal -> 0
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    _close(grpo_advantages(r, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_three_values():
    # rewards 0, 1, 2: mean 1, sample std 1 -> -1, 0, 1 (eps 1e-6 in the denominator)
    _close(grpo_advantages(torch.tensor([0.0, 1.0, 2.0]), 3), [-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)])


def test_dr_grpo_hand_computed():
    _close(dr_grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2]), 2), [0.5, -0.5, -0.5, 0.5, 0.0, 0.0])


def test_rloo_hand_computed():
    # A_0 = 1 - mean(0, 0, 0) = 1; A_1 = 0 - mean(1, 0, 0) = -1/3
    _close(rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4), [1.0, -1 / 3, -1 / 3, -1 / 3])
    # G = 2: A = +-(r_0 - r_1)
    _close(rloo_advantages(torch.tensor([3.0, 1.0]), 2), [2.0, -2.0])


def test_groups_with_signal():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert groups_with_signal(r, 3).tolist() == [False, True, False]


# ---------------------------------------------------------- float64 oracle
def _oracle(rewards, G, kind):
    out = []
    r = rewards.double().tolist()
    for g in range(0, len(r), G):
        grp = r[g:g + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for i, x in enumerate(grp):
            if kind == "grpo":
                out.append((x - mean) / (std + 1e-6))
            elif kind == "dr_grpo":
                out.append(x - mean)
            else:
                out.append(x - (sum(grp) - x) / (G - 1))
    return out


@pytest.mark.parametrize("G", [2, 3, 5, 8])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_against_loop_oracle(G, kind):
    gen = torch.Generator().manual_seed(100 + G)
    rewards = torch.randn(7 * G, generator=gen)
    rewards[:G] = 0.25  # one group without signal
    fn = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}[kind]
    got = fn(rewards, G)
    assert got.dtype == torch.float32 and got.shape == rewards.shape
    _close(got, _oracle(rewards, G, kind), tol=1e-5)
    assert torch.equal(got[:G], torch.zeros(G))


def test_rloo_is_scaled_dr_grpo():
    gen = torch.Generator().manual_seed(3)
    r = torch.rand(20, generator=gen)
    _close(rloo_advantages(r, 5), dr_grpo_advantages(r, 5).double() * 5 / 4)


@pytest.mark.parametrize("bad, match", [
    (dict(rewards=torch.zeros(6), group_size=1), "group_size"),
    (dict(rewards=torch.zeros(7), group_size=2), "multiple"),
    (dict(rewards=torch.zeros(2, 4), group_size=2), "1-D"),
    (dict(rewards=torch.zeros(4), group_size=True), "group_size"),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(**bad)


# ----------------------------------------------------- algorithm plug-ins
def _batch(rewards, G):
    B = len(rewards)
    mask = torch.ones(B, 3, dtype=torch.bool)
    return RolloutBatch(prompts=["p"] * B, completions=["c"] * B, group_size=G, rewards=rewards,
                        correct=rewards > 0, completion_mask=mask, old_logprobs=torch.zeros(B, 3),
                        old_entropy=torch.zeros(B, 3))


@pytest.mark.parametrize("name, fn", [("grpo", grpo_advantages), ("dr_grpo", dr_grpo_advantages),
                                      ("dr-grpo", dr_grpo_advantages), ("RLOO", rloo_advantages)])
def test_algorithms_use_the_plain_functions(name, fn):
    gen = torch.Generator().manual_seed(11)
    r = torch.rand(12, generator=gen)
    assert torch.equal(get_algorithm(name).advantages(_batch(r, 4)), fn(r, 4))


def test_algorithm_presets_and_options():
    assert algorithm_class("grpo").loss_preset == "grpo"
    assert algorithm_class("dr-grpo").loss_preset == "dr_grpo"
    r = torch.tensor([0.0, 1.0])
    _close(get_algorithm("grpo", eps=0.5).advantages(_batch(r, 2)), [-0.5 / (math.sqrt(0.5) + 0.5),
                                                                      0.5 / (math.sqrt(0.5) + 0.5)])
    with pytest.raises(ValueError, match="unknown key"):
        get_algorithm("rloo", alpha=1.0)
    with pytest.raises(ValueError, match="eps"):
        get_algorithm("grpo", eps=-1.0)
    with pytest.raises(ValueError, match="available"):
        get_algorithm("ppo")


def test_register():
    class Constant(Algorithm):
        name = "test-constant-advantage"

        def advantages(self, batch):
            return torch.ones_like(batch.rewards)

    try:
        assert register(Constant) is Constant
        assert isinstance(get_algorithm("test_constant_advantage"), Constant)
        with pytest.raises(ValueError, match="already registered"):
            register(type("Other", (Algorithm,), {"name": "test-constant-advantage"}))
        with pytest.raises(TypeError):
            register(int)
    finally:
        ALGORITHMS.pop("test-constant-advantage", None)
