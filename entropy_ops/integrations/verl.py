"""verl integration: drop-ins for verl's log-prob / entropy entry points, and the switch that installs them.

The switch (docs/integrations.md has the full YAML)::

    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=triton      # or torch: both are served
    actor_rollout_ref.model.external_lib=entropy_ops.integrations.verl_plugin

verl imports ``external_lib`` in every worker before it builds the model; importing
:mod:`entropy_ops.integrations.verl_plugin` calls :func:`install` there (entropy-ops itself never
patches anything on import). What :func:`install` replaces, in the worker's process (verl's source
was read to find each entry point; its code is not copied):

========================================================  =========================================
verl name                                                 entropy-ops drop-in (same signature)
========================================================  =========================================
``verl.utils.kernel.linear_cross_entropy.                 :func:`linear_cross_entropy` (FSDP fused
linear_cross_entropy(hidden, weight, labels,              forward with ``impl_backend=triton``;
temperature, reduction, dist_process_group)``             Megatron fused forward with the
                                                          tensor-parallel group)
``verl.utils.experimental.torch_functional.               :class:`FusedLinearForPPO`
FusedLinearForPPO`` (``impl_backend=torch``)
``verl.utils.torch_functional.logprobs_from_logits(       :func:`logprobs_from_logits` (the
logits, labels, inplace_backward=True)``                  logits path, ``use_fused_kernels=False``)
``verl.utils.torch_functional.entropy_from_logits(        :func:`entropy_from_logits`,
logits)`` and ``entropy_from_logits_with_chunking``       :func:`entropy_from_logits_with_chunking`
``patch_forward_with_backends`` (``model_forward=True``)  installs :func:`forward_for_ppo`
========================================================  =========================================

Modules that bound one of these names at their import (``from ... import name``) before
:func:`install` ran get the drop-in too, when they are already imported.

Semantics (``h`` hidden ``[..., D]``, ``W`` ``[V, D]``, ``y`` labels ``[...]``, ``t`` temperature)::

    log_probs = log_softmax(h W^T / t)[y],   entropy = -sum_v p_v log p_v,   p = softmax(h W^T / t)

fp32, shape ``h.shape[:-1]`` (``FusedLinearForPPO``, ``forward_for_ppo``) or flattened ``[N]``
(``linear_cross_entropy``, as verl's kernel); a label equal to ``-100`` gives 0 and no gradient. ``t`` may be a float
or, as in recent verl, a tensor with one temperature per token (``h W^T / t_n = (h_n / t_n) W^T``:
the rows are pre-scaled, one rounding of ``h / t`` to the input dtype). ``reduction`` ``"sum"`` /
``"mean"`` reduce ``log_probs`` over all tokens (verl's definition); ``entropy`` stays per token.

Tensor parallelism (``dist_process_group``): as in verl's kernel, ``weight`` is this rank's block of
rows ``[r V_r, (r + 1) V_r)`` (``r`` its rank in the group, equal shards in rank order), ``hidden``
and ``labels`` (global ids) are the same on every rank, and the outputs are the full-vocabulary
values on every rank (:func:`entropy_ops.vocab_parallel.vocab_parallel_linear_logprobs_and_entropy`:
one all-reduce MAX and one SUM of ``[3, N]``). verl's kernel returns, as ``d hidden``, this rank's
partial sum ``dz_r W_r`` and leaves the sum over ranks to its caller (the backward of
``gather_from_sequence_parallel_region``); the vocab-parallel op already all-reduces it, so the
drop-in returns ``(1 / tp) sum_r dz_r W_r`` on each rank: the caller's sum is then the true gradient,
as with verl's kernel.

:func:`forward_for_ppo` is the model-level forward with verl's fused contract
(``output.log_probs``, ``output.entropy``). Unlike verl's own, it runs the model's *own* forward
with the output layer captured (:mod:`entropy_ops.output_head`), so vision-language models
(``pixel_values``, ``image_grid_thw``, ...) work, and it applies the model's full head (bias,
final soft-cap, logit scale: Gemma 2/3, Cohere, Granite), which verl's passes over.

The actor's loss itself (:mod:`entropy_ops.integrations.verl_loss`, re-exported here):
:func:`fused_policy_loss` takes the response positions' hidden states and ``lm_head.weight`` with
verl's loss inputs (``responses``, ``old_log_prob``, ``advantages``, ``response_mask``, the actor
config) and returns verl's vanilla PPO loss (dual clip, entropy bonus, KL loss, every
``loss_agg_mode``) and its metrics; when a gradient is needed it forms it during the head's forward
(one pass over the vocabulary, ``6 N D V`` FLOPs instead of ``8 N D V``). :func:`verl_loss_settings`
checks and maps the actor config once.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..linear_ops import linear_logprobs_and_entropy
from ..output_head import capture_head, head_logprobs_and_entropy, output_head
from ..token_ops import token_entropy, token_logprobs
from ..vocab_parallel import vocab_parallel_linear_logprobs_and_entropy
from .verl_loss import VerlLossSettings, fused_policy_loss, verl_loss_settings  # noqa: F401 (public)

_TRITON_MODULE = "verl.utils.kernel.linear_cross_entropy"
_TORCH_MODULE = "verl.utils.experimental.torch_functional"
_FUNCTIONAL_MODULE = "verl.utils.torch_functional"
_PATCH_MODULE = "verl.models.transformers.monkey_patch"
# Modules that bind a replaced name at their import (read in verl's source).
_BINDERS = {
    "linear_cross_entropy": ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap"),
    "logprobs_from_logits": ("verl.workers.actor.dp_actor",),
}
REDUCTIONS = ("none", "sum", "mean")


# ---------------------------------------------------------------- logits drop-ins
def logprobs_from_logits(logits, labels, inplace_backward=True, *, backend: str = "auto"):
    """verl's ``logprobs_from_logits``: ``log_softmax(logits)[labels]``, fp32 ``logits.shape[:-1]``.

    ``inplace_backward=True`` (verl's default) lets backward write the logits' gradient into the
    logits' own buffer, as verl's flash-attn path does: nothing may read the logits after backward
    (verl sets it False when it also computes the entropy from them).
    """
    return token_logprobs(logits, labels, inplace_backward=bool(inplace_backward), backend=backend)


def entropy_from_logits(logits, *, backend: str = "auto"):
    """verl's ``entropy_from_logits``: ``logsumexp(logits) - sum softmax(logits) * logits``, fp32."""
    return token_entropy(logits, backend=backend)


def entropy_from_logits_with_chunking(logits, chunk_size: int = 2048, *, backend: str = "auto"):
    """verl's ``entropy_from_logits_with_chunking``; ``chunk_size`` is accepted and unused (the fused
    op streams the vocabulary and never holds a softmax copy)."""
    return token_entropy(logits, backend=backend)


# ---------------------------------------------------------------- hidden-state drop-ins
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


def _prescale(hidden, per_token):
    """``hidden / t`` per row (the per-token temperature folded into the rows)."""
    per_token = per_token.to(device=hidden.device)
    if not bool((per_token > 0).all()):  # host sync, per-token temperatures only
        raise ValueError("temperature must be > 0 for every token")
    return (hidden.float() / per_token.float().unsqueeze(-1)).to(hidden.dtype)


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
        hidden_states = _prescale(hidden_states, per_token)
    return linear_logprobs_and_entropy(hidden_states, vocab_weights, input_ids, temperature=temperature,
                                       backend=backend)


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _tensor_parallel(hidden, weight, labels, temperature, group, backend):
    """verl's tensor-parallel contract on the vocab-parallel op (module docstring)."""
    world = dist.get_world_size(group)
    vocab_start = dist.get_rank(group) * weight.shape[0]
    temperature, per_token = _per_token_temperature(temperature, hidden.shape[:-1])
    if per_token is not None:
        hidden = _prescale(hidden, per_token)
    if world > 1:
        hidden = _ScaleGrad.apply(hidden, 1.0 / world)  # the caller sums d hidden over the group
    return vocab_parallel_linear_logprobs_and_entropy(hidden, weight, labels, vocab_start=vocab_start,
                                                      process_group=group, temperature=temperature, backend=backend)


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None, *,
                         backend: str = "auto"):
    """verl's ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``.

    Returns ``(log_probs, entropy)`` fp32: ``log_probs`` per token ``[N]`` (``"none"``) or its sum /
    mean over all tokens, ``entropy`` per token ``[N]``. Like verl's kernel, the rows of ``hidden``
    ``[..., D]`` and the ids of ``labels`` are flattened in order (``N`` = ``labels.numel()``; the two
    may have different leading shapes, e.g. Megatron's ``[T, 1, D]`` hidden with ``[1, T]`` labels).
    ``dist_process_group``: ``weight`` is this rank's vocab shard (module docstring).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not isinstance(labels, torch.Tensor):
        raise ValueError("hidden must be a [..., D] tensor and labels an integer tensor")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(labels.shape)} must hold one id per row of hidden {tuple(hidden.shape)}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # verl's kernel flattens both
    if isinstance(temperature, torch.Tensor) and temperature.numel() > 1:
        temperature = temperature.reshape(-1)
    if dist_process_group is not None:
        if not dist.is_initialized():
            raise ValueError("dist_process_group was given but torch.distributed is not initialized")
        log_probs, entropy = _tensor_parallel(hidden, weight, labels, temperature, dist_process_group, backend)
    else:
        log_probs, entropy = fused_linear_for_ppo(hidden, weight, labels, temperature, backend=backend)
    if reduction == "sum":
        log_probs = log_probs.sum()
    elif reduction == "mean":
        log_probs = log_probs.mean()
    return log_probs, entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` module; ``chunk_size`` and ``impl_backend`` (verl's knobs) are
    accepted and ignored: the vocabulary is streamed by the fused op. ``backend`` picks ours."""

    def __init__(self, chunk_size: int | None = None, impl_backend: str | None = None, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.backend)


# ---------------------------------------------------------------- model-level forward
@dataclass
class PPOForwardOutput:
    """What verl's actor reads from a fused forward: ``log_probs`` and ``entropy``, fp32 ``[B, T]``."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    past_key_values: object = None
    hidden_states: object = None
    attentions: object = None


# Forward arguments that only matter for a logits / generation pass.
_DROPPED = ("past_key_values", "cache_position", "logits_to_keep", "return_dict", "use_cache")


def forward_for_ppo(self, *args, labels=None, shift_labels=None, temperature=1.0, backend: str = "auto", **kwargs):
    """A causal LM ``forward`` with verl's fused contract, through the model's own forward and full head.

    Runs the forward the model class had before :func:`install` replaced it (``model.forward`` when
    called directly on an unpatched model) with the output layer captured, every argument passed
    through (``pixel_values`` & co. of a vision-language model included), then scores the captured
    hidden states with the model's :class:`~entropy_ops.output_head.OutputHead`. Labels are rolled
    like verl's (``shift_labels``, else ``labels`` or ``input_ids`` shifted left by one, the last
    column wrapping around, which verl discards). A per-token ``temperature`` tensor needs a head
    with neither bias nor soft-cap.
    """
    for name in _DROPPED:
        kwargs.pop(name, None)
    original = getattr(type(self).forward, "_entropy_ops_original", None)
    head = output_head(self)
    with capture_head(self, head) as record:
        if original is None:
            out = type(self).forward(self, *args, use_cache=False, return_dict=True, **kwargs)
        else:
            out = original(self, *args, use_cache=False, return_dict=True, **kwargs)
    record.check_transform(out.get("logits") if hasattr(out, "get") else out[0])
    hidden = record.hidden
    if shift_labels is None:
        source = labels if labels is not None else kwargs.get("input_ids", args[0] if args else None)
        if source is None:
            raise ValueError("forward_for_ppo needs input_ids, labels or shift_labels to score")
        shift_labels = torch.roll(source, shifts=-1, dims=-1)
    temperature, per_token = _per_token_temperature(temperature, hidden.shape[:-1])
    if per_token is not None:
        if head.bias is not None or head.softcap is not None:
            raise NotImplementedError("a per-token temperature tensor needs a head without bias or soft-cap")
        hidden = _prescale(hidden, per_token)
    logp, H = head_logprobs_and_entropy(head, hidden.reshape(-1, hidden.shape[-1]), shift_labels.reshape(-1),
                                        temperature=temperature, backend=backend)
    lead = hidden.shape[:-1]
    return PPOForwardOutput(log_probs=logp.view(lead), entropy=H.view(lead),
                            hidden_states=out.get("hidden_states"), attentions=out.get("attentions"))


def _forward_for_ppo_of(original):
    """``forward_for_ppo`` bound to the class forward it replaces (kept for every later call)."""
    original = getattr(original, "_entropy_ops_original", original)

    def forward(self, *args, **kwargs):
        return forward_for_ppo(self, *args, **kwargs)

    forward._entropy_ops_original = original
    return forward


# ---------------------------------------------------------------- install
def _replace(module, name: str, value) -> None:
    setattr(module, name, value)
    for binder in _BINDERS.get(name, ()):
        if binder in sys.modules and hasattr(sys.modules[binder], name):
            setattr(sys.modules[binder], name, value)


def install(*, model_forward: bool = True, logits_functions: bool = True) -> None:
    """Point verl's entry points at entropy-ops, in this process (idempotent; table in the module docstring).

    ``model_forward``: also wrap verl's ``patch_forward_with_backends`` so that
    ``use_fused_kernels=True`` installs :func:`forward_for_ppo` (either ``impl_backend``) instead of
    verl's fused forward, for every model type, vision-language models included.
    ``logits_functions``: also replace ``logprobs_from_logits`` / ``entropy_from_logits`` (used when
    ``use_fused_kernels=False``). Raises ``ImportError`` when verl is not installed.
    """
    _replace(importlib.import_module(_TRITON_MODULE), "linear_cross_entropy", linear_cross_entropy)
    _replace(importlib.import_module(_TORCH_MODULE), "FusedLinearForPPO", FusedLinearForPPO)
    if logits_functions:
        functional = importlib.import_module(_FUNCTIONAL_MODULE)
        _replace(functional, "logprobs_from_logits", logprobs_from_logits)
        _replace(functional, "entropy_from_logits", entropy_from_logits)
        _replace(functional, "entropy_from_logits_with_chunking", entropy_from_logits_with_chunking)
    if not model_forward:
        return
    patch_mod = importlib.import_module(_PATCH_MODULE)
    original = patch_mod.patch_forward_with_backends
    if getattr(original, "_entropy_ops", False):
        return

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not use_fused_kernels:
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        output_head(model)  # refuse an unusable head before training starts, naming the family
        model.__class__.forward = _forward_for_ppo_of(model.__class__.forward)

    patch_forward_with_backends._entropy_ops = True
    patch_mod.patch_forward_with_backends = patch_forward_with_backends
