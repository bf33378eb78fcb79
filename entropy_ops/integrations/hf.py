"""Per-token log-probs and entropies of a Hugging Face causal LM without its ``[B, T, V]`` logits.

A causal LM's ``forward`` is ``body -> last hidden states -> lm_head -> (logit transform)``.
:func:`compute_logprobs_and_entropy` runs the body only, keeps the hidden rows that predict a
completion token, and hands them with the head's weight (and bias) to
:func:`entropy_ops.linear_logprobs_and_entropy`, which streams the vocabulary: no logits tensor is
built in forward or backward, and prompt or padding positions never cost a vocabulary pass.

Math (``h_{b,t}`` the body's last hidden state at position ``t``, ``W``/``b`` the output layer,
``tau`` the temperature, ``y_{b,t}`` = ``input_ids[b, t]``)::

    z = f(h_{b,t-1} W^T + b)                 f = the family's logit transform (table below)
    logp[b, t] = log_softmax(z / tau)[y_{b,t}]
    H[b, t]    = -sum_v p_v log p_v,  p = softmax(z / tau)

for every ``t`` with ``completion_mask[b, t]``; both are 0 elsewhere. Position ``t`` holds the
prediction *of* token ``t`` *from* the prefix ``input_ids[b, :t]``, i.e. it equals
``log_softmax(model(...).logits[b, t - 1] / tau)[input_ids[b, t]]``: the shift is done here, and
``completion_mask[:, 0]`` must be False (no prefix predicts token 0). Gradients reach every
parameter (body, output layer, tied embeddings) through the fused op's backward.

Logit transforms, per ``config.model_type`` (the families whose ``ForCausalLM.forward`` was read
in transformers 5.23 and is exactly ``lm_head`` followed by this transform):

=================================================  ===========================================
llama, mistral, qwen2, qwen3, gemma, phi3, olmo2,  none (Gemma's final norm and its embedding
mixtral, qwen2_moe, qwen3_moe                      scale live in the body)
gemma2, gemma3_text                                ``c tanh(z / c)``, ``c`` =
                                                   ``config.final_logit_softcapping`` (None: none)
cohere, cohere2                                    ``model.logit_scale * z``
granite                                            ``z / config.logits_scaling``
=================================================  ===========================================

A positive logit scale ``s`` is folded into the temperature (``s z / tau = z / (tau / s)``); the
soft-cap is the fused op's ``logit_softcap``. Any other ``model_type`` raises
``NotImplementedError`` rather than risk a silently different head (many architectures add a
bias, a multiplier or a mask after ``lm_head``); for such a model, build an :class:`OutputHead`
by hand and call :func:`head_logprobs_and_entropy` on the body's hidden states.

Host syncs: the checks of ``completion_mask`` and the boolean row selection (one ``nonzero``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_temperature
from ..linear_ops import linear_logprobs_and_entropy

# model_type -> how the family's forward transforms ``lm_head``'s output (see the module docstring).
_PLAIN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo2", "mixtral", "qwen2_moe", "qwen3_moe")
_LOGIT_TRANSFORMS = {
    **{name: "none" for name in _PLAIN},
    "gemma2": "softcap",
    "gemma3_text": "softcap",
    "cohere": "scale",
    "cohere2": "scale",
    "granite": "inverse_scale",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_LOGIT_TRANSFORMS))


@dataclass(frozen=True)
class OutputHead:
    """What the fused op needs from a model's output layer: ``logits = cap(scale * (h @ weight.T + bias))``.

    ``scale`` must be > 0; ``softcap`` is ``c`` of ``c tanh(z / c)`` or ``None``. At most one of
    the two is not the identity (no supported family has both).
    """

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            raise ValueError(f"OutputHead.weight must be a [V, D] tensor, got "
                             f"{tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else self.weight!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"OutputHead.scale must be a finite number > 0, got {self.scale!r}")
        if self.softcap is not None and self.scale != 1.0:
            raise ValueError("OutputHead takes a logit scale or a soft-cap, not both "
                             f"(scale={self.scale}, softcap={self.softcap})")

    def op_temperature(self, temperature: float) -> float:
        """The fused op's temperature with the scale folded in: ``scale * z / t = z / (t / scale)``."""
        return check_temperature(temperature) / self.scale


def output_head(model) -> OutputHead:
    """The :class:`OutputHead` of a supported Hugging Face causal LM (``config.model_type`` in the table).

    Reads ``model.get_output_embeddings()`` (an ``nn.Linear``; with tied embeddings its weight *is*
    the input embedding, so gradients reach both uses), and the family's logit transform.
    Raises ``NotImplementedError`` for other model types and ``TypeError`` for a non-Linear head
    (e.g. a PEFT adapter on ``lm_head``, whose effective weight is not ``.weight``).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    transform = _LOGIT_TRANSFORMS.get(model_type)
    if transform is None:
        raise NotImplementedError(
            f"model_type {model_type!r} ({type(model).__name__}) is not one of the causal LMs whose output layer "
            f"entropy_ops knows: {SUPPORTED_MODEL_TYPES}. Build an OutputHead for it by hand and call "
            "head_logprobs_and_entropy on the body's hidden states.")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise TypeError(f"the model's output layer must be a plain torch.nn.Linear, got {type(head).__name__}")
    if transform == "softcap":
        softcap = getattr(config, "final_logit_softcapping", None)
        return OutputHead(head.weight, head.bias, softcap=None if softcap is None else float(softcap))
    if transform == "scale":
        return OutputHead(head.weight, head.bias, scale=_positive("logit_scale", model.logit_scale, model_type))
    if transform == "inverse_scale":
        return OutputHead(head.weight, head.bias,
                          scale=1.0 / _positive("logits_scaling", config.logits_scaling, model_type))
    return OutputHead(head.weight, head.bias)


def _positive(name: str, value, model_type: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{model_type}: {name} must be a finite number > 0 to be folded into the temperature, "
                         f"got {value!r}")
    return float(value)


def model_body(model) -> torch.nn.Module:
    """The decoder body (embeddings, layers, final norm) whose output feeds ``lm_head``."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if body is None or body is model:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__} (model.get_decoder() / model.model)")
    return body


def head_logprobs_and_entropy(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, *,
                              temperature: float = 1.0, return_entropy: bool = True, backend: str = "auto",
                              dtype: torch.dtype | None = None):
    """``(logp, H)`` fp32 ``[N]`` of ``targets [N]`` under ``softmax(cap(scale (hidden W^T + b)) / temperature)``.

    Every row of ``hidden`` ``[N, D]`` counts (select rows before calling). ``dtype`` is the dtype
    the matmuls read: by default the autocast dtype when autocast is on for the head's device
    (what ``lm_head`` itself would use, e.g. bf16 with fp32 master weights), else the head's dtype;
    ``hidden``, ``weight`` and ``bias`` are cast to it (differentiably) and moved to the head's
    device. The op itself runs with autocast off.
    """
    weight, bias = head.weight, head.bias
    device_type = weight.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    weight, hidden = weight.to(dtype), hidden.to(device=weight.device, dtype=dtype)
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return linear_logprobs_and_entropy(
            hidden, weight, targets.to(weight.device), bias=bias, temperature=head.op_temperature(temperature),
            return_entropy=return_entropy, logit_softcap=head.softcap, backend=backend)


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place ``values`` ``[mask.sum()]`` at the True positions of ``mask``, 0 elsewhere (differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _as_bool_mask(name: str, mask, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of input_ids' shape {tuple(shape)}, got {got}")
    if mask.device != device:
        raise ValueError(f"{name} must be on input_ids' device ({device}), got {mask.device}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or hold only 0/1 values")
        mask = mask != 0
    return mask


def compute_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                                 backend="auto", **kwargs):
    """Per-token log-prob and entropy of ``input_ids`` under a Hugging Face causal LM, logits-free.

    Args:
        model: a ``*ForCausalLM`` of a supported family (module docstring), in the mode you want
            (``model.eval()`` for dropout-free log-probs).
        input_ids: ``[B, T]`` token ids (prompt and completion, any padding).
        attention_mask: ``[B, T]`` 0/1 or bool, passed to the body unchanged (``None`` allowed).
        completion_mask: ``[B, T]`` bool or 0/1: the positions to score; ``completion_mask[:, 0]``
            must be False and every scored position must be attended (``attention_mask`` 1).
        temperature: ``tau > 0``; the distribution is ``softmax(logits / tau)`` as in TRL and verl.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` for the fused op.
        **kwargs: passed to the body (e.g. ``position_ids`` for left-padded batches).

    Returns:
        ``(logp, entropy)``, fp32 ``[B, T]``: position ``t`` is the prediction of ``input_ids[b, t]``
        from ``input_ids[b, :t]`` (the body's hidden state at ``t - 1``), 0 where
        ``completion_mask`` is False. Equals, in exact arithmetic,
        ``log_softmax(model(input_ids, attention_mask).logits[:, :-1] / tau)`` gathered at
        ``input_ids[:, 1:]`` and placed at columns ``1..T-1``. The head reads the autocast dtype
        when autocast is on (as ``lm_head`` would), else its own dtype; see
        :func:`head_logprobs_and_entropy`.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty [B, T] integer tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    shape, device = input_ids.shape, input_ids.device
    completion = _as_bool_mask("completion_mask", completion_mask, shape, device)
    if bool(completion[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be False: no prefix predicts the first token")
    if attention_mask is not None:
        attended = _as_bool_mask("attention_mask", attention_mask, shape, device)
        if bool((completion & ~attended).any()):
            raise ValueError("completion_mask selects a position whose attention_mask is 0")
    head = output_head(model)
    hidden = model_body(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **kwargs).last_hidden_state
    scored = completion[:, 1:]  # scored[b, t - 1]: the hidden state at t - 1 predicts token t
    logp, H = head_logprobs_and_entropy(head, hidden[:, :-1][scored], input_ids[:, 1:][scored],
                                        temperature=temperature, backend=backend)
    first = torch.zeros(shape[0], 1, dtype=logp.dtype, device=logp.device)
    scored = scored.to(logp.device)
    return torch.cat((first, scatter_rows(logp, scored)), 1), torch.cat((first, scatter_rows(H, scored)), 1)
