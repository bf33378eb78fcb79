"""TRL integration: ``GRPOTrainer`` on entropy-ops' fused log-prob/entropy op, with TRL's own defaults.

Two pieces, usable apart:

1. :func:`add_fused_lm_head` gives a model TRL's fused-LM-head protocol (TRL >= 1.16 calls
   ``model(..., labels=labels, fused_lm_head=True)`` and reads ``.log_probs``/``.entropy``, shape
   ``[B, T - 1]``, position ``j`` predicting token ``j + 1``, 0 where the label is ``-100``) on
   :func:`entropy_ops.output_head.head_logprobs_and_entropy`: the model's own forward runs once with
   its output layer captured (:func:`entropy_ops.output_head.capture_head`, so any Hugging Face
   causal LM or vision-language model whose head :func:`entropy_ops.output_head.output_head` reads),
   only the labelled rows reach the vocabulary, and no logits exist. It goes through ``model.forward``, so
   DDP/FSDP hooks still fire. Every TRL trainer that uses the protocol (GRPO, RLOO, DPO, KTO, SFT)
   can use it; only ``log_probs`` and ``entropy`` are computed (TRL's other fields are ``None``).
2. :class:`FusedGRPOTrainer` is ``GRPOTrainer`` with that head on the policy and the reference
   model, and TRL's loss computed on those per-token ``logp``/``H`` by
   :func:`entropy_ops.integrations.trl_compute.fused_grpo_loss`: every ``loss_type`` (grpo, bnpo,
   dr_grpo, dapo, luspo, cispo, sapo, vespo), token or sequence ratio, the vLLM importance-sampling
   correction, the (bias-corrected) KL, the entropy bonus (static or adaptive), the entropy mask,
   the off-policy mask, ``delta``; loss, gradients and logged metrics equal to TRL's (tests).

The path is chosen before ``GRPOTrainer.__init__`` runs (:func:`.trl_plan.plan_fused_grpo`): bad
arguments raise before TRL builds a model copy or a vLLM client; DeepSpeed ZeRO-3 or an output layer
entropy-ops cannot express fall back to TRL's own code with a :class:`FusedFallbackWarning` saying why.
"""
from __future__ import annotations

import functools
import types
import warnings

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..output_head import capture_head, head_logprobs_and_entropy, output_head
from .hf import scatter_rows
from .trl_compute import fused_grpo_loss
from .trl_onepass import one_pass_head
from .trl_plan import FusedFallbackWarning, FusedGRPOPlan, head_reason, plan_fused_grpo, zero3_reason

__all__ = ["add_fused_lm_head", "FusedGRPOTrainer", "FusedFallbackWarning", "FusedGRPOPlan", "plan_fused_grpo"]
OUTPUT_FIELDS = ("log_probs", "entropy")


def add_fused_lm_head(model, *, temperature: float = 1.0, outputs=("log_probs",), cast_lm_head_to_fp32=False,
                      backend: str = "auto", token_chunk: int | None = None) -> None:
    """Patch ``model.forward`` so that ``model(..., labels=..., fused_lm_head=True)`` runs entropy-ops.

    Same calling convention as TRL's ``trl.trainer.utils.add_fused_lm_head``: ``labels`` ``[B, T]``
    (``-100`` = not scored) are shifted here (``log_probs[:, j]`` scores ``labels[:, j + 1]``);
    pre-shifted ``shift_labels`` are used as given. Returns a ``FusedCausalLMOutput`` with
    ``log_probs``, ``entropy`` (when in ``outputs``), ``loss = -sum(log_probs) / count``
    (or ``/ num_items_in_batch``), ``label_mask`` and, for MoE models asked for router logits,
    ``aux_loss`` (added to ``loss`` with ``router_aux_loss_coef``). Without ``fused_lm_head`` the
    previous forward runs unchanged (generation is untouched). The model's output layer must be one
    :func:`entropy_ops.output_head.output_head` reads (checked here and, against the model's own
    logit post-processing, at each fused call); ``temperature`` divides the logits.

    ``fused_token_grads=grad_fn`` (with ``fused_lm_head=True``) runs the one-pass form
    (:mod:`.trl_onepass`): ``grad_fn(r0, r1, logp, H)`` gives the loss's upstream gradients of the
    labelled rows ``[r0, r1)`` (row-major); ``log_probs``/``entropy`` come back detached and ``loss``
    is a 0-valued anchor that carries the gradient formed in the pass (``token_chunk`` rows per chunk).
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
                      fused_token_grads=None, **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        _refuse_zero3()
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        head = output_head(self)  # looked up per call: FSDP/PEFT may have replaced the layer
        with capture_head(self, head) as record:  # the model's own forward; its output layer is never called
            outputs = previous_forward(*args, **kwargs)
        record.check_transform(outputs["logits"])
        hidden = record.hidden
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = _full_head(head)
        labels = labels.to(head.weight.device)
        mask = labels != -100
        rows = hidden[mask.to(hidden.device)]
        if fused_token_grads is not None:
            anchor, logp, H = one_pass_head(head, rows, labels[mask], fused_token_grads, temperature=temperature,
                                            backend=backend, dtype=compute_dtype, token_chunk=token_chunk)
            return FusedCausalLMOutput(loss=anchor, log_probs=scatter_rows(logp.float(), mask),
                                       entropy=scatter_rows(H.float(), mask), label_mask=mask,
                                       aux_loss=outputs.get("aux_loss") if kwargs.get("output_router_logits") else None)
        logp, H = head_logprobs_and_entropy(head, rows, labels[mask], temperature=temperature,
                                            return_entropy=want_entropy, backend=backend, dtype=compute_dtype)
        log_probs = scatter_rows(logp, mask)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = outputs.get("aux_loss") if kwargs.get("output_router_logits") else None
        if aux_loss is not None:  # the model's own load-balancing loss (it gets no labels, so it is not in a loss)
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
    # FusedGRPOTrainer never patches under ZeRO-3 (it falls back to TRL's head); a direct caller gets this.
    if zero3_reason() is not None:
        raise NotImplementedError("add_fused_lm_head does not support DeepSpeed ZeRO-3: the fused backward reads "
                                  "lm_head's whole weight outside the hooks that gather its shards")


class FusedGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose log-probs, entropies and loss come from entropy-ops.

    Takes ``GRPOTrainer``'s arguments plus ``fused_backend`` (``"auto"`` | ``"triton"`` | ``"torch"``),
    ``fused_loss`` (default True: the loss on the fused log-probs by entropy-ops; False: TRL's own
    ``_compute_loss`` on the fused log-probs) and ``fused_one_pass`` (default False: form the loss's
    gradient during the forward, :mod:`.trl_onepass`, where the configuration allows it;
    ``fused_token_chunk`` its rows per chunk). ``self.fused_plan`` records the path taken and why.
    """

    def __init__(self, model, reward_funcs=None, args=None, *pos, fused_backend: str = "auto",
                 fused_loss: bool = True, fused_one_pass: bool = False, fused_token_chunk: int | None = None,
                 **kwargs):
        if args is None:  # as GRPOTrainer does, so that the plan sees the config TRL will use
            from trl import GRPOConfig
            from trl.trainer.utils import get_config_model_id

            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = GRPOConfig(f"{name.split('/')[-1]}-GRPO")
        plan = plan_fused_grpo(args, fused_loss=fused_loss, fused_backend=fused_backend,
                               fused_one_pass=fused_one_pass, fused_token_chunk=fused_token_chunk,
                               model=None if isinstance(model, str) else model)
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        if plan.fused_head:  # a model given by name is checked now that TRL has loaded it
            late = zero3_reason() or (head_reason(self.model) if isinstance(model, str) else None)
            if late is not None:
                plan = FusedGRPOPlan(path="trl", backend=fused_backend, reasons=(late,))
                warnings.warn(f"FusedGRPOTrainer: {late}", FusedFallbackWarning, stacklevel=2)
        self.fused_plan = plan
        self.fused_loss = plan.fused_loss
        if not plan.fused_head:
            return
        cast = self.args.cast_lm_head_to_fp32
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_fused_lm_head(policy, temperature=self.temperature, outputs=OUTPUT_FIELDS, cast_lm_head_to_fp32=cast,
                          backend=fused_backend, token_chunk=plan.token_chunk)
        if self.ref_model is not None:
            add_fused_lm_head(self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                              backend=fused_backend)

    def _compute_loss(self, model, inputs):
        if not self.fused_plan.fused_loss:
            return super()._compute_loss(model, inputs)
        plan = self.fused_plan
        one_pass = plan.one_pass and torch.is_grad_enabled()
        return fused_grpo_loss(self, model, inputs, plan.surrogate_config, one_pass=one_pass)
