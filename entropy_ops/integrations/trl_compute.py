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
(``k pg(w, A) = pg(w, k A)`` for ``k >= 0``, the dual clip included), so ``W c A / (W-mean)`` goes in as
a per-token advantage under ``token-mean`` aggregation, and ``log_w`` goes in as the log-prob with
``old = 0`` (the surrogate reads only ``logp - old``). Exact in value and gradient.

Metrics: TRL's names and counting (``entropy``, ``kl``, ``clip_ratio/{low,high,region}_mean`` per token,
or per response where the ratio is per response, ``clip_ratio/low_min``, ``clip_ratio/high_max``,
``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss`` and ``entropy_coef`` with the bonus,
``aux_loss``), reduced over processes as TRL reduces them.
"""
from __future__ import annotations

import torch
from trl.trainer.utils import nanmax, nanmin

from ..policy_loss import k3_kl, policy_loss_from_logprobs
from . import trl_losses as L

_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def fused_grpo_loss(trainer, model, inputs, surrogate_config):
    """TRL's ``GRPOTrainer._compute_loss`` (loss and logged metrics) on the fused head; module docstring."""
    args, loss_type = trainer.args, trainer.loss_type
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    logp, H, aux_loss = trainer._get_per_token_logps_and_entropies(
        model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled, **{k: inputs.get(k) for k in _MULTIMODAL})

    entropy_mask = None
    if trainer.top_entropy_quantile < 1.0:
        entropy_mask = trainer.get_high_entropy_mask(H, mask, 1 - trainer.top_entropy_quantile)
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    log_ratio = logp - old
    if trainer.importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef = torch.exp(log_w)

    factor = None  # c_it, the product of the options' 0/1 masks and the vLLM ratio
    if trainer.off_policy_mask_threshold is not None:
        factor = L.off_policy_sequence_mask(advantages, logp, inputs.get("sampling_per_token_logps", old), mask,
                                            trainer.off_policy_mask_threshold)
    if entropy_mask is not None:
        factor = _times(factor, entropy_mask)
    if loss_type == "vespo":  # VESPO reads the ratio whenever the batch has one, into its weight
        is_ratio = inputs.get("importance_sampling_ratio")
    elif _vllm_is_on(trainer):
        is_ratio = inputs["importance_sampling_ratio"]
        factor = _times(factor, is_ratio)

    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    weights = L.trl_aggregation_weights(loss_type, mask, max_completion_length=trainer.max_completion_length,
                                        global_normalizer=_global_token_normalizer(trainer, inputs, mode))
    phi = None
    if loss_type in L.CLIPPED_LOSS_TYPES:
        loss = _clipped_surrogate(log_w, H, mask, advantages, factor, weights, surrogate_config)
    else:
        if loss_type == "cispo":
            per_token = L.cispo_token_loss(logp, coef, advantages, trainer.epsilon_high)
        elif loss_type == "sapo":
            per_token = L.sapo_token_loss(coef, advantages, args.sapo_temperature_pos, args.sapo_temperature_neg)
        else:
            phi = L.vespo_gamma_weights(log_ratio, mask, advantages, is_ratio, k_pos=args.vespo_k_pos,
                                        lambda_pos=args.vespo_lambda_pos, k_neg=args.vespo_k_neg,
                                        lambda_neg=args.vespo_lambda_neg)
            per_token = L.vespo_token_loss(logp, phi, advantages)
        loss = (_times(factor, per_token) * weights).sum()
    per_token_kl = None
    if trainer.beta != 0.0:
        per_token_kl = k3_kl(inputs["ref_per_token_logps"] - logp)
        if args.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef
        loss = loss + (trainer.beta * per_token_kl * weights).sum()
    policy_loss = loss.detach()
    if loss_type not in L.GLOBAL_TOKEN_NORMALIZED:
        loss = loss / accumulation

    if trainer._entropy_bonus_enabled:
        bonus = L.entropy_bonus(H, mask, entropy_mask) / accumulation
        loss = loss - _entropy_coef_to_apply(trainer) * bonus
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
        if trainer.use_adaptive_entropy and mode == "train":
            _step_adaptive_entropy(trainer, H, mask if entropy_mask is None else mask * entropy_mask)
        if mode == "train" and trainer.accelerator.sync_gradients:
            trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / accumulation
        trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    _log_metrics(trainer, mode, mask, H, per_token_kl, coef, advantages, phi)
    return loss


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
