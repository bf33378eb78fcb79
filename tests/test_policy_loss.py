"""Tests of ``entropy_ops.policy_loss`` against a float64 oracle written from the formulas.

The oracle takes ``logp``/``H`` in float64 from ``tests/oracle.py`` (``log_softmax``) and
computes the loss one response at a time (a different structure from the vectorized code under
test). Tiny hand-derived cases pin each preset to the formula it claims.
"""
import itertools
import math
import re

import pytest
import torch

from entropy_ops import token_ops
from entropy_ops.policy_loss import PolicyLoss, PolicyLossConfig, _loss_from_token_stats, policy_loss
from oracle import TOL, assert_close, logprobs_entropy_reference

FP32 = TOL[torch.float32]["fwd"]


# ---------------------------------------------------------------- helpers
def check(actual, expected, rel, name, **kwargs):
    """``oracle.assert_close`` on tensors or Python numbers."""
    assert_close(torch.as_tensor(actual), torch.as_tensor(expected, dtype=torch.float64), rel, name, **kwargs)


def check_grad(actual, expected, rel, name):
    """Max-norm relative error ``|a - e| <= rel * max|e|``, no NaN. The loss's per-token upstream
    gradients are fp32 sums that can cancel on one token (its KL term against its policy term), so an
    entry is accurate relative to the whole gradient, not to itself or its row."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    err = (actual - expected).abs()
    bound = rel * float(expected.abs().max())
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err[worst] <= bound, (f"{name}: worst at {worst}: got {actual[worst].item():.10g}, "
                                 f"expected {expected[worst].item():.10g}, |err| {err[worst].item():.3g} > {bound:.3g}")


def check_loss(actual, expected, magnitude, rel, name="loss"):
    """A loss is a sum that can cancel: its error is relative to ``magnitude``, the sum of |its terms|."""
    actual, expected = float(torch.as_tensor(actual).detach()), float(torch.as_tensor(expected).detach())
    err = abs(actual - expected)
    assert math.isfinite(actual) and err <= rel * (abs(expected) + magnitude), (
        f"{name}: got {actual!r}, expected {expected!r}, |err| {err:.3g} (terms sum to {magnitude:.3g})")


def ref_token_stats(logits, targets, mask, temperature):
    """float64 ``logp``, ``H`` ``[B, T]`` (0 on masked tokens) from the shared oracle."""
    return logprobs_entropy_reference(logits, torch.where(mask, targets, -100), temperature, ignore_index=-100)


def make_batch(seed, *, B=5, T=7, V=37, per_token_adv=False, dtype=torch.float32, noncontig=False, temperature=1.0):
    """Random batch with unequal lengths, a hole in one mask, one all-masked row, garbage on masked slots.

    ``old_logprobs`` = the true log-probs at ``temperature`` + U(-1, 1): ratios in [1/e, e], both ends hit.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T + 1, V, generator=g) * 2.0
    base[0, 1, 5] = -math.inf  # a -inf logit (never a target below)
    logits = base[:, :T] if noncontig else base[:, :T].contiguous()
    logits = logits.to(dtype).detach().requires_grad_()
    lengths = [T, 3, 0, T - 2, 1][:B]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    mask[0, 2] = False  # a hole (a tool-output token, say)
    targets = torch.randint(6, V, (B, T), generator=g)
    targets[~mask] = -1  # padding ids: must never reach the fused op
    logp_true = ref_token_stats(logits.detach(), targets, mask, temperature)[0].detach()
    shift = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    shift[0, :2] = torch.tensor([0.9, -0.9])  # at least one ratio far out on each side
    old = logp_true + shift
    ref = logp_true + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old, ref = old.float(), ref.float()
    old[~mask], ref[~mask] = -math.inf, math.nan  # garbage on masked positions must not leak
    if per_token_adv:
        adv = torch.randn(B, T, generator=g)
        adv[~mask] = math.nan
    else:
        adv = torch.tensor([1.3, -0.7, 0.4, -1.9, 0.8][:B])
    return dict(logits=logits, targets=targets, mask=mask, advantages=adv, old_logprobs=old, ref_logprobs=ref)


# ---------------------------------------------------------------- float64 oracle
def ref_loss(logp, H, mask, adv, old, ref, cfg, gspo_full_grad=False):
    """Loss and metrics from float64 ``logp``, ``H``, one response at a time (module docstring math)."""
    B, T = mask.shape
    valid_H = H.detach()[mask]
    keep_all = cfg.top_entropy_quantile >= 1.0
    threshold = torch.quantile(valid_H, 1 - cfg.top_entropy_quantile) if valid_H.numel() and not keep_all else None
    C = cfg.max_completion_length or T
    n_tok = int(mask.sum())
    n_seq = sum(int(mask[i].any()) for i in range(B))
    total = torch.zeros((), dtype=torch.float64)
    magnitude = 0.0  # sum of |each token's contribution|: the scale of the loss's rounding error
    stats = {k: [] for k in ("low", "high", "dual", "w", "k3", "kl", "H", "keep")}
    for i in range(B):
        tok = mask[i]
        L = int(tok.sum())
        if L == 0:
            continue
        lp, h = logp[i][tok], H[i][tok]
        o = lp.detach() if old is None else old[i][tok].double()
        a = adv[i][tok].double() if adv.dim() == 2 else adv[i].double().expand(L)
        if cfg.importance_sampling_level == "token":
            w = torch.exp(lp - o)
        elif gspo_full_grad:  # plain sequence ratio, gradient through the mean
            w = torch.exp((lp - o).mean()).expand(L)
        else:  # GSPO-token: sg(s_i) * exp(logp - sg(logp))
            w = torch.exp((lp - o).mean()).detach() * torch.exp(lp - lp.detach())
        unclipped, clipped = -a * w, -a * torch.clamp(w, 1 - cfg.eps_low, 1 + cfg.eps_high)
        pg = torch.where(unclipped > clipped, unclipped, clipped)
        dual = torch.zeros(L, dtype=torch.bool)
        if cfg.dual_clip is not None:
            dual = (a < 0) & (pg > -cfg.dual_clip * a)
            pg = torch.where(dual, -cfg.dual_clip * a, pg)
        keep = torch.ones(L, dtype=torch.bool) if threshold is None else h.detach() >= threshold
        l_tok = torch.where(keep, pg, torch.zeros_like(pg)) - cfg.entropy_coef * h
        if ref is not None:
            d = ref[i][tok].double() - lp
            kl = torch.exp(d) - d - 1
            stats["kl"].append(kl.detach())
            if cfg.beta > 0:
                l_tok = l_tok + cfg.beta * kl
        weight = {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / L / n_seq,
                  "seq-mean-token-sum-norm": 1 / C / n_seq}[cfg.aggregation]
        total = total + l_tok.sum() * weight
        magnitude += float(l_tok.detach().abs().sum()) * weight
        wd, lr = w.detach(), (lp - o).detach()
        stats["low"].append((wd < 1 - cfg.eps_low) & (a < 0))
        stats["high"].append((wd > 1 + cfg.eps_high) & (a > 0))
        stats["dual"].append(dual)
        stats["w"].append(wd)
        stats["k3"].append(torch.exp(lr) - lr - 1)
        stats["H"].append(h.detach())
        stats["keep"].append(keep)
    cat = {k: torch.cat(v).double() if v else torch.zeros(0, dtype=torch.float64) for k, v in stats.items()}
    mean = (lambda x: x.mean()) if n_tok else (lambda x: torch.zeros((), dtype=torch.float64))
    metrics = {
        "clip_frac_low": mean(cat["low"]), "clip_frac_high": mean(cat["high"]),
        "clip_frac_dual": mean(cat["dual"]), "approx_kl": mean(cat["k3"]),
        "entropy_mean": mean(cat["H"]), "entropy_mask_kept_frac": mean(cat["keep"]),
        "ratio_mean": cat["w"].mean() if n_tok else torch.tensor(1.0),
        "ratio_min": cat["w"].min() if n_tok else torch.tensor(1.0),
        "ratio_max": cat["w"].max() if n_tok else torch.tensor(1.0),
    }
    if ref is not None:
        metrics["kl_ref"] = mean(cat["kl"])
    return total, metrics, magnitude


def oracle(batch, cfg, *, on_policy=False, with_ref=True, gspo_full_grad=False):
    """float64 loss, metrics and d loss / d logits for ``batch``."""
    z = batch["logits"].detach().double().requires_grad_()
    logp, H = ref_token_stats(z, batch["targets"], batch["mask"], cfg.temperature)
    loss, metrics, magnitude = ref_loss(logp, H, batch["mask"], batch["advantages"],
                                        None if on_policy else batch["old_logprobs"],
                                        batch["ref_logprobs"] if with_ref else None, cfg, gspo_full_grad)
    loss.backward()
    return loss.detach(), metrics, z.grad, magnitude


def run(batch, cfg, backend, *, on_policy=False, with_ref=True, **kw):
    """Loss, metrics and d loss / d logits from the code under test."""
    batch["logits"].grad = None
    args = {k: v for k, v in batch.items() if k not in ("old_logprobs", "ref_logprobs")}
    loss, metrics = policy_loss(**args, old_logprobs=None if on_policy else batch["old_logprobs"],
                                ref_logprobs=batch["ref_logprobs"] if with_ref else None,
                                config=cfg, backend=backend, **kw)
    loss.backward()
    return loss.detach(), metrics, batch["logits"].grad


def check_against_oracle(batch, cfg, backend, **kw):
    """Loss, d loss / d logits and every metric of the code under test vs the float64 oracle."""
    tol = TOL[batch["logits"].dtype]
    loss, metrics, grad = run(batch, cfg, backend, **kw)
    ref_l, ref_m, ref_g, magnitude = oracle(batch, cfg, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    check_loss(loss, ref_l, magnitude, tol["fwd"])
    assert grad.dtype == batch["logits"].dtype
    check_grad(grad, ref_g, tol["grad"], "d loss / d logits")
    assert set(metrics) == set(ref_m), f"metric names {sorted(metrics)} != {sorted(ref_m)}"
    for k in ref_m:
        assert not metrics[k].requires_grad and metrics[k].dtype == torch.float32, k
        check(metrics[k], ref_m[k], tol["fwd"], f"metrics[{k!r}]")
    return metrics


# ---------------------------------------------------------------- every config combination vs the oracle
COMBOS = list(itertools.product(
    ("token", "sequence"),
    ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    (None, 1.6),  # dual_clip
    (0.0, 0.05),  # beta
    (0.0, 0.02),  # entropy_coef
    (1.0, 0.3),  # top_entropy_quantile
))


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_seq", "adv_tok"])
@pytest.mark.parametrize("level,agg,dual,beta,ent,rho", COMBOS)
def test_every_combination_torch(level, agg, dual, beta, ent, rho, per_token_adv):
    seed = COMBOS.index((level, agg, dual, beta, ent, rho)) * 2 + per_token_adv
    cfg = PolicyLossConfig(importance_sampling_level=level, aggregation=agg, dual_clip=dual, beta=beta,
                           entropy_coef=ent, top_entropy_quantile=rho, eps_low=0.2, eps_high=0.28,
                           max_completion_length=11 if seed % 2 else None, temperature=0.7 if seed % 3 else 1.0)
    batch = make_batch(seed, per_token_adv=per_token_adv, noncontig=bool(seed % 2), temperature=cfg.temperature)
    metrics = check_against_oracle(batch, cfg, "torch")
    # The perturbed old log-probs push ratios far outside the clip range on both sides.
    if level == "token":
        assert metrics["ratio_min"] < 0.8 and metrics["ratio_max"] > 1.28


TRITON_CASES = [
    ("grpo", {}), ("dapo", {}), ("dr_grpo", {"max_completion_length": 9}), ("gspo", {}), ("bnpo", {}),
    ("dapo", {"dual_clip": 1.6, "beta": 0.05, "entropy_coef": 0.02, "top_entropy_quantile": 0.2,
              "temperature": 0.7}),
    ("gspo", {"eps_low": 0.05, "eps_high": 0.05, "beta": 0.05, "top_entropy_quantile": 0.5}),
]


@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_seq", "adv_tok"])
@pytest.mark.parametrize("preset,overrides", TRITON_CASES)
def test_presets_and_features_triton(preset, overrides, per_token_adv):
    seed = 1000 + TRITON_CASES.index((preset, overrides)) * 2 + per_token_adv
    cfg = PolicyLossConfig.preset(preset, **overrides)
    batch = make_batch(seed, per_token_adv=per_token_adv, noncontig=True, temperature=cfg.temperature)
    check_against_oracle(batch, cfg, "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_logits(backend):
    cfg = PolicyLossConfig.preset("dapo", beta=0.05, entropy_coef=0.02)
    check_against_oracle(make_batch(7, dtype=torch.bfloat16), cfg, backend)


# ---------------------------------------------------------------- semantics
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("preset", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_on_policy_is_reinforce(preset, backend):
    """old=None: ratio 1, no clipping, gradient of -sum(agg * A * logp)."""
    batch = make_batch(21, per_token_adv=preset == "dapo")
    cfg = PolicyLossConfig.preset(preset)
    loss, metrics, grad = run(batch, cfg, backend, on_policy=True, with_ref=False)
    z = batch["logits"].detach().double().requires_grad_()
    logp, _ = ref_token_stats(z, batch["targets"], batch["mask"], cfg.temperature)
    mask, adv = batch["mask"], batch["advantages"].double()
    adv = torch.where(mask, adv if adv.dim() == 2 else adv[:, None].expand_as(logp), 0.0)
    m, C = mask.double(), cfg.max_completion_length or mask.shape[1]
    n_seq = (m.sum(-1) > 0).sum()
    weights = {"token-mean": m / m.sum(), "seq-mean-token-mean": m / m.sum(-1, keepdim=True).clamp(min=1) / n_seq,
               "seq-mean-token-sum-norm": m / C / n_seq}[cfg.aggregation]
    reinforce = -(weights * adv * logp).sum()
    reinforce.backward()
    check_grad(grad, z.grad, FP32, "on-policy gradient")
    check_loss(loss, -(weights * adv).sum(), float((weights * adv).abs().sum()), FP32, "on-policy loss value")
    for k in ("clip_frac_low", "clip_frac_high", "approx_kl"):
        assert metrics[k] == 0, (k, metrics[k])
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert metrics[k] == 1, (k, metrics[k])


def test_gspo_token_gradient_equals_sequence_ratio_gradient():
    """Per-response A and no entropy mask: GSPO-token's gradient is the plain sequence ratio's (GSPO eq. 6)."""
    batch = make_batch(31)  # sequence ratios (1.026, 2.08, -, 1.28, 0.955), A = (1.3, -0.7, 0.4, -1.9, 0.8)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        # eps 0.02 high-clips row 0, the dual clip 1.5 caps row 1; rows 3 and 4 keep their gradient.
        cfg = PolicyLossConfig(importance_sampling_level="sequence", eps_low=0.02, eps_high=0.02, dual_clip=1.5,
                               aggregation=agg)
        _, metrics, grad_ours = run(batch, cfg, "torch", with_ref=False)
        _, _, grad_full, _ = oracle(batch, cfg, with_ref=False, gspo_full_grad=True)
        assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_dual"] > 0
        assert (grad_ours[[3, 4]] != 0).any(-1).any(-1).all() and (grad_ours[[0, 1]] == 0).all()
        check_grad(grad_ours, grad_full, FP32, f"GSPO gradient ({agg})")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_masked_row_contributes_nothing(backend):
    batch = make_batch(41, per_token_adv=True)
    assert not batch["mask"][2].any()
    for preset in ("grpo", "dapo", "dr_grpo", "gspo") if backend == "torch" else ("grpo", "dr_grpo"):
        cfg = PolicyLossConfig.preset(preset, beta=0.05, entropy_coef=0.02)
        loss, metrics, grad = run(batch, cfg, backend)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        assert torch.all(grad[2] == 0) and torch.all(grad[~batch["mask"]] == 0)
        keep = [0, 1, 3, 4]
        sub = {k: (v[keep].detach().requires_grad_() if k == "logits" else v[keep]) for k, v in batch.items()}
        loss_sub, metrics_sub, grad_sub = run(sub, cfg, backend)
        ref_l, _, _, magnitude = oracle(batch, cfg)
        check_loss(loss, ref_l, magnitude, FP32, f"{preset}: loss")
        check_loss(loss_sub, ref_l, magnitude, FP32, f"{preset}: loss without the empty row")
        check_grad(grad[keep], grad_sub, FP32, f"{preset}: grad without the empty row")
        for k in metrics:
            check(metrics[k], metrics_sub[k], FP32, f"{preset}: metrics[{k!r}]")


def test_absurd_ratio_stays_finite():
    """A ratio past fp32's exp range (log-ratio 200) with A > 0 is just high-clipped: same loss and gradient
    as a ratio of e (also clipped), no inf/NaN (exp's backward would give grad * inf without the cap).
    A ref log-ratio of 200 stays finite too (its KL term is capped at exp(20) - 21)."""
    batch = make_batch(43)
    logp = ref_token_stats(batch["logits"].detach(), batch["targets"], batch["mask"], 1.0)[0].float()
    assert batch["advantages"][0] > 0 and batch["mask"][0, 3]
    results = []
    for log_ratio in (200.0, 1.0):
        batch["old_logprobs"][0, 3] = logp[0, 3] - log_ratio
        loss, metrics, grad = run(batch, PolicyLossConfig.preset("dapo"), "torch", with_ref=False)
        assert torch.isfinite(grad).all() and all(torch.isfinite(v) for v in metrics.values())
        results.append((loss, grad.clone(), metrics["clip_frac_high"]))
    (loss_big, grad_big, clip_big), (loss_e, grad_e, clip_e) = results
    check_loss(loss_big, loss_e, 0.0, 1e-6)
    check_grad(grad_big, grad_e, 1e-6, "d loss / d logits")
    assert clip_big == clip_e
    batch["ref_logprobs"][0, 3] = logp[0, 3] + 200.0
    loss, metrics, grad = run(batch, PolicyLossConfig.preset("dapo", beta=0.05), "torch")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    kl_sum = float(metrics["kl_ref"]) * int(batch["mask"].sum())  # the capped token dominates the sum
    assert (math.exp(20) - 21) * (1 - 1e-6) <= kl_sum <= math.exp(20) * (1 + 1e-6), kl_sum


def test_everything_masked_is_zero_not_nan():
    batch = make_batch(42)
    batch["mask"] = torch.zeros_like(batch["mask"])
    loss, metrics, grad = run(batch, PolicyLossConfig.preset("grpo", top_entropy_quantile=0.2, beta=0.1), "torch")
    assert loss == 0 and torch.all(grad == 0)
    assert metrics["ratio_mean"] == 1 and metrics["entropy_mean"] == 0 and metrics["clip_frac_low"] == 0


def test_float_mask_and_module_match_bool_functional():
    batch = make_batch(51, per_token_adv=True)
    cfg = PolicyLossConfig.preset("dapo", beta=0.05)
    loss_b, metrics_b, grad_b = run(batch, cfg, "torch")
    grad_b = grad_b.clone()
    batch["logits"].grad = None
    kwargs = {k: v for k, v in batch.items()}
    kwargs["mask"] = batch["mask"].float()
    loss_m, metrics_m = PolicyLoss(cfg)(**kwargs, backend="torch")
    loss_m.backward()
    assert torch.equal(loss_b, loss_m.detach()) and torch.equal(grad_b, batch["logits"].grad)
    assert all(torch.equal(metrics_b[k], metrics_m[k]) for k in metrics_b)


def test_one_fused_pass_each_way(monkeypatch):
    """logp and H reach the vocab through one forward and one backward of the fused op."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = token_ops.token_forward_torch, token_ops.token_backward_torch

    def count_fwd(*a, **k):
        calls["fwd"] += 1
        return fwd(*a, **k)

    def count_bwd(*a, **k):
        calls["bwd"] += 1
        return bwd(*a, **k)

    monkeypatch.setattr(token_ops, "token_forward_torch", count_fwd)
    monkeypatch.setattr(token_ops, "token_backward_torch", count_bwd)
    cfg = PolicyLossConfig.preset("dapo", beta=0.05, entropy_coef=0.02, top_entropy_quantile=0.5)
    run(make_batch(61), cfg, "torch")
    assert calls == {"fwd": 1, "bwd": 1}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_no_host_sync_after_the_fused_op(level, agg):
    """Everything after the fused op, forward and backward, runs on meta tensors, which have no values:
    any host sync (.item(), bool(), nonzero) would raise."""
    meta = torch.device("meta")
    logp = torch.empty(4, 6, device=meta, requires_grad=True)
    H = torch.empty(4, 6, device=meta, requires_grad=True)
    valid = torch.empty(4, 6, dtype=torch.bool, device=meta)
    old, ref = torch.empty(4, 6, device=meta), torch.empty(4, 6, device=meta)
    cfg = PolicyLossConfig(importance_sampling_level=level, aggregation=agg, dual_clip=2.0, beta=0.1,
                           entropy_coef=0.1, top_entropy_quantile=0.2)
    for adv in (torch.empty(4, device=meta), torch.empty(4, 6, device=meta)):
        loss, metrics = _loss_from_token_stats(logp, H, valid, adv, old, ref, cfg)
        loss.backward()
        assert loss.device == meta and all(v.device == meta for v in metrics.values())
    assert logp.grad.shape == (4, 6) and H.grad.shape == (4, 6)


def test_entropy_mask_threshold_matches_torch_quantile():
    """The kept tokens are exactly those at or above torch.quantile of the valid entropies."""
    batch = make_batch(71, B=5, T=7, V=300)
    for rho in (0.2, 0.5, 0.9):
        cfg = PolicyLossConfig.preset("dapo", top_entropy_quantile=rho)
        _, metrics, _ = run(batch, cfg, "torch", on_policy=True, with_ref=False)
        _, H = ref_token_stats(batch["logits"].detach(), batch["targets"], batch["mask"], 1.0)
        valid_H = H[batch["mask"]]
        kept = (valid_H >= torch.quantile(valid_H, 1 - rho)).double().mean()
        check(metrics["entropy_mask_kept_frac"], kept, 1e-7, f"kept fraction (rho={rho})")


# ---------------------------------------------------------------- hand-computed presets
def hand_batch():
    """B=2, T=3, V=2, all logits 0: logp = -ln 2 and H = ln 2 on every token.

    old = logp - ln r sets the ratio r: row 0 r = (1.5, 1.0, 0.7), A = +1;
    row 1 r = (0.5, 1.25, masked), A = -2.
    """
    logits = torch.zeros(2, 3, 2, requires_grad=True)
    targets = torch.tensor([[0, 1, 0], [1, 0, -100]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r = torch.tensor([[1.5, 1.0, 0.7], [0.5, 1.25, 1.0]])
    old = -math.log(2) - torch.log(r)
    return dict(logits=logits, targets=targets, mask=mask, advantages=torch.tensor([1.0, -2.0]),
                old_logprobs=old)


# Per-token losses -min(rA, clip(r)A), eps 0.2/0.2:
#   row 0 (A=+1): r=1.5 -> -1.2 (clipped), r=1.0 -> -1.0, r=0.7 -> -0.7 (unclipped, 0.7 < 0.8); sum -2.9
#   row 1 (A=-2): r=0.5 -> +1.6 (clipped at 0.8), r=1.25 -> +2.5 (unclipped); sum 4.1
# grpo    seq-mean-token-mean: (-2.9/3 + 4.1/2) / 2 = 13/24
# dapo    token-mean, eps_high 0.28: r=1.5 -> -1.28, so (-2.98 + 4.1) / 5 = 0.224
# dr_grpo seq sums / C=4, mean over 2 rows: (-2.9 + 4.1) / 4 / 2 = 0.15
# bnpo    token-mean, eps 0.2: (-2.9 + 4.1) / 5 = 0.24
# gspo    s_0 = (1.5*1.0*0.7)^(1/3) = 1.0164 > 1.0004, A>0 -> clipped: -1.0004 per token, row mean -1.0004;
#         s_1 = (0.5*1.25)^(1/2) = 0.7906 < 0.9997, A<0 -> clipped: +1.9994; loss (-1.0004 + 1.9994) / 2 = 0.4995
HAND_CASES = {
    "grpo": (13 / 24, {}),
    "dapo": (0.224, {}),
    "dr_grpo": (0.15, {"max_completion_length": 4}),
    "bnpo": (0.24, {}),
    "gspo": (0.4995, {}),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("preset", sorted(HAND_CASES))
def test_preset_hand_computed(preset, backend):
    expected, overrides = HAND_CASES[preset]
    loss, metrics = policy_loss(**hand_batch(), config=PolicyLossConfig.preset(preset, **overrides),
                                backend=backend)
    check(loss, expected, 1e-6, f"{preset} loss")
    check(metrics["entropy_mean"], math.log(2), 1e-6, "entropy_mean")
    if preset in ("grpo", "bnpo", "dr_grpo"):
        # low: r=0.5 with A<0; high: r=1.5 with A>0; 5 valid tokens. Ratios (1.5, 1, .7, .5, 1.25).
        check(metrics["clip_frac_low"], 0.2, 1e-6, "clip_frac_low")
        check(metrics["clip_frac_high"], 0.2, 1e-6, "clip_frac_high")
        check(metrics["ratio_mean"], 4.95 / 5, 1e-6, "ratio_mean")
        check(metrics["ratio_min"], 0.5, 1e-6, "ratio_min")
        check(metrics["ratio_max"], 1.5, 1e-6, "ratio_max")
        k3 = sum(r - math.log(r) - 1 for r in (1.5, 1.0, 0.7, 0.5, 1.25)) / 5
        check(metrics["approx_kl"], k3, 1e-6, "approx_kl")
    if preset == "gspo":  # every token of row 0 is high-clipped, every token of row 1 low-clipped
        check(metrics["clip_frac_high"], 0.6, 1e-6, "clip_frac_high")
        check(metrics["clip_frac_low"], 0.4, 1e-6, "clip_frac_low")


def test_hand_dual_clip_kl_entropy_bonus():
    # grpo + dual_clip 1.1: row 1 r=1.25 -> min(2.5, 1.1*2) = 2.2, so (-2.9/3 + (1.6 + 2.2)/2) / 2 = 14/30.
    # beta 0.1 with ref = logp + ln 2: k3 = 2 - ln 2 - 1 per token, every row mean is that: +0.1 (1 - ln 2).
    # entropy_coef 0.5: every H = ln 2, so -0.5 ln 2.
    batch = hand_batch()
    ref = torch.full((2, 3), -math.log(2) + math.log(2))
    cfg = PolicyLossConfig.preset("grpo", dual_clip=1.1, beta=0.1, entropy_coef=0.5)
    loss, metrics = policy_loss(**batch, ref_logprobs=ref, config=cfg, backend="torch")
    expected = 14 / 30 + 0.1 * (1 - math.log(2)) - 0.5 * math.log(2)
    check(loss, expected, 1e-6, "loss")
    check(metrics["clip_frac_dual"], 0.2, 1e-6, "clip_frac_dual")
    check(metrics["kl_ref"], 1 - math.log(2), 1e-6, "kl_ref")


def test_hand_entropy_mask():
    # One response, V=2, logits (gap, 0) with gaps (1, 3, 4, 0, 2): the entropy falls with the gap, so the
    # order is token 3 > 0 > 4 > 1 > 2. rho = 0.4: the 0.6 quantile of the 5 values sorted ascending
    # (2, 1, 4, 0, 3) sits at position 0.6 * 4 = 2.4, between tokens 4 and 0, strictly above token 4's H:
    # tokens 0 and 3 are kept.
    # On-policy, ratio 1: token loss -A_t; token-mean over all 5 valid: -(A_3 + A_0) / 5 = -(4 + 1) / 5.
    gaps = torch.tensor([1.0, 3.0, 4.0, 0.0, 2.0])
    logits = torch.stack([gaps, torch.zeros(5)], -1).unsqueeze(0).requires_grad_()
    adv = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    cfg = PolicyLossConfig.preset("dapo", top_entropy_quantile=0.4)
    loss, metrics = policy_loss(logits=logits, targets=torch.zeros(1, 5, dtype=torch.long),
                                mask=torch.ones(1, 5, dtype=torch.bool), advantages=adv, config=cfg,
                                backend="torch")
    check(loss, -1.0, 1e-6, "loss")
    check(metrics["entropy_mask_kept_frac"], 0.4, 1e-6, "kept fraction")


# ---------------------------------------------------------------- hidden-state path
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hidden_path_equals_logits_path(backend, softcap):
    """hidden + weight + bias through the linear op == logits = cap(hidden @ W^T + b) through the logits op."""
    pytest.importorskip("entropy_ops.linear_ops")
    g = torch.Generator().manual_seed(81)
    B, T, D, V = 3, 5, 16, 37
    batch = make_batch(81, B=B, T=T, V=V, per_token_adv=True)
    hidden = torch.randn(B, T + 1, D, generator=g)[:, :T].requires_grad_()  # non-contiguous, as h[:, :-1]
    weight = (torch.randn(V, D, generator=g) / 2).requires_grad_()
    bias = torch.randn(V, generator=g).requires_grad_()
    cfg = PolicyLossConfig.preset("dapo", beta=0.05, entropy_coef=0.02, top_entropy_quantile=0.5, temperature=0.7)
    args = {k: v for k, v in batch.items() if k != "logits"}
    leaves = (hidden, weight, bias)
    loss_h, metrics_h = policy_loss(**args, hidden=hidden, weight=weight, bias=bias, config=cfg,
                                    logit_softcap=softcap, backend=backend)
    loss_h.backward()
    grads_h = [t.grad.clone() for t in leaves]
    assert torch.all(grads_h[0][~batch["mask"]] == 0), "masked positions must get no gradient"
    for t in leaves:
        t.grad = None
    logits = hidden @ weight.T + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss_l, metrics_l = policy_loss(**args, logits=logits, config=cfg, backend="torch")
    loss_l.backward()
    _, _, _, magnitude = oracle({**batch, "logits": logits.detach()}, cfg)
    check_loss(loss_h, loss_l, magnitude, FP32)
    for name, grad, t in zip(("hidden", "weight", "bias"), grads_h, leaves):
        check_grad(grad, t.grad, FP32, f"d loss / d {name}")
    for k in metrics_l:
        check(metrics_h[k], metrics_l[k], FP32, f"metrics[{k!r}]")


# ---------------------------------------------------------------- bad inputs
def bad_call(**changes):
    batch = make_batch(91)
    batch.update(changes)
    return policy_loss(**{k: v for k, v in batch.items() if k != "config"},
                       config=changes.get("config", "grpo"), backend="torch")


@pytest.mark.parametrize("changes,exc,pattern", [
    ({"mask": torch.ones(5, 6, dtype=torch.bool)}, ValueError, "mask"),
    ({"mask": torch.full((5, 7), 0.5)}, ValueError, "mask"),
    ({"advantages": torch.ones(4)}, ValueError, "advantages"),
    ({"advantages": torch.tensor([1.0, math.nan, 0.0, 0.0, 0.0])}, ValueError, "advantages.*finite"),
    ({"advantages": torch.ones(5, dtype=torch.long)}, TypeError, "advantages"),
    ({"old_logprobs": torch.zeros(5, 8)}, ValueError, "old_logprobs"),
    ({"ref_logprobs": torch.zeros(7, 5)}, ValueError, "ref_logprobs"),
    ({"ref_logprobs": None, "config": PolicyLossConfig(beta=0.1)}, ValueError, "ref_logprobs"),
    ({"targets": torch.zeros(5, 7)}, TypeError, "targets"),
    ({"targets": torch.zeros(35, dtype=torch.long)}, ValueError, "targets"),
    ({"targets": torch.zeros(5, 0, dtype=torch.long)}, ValueError, "targets.*non-empty"),
    ({"logits": None}, ValueError, "logits"),
    ({"logits": torch.zeros(5, 6, 37)}, ValueError, "logits"),
    ({"hidden": torch.zeros(5, 7, 4)}, ValueError, "logits or hidden"),
    ({"logits": None, "hidden": torch.zeros(5, 7, 4)}, ValueError, "weight"),
    ({"config": "ppo"}, ValueError, "preset"),
    ({"config": 3}, TypeError, "config"),
])
def test_bad_inputs_name_the_argument(changes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        bad_call(**changes)


@pytest.mark.parametrize("name,bad", [("old_logprobs", math.nan), ("old_logprobs", -math.inf),
                                      ("ref_logprobs", math.inf), ("targets", -100)])
def test_bad_values_on_kept_tokens_name_the_argument_and_index(name, bad):
    """A non-finite old / ref log-prob, or a target equal to ignore_index, on a kept token is refused (the
    latter would reach the fused op as an ignored token: log-prob 0, no gradient); on a masked token it
    is fine."""
    batch = make_batch(95)
    kept = tuple(int(i) for i in batch["mask"].nonzero()[0])
    dropped = tuple(int(i) for i in (~batch["mask"]).nonzero()[0])
    args = {k: v for k, v in batch.items() if k != "config"}
    for where, refused in ((dropped, False), (kept, True)):
        x = args[name].clone() if args.get(name) is not None else torch.zeros(args["targets"].shape)
        x[where] = bad
        call = dict(args, **{name: x})
        if refused:
            with pytest.raises(ValueError, match=rf"{name}.*index {re.escape(str(where))}"):
                policy_loss(**call, config="grpo", backend="torch")
        else:
            loss, _ = policy_loss(**call, config="grpo", backend="torch")
            assert torch.isfinite(loss)


def test_nan_advantage_on_masked_token_is_fine():
    batch = make_batch(92, per_token_adv=True)  # NaN advantages sit on every masked token
    loss, _ = policy_loss(**batch, config="dapo", backend="torch")
    assert torch.isfinite(loss)


def test_logit_softcap_rejected_on_logits_path():
    with pytest.raises(ValueError, match="logit_softcap"):
        policy_loss(**make_batch(93), config="dapo", logit_softcap=30.0, backend="torch")


@pytest.mark.parametrize("field,value", [
    ("eps_low", -0.1), ("eps_low", 1.0), ("eps_high", -0.2), ("dual_clip", 1.0), ("beta", -1.0),
    ("top_entropy_quantile", 0.0), ("top_entropy_quantile", 1.5), ("aggregation", "sum"),
    ("importance_sampling_level", "segment"), ("max_completion_length", 0), ("temperature", 0.0),
    ("entropy_coef", math.nan),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**{field: value})


def test_preset_fields_and_overrides():
    assert PolicyLossConfig.preset("grpo") == PolicyLossConfig(aggregation="seq-mean-token-mean")
    assert PolicyLossConfig.preset("dapo").eps_high == 0.28
    gspo = PolicyLossConfig.preset("gspo", beta=0.01)
    assert (gspo.importance_sampling_level, gspo.eps_low, gspo.eps_high, gspo.beta) == ("sequence", 3e-4, 4e-4, 0.01)
    assert PolicyLossConfig.preset("dr_grpo").aggregation == "seq-mean-token-sum-norm"
    with pytest.raises(ValueError, match="preset"):
        PolicyLossConfig.preset("grpo-x")
    with pytest.raises(TypeError, match="epsilon"):
        PolicyLossConfig.preset("grpo", epsilon=0.1)
    with pytest.raises(TypeError, match="config"):
        PolicyLoss("grpo")(config="dapo")


def test_policy_loss_from_logprobs_equals_policy_loss():
    """The public (logp, entropy) entry point gives the same loss, metrics and gradient."""
    from entropy_ops import policy_loss_from_logprobs, token_logprobs_and_entropy

    g = torch.Generator().manual_seed(31)
    B, T, V = 3, 5, 40
    logits = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 3.0
    cfg = PolicyLossConfig.preset("dapo", entropy_coef=0.01)
    x1 = logits.clone().requires_grad_(True)
    loss1, m1 = policy_loss(logits=x1, targets=targets, mask=mask, advantages=adv, old_logprobs=old, config=cfg,
                            backend="torch")
    loss1.backward()
    x2 = logits.clone().requires_grad_(True)
    logp, H = token_logprobs_and_entropy(x2, torch.where(mask, targets, -100), backend="torch")
    loss2, m2 = policy_loss_from_logprobs(logp, H, mask=mask, advantages=adv, old_logprobs=old, config=cfg)
    loss2.backward()
    assert torch.allclose(loss1, loss2, rtol=1e-6, atol=0)
    assert m1.keys() == m2.keys() and all(torch.allclose(m1[k], m2[k]) for k in m1)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss_from_logprobs(logp, H[:, :-1], mask=mask, advantages=adv, config=cfg)
