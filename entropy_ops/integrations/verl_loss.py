"""verl's PPO actor loss from the hidden states and the lm-head weight: :func:`fused_policy_loss`.

verl's actor scores the micro-batch in the model forward (``log_prob``, ``entropy`` ``[B, T]``), then
builds its loss from them: the ``"vanilla"`` policy loss of ``core_algos``, the entropy bonus and the
KL loss, each aggregated by ``agg_loss``, and calls ``backward``. Here the same loss is computed from
the response positions' hidden states ``h`` ``[B, T, D]`` and ``W`` ``[V, D]`` by the fused op
(``logp_t = log_softmax(h_t W^T / tau)[y_t]``, ``H_t`` its entropy; the logits never exist), in one
pass when a gradient is needed (below). verl's definitions, re-derived from its source (``M`` the
response mask, ``A`` the advantages, ``c = clip_ratio_c``, ``r`` the optional rollout weights)::

    d_t      = clamp(logp_t - old_t, -20, 20)           (old = sg(logp) when old_log_prob is None)
    w_t      = exp(d_t)
    pg_t     = max(-A w, -A clip(w, 1 - clip_ratio_low, 1 + clip_ratio_high))
    pg_t     = min(pg_t, -c A)   where A < 0             (dual clip, always on in verl)
    loss     = agg(r pg) - entropy_coeff agg(H) + kl_loss_coef agg(kl)     (kl: use_kl_loss only)

``agg(X) = sum_t a_t X_t`` with verl's per-token weights (``L_i`` the mask's count in row ``i``, ``T``
its width, ``dp``, ``n_tok``, ``G``, ``S`` from ``global_batch_info``, which verl's new-engine loss
fills and its FSDP actor leaves empty)::

    token-mean                a = M dp / n_tok             n_tok: batch_num_tokens, else sum M
    seq-mean-token-sum        a = M dp / G                 G: global_batch_size, else #rows with L_i > 0
    seq-mean-token-mean       a = M dp / ((L_i + 1e-8) G)
    seq-mean-token-sum-norm   a = M / S                    S: loss_scale_factor, else T (no division by G)

``kl`` per ``kl_loss_type``: ``kl``/``k1`` ``logp - ref``, ``abs`` ``|logp - ref|``, ``mse``/``k2``
``(logp - ref)^2 / 2``, ``low_var_kl``/``k3`` ``clamp(exp(e) - e - 1, -10, 10)`` with
``e = clamp(ref - logp, -20, 20)``. verl's FSDP actor then multiplies the loss by its
``loss_scale_factor`` (``1 / gradient_accumulation``) before ``backward``: that stays with the caller.

Reuse: the clipped surrogate with the dual clip is entropy-ops' own
(:func:`entropy_ops.policy_loss_from_logprobs`, config ``eps_low``/``eps_high``/``dual_clip`` mapped
from verl's keys). It aggregates by ``token-mean``; since the surrogate is positively homogeneous in
``A`` (``k pg(w, A) = pg(w, k A)`` for ``k >= 0``, the dual clip included), verl's weights enter as a
per-token advantage ``A' = n a r A`` (``n`` the call's valid tokens) with the clamped ``d`` as the
log-prob and ``old = 0``: exact in value and gradient. The two-sided clamp is applied here (entropy-ops
caps ``d`` only above); the k3 estimator is entropy-ops' ``k3_kl``.

One pass: every token's ``d loss / d (logp_t, H_t)`` depends only on its own ``logp_t``, ``H_t`` and
constants known before the forward (the weights ``a`` depend on the mask and ``global_batch_info``
only), so verl's vanilla loss is always eligible (``policy_checks.one_pass_eligible`` of the mapped
config: a token-level ratio, no entropy mask). The loss's gradient is then formed inside the head's
forward, per token chunk (:class:`entropy_ops.policy_onepass.OnePassLinearGradients`: ``6 N D V`` FLOPs
instead of ``8 N D V``; modeled, not yet measured on a GPU); the returned loss carries it through a
0-valued anchor. Without a gradient (``torch.no_grad()``, or neither ``h`` nor ``W`` requiring one) or
with ``one_pass=False``: the op's forward, the loss, and autograd's backward (two passes).

Not covered (``ValueError`` naming the key): ``policy_loss.loss_mode`` other than ``"vanilla"``
(gspo, sapo, gpg, clip_cov, kl_cov, geo_mean, cispo, bypass_mode), ``kl_loss_type`` ``"full"`` and the
``"+"`` straight-through variants (verl's ``kl_penalty_forward`` at the version read rejects those
names too). verl's rollout-correction metrics (``rollout_log_probs``) are not computed.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from .._validation import check_float_tensor, widen_targets
from ..policy_checks import use_one_pass
from ..policy_loss import PolicyLossConfig, k3_kl, policy_loss_from_logprobs

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_LOSS_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
GLOBAL_BATCH_KEYS = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
LOG_RATIO_CLAMP = 20.0  # verl clamps log(new / old) and log(ref / new) to [-20, 20] before exp
KL_VALUE_CLAMP = 10.0  # verl clamps its k3 estimate to [-10, 10]
SEQ_LENGTH_EPS = 1e-8  # verl's seq-mean-token-mean divides each row's sum by L_i + 1e-8
METRIC_EPS = 1e-8  # verl's masked_mean divides by the mask's count + 1e-8
# verl's ActorConfig defaults for the keys read here, except clip_ratio_low/high: missing means clip_ratio
# (verl's vanilla loss falls back to it for None).
_MISSING = object()
_DEFAULTS = dict(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                 loss_agg_mode="token-mean", entropy_coeff=0.0, calculate_entropy=False, use_kl_loss=False,
                 kl_loss_coef=0.001, kl_loss_type="low_var_kl", global_batch_info=None, policy_loss=None)


@dataclasses.dataclass(frozen=True)
class VerlLossSettings:
    """verl's actor keys, checked and mapped (:func:`verl_loss_settings`)."""

    surrogate: PolicyLossConfig  # eps_low / eps_high / dual_clip from clip_ratio_low / _high / _c
    loss_agg_mode: str
    entropy_coeff: float
    kl_loss_coef: float | None  # None: use_kl_loss is off
    kl_loss_type: str
    report_entropy: bool  # verl logs actor/entropy with calculate_entropy or entropy_coeff != 0
    dp_size: float = 1.0
    batch_num_tokens: float | torch.Tensor | None = None
    global_batch_size: float | torch.Tensor | None = None
    loss_scale_factor: float | None = None


def _number(key, value, *, low=None, low_open=False, high=None, high_open=False):
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()  # host sync, config values only
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"verl key {key} must be a finite number, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high)):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"verl key {key} must lie in {bounds}, got {value}")
    return float(value)


def _read(config: Mapping, key: str):
    """``config[key]``, or ``_MISSING``: verl's ``ActorConfig`` raises ``AttributeError`` (not ``KeyError``)
    for a key it lacks, so neither ``in`` nor ``Mapping.get`` can be used."""
    try:
        return config[key]
    except (KeyError, AttributeError):
        return _MISSING


def verl_loss_settings(actor_config: Mapping | None = None, **overrides) -> VerlLossSettings:
    """Map verl's actor config (a dict, an OmegaConf node or verl's ``ActorConfig``; ``overrides`` win) to
    :class:`VerlLossSettings`. Keys read: ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c``, ``loss_agg_mode``, ``entropy_coeff``, ``calculate_entropy``, ``use_kl_loss``,
    ``kl_loss_coef``, ``kl_loss_type``, ``global_batch_info`` (``dp_size``, ``batch_num_tokens``,
    ``global_batch_size``, ``loss_scale_factor``), ``policy_loss.loss_mode``; other keys (batch sizes,
    optimizer, ...) do not change the loss and are ignored. A value that cannot be expressed raises
    ``ValueError`` naming the key."""
    if actor_config is not None and not isinstance(actor_config, Mapping):
        raise TypeError(f"actor_config must be a mapping of verl's actor keys, got {type(actor_config).__name__}")
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown verl actor key(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    given = {} if actor_config is None else {k: _read(actor_config, k) for k in _DEFAULTS}
    cfg = {**_DEFAULTS, **{k: v for k, v in given.items() if v is not _MISSING}, **overrides}
    if cfg["policy_loss"] is not None and not isinstance(cfg["policy_loss"], Mapping):
        raise ValueError(f"verl key policy_loss must be a mapping with loss_mode, got {cfg['policy_loss']!r}")
    mode = (cfg["policy_loss"] or {}).get("loss_mode", "vanilla")
    if mode != "vanilla":
        raise ValueError(f"verl key policy_loss.loss_mode={mode!r} is not supported: only 'vanilla' (the clipped "
                         "PPO loss with dual clip) has a fused form here")
    if cfg["loss_agg_mode"] not in LOSS_AGG_MODES:
        raise ValueError(f"verl key loss_agg_mode must be one of {LOSS_AGG_MODES}, got {cfg['loss_agg_mode']!r}")
    clip = _number("clip_ratio", cfg["clip_ratio"], low=0.0)
    low_key = "clip_ratio" if cfg["clip_ratio_low"] is None else "clip_ratio_low"  # verl: None means clip_ratio
    low = _number(low_key, cfg[low_key], low=0.0, high=1.0, high_open=True)  # the lower bound 1 - low stays > 0
    high = clip if cfg["clip_ratio_high"] is None else _number("clip_ratio_high", cfg["clip_ratio_high"], low=0.0)
    dual = _number("clip_ratio_c", cfg["clip_ratio_c"], low=1.0, low_open=True)
    coeff = _number("entropy_coeff", cfg["entropy_coeff"])
    kl_type = cfg["kl_loss_type"]
    kl_coef = None
    if cfg["use_kl_loss"]:
        if kl_type not in KL_LOSS_TYPES:
            raise ValueError(f"verl key kl_loss_type must be one of {KL_LOSS_TYPES} (the '+' straight-through "
                             f"variants and 'full' have no fused form here), got {kl_type!r}")
        kl_coef = _number("kl_loss_coef", cfg["kl_loss_coef"])
    info = dict(cfg["global_batch_info"] or {})
    extra = set(info) - set(GLOBAL_BATCH_KEYS)
    if extra:
        raise ValueError(f"verl key global_batch_info has unknown entries {sorted(extra)}; known: {GLOBAL_BATCH_KEYS}")
    glob = {}
    for key in GLOBAL_BATCH_KEYS:
        value = info.get(key)
        if value is not None:
            value = _number(f"global_batch_info.{key}", value, low=0.0, low_open=True)
        glob[key] = value
    return VerlLossSettings(
        surrogate=PolicyLossConfig(eps_low=low, eps_high=high, dual_clip=dual, aggregation="token-mean"),
        loss_agg_mode=cfg["loss_agg_mode"], entropy_coeff=coeff, kl_loss_coef=kl_coef, kl_loss_type=kl_type,
        report_entropy=bool(cfg["calculate_entropy"]) or coeff != 0.0,
        dp_size=1.0 if glob["dp_size"] is None else glob["dp_size"], batch_num_tokens=glob["batch_num_tokens"],
        global_batch_size=glob["global_batch_size"], loss_scale_factor=glob["loss_scale_factor"])


# ---------------------------------------------------------------- O(tokens) pieces
def agg_weights(mask: torch.Tensor, s: VerlLossSettings, dtype=torch.float32) -> torch.Tensor:
    """verl's ``agg_loss`` as per-token weights ``a`` ``[B, T]``: ``agg_loss(X) = sum(a * X)`` (module docstring).
    A local normalizer of 0 (no valid token or row) counts as 1: the loss is 0 where verl's is 0 / 0."""
    m = mask.to(dtype)
    if s.loss_agg_mode == "seq-mean-token-sum-norm":
        return m / (mask.shape[-1] if s.loss_scale_factor is None else s.loss_scale_factor)
    if s.loss_agg_mode == "token-mean":
        n_tok = m.sum().clamp(min=1.0) if s.batch_num_tokens is None else s.batch_num_tokens
        return m * (s.dp_size / n_tok)
    lengths = m.sum(-1, keepdim=True)
    n_seq = (lengths > 0).sum().to(dtype).clamp(min=1.0) if s.global_batch_size is None else s.global_batch_size
    if s.loss_agg_mode == "seq-mean-token-sum":
        return m * (s.dp_size / n_seq)
    return m / (lengths + SEQ_LENGTH_EPS) * (s.dp_size / n_seq)


def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, kl_loss_type: str) -> torch.Tensor:
    """verl's per-token KL estimate of ``kl_loss_type`` (module docstring)."""
    if kl_loss_type in ("kl", "k1"):
        return logp - ref
    if kl_loss_type == "abs":
        return (logp - ref).abs()
    if kl_loss_type in ("mse", "k2"):
        return 0.5 * (logp - ref).square()
    return k3_kl((ref - logp).clamp(min=-LOG_RATIO_CLAMP)).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


@dataclasses.dataclass
class _Constants:
    """What the loss reads besides ``logp``/``H``, sanitized on masked tokens (``old``/``ref`` 0 there, where
    the op's ``logp`` is 0 too): ``mask`` bool, ``adv``, ``old`` (``None``: on-policy), ``ref``, ``pg_weights``
    (``a r``) and ``weights`` (``a``), all ``[R, C]``."""

    mask: torch.Tensor
    adv: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    pg_weights: torch.Tensor
    weights: torch.Tensor

    def flat_chunk(self, r0: int, r1: int) -> "_Constants":
        """The flat tokens ``[r0, r1)`` (row-major) as ``[1, r1 - r0]``."""
        return _Constants(**{f.name: (None if x is None else x.reshape(1, -1)[:, r0:r1])
                             for f in dataclasses.fields(self) for x in (getattr(self, f.name),)})


def _loss_terms(logp, H, k: _Constants, s: VerlLossSettings):
    """``(loss, pg_loss, entropy_agg, kl_loss)`` from ``logp``/``H`` ``[R, C]`` (0 on masked tokens)."""
    old = logp.detach() if k.old is None else k.old
    d = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    zeros = torch.zeros_like(d)
    n = k.mask.sum().clamp(min=1).to(d.dtype)  # the surrogate's token-mean divides by it again
    adv = torch.where(k.mask, k.adv * k.pg_weights * n, zeros)
    pg_loss, _ = policy_loss_from_logprobs(d, zeros, mask=k.mask, advantages=adv, old_logprobs=zeros,
                                           config=s.surrogate)
    entropy_agg = (H * k.weights).sum()
    loss = pg_loss - s.entropy_coeff * entropy_agg if s.entropy_coeff != 0 else pg_loss
    kl_loss = None
    if s.kl_loss_coef is not None:
        kl_loss = (kl_penalty(logp, k.ref, s.kl_loss_type) * k.weights).sum()
        loss = loss + s.kl_loss_coef * kl_loss
    return loss, pg_loss, entropy_agg, kl_loss


def _metrics(logp, k: _Constants, s: VerlLossSettings, pg_loss, entropy_agg, kl_loss):
    """verl's logged values (``actor/...``): detached 0-dim tensors (fp32, fp64 for fp64 inputs);
    ``actor/kl_coef`` the float."""
    with torch.no_grad():
        old = logp if k.old is None else k.old
        d = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        w, adv = d.exp(), k.adv
        m = k.mask.to(d.dtype)

        def masked_mean(x):
            return (x.to(d.dtype) * m).sum() / (m.sum() + METRIC_EPS)

        eps = s.surrogate
        clipped = ((w > 1.0 + eps.eps_high) & (adv > 0)) | ((w < 1.0 - eps.eps_low) & (adv < 0))
        out = {
            "actor/pg_clipfrac": masked_mean(clipped),
            "actor/ppo_kl": masked_mean(-d),
            "actor/pg_clipfrac_lower": masked_mean((w > eps.dual_clip) & (adv < 0)),
            # verl's actor subtracts the entropy bonus from the pg_loss tensor in place before logging it
            "actor/pg_loss": pg_loss - s.entropy_coeff * entropy_agg if s.entropy_coeff != 0 else pg_loss,
        }
        if s.report_entropy:
            out["actor/entropy"] = entropy_agg
        if kl_loss is not None:
            out["actor/kl_loss"] = kl_loss
        out = {key: v.detach() for key, v in out.items()}
        if kl_loss is not None:
            out["actor/kl_coef"] = s.kl_loss_coef
    return out


# ---------------------------------------------------------------- inputs
def _check_inputs(hidden_states, responses, old_log_prob, advantages, response_mask, ref_log_prob,
                  rollout_is_weights, s: VerlLossSettings) -> torch.Tensor:
    """Shapes, dtypes, devices (each message names verl's argument); returns the bool mask."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be a [B, T, D] tensor (the response positions' hidden states), got {got}")
    shape, device = hidden_states.shape[:2], hidden_states.device
    if not isinstance(responses, torch.Tensor) or responses.shape != shape:
        got = tuple(responses.shape) if isinstance(responses, torch.Tensor) else type(responses).__name__
        raise ValueError(f"responses must be a [B, T] = {tuple(shape)} tensor of token ids, got {got}")
    if responses.dtype.is_floating_point or responses.dtype.is_complex or responses.dtype == torch.bool:
        raise TypeError(f"responses must have an integer dtype, got {responses.dtype}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != shape:
        got = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
        raise ValueError(f"response_mask must be a [B, T] = {tuple(shape)} tensor, got {got}")
    if response_mask.dtype != torch.bool:
        if response_mask.dtype.is_complex or not bool(((response_mask == 0) | (response_mask == 1)).all()):
            raise ValueError("response_mask must be bool or hold only 0/1 values (fractional token weights would "
                             "change verl's normalizers)")
        response_mask = response_mask != 0
    check_float_tensor("advantages", advantages)
    if advantages.shape not in (shape, shape[:1]):
        raise ValueError(f"advantages must have shape {tuple(shape)} (per token) or ({shape[0]},), "
                         f"got {tuple(advantages.shape)}")
    if s.kl_loss_coef is not None and ref_log_prob is None:
        raise ValueError("ref_log_prob is required when use_kl_loss is true")
    named = (("old_log_prob", old_log_prob), ("ref_log_prob", ref_log_prob), ("rollout_is_weights", rollout_is_weights))
    for name, x in named:
        if x is not None:
            check_float_tensor(name, x)
            if x.shape != shape:
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    for name, x in (("responses", responses), ("response_mask", response_mask), ("advantages", advantages), *named):
        if x is not None and x.device != device:
            raise ValueError(f"{name} must be on hidden_states' device ({device}), got {x.device}")
    valid_adv = response_mask if advantages.dim() == 2 else response_mask.any(-1)
    if bool((~torch.isfinite(advantages) & valid_adv).any()):  # host sync, as verl's loss would NaN
        raise ValueError("advantages must be finite on the response_mask's tokens")
    if rollout_is_weights is not None and bool(((~torch.isfinite(rollout_is_weights) | (rollout_is_weights < 0))
                                                & response_mask).any()):
        raise ValueError("rollout_is_weights must be finite and >= 0 on the response_mask's tokens")
    return response_mask


def _constants(mask, advantages, old_log_prob, ref_log_prob, rollout_is_weights, s, dtype) -> _Constants:
    zero = torch.zeros((), dtype=dtype, device=mask.device)

    def tokens(x):
        return None if x is None else torch.where(mask, x.detach().to(dtype).expand(mask.shape), zero)

    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    weights = agg_weights(mask, s, dtype)
    pg_weights = weights if rollout_is_weights is None else weights * tokens(rollout_is_weights)
    return _Constants(mask=mask, adv=tokens(adv), old=tokens(old_log_prob), ref=tokens(ref_log_prob),
                      pg_weights=pg_weights, weights=weights)


# ---------------------------------------------------------------- public
def fused_policy_loss(hidden_states, lm_head_weight, responses, old_log_prob, advantages, response_mask, *,
                      actor_config: Mapping | VerlLossSettings | None = None, ref_log_prob=None,
                      rollout_is_weights=None, temperature=1.0, one_pass: bool | None = None, backend: str = "auto",
                      token_chunk: int | None = None, **config_overrides):
    """verl's actor loss (vanilla PPO policy loss, entropy bonus, KL loss) and metrics from hidden states.

    Args:
        hidden_states: ``[B, T, D]``: the hidden state that predicts each response token (row ``t``
            scores ``responses[:, t]``: the model's last hidden states at the positions before the
            response tokens, unpadded to the responses' ``[B, T]`` layout).
        lm_head_weight: ``[V, D]``, same dtype and device (fp32, bf16, fp16; fp64 on the CPU path).
        responses: ``[B, T]`` integer token ids (verl's ``responses``).
        old_log_prob: ``[B, T]`` (verl's ``old_log_probs``), or ``None`` on-policy (verl's actor uses
            ``log_prob.detach()`` when the batch is one mini-batch of one epoch).
        advantages: ``[B, T]`` (or ``[B]``, broadcast over the tokens).
        response_mask: ``[B, T]`` bool or 0/1.
        actor_config: verl's actor config (``actor_rollout_ref.actor``: a dict, an OmegaConf node, verl's
            ``ActorConfig``) or :class:`VerlLossSettings`; ``config_overrides`` set single keys
            (:func:`verl_loss_settings` lists what is read; defaults are ``ActorConfig``'s). verl's
            new-engine loss rewrites ``global_batch_info`` per micro-batch: map the config at each call
            (pass the config itself, not a :class:`VerlLossSettings` made once, when it changes).
        ref_log_prob: ``[B, T]``, required with ``use_kl_loss``.
        rollout_is_weights: optional ``[B, T]`` rollout-correction weights (``>= 0``) on the policy term.
        temperature: a float, or a ``[B, T]`` tensor of per-token temperatures.
        one_pass: ``None``: one pass when a gradient is needed; ``True``: always; ``False``: two passes.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` (the fused op's).
        token_chunk: one-pass tokens per chunk (``None``: the one-pass default).

    Returns:
        ``(loss, metrics)``: ``loss`` verl's ``policy_loss`` before the actor's ``loss_scale_factor``
        (0-dim; fp32, fp64 for fp64 inputs), gradients reaching ``hidden_states`` and
        ``lm_head_weight``; ``metrics`` verl's names (``actor/pg_clipfrac``, ``actor/ppo_kl``,
        ``actor/pg_clipfrac_lower``, ``actor/pg_loss``, and ``actor/entropy`` with ``calculate_entropy``
        or ``entropy_coeff != 0``, ``actor/kl_loss`` and ``actor/kl_coef`` with ``use_kl_loss``), per
        micro-batch: verl's actor sums ``actor/pg_loss`` and ``actor/kl_loss`` times its
        ``loss_scale_factor`` over the micro-batches, and calls ``.item()`` on each.
    """
    from ..linear_ops import linear_logprobs_and_entropy, linear_op_params
    from ..policy_onepass import OnePassLinearGradients, OnePassParams
    from .verl import _per_token_temperature, _prescale

    if isinstance(actor_config, VerlLossSettings):
        if config_overrides:
            raise TypeError("config overrides need actor_config as a mapping, not VerlLossSettings")
        s = actor_config
    else:
        s = verl_loss_settings(actor_config, **config_overrides)
    mask = _check_inputs(hidden_states, responses, old_log_prob, advantages, response_mask, ref_log_prob,
                         rollout_is_weights, s)
    if not isinstance(lm_head_weight, torch.Tensor):
        raise TypeError(f"lm_head_weight must be a [V, D] tensor, got {type(lm_head_weight).__name__}")
    dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
    k = _constants(mask, advantages, old_log_prob, ref_log_prob, rollout_is_weights, s, dtype)
    temperature, per_token = _per_token_temperature(temperature, hidden_states.shape[:-1])
    if per_token is not None:
        hidden_states = _prescale(hidden_states, per_token)
    wide = widen_targets(responses).view(mask.shape)
    targets = torch.where(mask, wide, torch.full_like(wide, -100))

    if token_chunk is not None and (isinstance(token_chunk, bool) or not isinstance(token_chunk, int)
                                    or token_chunk < 1):
        raise ValueError(f"token_chunk must be an int >= 1 or None, got {token_chunk!r}")
    if not use_one_pass(one_pass, s.surrogate, None, hidden_states, lm_head_weight, None):
        logp, H = linear_logprobs_and_entropy(hidden_states, lm_head_weight, targets, temperature=temperature,
                                              backend=backend)
        loss, pg_loss, entropy_agg, kl_loss = _loss_terms(logp.to(dtype), H.to(dtype), k, s)
        return loss, _metrics(logp.detach().to(dtype), k, s, pg_loss, entropy_agg, kl_loss)

    def grad_fn(r0, r1, logp_c, H_c):
        """``d loss / d (logp, H)`` of the flat tokens ``[r0, r1)``: the same terms on the chunk."""
        with torch.enable_grad():
            lp = logp_c.detach().to(dtype).unsqueeze(0).requires_grad_(True)
            ent = H_c.detach().to(dtype).unsqueeze(0).requires_grad_(True)
            loss_c = _loss_terms(lp, ent, k.flat_chunk(r0, r1), s)[0]
            g_lp, g_ent = torch.autograd.grad(loss_c, (lp, ent), allow_unused=True)
        g_lp = torch.zeros_like(lp) if g_lp is None else g_lp
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
        return g_lp.squeeze(0).to(logp_c.dtype), g_ent.squeeze(0).to(H_c.dtype)

    with torch.autocast(hidden_states.device.type, enabled=False):
        op = linear_op_params(hidden_states, lm_head_weight, None, targets, temperature=temperature, ignore_index=-100,
                              logit_softcap=None, allow_tf32=False, backend=backend)
        anchor, logp, H = OnePassLinearGradients.apply(hidden_states, lm_head_weight, None, targets.reshape(-1),
                                                       grad_fn, OnePassParams(op, token_chunk))
    logp, H = logp.view(mask.shape).to(dtype), H.view(mask.shape).to(dtype)
    with torch.no_grad():
        loss, pg_loss, entropy_agg, kl_loss = _loss_terms(logp, H, k, s)
    return loss + anchor.to(loss.dtype), _metrics(logp, k, s, pg_loss, entropy_agg, kl_loss)
