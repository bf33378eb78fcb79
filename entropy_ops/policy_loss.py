"""The GRPO-family clipped policy loss on top of the fused log-prob/entropy ops: ``policy_loss``.

One call of a fused op gives the per-token ``logp`` and entropy ``H`` (fp32
``[B, T]``) from the logits (``token_logprobs_and_entropy``) or from the hidden
states and the lm-head weight (``linear_logprobs_and_entropy``); masked
positions reach the op as ``ignore_index`` so they cost no vocab work and get
zero gradient. Everything after it is O(tokens) PyTorch (the entropy mask adds
one sort of the ``B*T`` entropies), and the one backward of
the fused op carries ``(d loss / d logp, d loss / d H)`` to the logits or to
``hidden``/``weight``. Never a second pass over the vocabulary.

Math, per valid token ``t`` of response ``i`` (``M`` the mask, ``A`` the advantage,
per response ``[B]`` or per token ``[B, T]``, ``sg`` stop-gradient)::

    token ratio     w_it = exp(logp_it - old_it)                   (old=None: exp(logp - sg(logp)) = 1)
    sequence ratio  w_it = sg(s_i) * exp(logp_it - sg(logp_it)),   s_i = exp(mean_{t: M} (logp_it - old_it))
    surrogate       pg_it = max(-w A, -clip(w, 1 - eps_low, 1 + eps_high) A)
    dual clip       pg_it = min(pg_it, -c A)          where A < 0 (c = dual_clip > 1)
    entropy mask    keep_it = H_it >= quantile_{valid}(sg(H), 1 - rho)      (rho = 1: keep all)
    k3 KL to ref    kl_it = exp(ref - logp) - (ref - logp) - 1
    token loss      l_it = keep_it * pg_it + beta * kl_it - entropy_coef * H_it
    loss            = sum_it agg_it * l_it

with the aggregation weights ``agg`` (``L_i`` valid tokens of response ``i``,
``N = sum_i L_i``, ``G`` responses with ``L_i > 0``, ``C`` =
``max_completion_length`` or the batch's ``T``)::

    token-mean                M / N                      (DAPO, BNPO)
    seq-mean-token-mean       M / (L_i G)                (GRPO, GSPO)
    seq-mean-token-sum-norm   M / (C G)                  (Dr.GRPO)

Empty denominators count as 1, so an all-masked response contributes nothing,
not even to ``G`` (TRL divides the two sequence modes by all ``B`` rows; the
two agree unless a row is fully masked). The entropy bonus and the KL act on
every valid token with the same weights; only the policy term obeys the entropy
mask, and its denominator still counts every valid token (Wang et al. 2025,
"Beyond the 80/20 rule", arXiv 2506.01939).

GSPO (Zheng et al. 2025, arXiv 2507.18071): we use the paper's GSPO-token form
written above. Its value is the sequence ratio ``s_i`` on every token (clipping
decides per sequence) and ``d w_it / d logp_it = s_i``. When ``A`` is per
response and the entropy mask is off, the per-token weights within a response
are equal and the gradient is exactly that of the plain sequence ratio
``exp(mean_t(logp - old))`` (the paper's GSPO objective, and TRL's
``importance_sampling_level="sequence"``); with per-token advantages or the
entropy mask, each token gets its own gradient (the paper's GSPO-token) instead
of sharing the sequence's (tested against the plain form in the tests).

Normalizers are local to the call: DAPO's normalization by the global token
count across gradient accumulation and data-parallel ranks, and any gathering
of entropies for the mask's quantile (TRL gathers them over ranks; here the
quantile is per call, i.e. per rank) are the caller's job. Old/ref log-probs
and advantages are constants (detached).

Metrics (0-dim fp32, detached, from the same pass; means over valid tokens,
with the sequence ratio counted on every token of its response):
``clip_frac_low`` = frac of tokens with ``w < 1 - eps_low`` and ``A < 0``,
``clip_frac_high`` = ``w > 1 + eps_high`` and ``A > 0`` (TRL's
``clip_ratio/low_mean``, ``/high_mean``: the clipped branch carries the value
and the gradient is zero), ``clip_frac_dual`` = ``A < 0`` and the dual bound
``-c A`` is strictly below the clipped surrogate; ``ratio_mean/min/max`` of
``w``; ``approx_kl`` = mean k3 of KL(old || new), ``exp(logp - old) - (logp -
old) - 1`` (>= 0, Schulman's low-variance estimator; 0 on-policy);
``kl_ref`` (when ``ref_logprobs`` is given) = mean ``kl_it``; ``entropy_mean``;
``entropy_mask_kept_frac`` = kept / valid. With no valid token every mean is 0
and the ratio metrics are 1.

Overflow guard: the log-ratios ``logp - old`` (or the sequence's mean) and
``ref - logp`` are capped at ``LOG_RATIO_CAP = 20`` before ``exp``; a token past
the cap keeps a finite value and gets no gradient through that exp. This changes
nothing below a ratio of ``exp(20) = 4.9e8``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ._validation import check_float_tensor, widen_targets
from .policy_checks import one_pass_eligible  # noqa: F401  (public: integrations ask it before a one-pass call)
from .policy_checks import check_policy_inputs, check_token_inputs, use_one_pass

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Log-ratios (policy/old and ref/policy) are capped at 20 before exp (verl clamps its log-ratio to
# [-20, 20]): exp(20) = 4.9e8 is already absurd, and an uncapped exp overflows to inf past 88.7 in
# fp32, where exp's backward (grad * inf) turns even a zero upstream gradient (the clipped branch)
# into NaN. No lower cap is needed: exp underflows to 0 with a finite gradient.
LOG_RATIO_CAP = 20.0
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Preset name -> the fields it sets (everything else keeps the dataclass default).
# grpo:    DeepSeekMath GRPO (arXiv 2402.03300) as TRL's loss_type="grpo": per-response mean, then
#          mean over responses; eps 0.2; beta 0.0 = TRL's GRPOConfig default (DeepSeekMath used
#          0.04: pass beta=0.04 and ref_logprobs for that).
# dapo:    DAPO (arXiv 2503.14476): token-mean, clip-higher eps_low 0.2 / eps_high 0.28, no KL.
# dr_grpo: Dr.GRPO (arXiv 2503.20783): per-response token sum / the constant max_completion_length
#          (set it; None falls back to the batch's T), no KL. Dropping the std from the advantage
#          is the advantage estimator's job, not the loss's.
# gspo:    GSPO (arXiv 2507.18071 v2, sec. 5.1; TRL paper index): sequence-level ratio,
#          eps_low 3e-4 / eps_high 4e-4, no KL, per-response mean (TRL loss_type="grpo").
# bnpo:    TRL's loss_type="bnpo": token-mean over this call's valid tokens, eps 0.2, no KL.
#          Differs from dapo only by eps_high here; TRL's dapo also normalizes globally (caller's job).
_PRESETS = {
    "grpo": dict(aggregation="seq-mean-token-mean", eps_low=0.2, eps_high=0.2, beta=0.0),
    "dapo": dict(aggregation="token-mean", eps_low=0.2, eps_high=0.28, beta=0.0),
    "dr_grpo": dict(aggregation="seq-mean-token-sum-norm", eps_low=0.2, eps_high=0.2, beta=0.0),
    "gspo": dict(importance_sampling_level="sequence", aggregation="seq-mean-token-mean",
                 eps_low=3e-4, eps_high=4e-4, beta=0.0),
    "bnpo": dict(aggregation="token-mean", eps_low=0.2, eps_high=0.2, beta=0.0),
}


def k3_kl(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of ``KL(q || p)`` per sample ``x ~ q``: ``exp(d) - d - 1`` with
    ``d = log p(x) - log q(x)`` capped at ``LOG_RATIO_CAP`` (>= 0; gradient ``exp(d) - 1`` w.r.t. ``d``)."""
    d = log_ratio.clamp(max=LOG_RATIO_CAP)
    return torch.exp(d) - d - 1.0


def _check_real(name: str, value, *, low=None, low_open=False, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass(frozen=True)
class PolicyLossConfig:
    """Options of the clipped policy loss (see the module docstring for the math)."""

    importance_sampling_level: str = "token"  # "token" | "sequence" (GSPO)
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None  # c > 1, applies where A < 0
    beta: float = 0.0  # k3 KL to the reference (needs ref_logprobs when > 0)
    entropy_coef: float = 0.0  # loss -= entropy_coef * H, aggregated like the rest
    top_entropy_quantile: float = 1.0  # rho in (0, 1]; 1.0 = off
    aggregation: str = "token-mean"
    max_completion_length: int | None = None  # C of seq-mean-token-sum-norm (None: the batch's T)
    temperature: float = 1.0

    def __post_init__(self):
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _check_real("eps_low", self.eps_low, low=0.0)
        if self.eps_low >= 1.0:
            raise ValueError(f"eps_low must be < 1 (the lower clip bound is 1 - eps_low), got {self.eps_low}")
        _check_real("eps_high", self.eps_high, low=0.0)
        if self.dual_clip is not None:
            _check_real("dual_clip", self.dual_clip, low=1.0, low_open=True)
        _check_real("beta", self.beta, low=0.0)
        _check_real("entropy_coef", self.entropy_coef)
        _check_real("top_entropy_quantile", self.top_entropy_quantile, low=0.0, low_open=True, high=1.0)
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int)
            or self.max_completion_length <= 0
        ):
            raise ValueError(
                f"max_completion_length must be a positive int or None, got {self.max_completion_length!r}")
        _check_real("temperature", self.temperature, low=0.0, low_open=True)

    @classmethod
    def preset(cls, name: str, **overrides) -> "PolicyLossConfig":
        """The config of a named loss ("grpo", "dapo", "dr_grpo", "gspo", "bnpo"), with ``overrides``."""
        if name not in _PRESETS:
            raise ValueError(f"config preset must be one of {tuple(_PRESETS)}, got {name!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"PolicyLossConfig.preset() got unknown field(s) {sorted(unknown)}")
        return cls(**{**_PRESETS[name], **overrides})


# ---------------------------------------------------------------- validation
def _resolve_config(config) -> PolicyLossConfig:
    if isinstance(config, PolicyLossConfig):
        return config
    if isinstance(config, str):
        return PolicyLossConfig.preset(config)
    raise TypeError(f"config must be a PolicyLossConfig or a preset name, got {type(config).__name__}")


# ---------------------------------------------------------------- the pieces (O(tokens))
def _fused_logprobs_entropy(targets, valid, logits, hidden, weight, bias, cfg, ignore_index, logit_softcap,
                            backend, vocab_chunk=None, validate="auto"):
    """One fused-op call -> fp32 ``(logp, H)`` ``[B, T]``; masked positions are ignored by the op."""
    wide = widen_targets(targets).view(targets.shape)  # widen first: a narrow dtype cannot hold ignore_index
    op_targets = torch.where(valid, wide, torch.full_like(wide, ignore_index))
    if logits is not None:
        if logit_softcap is not None:
            raise ValueError("logit_softcap is supported on the hidden-state path only; "
                             "the logits path expects logits that are already soft-capped")
        from .token_ops import token_logprobs_and_entropy

        return token_logprobs_and_entropy(logits, op_targets, temperature=cfg.temperature,
                                          ignore_index=ignore_index, backend=backend, validate=validate)
    from .linear_ops import linear_logprobs_and_entropy

    return linear_logprobs_and_entropy(hidden, weight, op_targets, bias=bias, temperature=cfg.temperature,
                                       ignore_index=ignore_index, return_entropy=True,
                                       logit_softcap=logit_softcap, backend=backend, vocab_chunk=vocab_chunk,
                                       validate=validate)


def _top_entropy_keep(H: torch.Tensor, valid: torch.Tensor, rho: float) -> torch.Tensor:
    """``valid & (H >= quantile(H[valid], 1 - rho))`` with ``torch.quantile``'s linear interpolation,
    on the detached entropies and without a host sync (the valid count stays on the device)."""
    flat_h, flat_valid = H.detach().reshape(-1), valid.reshape(-1)
    n_last = (flat_valid.sum() - 1).clamp(min=0)
    # Invalid entries sort after every entropy, so the first n sorted values are the valid ones.
    ordered = torch.where(flat_valid, flat_h, torch.finfo(flat_h.dtype).max).sort().values
    pos = (1.0 - rho) * n_last.to(flat_h.dtype)
    below, above = pos.floor().long().view(1), pos.ceil().long().view(1)
    threshold = torch.lerp(ordered.gather(0, below), ordered.gather(0, above), pos - below.to(flat_h.dtype))
    return valid & (H.detach() >= threshold)


def _aggregation_weights(valid: torch.Tensor, cfg: PolicyLossConfig) -> torch.Tensor:
    """Per-token weights ``agg`` ``[B, T]`` (0 on masked tokens) so that ``loss = sum(agg * l)``."""
    m = valid.to(torch.float32)
    lengths = m.sum(-1, keepdim=True)
    if cfg.aggregation == "token-mean":
        return m / lengths.sum().clamp(min=1.0)
    n_seq = (lengths > 0).sum().to(torch.float32).clamp(min=1.0)
    if cfg.aggregation == "seq-mean-token-mean":
        return m / (lengths.clamp(min=1.0) * n_seq)
    const = cfg.max_completion_length if cfg.max_completion_length is not None else valid.shape[1]
    return m / (float(const) * n_seq)


def _constants(lp, valid, advantages, old_logprobs, ref_logprobs):
    """Detached fp32 ``(old, adv, ref)`` shaped like ``lp`` (the detached log-probs), sanitized so that masked
    positions (any value there, even -inf) give ratio 1 and KL 0. ``advantages`` per response (one dim
    fewer than ``lp``) are broadcast over the tokens."""
    f32 = torch.float32
    zero = torch.zeros((), dtype=f32, device=lp.device)
    old = lp if old_logprobs is None else torch.where(valid, old_logprobs.detach().to(f32), lp)
    adv = advantages.detach().to(f32)
    adv = torch.where(valid, adv.unsqueeze(-1) if adv.dim() < lp.dim() else adv, zero)
    ref = None if ref_logprobs is None else torch.where(valid, ref_logprobs.detach().to(f32), lp)
    return old, adv, ref


def _token_terms(logp, H, valid, keep, old, adv, ref, cfg: PolicyLossConfig):
    """Per-token ``(l, w, log_ratio, dual_active, kl_ref)`` from ``logp``/``H`` (0 on masked tokens) and the
    constants of :func:`_constants`; ``keep`` = the tokens whose policy term counts (entropy mask).

    With ``importance_sampling_level="token"`` and ``keep = valid`` every entry depends only on its own
    token: the one-pass loss (``policy_onepass``) calls this on token chunks."""
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    lp = logp.detach()
    log_ratio = logp - old
    if cfg.importance_sampling_level == "token":
        log_w = log_ratio
    else:  # GSPO-token: value log s_i on every token, d/d logp_it = 1
        m = valid.to(torch.float32)
        seq_log_ratio = (log_ratio.detach() * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        log_w = seq_log_ratio + (logp - lp)
    w = torch.exp(log_w.clamp(max=LOG_RATIO_CAP))
    w_clipped = w.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = torch.maximum(-adv * w, -adv * w_clipped)
    if cfg.dual_clip is not None:
        dual_bound = -cfg.dual_clip * adv
        dual_active = (adv < 0) & (pg.detach() > dual_bound)
        pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    else:
        dual_active = torch.zeros_like(valid)
    per_token = torch.where(keep, pg, zero)
    kl_ref = None
    if ref is not None:
        kl_ref = k3_kl(ref - logp)
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * kl_ref
    if cfg.entropy_coef != 0:
        per_token = per_token - cfg.entropy_coef * H
    return per_token, w, log_ratio, dual_active, kl_ref


def _loss_from_token_stats(logp, H, valid, advantages, old_logprobs, ref_logprobs, cfg: PolicyLossConfig):
    """The loss and metrics from fp32 ``logp``/``H`` ``[B, T]`` (0 on masked tokens); O(tokens)."""
    f32 = torch.float32
    zero = torch.zeros((), dtype=f32, device=logp.device)
    logp = torch.where(valid, logp, zero)
    H = torch.where(valid, H, zero)
    old, adv, ref = _constants(logp.detach(), valid, advantages, old_logprobs, ref_logprobs)
    keep = valid if cfg.top_entropy_quantile >= 1.0 else _top_entropy_keep(H, valid, cfg.top_entropy_quantile)
    per_token, w, log_ratio, dual_active, kl_ref = _token_terms(logp, H, valid, keep, old, adv, ref, cfg)
    loss = (per_token * _aggregation_weights(valid, cfg)).sum()

    with torch.no_grad():
        n = valid.sum().to(f32)
        inv_n = 1.0 / n.clamp(min=1.0)

        def token_mean(x):
            return torch.where(valid, x.to(f32), zero).sum() * inv_n

        wd, one = w.detach(), torch.ones((), dtype=f32, device=logp.device)
        metrics = {
            "clip_frac_low": token_mean((wd < 1.0 - cfg.eps_low) & (adv < 0)),
            "clip_frac_high": token_mean((wd > 1.0 + cfg.eps_high) & (adv > 0)),
            "clip_frac_dual": token_mean(dual_active),
            "ratio_mean": torch.where(n > 0, token_mean(wd), one),
            "ratio_min": torch.where(n > 0, torch.where(valid, wd, math.inf).amin(), one),
            "ratio_max": torch.where(n > 0, torch.where(valid, wd, -math.inf).amax(), one),
            "approx_kl": token_mean(k3_kl(log_ratio.detach())),
            "entropy_mean": token_mean(H.detach()),
            "entropy_mask_kept_frac": token_mean(keep),
        }
        if kl_ref is not None:
            metrics["kl_ref"] = token_mean(kl_ref.detach())
    return loss, metrics


# ---------------------------------------------------------------- public functional and module
def policy_loss(*, targets, mask, advantages, logits=None, hidden=None, weight=None, bias=None,
                old_logprobs=None, ref_logprobs=None, config: PolicyLossConfig | str = "grpo",
                ignore_index: int = -100, logit_softcap: float | None = None, backend: str = "auto",
                one_pass: bool | None = None, token_chunk: int | None = None, vocab_chunk: int | None = None,
                validate="auto"):
    """Clipped policy loss (GRPO, DAPO, Dr.GRPO, GSPO, BNPO) with one fused vocab pass each way.

    Args:
        targets: ``[B, T]`` integer ids of the sampled completion tokens.
        mask: ``[B, T]`` bool (or 0/1): the tokens that count. Masked positions reach the fused op
            as ``ignore_index`` (no vocab work, zero gradient); their target may be anything.
        advantages: ``[B]`` per response or ``[B, T]`` per token (GTPO); must be finite on valid tokens.
        logits: ``[B, T, V]``, OR ``hidden`` ``[B, T, D]`` with ``weight`` ``[V, D]`` (+ ``bias`` ``[V]``).
        old_logprobs: ``[B, T]`` rollout-policy log-probs; ``None`` = on-policy (ratio 1, gradient
            ``A * d logp``, i.e. REINFORCE with the aggregation's weights).
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``config.beta > 0``;
            when given, ``metrics["kl_ref"]`` is reported even with ``beta = 0``.
        config: a :class:`PolicyLossConfig` or a preset name.
        ignore_index: the id the fused op skips; must lie outside ``[0, V)``.
        logit_softcap: ``c * tanh(z / c)`` inside the fused op (hidden-state path only).
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``, passed to the fused op.
        one_pass: hidden-state path only. ``None`` (default): the one-pass loss whenever the config
            allows it and a gradient is needed, else the two-pass form; ``True``: one-pass (``ValueError``
            when the config does not allow it, or on the logits path); ``False``: two-pass. One-pass
            forms ``d loss / d hidden, weight, bias`` during the forward, per token chunk (``6 N D V``
            FLOPs instead of ``8 N D V``; ``entropy_ops.policy_onepass``). It needs every token's
            gradient to depend only on that token's ``logp``, ``H`` and constants: a token-level ratio
            (not GSPO's sequence ratio) and no entropy mask (``top_entropy_quantile = 1``); other
            configurations fall back to two passes automatically. Values and metrics are those of the
            two-pass form (up to fp32 summation order), and so are the gradients, except that on the
            Triton path with several token chunks ``d weight`` is rounded to the weight's dtype once
            per chunk (the two-pass form rounds it once). Its memory: a ``[token_chunk, V]`` workspace and no
            ``[N, V]`` nor fp32 ``[V, D]`` buffer (``policy_onepass.onepass_peak_bytes``; the module
            docstring of ``policy_onepass``).
        token_chunk: one-pass tokens per chunk (``None``: the largest multiple of 128 whose
            ``[token_chunk, V]`` workspace fits in ``policy_onepass.ONEPASS_WORKSPACE_BYTES`` = 256 MiB,
            at least 128, at most ``N``; all tokens on the CPU path).
        vocab_chunk: two-pass vocab columns per chunk of the hidden-state op (its ``vocab_chunk``).
        validate: the fused op's data-reading checks (``True`` / ``False`` / ``"auto"``: CPU only).

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-dim fp32 tensor (formula in the module docstring);
        ``metrics`` a dict of detached 0-dim fp32 tensors (defined there too).

    Host syncs: only the input checks (one for the values of the O(tokens) inputs: finite advantages,
    finite old / ref log-probs, no kept target equal to ``ignore_index``; a non-bool mask's values; the
    fused op's target range); the loss and the metrics stay on the device.
    """
    cfg = _resolve_config(config)
    valid = check_policy_inputs(targets, mask, advantages, logits, hidden, weight, bias, old_logprobs, ref_logprobs,
                                cfg, ignore_index)
    if use_one_pass(one_pass, cfg, logits, hidden, weight, bias, token_chunk=token_chunk, vocab_chunk=vocab_chunk):
        from .policy_onepass import one_pass_policy_loss

        return one_pass_policy_loss(targets, valid, advantages, hidden, weight, bias, old_logprobs, ref_logprobs, cfg,
                                    ignore_index=ignore_index, logit_softcap=logit_softcap, backend=backend,
                                    token_chunk=token_chunk, validate=validate)
    logp, H = _fused_logprobs_entropy(targets, valid, logits, hidden, weight, bias, cfg, ignore_index,
                                      logit_softcap, backend, vocab_chunk, validate)
    return _loss_from_token_stats(logp.view(targets.shape), H.view(targets.shape), valid, advantages,
                                  old_logprobs, ref_logprobs, cfg)


def policy_loss_from_logprobs(logp, entropy, *, mask, advantages, old_logprobs=None, ref_logprobs=None,
                              config: PolicyLossConfig | str = "grpo"):
    """The same loss and metrics as :func:`policy_loss` from per-token ``logp`` and ``entropy`` ``[B, T]``.

    For callers that already ran a fused op (an integration that owns the model forward): the
    gradient flows into whatever produced ``logp`` / ``entropy``. Values at masked positions are
    ignored (they must be finite: use 0). ``config.temperature`` is not applied here.
    """
    cfg = _resolve_config(config)
    for name, x in (("logp", logp), ("entropy", entropy)):
        check_float_tensor(name, x)
        if x.dim() != 2 or x.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [B, T] tensor, got shape {tuple(x.shape)}")
    if entropy.shape != logp.shape or entropy.device != logp.device:
        raise ValueError(f"entropy must have logp's shape {tuple(logp.shape)} on {logp.device}, "
                         f"got {tuple(entropy.shape)} on {entropy.device}")
    valid = check_token_inputs(logp.shape, logp.device, mask, advantages, old_logprobs, ref_logprobs, cfg)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return _loss_from_token_stats(torch.where(valid, logp, zero), torch.where(valid, entropy, zero), valid,
                                  advantages, old_logprobs, ref_logprobs, cfg)


class PolicyLoss(torch.nn.Module):
    """Module form of :func:`policy_loss`: ``PolicyLoss(config)(targets=..., mask=..., ...)``."""

    def __init__(self, config: PolicyLossConfig | str = "grpo"):
        super().__init__()
        self.config = _resolve_config(config)

    def forward(self, **kwargs):
        if "config" in kwargs:
            raise TypeError("PolicyLoss.forward() takes no config: it is set in the constructor")
        return policy_loss(config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.config)
