"""TRL 1.16's GRPO loss on entropy-ops' per-token log-probs and entropies: :func:`fused_grpo_loss`.

One fused forward of the policy gives ``logp`` and ``H`` (``[B, T]``, no logits); everything after is
O(tokens) and composes TRL's per-token loss in TRL's order (notation of :mod:`.trl_losses`)::

    l_it = c_it * policy_it + beta * kl_it
    c_it = off_i * emask_it * r_it                 (each factor 1 when its option is off)
    loss = sum_it W_it l_it / g  -  coef * bonus / g'

- ``policy``: the clipped surrogate ``-min(w A, clip(w, 1 - eps_low, 1 + eps_high) A)`` (grpo, bnpo,
  dr_grpo, dapo, luspo; ``delta`` as a dual clip) by :func:`entropy_ops.policy_loss_from_logprobs`,
  or CISPO / SAPO / VESPO (:mod:`.trl_losses`). ``w = exp(log_w)`` is the token ratio or, with
  ``importance_sampling_level="sequence"``, the sequence ratio broadcast over the response, whose
  gradient reaches every token of the response (``d log_w_i / d logp_it = m_it / L_i``), as in TRL.
- ``off``: the off-policy sequence mask (``off_policy_mask_threshold``); ``emask``: the top-entropy
  mask (``top_entropy_quantile < 1``, TRL's own quantile over all processes); ``r``: vLLM's
  importance-sampling ratio ``inputs["importance_sampling_ratio"]`` (``[B, T]`` token modes,
  ``[B, 1]`` sequence modes; truncated or masked by TRL when it scores the batch), applied when
  ``use_vllm`` and ``vllm_importance_sampling_correction`` and the loss is not VESPO (VESPO folds
  ``r`` into its sequence weight).
- ``kl``: k3 ``exp(ref - logp) - (ref - logp) - 1``, times ``w`` (differentiable) with
  ``use_bias_correction_kl``.
- ``W``: :func:`.trl_losses.trl_aggregation_weights`; ``g`` the gradient-accumulation steps in
  training (1 for cispo/dapo/vespo, whose normalizer already counts them); ``bonus``:
  :func:`.trl_losses.entropy_bonus`, ``g'`` the accumulation steps, ``coef`` = ``entropy_coef``
  (adaptive: TRL's controller, stepped on the same trainer state).

How the clipped surrogate takes the factors: it is positively homogeneous in ``A``
(``k pg(w, A) = pg(w, k A)`` for ``k >= 0``, the dual clip included), so ``A' = N W c A`` goes in as a
per-token advantage under ``token-mean`` aggregation (which divides by the ``N`` valid tokens), and
``log_w`` goes in as the log-prob with ``old = 0`` (the surrogate reads only ``logp - old``). Exact in
value and gradient.

Everything but ``logp``/``H`` is a :class:`_Constants` of the micro-batch, so the loss is a sum of
per-token terms with fixed weights (:func:`_loss_from_token_stats`). Two passes: the head's forward,
this sum, autograd's backward. One pass (``one_pass=True``, :mod:`.trl_onepass`): the same function on
chunks of flattened completion tokens gives each chunk's ``d loss / d (logp, H)`` inside the head's
forward; the value and the metrics come from the same function on the pass's (detached) outputs.

Metrics: TRL's names and counting (``entropy``, ``kl``, ``clip_ratio/{low,high,region}_mean`` per token,
or per response where the ratio is per response, ``clip_ratio/low_min``, ``clip_ratio/high_max``,
``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` with the bonus,
``aux_loss``), reduced over processes as TRL reduces them.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from trl.trainer.utils import nanmax, nanmin

from ..policy_loss import k3_kl, policy_loss_from_logprobs
from . import trl_losses as L

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclasses.dataclass
class _Constants:
    """What TRL's per-token loss reads besides ``logp``/``H``: all fixed before the forward, or (two-pass
    only) computed from its detached outputs (the entropy and off-policy masks, folded into ``factor``).

    ``mask`` ``[B, T]``; ``advantages``/``factor`` ``[B, 1]`` or ``[B, T]``; ``old``/``ref`` ``[B, T]`` or
    ``None``; ``weights`` ``W`` and ``bonus_weights`` (``e / (max(sum e, 1) g')``, ``None`` without the
    bonus) ``[B, T]``; ``divisor`` ``g``; ``bonus_coef`` the entropy coefficient to apply."""

    mask: torch.Tensor
    advantages: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    factor: torch.Tensor | None
    is_ratio: torch.Tensor | None
    weights: torch.Tensor
    bonus_weights: torch.Tensor | None
    divisor: float
    bonus_coef: float

    def token_rows(self, selected: torch.Tensor) -> "_Constants":
        """The same constants for the tokens ``selected`` (bool ``[B, T]``), flattened row-major, as ``[1, n]``."""
        shape = selected.shape

        def rows(x):
            return x if not isinstance(x, torch.Tensor) else x.expand(shape)[selected].unsqueeze(0)

        return _Constants(**{f.name: rows(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def chunk(self, r0: int, r1: int) -> "_Constants":
        """Columns ``[r0, r1)`` of flattened constants (:meth:`token_rows`)."""
        return _Constants(**{f.name: (x[:, r0:r1] if isinstance(x, torch.Tensor) else x)
                             for f in dataclasses.fields(self) for x in (getattr(self, f.name),)})


def fused_grpo_loss(trainer, model, inputs, surrogate_config, one_pass=False):
    """TRL's ``GRPOTrainer._compute_loss`` (loss and logged metrics) on the fused head; module docstring.

    ``one_pass``: the gradient is formed during the forward (:mod:`.trl_onepass`; the plan allows it only
    for a token-level ratio without the entropy or off-policy mask, not VESPO); batches with
    vision inputs use two passes.
    """
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mode = "train" if trainer.model.training else "eval"
    multimodal = {k: inputs.get(k) for k in _MULTIMODAL}
    if one_pass and all(v is None for v in multimodal.values()):
        consts = _constants(trainer, inputs, mask, mode, entropy_mask=None, factor=None)
        from .trl_onepass import one_pass_logprobs

        logp, H, aux_loss, anchor = one_pass_logprobs(
            trainer, model, input_ids, attention_mask, completion_ids.size(1),
            _chunk_grad_fn(trainer, consts.token_rows(completion_mask.bool()), surrogate_config))
        entropy_mask = None
    else:
        logp, H, aux_loss = trainer._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=trainer.aux_loss_enabled, **multimodal)
        anchor = None
        entropy_mask = None
        if trainer.top_entropy_quantile < 1.0:
            entropy_mask = trainer.get_high_entropy_mask(H, mask, 1 - trainer.top_entropy_quantile)
        factor = None  # the options' 0/1 masks, computed from this forward's (detached) outputs
        if trainer.off_policy_mask_threshold is not None:
            old = inputs.get("old_per_token_logps")
            old = logp.detach() if old is None else old
            advantages = inputs["advantages"]
            factor = L.off_policy_sequence_mask(advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                                                logp, inputs.get("sampling_per_token_logps", old), mask,
                                                trainer.off_policy_mask_threshold)
        if entropy_mask is not None:
            factor = _times(factor, entropy_mask)
        consts = _constants(trainer, inputs, mask, mode, entropy_mask=entropy_mask, factor=factor)

    with torch.no_grad() if anchor is not None else contextlib.nullcontext():
        loss, policy_loss, per_token_kl, coef, phi = _loss_from_token_stats(trainer, logp, H, consts,
                                                                             surrogate_config)
    if anchor is not None:
        loss = loss + anchor  # value from the pass's log-probs, gradient formed during it
    if trainer._entropy_bonus_enabled:
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
        if trainer.use_adaptive_entropy and mode == "train":
            _step_adaptive_entropy(trainer, H.detach(), mask if entropy_mask is None else mask * entropy_mask)
        if mode == "train" and trainer.accelerator.sync_gradients:
            trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / accumulation
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log_metrics(trainer, mode, mask, H, per_token_kl, coef, consts.advantages, phi)
    return loss


def _constants(trainer, inputs, mask, mode, *, entropy_mask, factor):
    """The :class:`_Constants` of this micro-batch (``factor``: the masks computed from the forward, or ``None``)."""
    loss_type = trainer.loss_type
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    is_ratio = None
    if loss_type == "vespo":  # VESPO reads the ratio whenever the batch has one, into its weight
        is_ratio = inputs.get("importance_sampling_ratio")
    elif _vllm_is_on(trainer):
        factor = _times(factor, inputs["importance_sampling_ratio"])
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    weights = L.trl_aggregation_weights(loss_type, mask, max_completion_length=trainer.max_completion_length,
                                        global_normalizer=_global_token_normalizer(trainer, inputs, mode))
    bonus_weights = None
    if trainer._entropy_bonus_enabled:
        effective = (mask if entropy_mask is None else mask * entropy_mask).to(torch.float32)
        bonus_weights = effective / (effective.sum().clamp(min=1.0) * accumulation)
    return _Constants(
        mask=mask, advantages=advantages, old=inputs.get("old_per_token_logps"),
        ref=inputs["ref_per_token_logps"] if trainer.beta != 0.0 else None, factor=factor, is_ratio=is_ratio,
        weights=weights, bonus_weights=bonus_weights,
        divisor=1.0 if loss_type in L.GLOBAL_TOKEN_NORMALIZED else accumulation,
        bonus_coef=_entropy_coef_to_apply(trainer) if trainer._entropy_bonus_enabled else 0.0)


def _loss_from_token_stats(trainer, logp, H, k: _Constants, surrogate_config):
    """``(loss, policy_loss, per_token_kl, coef, phi)``: TRL's loss as a sum of per-token terms with the
    constant weights ``k`` (``[B, T]``, or flattened ``[1, n]`` token rows with a token-level ratio)."""
    args, loss_type = trainer.args, trainer.loss_type
    mask, advantages = k.mask, k.advantages
    old = logp.detach() if k.old is None else k.old
    log_ratio = logp - old
    if trainer.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef = torch.exp(log_w)
    phi = None
    if loss_type in L.CLIPPED_LOSS_TYPES:
        loss = _clipped_surrogate(log_w, H, mask, advantages, k.factor, k.weights, surrogate_config)
    else:
        if loss_type == "cispo":
            per_token = L.cispo_token_loss(logp, coef, advantages, trainer.epsilon_high)
        elif loss_type == "sapo":
            per_token = L.sapo_token_loss(coef, advantages, args.sapo_temperature_pos, args.sapo_temperature_neg)
        else:
            phi = L.vespo_gamma_weights(log_ratio, mask, advantages, k.is_ratio, k_pos=args.vespo_k_pos,
                                        lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                                        lambda_neg=args.vespo_lambda_neg)
            per_token = L.vespo_token_loss(logp, phi, advantages)
        loss = (_times(k.factor, per_token) * k.weights).sum()
    per_token_kl = None
    if k.ref is not None:
        per_token_kl = k3_kl(k.ref - logp)
        if args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef
        loss = loss + (trainer.beta * per_token_kl * k.weights).sum()
    policy_loss = loss.detach()
    loss = loss / k.divisor
    if k.bonus_weights is not None:
        loss = loss - k.bonus_coef * (H * k.bonus_weights).sum()
    return loss, policy_loss, per_token_kl, coef, phi


def _chunk_grad_fn(trainer, flat: _Constants, surrogate_config):
    """``grad_fn(r0, r1, logp, H) -> (d loss / d logp, d loss / d H)`` of the flattened completion tokens
    ``[r0, r1)``: the same per-token terms as :func:`_loss_from_token_stats` (token-level ratio only)."""

    def grad_fn(r0, r1, logp_c, H_c):
        with torch.enable_grad():
            lp = logp_c.detach().to(torch.float32).unsqueeze(0).requires_grad_(True)
            ent = H_c.detach().to(torch.float32).unsqueeze(0).requires_grad_(True)
            loss = _loss_from_token_stats(trainer, lp, ent, flat.chunk(r0, r1), surrogate_config)[0]
            g_lp, g_ent = torch.autograd.grad(loss, (lp, ent), allow_unused=True)
        g_lp = torch.zeros_like(lp) if g_lp is None else g_lp
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent
        return g_lp.squeeze(0).to(logp_c.dtype), g_ent.squeeze(0).to(H_c.dtype)

    return grad_fn


def _times(a, b):
    return b if a is None else a * b


def _vllm_is_on(trainer) -> bool:
    return bool(trainer.use_vllm and trainer.vllm_importance_sampling_correction)


def _global_token_normalizer(trainer, inputs, mode):
    """TRL's normalizer of cispo/dapo/vespo: the generation batch's token count, per process and accumulation step."""
    if trainer.loss_type not in L.GLOBAL_TOKEN_NORMALIZED:
        return None
    normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
    if mode == "train":
        normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
    return normalizer


def _clipped_surrogate(log_w, H, mask, advantages, factor, weights, config):
    """``sum_it W_it c_it pg(w_it, A_it)`` through entropy-ops' surrogate (module docstring: homogeneity in ``A``)."""
    valid = mask.bool()
    shape = mask.shape
    n_valid = valid.sum().to(torch.float32).clamp(min=1.0)
    scale = _times(factor, weights) * n_valid  # token-mean divides by n_valid again
    adv = torch.where(valid, (advantages * scale).expand(shape), 0.0).to(torch.float32)
    zeros = torch.zeros(shape, dtype=torch.float32, device=mask.device)
    loss, _ = policy_loss_from_logprobs(log_w.expand(shape).to(torch.float32), H.detach().to(torch.float32),
                                        mask=valid, advantages=adv, old_logprobs=zeros, config=config)
    return loss


def _entropy_coef_to_apply(trainer):
    """The bonus coefficient of this micro-batch: the static coefficient, or the adaptive one while the last
    optimizer step's world entropy was at or below ``entropy_target`` (0 above it)."""
    if trainer.use_adaptive_entropy:
        return trainer.entropy_coef if trainer._last_world_entropy <= trainer.args.entropy_target else 0.0
    return trainer.entropy_coef


def _step_adaptive_entropy(trainer, H, effective_mask):
    """TRL's adaptive entropy controller on the trainer's own state (saved in its checkpoints): sum the window's
    entropy and token count; at the optimizer-step boundary take the global mean over processes and move
    ``entropy_coef`` by ``entropy_coef_delta`` (up when the mean is at or below ``entropy_target``, down
    otherwise) within ``[entropy_coef_min, entropy_coef_max]``."""
    args = trainer.args
    stats = torch.stack([(H * effective_mask).sum(), effective_mask.sum()]).detach()
    window = trainer._entropy_window_stats
    trainer._entropy_window_stats = stats if window is None else window + stats
    if not trainer.accelerator.sync_gradients:
        return
    totals = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
    world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
    if world_entropy <= args.entropy_target:
        trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    trainer._last_world_entropy = world_entropy
    trainer._entropy_window_stats = None


def _log_metrics(trainer, mode, mask, H, per_token_kl, coef, advantages, phi):
    """TRL's loss metrics: a ``[B, 1]`` quantity counts once per response (all ``B`` rows), a ``[B, T]`` one per
    masked-in token; sums and counts are reduced over processes before dividing."""
    metrics = trainer._metrics[mode]

    def global_mean(x):
        if x.shape[1] == 1:
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
        totals = trainer.accelerator.reduce(local, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def per_response_mean(x):  # NaN for an empty response: nanmin/nanmax skip it
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    if per_token_kl is not None:
        metrics["kl"].append(global_mean(per_token_kl.detach()))
    metrics["entropy"].append(global_mean(H.detach()))
    coef = coef.detach()
    if trainer.loss_type in L.CLIPPED_LOSS_TYPES:
        if trainer.args.delta is not None:
            coef = coef.clamp(max=trainer.args.delta)
        low = ((coef < 1 - trainer.epsilon_low) & (advantages < 0)).float()
        high = ((coef > 1 + trainer.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(per_response_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(trainer.accelerator.gather(per_response_mean(high))).item())
    elif trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_mean(((coef > trainer.epsilon_high) & (advantages > 0)).float()))
    elif trainer.loss_type == "vespo":
        metrics["vespo/phi_seq_mean"].append(global_mean(phi))
