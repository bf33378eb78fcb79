"""``entropy_ops.integrations.verl_loss.fused_policy_loss`` against verl's actor loss, re-derived here in
float64 from verl's definitions (verl does not import on this CPU-only machine: it needs ray and
tensordict): ``compute_policy_loss_vanilla`` (two-sided log-ratio clamp, clip, dual clip, its three
metrics), ``agg_loss`` (every ``loss_agg_mode``, local and global normalizers), ``kl_penalty``
(every estimator) and the actor's combination (entropy bonus, KL loss, logged values). Loss, every
metric and the gradients of the hidden states and the lm-head weight, on the CPU path (fp64) and the
Triton kernels under the interpreter (fp32, bf16), one pass and two passes; plus the bad configs."""
import collections.abc
import dataclasses
import types

import pytest
import torch

from entropy_ops import policy_onepass
from entropy_ops.integrations import verl as everl
from entropy_ops.integrations.verl_loss import fused_policy_loss, verl_loss_settings
from oracle import assert_close, logprobs_entropy_reference

B, T, D, V = 3, 6, 16, 40
TEMPERATURE = 0.7


# ---------------------------------------------------------------- verl's definitions, float64
def masked_mean(x, mask):
    return (torch.where(mask > 0, x, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def verl_agg_loss(loss_mat, mask, mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    """verl's ``agg_loss`` (core_algos), written from its definition."""
    mask = mask.double()
    if mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (torch.where(mask > 0, loss_mat, 0.0) * mask).sum() / n * dp_size
    if mode == "seq-mean-token-sum-norm":
        return (loss_mat * mask).sum(-1).sum() / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    counts = mask.sum(-1)
    seq = (loss_mat * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (counts + 1e-8)
    seq_mask = (counts > 0).double()
    n_seq = seq_mask.sum() if global_batch_size is None else global_batch_size
    return (seq * seq_mask).sum() / n_seq * dp_size


def verl_kl(logp, ref, kind):
    """verl's ``kl_penalty_forward`` for ``kind``."""
    if kind in ("kl", "k1"):
        return logp - ref
    if kind == "abs":
        return (logp - ref).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (logp - ref) ** 2
    e = (ref - logp).clamp(-20, 20)
    return (e.exp() - e - 1).clamp(-10, 10)


def verl_actor_loss(logp, H, old, ref, adv, mask, cfg, is_weights=None):
    """verl's ``compute_policy_loss_vanilla`` + the actor's entropy and KL terms -> (loss, logged metrics)."""
    info = cfg.get("global_batch_info") or {}
    mode = cfg["loss_agg_mode"]
    low, high, c = cfg["clip_ratio_low"], cfg["clip_ratio_high"], cfg["clip_ratio_c"]
    maskf = mask.double()
    neg_kl = (logp - old).clamp(-20.0, 20.0)
    ratio = neg_kl.exp()
    ppo_kl = masked_mean(-neg_kl, maskf)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - low, 1 + high)
    clip1 = torch.maximum(pg1, pg2)
    clipfrac = masked_mean((pg2 > pg1).double(), maskf)
    pg3 = -adv * c
    clipfrac_lower = masked_mean(((clip1 > pg3) & (adv < 0)).double(), maskf)
    pg = torch.where(adv < 0, torch.minimum(pg3, clip1), clip1)
    if is_weights is not None:
        pg = pg * is_weights
    pg_loss = verl_agg_loss(pg, mask, mode, **info)
    metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": clipfrac_lower}
    loss = pg_loss
    coeff = cfg.get("entropy_coeff", 0.0)
    entropy_agg = verl_agg_loss(H, mask, mode, **info)
    if cfg.get("calculate_entropy") or coeff != 0:
        metrics["actor/entropy"] = entropy_agg
    if coeff != 0:
        loss = loss - entropy_agg * coeff  # verl does this in place on pg_loss, so its log carries it
    metrics["actor/pg_loss"] = loss
    if cfg.get("use_kl_loss"):
        kl_loss = verl_agg_loss(verl_kl(logp, ref, cfg["kl_loss_type"]), mask, mode, **info)
        loss = loss + kl_loss * cfg["kl_loss_coef"]
        metrics["actor/kl_loss"] = kl_loss
        metrics["actor/kl_coef"] = cfg["kl_loss_coef"]
    return loss, metrics


# ---------------------------------------------------------------- data
def make_batch(seed, dtype=torch.float64, per_token_temperature=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=g, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 2.0 / D**0.5).to(dtype)
    responses = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :2] = True
    mask[2] = False  # a fully masked response: excluded from verl's sequence counts
    temperature = (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64) if per_token_temperature
                   else TEMPERATURE)
    with torch.no_grad():
        logp, _ = reference_logp_entropy(hidden, weight, responses, mask, temperature)
    # old log-probs around the policy's: ratios inside the clip range, clipped either way, and past the
    # dual bound clip_ratio_c = 3 (ratio 5) for some tokens with A < 0; one token past the -20 clamp
    shift = 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    shift[0, 0], shift[0, 1], shift[1, :] = -torch.log(torch.tensor(5.0)), 25.0, -torch.log(torch.tensor(5.0))
    old = logp + shift
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv[0, 0], adv[1, :] = -1.5, -1.0
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref[0, 1] = logp[0, 1] + 4.0  # k3 past verl's value clamp of 10
    old, ref = old.masked_fill(~mask, 7.0), ref.masked_fill(~mask, -3.0)  # values at masked tokens are ignored
    return dict(hidden=hidden, weight=weight, responses=responses, mask=mask, old=old, adv=adv, ref=ref,
                temperature=temperature)


def reference_logp_entropy(hidden, weight, responses, mask, temperature):
    logits = hidden.double() @ weight.double().T
    t = temperature.unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    return logprobs_entropy_reference(logits / t, torch.where(mask, responses, -100))


def reference(batch, cfg, on_policy=False, is_weights=None):
    """verl's loss, logged metrics and d/d (hidden, weight) in float64 on the (rounded) inputs."""
    hidden = batch["hidden"].double().clone().requires_grad_(True)
    weight = batch["weight"].double().clone().requires_grad_(True)
    logp, H = reference_logp_entropy(hidden, weight, batch["responses"], batch["mask"], batch["temperature"])
    old = logp.detach() if on_policy else batch["old"].double()
    loss, metrics = verl_actor_loss(logp, H, old, batch["ref"].double(), batch["adv"].double(), batch["mask"], cfg,
                                    is_weights)
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), metrics, grads


def ours(batch, cfg, *, one_pass, backend, on_policy=False, token_chunk=None, **kwargs):
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    temperature = batch["temperature"]
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(hidden.dtype)
    loss, metrics = fused_policy_loss(hidden, weight, batch["responses"], None if on_policy else batch["old"],
                                      batch["adv"], batch["mask"], actor_config=cfg, ref_log_prob=batch["ref"],
                                      temperature=temperature, one_pass=one_pass, backend=backend,
                                      token_chunk=token_chunk, **kwargs)
    loss.backward()
    return loss.detach(), metrics, (hidden.grad, weight.grad)


def assert_matches(got, expected, rel, grad_rel=None):
    grad_rel = rel if grad_rel is None else grad_rel
    assert_close(got[0], expected[0], rel, "loss")
    assert set(got[1]) == set(expected[1]), (sorted(got[1]), sorted(expected[1]))
    for key, value in expected[1].items():
        assert_close(torch.as_tensor(got[1][key]), torch.as_tensor(value), rel, key)
    assert_close(got[2][0], expected[2][0], grad_rel, "d hidden", rowwise=True)
    assert_close(got[2][1].T, expected[2][1].T, grad_rel, "d weight", rowwise=True)


def actor_config(mode, **extra):
    return {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
            "loss_agg_mode": mode, "entropy_coeff": 0.01, "use_kl_loss": True, "kl_loss_coef": 0.05,
            "kl_loss_type": "low_var_kl", "policy_loss": {"loss_mode": "vanilla"}, **extra}


MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GLOBAL = {"dp_size": 2, "batch_num_tokens": 23, "global_batch_size": 5, "loss_scale_factor": 9}
# The op keeps per-row statistics and the surrogate its constants in fp32 also for fp64 inputs.
FP64_REL = 2e-6


# ---------------------------------------------------------------- against verl
@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("mode", MODES)
def test_cpu_path_matches_verl(mode, one_pass):
    """fp64 on the CPU path; the one-pass form in chunks of 5 tokens (the chunks cross responses)."""
    batch = make_batch(seed=MODES.index(mode))
    for cfg in (actor_config(mode), actor_config(mode, global_batch_info=GLOBAL)):
        got = ours(batch, cfg, one_pass=one_pass, backend="torch", token_chunk=5)
        expected = reference(batch, cfg)
        assert expected[1]["actor/pg_clipfrac"] > 0 and expected[1]["actor/pg_clipfrac_lower"] > 0  # both clips act
        assert_matches(got, expected, FP64_REL)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("mode", MODES)
def test_triton_path_matches_verl(mode, one_pass):
    """fp32 on the Triton kernels (interpreter), local normalizers in two modes and global ones in the others."""
    batch = make_batch(seed=10 + MODES.index(mode), dtype=torch.float32)
    cfg = actor_config(mode, **({"global_batch_info": GLOBAL} if MODES.index(mode) % 2 else {}))
    got = ours(batch, cfg, one_pass=one_pass, backend="triton", token_chunk=8 if one_pass else None)
    assert_matches(got, reference(batch, cfg), 1e-5)


def test_bf16_one_pass_within_tolerance():
    """bf16 inputs on the Triton path: loss and metrics to fp32 precision against float64 on the same rounded
    inputs, gradients (stored in bf16) within 1e-2."""
    batch = make_batch(seed=20, dtype=torch.bfloat16)
    cfg = actor_config("seq-mean-token-mean")
    got = ours(batch, cfg, one_pass=True, backend="triton")
    assert got[2][0].dtype == torch.bfloat16 and got[2][1].dtype == torch.bfloat16
    assert_matches(got, reference(batch, cfg), 1e-4, grad_rel=1e-2)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"])
def test_every_kl_loss_type(kind):
    batch = make_batch(seed=30)
    cfg = actor_config("token-mean", kl_loss_type=kind, kl_loss_coef=0.3, entropy_coeff=0.0)
    assert_matches(ours(batch, cfg, one_pass=True, backend="torch"), reference(batch, cfg), FP64_REL)


def test_on_policy_rollout_weights_per_response_advantages_and_per_token_temperature():
    """old_log_prob=None (verl's on-policy log_prob.detach()), rollout-correction weights on the policy term,
    advantages [B] broadcast over the tokens, a per-token temperature, no KL / entropy bonus (entropy logged)."""
    batch = make_batch(seed=40, per_token_temperature=True)
    g = torch.Generator().manual_seed(41)
    is_weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    batch["adv"] = torch.randn(B, generator=g, dtype=torch.float64)
    cfg = {"clip_ratio": 0.2, "loss_agg_mode": "seq-mean-token-mean", "calculate_entropy": True}
    expected_batch = {**batch, "adv": batch["adv"].unsqueeze(-1).expand(B, T)}
    for one_pass in (True, False):
        got = ours(batch, cfg, one_pass=one_pass, backend="torch", on_policy=True, rollout_is_weights=is_weights)
        expected = reference(expected_batch, {**cfg, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                              "clip_ratio_c": 3.0}, on_policy=True, is_weights=is_weights)
        assert_matches(got, expected, FP64_REL)
    assert got[1]["actor/ppo_kl"] == 0 and got[1]["actor/pg_clipfrac"] == 0


def test_values_at_masked_tokens_are_ignored():
    """NaN / inf old, ref and advantages at masked tokens change nothing (verl multiplies them by 0, which
    would give NaN in its sequence modes; here they are never read); a 0/1 integer mask acts as the bool one."""
    batch = make_batch(seed=50)
    cfg = actor_config("seq-mean-token-sum")
    clean = ours(batch, cfg, one_pass=True, backend="torch")
    dirty = {**batch, "old": batch["old"].masked_fill(~batch["mask"], float("nan")),
             "ref": batch["ref"].masked_fill(~batch["mask"], float("inf")),
             "adv": batch["adv"].masked_fill(~batch["mask"], float("nan")), "mask": batch["mask"].long()}  # 0/1 ints
    assert_matches(ours(dirty, cfg, one_pass=True, backend="torch"), clean, 0.0)


def test_one_pass_is_chosen_when_a_gradient_is_needed(monkeypatch):
    calls = []
    original = policy_onepass.OnePassLinearGradients.apply
    monkeypatch.setattr(policy_onepass.OnePassLinearGradients, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    batch = make_batch(seed=60)
    cfg = actor_config("token-mean")
    ours(batch, cfg, one_pass=None, backend="torch")
    assert calls == [1]
    ours(batch, cfg, one_pass=False, backend="torch")
    assert calls == [1]
    with torch.no_grad():  # no gradient needed: the op's forward only
        loss, metrics = fused_policy_loss(batch["hidden"], batch["weight"], batch["responses"], batch["old"],
                                          batch["adv"], batch["mask"], actor_config=cfg, ref_log_prob=batch["ref"],
                                          temperature=TEMPERATURE, backend="torch")
    assert calls == [1]
    assert_close(loss, reference(batch, cfg)[0], FP64_REL, "loss")


def test_config_objects_and_overrides():
    """Any mapping of verl's keys (verl's ActorConfig is one), keyword overrides, and the exports of verl.py."""
    assert everl.fused_policy_loss is fused_policy_loss
    batch = make_batch(seed=70)
    cfg = actor_config("seq-mean-token-sum-norm")
    proxy = types.MappingProxyType({**cfg, "loss_agg_mode": "token-mean", "strategy": "fsdp"})  # unread keys ignored
    got = ours(batch, proxy, one_pass=True, backend="torch", loss_agg_mode="seq-mean-token-sum-norm")
    assert_matches(got, reference(batch, cfg), FP64_REL)
    settings = verl_loss_settings(cfg)
    assert (settings.surrogate.eps_low, settings.surrogate.eps_high, settings.surrogate.dual_clip) == (0.2, 0.28, 3.0)
    assert_matches(ours(batch, settings, one_pass=True, backend="torch"), got, 0.0)
    assert verl_loss_settings({"clip_ratio": 0.3}).surrogate.eps_high == 0.3  # missing low/high: clip_ratio

    @dataclasses.dataclass
    class AttrConfig(collections.abc.Mapping):  # as verl's BaseConfig: a missing key raises AttributeError
        loss_agg_mode: str = "seq-mean-token-sum"
        clip_ratio_c: float = 2.5

        def __getitem__(self, key):
            return getattr(self, key)

        def __iter__(self):
            return iter(f.name for f in dataclasses.fields(self))

        def __len__(self):
            return len(dataclasses.fields(self))

    settings = verl_loss_settings(AttrConfig())
    assert (settings.loss_agg_mode, settings.surrogate.dual_clip, settings.surrogate.eps_low) == (
        "seq-mean-token-sum", 2.5, 0.2)


# ---------------------------------------------------------------- what cannot be expressed
@pytest.mark.parametrize("key, value, message", [
    ("policy_loss", {"loss_mode": "gspo"}, "policy_loss.loss_mode='gspo'"),
    ("loss_agg_mode", "sample-mean", "loss_agg_mode"),
    ("clip_ratio_c", 1.0, "clip_ratio_c"),
    ("clip_ratio_low", 1.0, "clip_ratio_low"),
    ("clip_ratio_high", -0.1, "clip_ratio_high"),
    ("clip_ratio", float("nan"), "clip_ratio"),
    ("policy_loss", "vanilla", "policy_loss"),
    ("entropy_coeff", "0.1", "entropy_coeff"),
    ("kl_loss_type", "k3+", "kl_loss_type"),
    ("kl_loss_type", "full", "kl_loss_type"),
    ("kl_loss_coef", None, "kl_loss_coef"),
    ("global_batch_info", {"dp_size": 2, "num_micro_batches": 4}, "global_batch_info"),
    ("global_batch_info", {"batch_num_tokens": 0}, r"global_batch_info\.batch_num_tokens"),
])
def test_bad_config_names_the_key(key, value, message):
    cfg = {**actor_config("token-mean"), key: value}
    with pytest.raises(ValueError, match=message):
        verl_loss_settings(cfg)


def test_bad_arguments():
    batch = make_batch(seed=80)
    args = (batch["hidden"], batch["weight"], batch["responses"], batch["old"], batch["adv"], batch["mask"])
    cfg = actor_config("token-mean")
    with pytest.raises(ValueError, match="ref_log_prob is required"):
        fused_policy_loss(*args, actor_config=cfg, backend="torch")
    with pytest.raises(TypeError, match="unknown verl actor key"):
        fused_policy_loss(*args, actor_config=cfg, ref_log_prob=batch["ref"], clip_ration=0.2)
    with pytest.raises(TypeError, match="actor_config must be a mapping"):
        fused_policy_loss(*args, actor_config=[("clip_ratio", 0.2)])
    with pytest.raises(ValueError, match="response_mask must be bool or hold only 0/1"):
        fused_policy_loss(*args[:5], batch["mask"] * 0.5, actor_config=cfg, ref_log_prob=batch["ref"])
    with pytest.raises(ValueError, match="rollout_is_weights must be finite and >= 0"):
        fused_policy_loss(*args, actor_config=cfg, ref_log_prob=batch["ref"],
                          rollout_is_weights=-torch.ones(B, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_states must be a"):
        fused_policy_loss(batch["hidden"][0], *args[1:], actor_config=cfg, ref_log_prob=batch["ref"])
    with pytest.raises(ValueError, match="old_log_prob must have shape"):
        fused_policy_loss(*args[:3], batch["old"][:, :2], *args[4:], actor_config=cfg, ref_log_prob=batch["ref"])
    with pytest.raises(ValueError, match="token_chunk"):
        fused_policy_loss(*args, actor_config=cfg, ref_log_prob=batch["ref"], token_chunk=0)
    with pytest.raises(TypeError, match="one_pass must be"):
        fused_policy_loss(*args, actor_config=cfg, ref_log_prob=batch["ref"], one_pass="yes")
