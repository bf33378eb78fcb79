"""The one-pass policy loss (gradient formed in the forward, per token chunk) against the two-pass form:
loss, metrics and the gradients of hidden, weight and bias, for every preset that allows it, on both paths
(chunked CPU, Triton under the interpreter), with several token chunks; and the automatic fallback."""
import zlib

import pytest
import torch

from entropy_ops import policy_onepass
from entropy_ops.policy_loss import PolicyLossConfig, policy_loss
from oracle import assert_close

B, T, D, V = 3, 5, 32, 200


def make_batch(dtype=torch.float32, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * 3.0 / D**0.5).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[0, 0] = True
    adv = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    # old/ref log-probs near the policy's own: ratios around 1, some clipped either way
    with torch.no_grad():
        z = hidden.double() @ weight.double().T + bias.double()
        logp = torch.log_softmax(z, -1).gather(-1, targets[..., None])[..., 0].float()
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    ref = logp + 0.2 * torch.randn(B, T, generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets, mask=mask, advantages=adv,
                old_logprobs=old, ref_logprobs=ref)


def run(batch, config, one_pass, **opts):
    leaves = {k: batch[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")}
    loss, metrics = policy_loss(**{**batch, **leaves}, config=config, one_pass=one_pass, **opts)
    loss.backward()
    return loss.detach(), metrics, {k: v.grad for k, v in leaves.items()}


def assert_same(a, b, rel):
    assert_close(a[0], b[0], rel, "loss")
    assert set(a[1]) == set(b[1])
    for k in a[1]:
        assert_close(a[1][k], b[1][k], rel, k)
    for k in a[2]:
        assert a[2][k].dtype == b[2][k].dtype
        got, expected = (a[2][k].T, b[2][k].T) if k == "weight" else (a[2][k], b[2][k])
        assert_close(got, expected.double(), rel, f"d_{k}", rowwise=k != "bias")


VARIANTS = {
    "plain": {},
    "kl+entropy": dict(beta=0.04, entropy_coef=0.01),
    "dual+temperature": dict(dual_clip=3.0, temperature=0.8),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("preset", ["grpo", "dapo", "dr_grpo", "bnpo"])
def test_one_pass_equals_two_pass(preset, variant, backend):
    config = PolicyLossConfig.preset(preset, **VARIANTS[variant])
    batch = make_batch(seed=zlib.crc32(f"{preset}-{variant}".encode()) % 1000, per_token_adv=variant == "plain")
    opts = dict(backend=backend, logit_softcap=5.0 if variant == "kl+entropy" else None)
    one = run(batch, config, True, token_chunk=4, **opts)  # 4 chunks of <= 4 tokens (15 tokens)
    two = run(batch, config, False, **opts)
    assert_same(one, two, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_one_pass_16_bit(dtype):
    """16-bit inputs on the Triton path: the one-pass workspace keeps s - m_tile in bf16 and dz in bf16;
    loss and metrics as the two-pass form to fp32 precision, gradients to the 16-bit tolerance."""
    batch = make_batch(dtype, seed=3)
    config = PolicyLossConfig.preset("dapo", beta=0.04)
    one = run(batch, config, True, backend="triton", token_chunk=8)
    two = run(batch, config, False, backend="triton")
    assert_close(one[0], two[0], 1e-5, "loss")
    for k in one[1]:
        assert_close(one[1][k], two[1][k], 1e-5, k)
    for k in one[2]:
        assert one[2][k].dtype == dtype
        got, expected = (one[2][k].T, two[2][k].T) if k == "weight" else (one[2][k], two[2][k])
        assert_close(got, expected, 1e-2, f"d_{k}", rowwise=k != "bias")


def test_on_policy_and_partial_requires_grad():
    """old_logprobs=None (ratio 1) and only the weight needing a gradient."""
    batch = make_batch(seed=5)
    batch["old_logprobs"] = None
    for backend in ("torch", "triton"):
        results = []
        for one_pass in (True, False):
            w = batch["weight"].clone().requires_grad_(True)
            loss, _ = policy_loss(**{**batch, "weight": w}, config="grpo", one_pass=one_pass, backend=backend)
            loss.backward()
            results.append((loss.detach(), w.grad))
        assert_close(results[0][0], results[1][0], 1e-5, "loss")
        assert_close(results[0][1].T, results[1][1].T, 1e-5, "d_weight", rowwise=True)


@pytest.mark.parametrize("config", [PolicyLossConfig.preset("gspo"), PolicyLossConfig(top_entropy_quantile=0.5)],
                         ids=["gspo", "entropy-mask"])
def test_sequence_ratio_and_entropy_mask_fall_back(monkeypatch, config):
    """Configurations whose token gradients need every token: auto uses two passes, one_pass=True refuses."""
    batch = make_batch(seed=7)
    calls = []
    original = policy_onepass.OnePassLinearGradients.apply
    monkeypatch.setattr(policy_onepass.OnePassLinearGradients, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    auto = run(batch, config, None, backend="torch")
    assert not calls
    assert_same(auto, run(batch, config, False, backend="torch"), 0.0)
    with pytest.raises(ValueError, match="one_pass=True needs"):
        run(batch, config, True, backend="torch")


def test_auto_uses_one_pass_when_allowed(monkeypatch):
    batch = make_batch(seed=9)
    calls = []
    original = policy_onepass.OnePassLinearGradients.apply
    monkeypatch.setattr(policy_onepass.OnePassLinearGradients, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    run(batch, "dapo", None, backend="torch")
    assert calls == [1]
    with torch.no_grad():  # no gradient needed: the plain forward
        policy_loss(**batch, config="dapo", backend="torch")
    assert calls == [1]


def test_bad_one_pass_arguments():
    batch = make_batch(seed=11)
    with pytest.raises(TypeError, match="one_pass must be"):
        policy_loss(**batch, config="dapo", one_pass="yes")
    with pytest.raises(ValueError, match="token_chunk"):
        policy_loss(**batch, config="dapo", one_pass=True, token_chunk=0)
    logits = torch.randn(B, T, V)
    plain = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "bias")}
    with pytest.raises(ValueError, match="hidden-state path"):
        policy_loss(**plain, logits=logits, config="dapo", one_pass=True)


@pytest.mark.parametrize("one_pass", [True, False])
def test_narrow_target_dtype_is_widened(one_pass):
    """uint8 targets: the masked fill with ignore_index = -100 happens after widening (no wrap to 156,
    which would be a real class), on both forms."""
    batch = make_batch(seed=13)
    narrow = {**batch, "targets": batch["targets"].to(torch.uint8)}
    a = run(batch, "dapo", one_pass, backend="torch")
    b = run(narrow, "dapo", one_pass, backend="torch")
    assert_same(a, b, 0.0)
