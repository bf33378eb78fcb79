"""verl integration: entropy-ops behind verl's fused-kernel switch (``model.use_fused_kernels=True``).

How verl's switch is wired (read in verl's source; FSDP workers, ``dp_actor``):
``actor_rollout_ref.model.use_fused_kernels=True`` makes ``apply_monkey_patch`` replace the model
class's ``forward`` by verl's ``forward_with_{triton,torch}_backend`` (choice:
``model.fused_kernel_options.impl_backend``). That forward runs the body, rolls the labels
(``labels[t] = input_ids[t + 1]``, or takes ``shift_labels``), and calls, at call time,

* triton: ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels,
  temperature, "none")``;
* torch: ``verl.utils.experimental.torch_functional.FusedLinearForPPO(...).forward(hidden_states=,
  vocab_weights=, input_ids=, temperature=)``;

both ``-> (log_probs, entropy)`` of the leading shape; the actor reads ``output.log_probs`` and
``output.entropy`` and never sees logits. This module provides drop-ins with those signatures
(:func:`linear_cross_entropy`, :class:`FusedLinearForPPO`, both on
:func:`entropy_ops.linear_logprobs_and_entropy`) and :func:`install`, which points both names
at them in the *current process*. verl runs its actors in Ray worker processes, so the call must
happen there: put it in a module of your own and list that module in verl's
``actor_rollout_ref.model.external_lib`` (verl imports it in every worker before building the
model)::

    # my_entropy_ops_plugin.py
    from entropy_ops.integrations.verl import install
    install()

    python -m verl.trainer.main_ppo ... actor_rollout_ref.model.use_fused_kernels=True \\
        actor_rollout_ref.model.fused_kernel_options.impl_backend=triton \\
        actor_rollout_ref.model.external_lib=my_entropy_ops_plugin

(entropy-ops itself never patches anything on import.) ``install(model_forward=True)`` also
replaces verl's forward itself by :func:`forward_for_ppo`: verl's passes only
``lm_head.weight``, so for Gemma 2/3 (final soft-cap), Cohere/Granite (logit scale) or a biased
head its fused path computes a different distribution than the model, whatever the kernel;
:func:`forward_for_ppo` applies the family's head (:mod:`entropy_ops.integrations.hf`).

Semantics (``h`` = hidden ``[..., D]``, ``W`` ``[V, D]``, ``y`` labels ``[...]``, ``t`` temperature)::

    log_probs = log_softmax(h W^T / t)[y],   entropy = -sum_v p_v log p_v,   p = softmax(h W^T / t)

fp32 outputs of shape ``h.shape[:-1]`` (verl's torch path returns the input dtype; fp32 is at
least as accurate); labels equal to ``-100`` give 0 and no gradient. ``t`` may be a float or, as
in recent verl, a tensor with one temperature per token: ``h W^T / t_n = (h_n / t_n) W^T``, so
the rows are pre-scaled (one rounding of ``h / t`` to the input dtype). Not supported:
``reduction`` other than ``"none"`` (the only one verl's actor uses) and ``dist_process_group``
(vocabulary-parallel heads): ``ValueError`` / ``NotImplementedError``. Megatron workers use a
different path (``get_mcore_forward_fused_fn``) that this module does not touch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..linear_ops import linear_logprobs_and_entropy
from .hf import head_logprobs_and_entropy, model_body, output_head

_TRITON_MODULE = "verl.utils.kernel.linear_cross_entropy"
_TORCH_MODULE = "verl.utils.experimental.torch_functional"
_PATCH_MODULE = "verl.models.transformers.monkey_patch"


def _per_token_temperature(temperature, lead_shape: torch.Size):
    """A float, or a tensor broadcastable to ``lead_shape`` (None when the tensor has one element)."""
    if not isinstance(temperature, torch.Tensor):
        return temperature, None  # checked by the fused op
    if temperature.numel() == 1:
        return float(temperature.item()), None  # host sync, once
    t = temperature.reshape(lead_shape) if temperature.numel() == lead_shape.numel() else None
    if t is None or temperature.is_complex() or not temperature.dtype.is_floating_point:
        raise ValueError(f"temperature must be a float or a floating tensor with one value per token "
                         f"({lead_shape.numel()}), got {temperature.dtype} of shape {tuple(temperature.shape)}")
    return 1.0, t


def fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature=1.0, *, backend: str = "auto"):
    """``(log_probs, entropy)`` fp32, shape ``hidden_states.shape[:-1]`` (module docstring for the math).

    ``hidden_states`` ``[..., D]``, ``vocab_weights`` ``[V, D]`` (same dtype and device),
    ``input_ids`` integer ``[...]`` (the already shifted labels), ``temperature`` a float or a
    per-token tensor. Gradients reach ``hidden_states`` and ``vocab_weights``.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1:
        raise ValueError("hidden_states must be a [..., D] tensor")
    temperature, per_token = _per_token_temperature(temperature, hidden_states.shape[:-1])
    if per_token is not None:
        per_token = per_token.to(device=hidden_states.device)
        if not bool((per_token > 0).all()):  # host sync, per-token temperatures only
            raise ValueError("temperature must be > 0 for every token")
        hidden_states = (hidden_states.float() / per_token.float().unsqueeze(-1)).to(hidden_states.dtype)
    return linear_logprobs_and_entropy(hidden_states, vocab_weights, input_ids, temperature=temperature,
                                       backend=backend)


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None, *,
                         backend: str = "auto"):
    """verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``."""
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token outputs, as verl's actor uses it), got {reduction!r}")
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group (a vocabulary-parallel lm_head) is not supported")
    return fused_linear_for_ppo(hidden, weight, labels, temperature, backend=backend)


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` module; ``chunk_size`` and ``impl_backend`` (verl's knobs) are
    accepted and ignored: the vocabulary is streamed by the fused op. ``backend`` picks ours."""

    def __init__(self, chunk_size: int | None = None, impl_backend: str | None = None, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.backend)


@dataclass
class PPOForwardOutput:
    """What verl's actor reads from a fused forward: ``log_probs`` and ``entropy``, fp32 ``[B, T]``."""

    log_probs: torch.Tensor
    entropy: torch.Tensor


def forward_for_ppo(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                    temperature=1.0, shift_labels=None, return_dict=True, use_cache=False, **kwargs):
    """A causal LM ``forward`` with verl's fused contract, through the family's full head.

    Bound as ``model.__class__.forward``. Runs the body on the inputs, rolls the labels like verl
    (``shift_labels``, else ``labels`` or ``input_ids`` shifted left by one, the last column
    wrapping around, which verl discards), and scores every position with the model's
    :class:`~entropy_ops.integrations.hf.OutputHead` (bias, soft-cap and logit scale included).
    A per-token ``temperature`` tensor needs a head with neither bias nor soft-cap.
    """
    for name in ("past_key_values", "logits_to_keep", "cache_position", "output_attentions", "output_hidden_states"):
        kwargs.pop(name, None)  # verl passes these for the logits forward; a scoring pass needs none of them
    body_out = model_body(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
    hidden = body_out.last_hidden_state
    if shift_labels is None:
        source = labels if labels is not None else input_ids
        if source is None:
            raise ValueError("forward_for_ppo needs input_ids, labels or shift_labels to score")
        shift_labels = torch.roll(source, shifts=-1, dims=-1)
    head = output_head(self)
    temperature, per_token = _per_token_temperature(temperature, hidden.shape[:-1])
    if per_token is not None:
        if head.bias is not None or head.softcap is not None:
            raise NotImplementedError("a per-token temperature tensor needs a head without bias or soft-cap")
        hidden = (hidden.float() / per_token.to(hidden.device).float().unsqueeze(-1)).to(hidden.dtype)
    logp, H = head_logprobs_and_entropy(head, hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1),
                                        temperature=temperature)
    return PPOForwardOutput(log_probs=logp.view(hidden.shape[:-1]), entropy=H.view(hidden.shape[:-1]))


def install(*, model_forward: bool = False) -> None:
    """Point verl's fused-kernel entry points at entropy-ops, in this process (idempotent).

    Replaces ``linear_cross_entropy`` (verl's triton backend) and ``FusedLinearForPPO`` (its torch
    backend) in their verl modules; verl imports them at call time, so models patched before or
    after this call use ours. With ``model_forward=True``, also wraps verl's
    ``patch_forward_with_backends`` so that ``use_fused_kernels`` installs :func:`forward_for_ppo`
    as the model's forward (either backend). Raises ``ImportError`` when verl is not installed.
    """
    triton_mod = importlib.import_module(_TRITON_MODULE)
    torch_mod = importlib.import_module(_TORCH_MODULE)
    triton_mod.linear_cross_entropy = linear_cross_entropy
    torch_mod.FusedLinearForPPO = FusedLinearForPPO
    if not model_forward:
        return
    patch_mod = importlib.import_module(_PATCH_MODULE)
    original = patch_mod.patch_forward_with_backends
    if getattr(original, "_entropy_ops", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not use_fused_kernels:
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        output_head(model)  # refuse an unsupported family before training starts
        model.__class__.forward = forward_for_ppo

    patch_forward_with_backends._entropy_ops = True
    patch_mod.patch_forward_with_backends = patch_forward_with_backends
