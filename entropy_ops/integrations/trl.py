"""TRL integration: ``GRPOTrainer`` on entropy-ops' fused log-prob/entropy op and policy loss.

Two pieces, usable apart:

1. :func:`add_fused_lm_head` gives a model TRL's fused-LM-head protocol (TRL >= 1.16 calls
   ``model(..., labels=labels, fused_lm_head=True)`` and reads ``.log_probs``/``.entropy``, shape
   ``[B, T - 1]``, position ``j`` predicting token ``j + 1``, 0 where the label is ``-100``) on
   :func:`entropy_ops.integrations.hf.head_logprobs_and_entropy`: the body runs once, only the
   labelled rows reach the vocabulary, and no logits exist. It goes through ``model.forward``, so
   DDP/FSDP hooks still fire. Every TRL trainer that uses the protocol (GRPO, RLOO, DPO, KTO, SFT)
   can use it; only ``log_probs`` and ``entropy`` are computed (TRL's other fields are ``None``).
2. :class:`FusedGRPOTrainer` is ``GRPOTrainer`` with that head on the policy and the reference
   model, and with the loss computed by :mod:`entropy_ops.policy_loss` from those per-token
   ``logp``/``H`` (``fused_loss=False`` keeps TRL's own loss on our log-probs instead).

Mapping of ``GRPOConfig`` onto :class:`~entropy_ops.PolicyLossConfig`
(:func:`policy_loss_config_from_grpo_args`)::

    epsilon -> eps_low, epsilon_high (None: epsilon) -> eps_high, beta -> beta (k3 KL),
    importance_sampling_level -> same, top_entropy_quantile -> same, temperature -> same (applied
    in the head), delta -> dual_clip (exact when delta >= 1 + epsilon_high, see below),
    loss_type:  grpo -> seq-mean-token-mean        bnpo, dapo -> token-mean
                dr_grpo -> seq-mean-token-sum-norm, max_completion_length
                luspo -> seq-mean-token-sum-norm with a constant of 1 (a per-sequence token sum)

then TRL's normalizers on top: ``grpo``/``dr_grpo``/``luspo`` divide by all ``B`` rows where
entropy-ops divides by the non-empty ones (the loss is multiplied by ``G / B``); ``dapo`` divides
the token sum by TRL's ``num_items_in_batch`` normalizer instead of this micro-batch's count; all
but ``dapo`` divide by the gradient-accumulation steps in training. With these, loss and gradients
equal TRL's (tested to 1e-5 for grpo, bnpo, dr_grpo, dapo, luspo, token and sequence level).
Why ``delta`` maps: TRL clamps the ratio at ``delta`` before the usual ``-min(w A, clip(w) A)``.
With ``delta >= 1 + eps_high`` that changes nothing where ``A > 0`` and equals the dual clip
``min(pg, -delta A)`` where ``A < 0``, in value and gradient.

Refused with ``NotImplementedError`` (not expressible as this loss, so no silent difference):
``loss_type`` cispo (a detached clipped-ratio weight on ``logp``), sapo (a sigmoid gate) and vespo
(gamma-weighted sequence ratios); vLLM importance-sampling correction (a per-token rollout ratio
factor); ``off_policy_mask_threshold`` (sequence drop mask); ``use_bias_correction_kl`` with ``beta > 0``
(TRL's default multiplies the KL by the differentiable ratio; pass ``use_bias_correction_kl=False``
for the plain k3 KL); the
entropy bonus (``entropy_coef``/``use_adaptive_entropy``: TRL normalizes it as a token mean over
the entropy-masked tokens, independent of ``loss_type``); ``top_entropy_quantile < 1`` with
``importance_sampling_level="sequence"`` (TRL broadcasts the sequence term over the kept tokens;
ours is GSPO-token, see policy_loss) or with several processes (TRL's quantile is over all
ranks, ours per rank); per-token advantages with sequence-level ratios (checked per batch,
``ValueError``); ``delta < 1 + epsilon_high``; DeepSpeed ZeRO-3 (our backward re-reads the head).
``fused_loss=False`` lifts all of these except ZeRO-3: TRL's loss then runs on our log-probs.

Logged metrics: ``entropy``, ``kl`` (beta > 0), ``clip_ratio/{low,high,region}_mean`` under TRL's
names (with sequence-level ratios counted per token, where TRL counts one per sequence), and
``aux_loss`` for MoE models; TRL's per-sequence ``clip_ratio/low_min``/``high_max`` are not logged.
"""
from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..policy_loss import PolicyLossConfig
from ..policy_loss import policy_loss_from_logprobs
from .hf import head_logprobs_and_entropy, model_body, output_head, scatter_rows

OUTPUT_FIELDS = ("log_probs", "entropy")
_AGGREGATION = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean",
                "dr_grpo": "seq-mean-token-sum-norm", "luspo": "seq-mean-token-sum-norm"}
_REFUSED_LOSS_TYPES = {
    "cispo": "its loss is a detached, clipped ratio times logp (REINFORCE-style), not a clipped surrogate",
    "sapo": "it replaces the clip by a sigmoid gate of the ratio",
    "vespo": "it weights logp by gamma functions of the sequence ratio",
}


def add_fused_lm_head(model, *, temperature: float = 1.0, outputs=("log_probs",), cast_lm_head_to_fp32=False,
                      backend: str = "auto") -> None:
    """Patch ``model.forward`` so that ``model(..., labels=..., fused_lm_head=True)`` runs entropy-ops.

    Same calling convention as TRL's ``trl.trainer.utils.add_fused_lm_head``: ``labels`` ``[B, T]``
    (``-100`` = not scored) are shifted here (``log_probs[:, j]`` scores ``labels[:, j + 1]``);
    pre-shifted ``shift_labels`` are used as given. Returns a ``FusedCausalLMOutput`` with
    ``log_probs``, ``entropy`` (when in ``outputs``), ``loss = -sum(log_probs) / count``
    (or ``/ num_items_in_batch``), ``label_mask`` and, for MoE models asked for router logits,
    ``aux_loss`` (added to ``loss`` with ``router_aux_loss_coef``). Without ``fused_lm_head`` the
    previous forward runs unchanged (generation is untouched). The model must be a family that
    :func:`entropy_ops.integrations.hf.output_head` supports; ``temperature`` divides the logits.
    """
    unknown = set(outputs) - set(OUTPUT_FIELDS)
    if unknown or "log_probs" not in outputs:
        raise ValueError(f"outputs must contain 'log_probs' and only fields among {OUTPUT_FIELDS}, got {outputs!r}")
    output_head(model)  # fail now, not at the first training step, for an unsupported family
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    want_entropy = "entropy" in outputs
    compute_dtype = torch.float32 if cast_lm_head_to_fp32 else None

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates kwargs against it
    def fused_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                      **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        _refuse_zero3()
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        body_out = model_body(self)(*args, **kwargs)
        hidden = body_out.last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = _full_head(output_head(self))  # looked up per call: FSDP/PEFT may have replaced it
        labels = labels.to(head.weight.device)
        mask = labels != -100
        logp, H = head_logprobs_and_entropy(head, hidden[mask.to(hidden.device)], labels[mask],
                                            temperature=temperature, return_entropy=want_entropy,
                                            backend=backend, dtype=compute_dtype)
        log_probs = scatter_rows(logp, mask)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux_loss = load_balancing_loss_func(body_out.router_logits, text_config.num_experts,
                                                text_config.num_experts_per_tok, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs,
                                   entropy=scatter_rows(H, mask) if want_entropy else None,
                                   label_mask=mask, aux_loss=aux_loss)

    model.forward = types.MethodType(fused_forward, model)


def _full_head(head):
    """FSDP2 shards parameters as DTensors while the body returns plain tensors: gather the head."""
    from torch.distributed.tensor import DTensor

    if not isinstance(head.weight, DTensor):
        return head
    bias = head.bias.full_tensor() if isinstance(head.bias, DTensor) else head.bias
    return type(head)(head.weight.full_tensor(), bias, head.scale, head.softcap)


def _refuse_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError("DeepSpeed ZeRO-3 is not supported: the fused backward re-reads lm_head's "
                                  "weight outside the module's gather hooks")


def policy_loss_config_from_grpo_args(args) -> PolicyLossConfig:
    """The :class:`PolicyLossConfig` whose loss equals TRL's for this ``GRPOConfig`` (module docstring);
    ``NotImplementedError`` naming the field for what has no exact equivalent."""
    loss_type = args.loss_type
    if loss_type in _REFUSED_LOSS_TYPES:
        raise NotImplementedError(f"loss_type={loss_type!r} has no entropy-ops equivalent: "
                                  f"{_REFUSED_LOSS_TYPES[loss_type]}; use fused_loss=False")
    if loss_type not in _AGGREGATION:
        raise NotImplementedError(f"loss_type={loss_type!r} is not mapped (known: {sorted(_AGGREGATION)})")
    refusals = [
        (args.use_vllm and args.vllm_importance_sampling_correction,
         "vllm_importance_sampling_correction (a per-token rollout ratio factor)"),
        (args.off_policy_mask_threshold is not None, "off_policy_mask_threshold (a sequence drop mask)"),
        (args.beta != 0.0 and args.use_bias_correction_kl,
         "use_bias_correction_kl (TRL's default: the KL term times the differentiable ratio; set it to False "
         "for the plain k3 KL of GRPO)"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy,
         "entropy_coef / use_adaptive_entropy (TRL's entropy bonus is a token mean over the entropy-masked "
         "tokens, independent of loss_type)"),
        (args.importance_sampling_level == "sequence" and args.top_entropy_quantile < 1.0,
         "top_entropy_quantile < 1 with importance_sampling_level='sequence' (TRL broadcasts the sequence "
         "term over the kept tokens; entropy-ops uses GSPO-token)"),
    ]
    for refused, what in refusals:
        if refused:
            raise NotImplementedError(f"GRPOConfig.{what} has no exact entropy-ops equivalent; use fused_loss=False")
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if args.delta is not None and not args.delta >= 1.0 + eps_high > 1.0:
        raise NotImplementedError(f"GRPOConfig.delta={args.delta} maps to a dual clip only when "
                                  f"delta >= 1 + epsilon_high = {1.0 + eps_high} (and > 1)")
    constant = {"dr_grpo": args.max_completion_length, "luspo": 1}.get(loss_type)
    return PolicyLossConfig(
        importance_sampling_level=args.importance_sampling_level, eps_low=args.epsilon, eps_high=eps_high,
        dual_clip=args.delta, beta=args.beta, top_entropy_quantile=args.top_entropy_quantile,
        aggregation=_AGGREGATION[loss_type], max_completion_length=constant, temperature=args.temperature)


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs, entropies and loss come from entropy-ops.

    Takes ``GRPOTrainer``'s arguments plus ``fused_backend`` (``"auto"`` | ``"triton"`` |
    ``"torch"``) and ``fused_loss`` (default True: entropy-ops' policy loss; False: TRL's own
    loss on our per-token log-probs and entropies). Raises ``NotImplementedError`` at construction
    for configurations the loss cannot reproduce exactly (module docstring).
    """

    def __init__(self, *args, fused_backend: str = "auto", fused_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss
        self.policy_loss_config = None
        if fused_loss:
            self.policy_loss_config = policy_loss_config_from_grpo_args(self.args)
            if self.top_entropy_quantile < 1.0 and self.accelerator.num_processes > 1:
                raise NotImplementedError("top_entropy_quantile < 1 on several processes: TRL takes the entropy "
                                          "quantile over all ranks, entropy-ops per rank; use fused_loss=False")
        cast = self.args.cast_lm_head_to_fp32
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_lm_head(policy, temperature=self.temperature, outputs=OUTPUT_FIELDS, cast_lm_head_to_fp32=cast,
                          backend=fused_backend)
        if self.ref_model is not None:
            add_fused_lm_head(self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                              backend=fused_backend)

    def _compute_loss(self, model, inputs):
        if not self.fused_loss:
            return super()._compute_loss(model, inputs)
        cfg = self.policy_loss_config
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        valid = mask.bool()
        multimodal = {k: inputs.get(k) for k in (
            "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")}
        logp, H, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **multimodal)
        advantages = inputs["advantages"]
        if cfg.importance_sampling_level == "sequence" and advantages.dim() == 2:
            raise ValueError("per-token advantages [B, T] with importance_sampling_level='sequence': TRL broadcasts "
                             "the sequence ratio over tokens, entropy-ops uses GSPO-token; use fused_loss=False")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        loss, metrics = policy_loss_from_logprobs(logp, H, mask=valid, advantages=advantages,
                                                  old_logprobs=inputs.get("old_per_token_logps"),
                                                  ref_logprobs=ref, config=cfg)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        n_valid = valid.sum().to(torch.float32)
        if self.loss_type == "dapo":  # TRL's normalizer: the generation batch's token count, per step
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss * n_valid.clamp(min=1.0) / normalizer
        else:
            if self.loss_type in ("grpo", "dr_grpo", "luspo"):  # TRL averages over all B rows, ours non-empty ones
                loss = loss * valid.any(-1).sum().to(torch.float32) / valid.shape[0]
            loss = loss / accumulation
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_token_means(mode, metrics, n_valid)
        return loss

    def _log_token_means(self, mode, metrics, n_valid):
        """Log our per-call token means under TRL's names, as global means over all processes' tokens."""
        names = {"entropy": "entropy_mean", "clip_ratio/low_mean": "clip_frac_low",
                 "clip_ratio/high_mean": "clip_frac_high"}
        if self.beta != 0.0:
            names["kl"] = "kl_ref"
        values = {trl_name: metrics[ours] for trl_name, ours in names.items()}
        values["clip_ratio/region_mean"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        sums = torch.stack([v * n_valid for v in values.values()] + [n_valid])
        totals = self.accelerator.reduce(sums, reduction="sum")
        for name, total in zip(values, (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()):
            self._metrics[mode][name].append(total)
