"""Per-token log-probs and entropies of a Hugging Face causal LM without its ``[B, T, V]`` logits.

:func:`compute_logprobs_and_entropy` is the RL path of a model, patched by
:func:`entropy_ops.patch` or not: it runs the model's own forward with the output layer captured
(:func:`entropy_ops.output_head.capture_head`: the output layer records its input hidden states
and is never called; vision-language inputs such as ``pixel_values`` pass through), keeps the
hidden rows that predict a completion token, and hands them with the head's weight, bias, logit
scale and soft-cap (:func:`entropy_ops.output_head.output_head`, read generically from the model
and its config) to :func:`entropy_ops.linear_logprobs_and_entropy`, which streams the vocabulary:
no logits tensor is built in forward or backward, and prompt or padding positions never cost a
vocabulary pass.

Math (``h_{b,t}`` the hidden state the output layer would read at position ``t``, ``W``/``b`` the
output layer, ``f`` the family's logit transform ``cap(s z)``, ``tau`` the temperature,
``y_{b,t}`` = ``input_ids[b, t]``)::

    z = f(h_{b,t-1} W^T + b)
    logp[b, t] = log_softmax(z / tau)[y_{b,t}]
    H[b, t]    = -sum_v p_v log p_v,  p = softmax(z / tau)

for every ``t`` with ``completion_mask[b, t]``; both are 0 elsewhere. Position ``t`` holds the
prediction *of* token ``t`` *from* the prefix ``input_ids[b, :t]``, i.e. it equals
``log_softmax(model(...).logits[b, t - 1] / tau)[input_ids[b, t]]``: the shift is done here, and
``completion_mask[:, 0]`` must be False (no prefix predicts token 0). Gradients reach every
parameter (body, output layer, tied embeddings) through the fused op's backward.

Host syncs: the checks of ``completion_mask``, the check of the model's logit transform (one
``[B, T, 9]`` probe) and the boolean row selection (one ``nonzero``).

The names :class:`OutputHead`, :func:`output_head` and :func:`head_logprobs_and_entropy` are
re-exported from :mod:`entropy_ops.output_head`, the one output-head implementation of the project.
"""
from __future__ import annotations

import torch

from .._validation import check_bool_mask
from ..output_head import (  # noqa: F401  (re-exported)
    OutputHead,
    capture_head,
    head_logprobs_and_entropy,
    output_head,
)


def model_body(model) -> torch.nn.Module:
    """The decoder body of a text-only causal LM (``model.get_decoder()``), for callers that run it directly.

    :func:`compute_logprobs_and_entropy` does not use it (it runs the whole model with the head
    captured, which also covers vision-language models).
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if body is None or body is model:
        raise TypeError(f"cannot find the decoder body of {type(model).__name__} (model.get_decoder() / model.model)")
    return body


def captured_hidden(model, *args, **kwargs):
    """``(hidden, head, outputs)``: run ``model(*args, **kwargs)`` with the output layer captured.

    ``hidden`` ``[..., D]`` is what the output layer would have read, ``head`` the model's
    :class:`OutputHead` (its transform checked against the model's own post-processing), ``outputs``
    the model's outputs (their ``logits`` field holds only the probe: ignore it). Pass no labels.
    """
    head = output_head(model)
    with capture_head(model, head) as record:
        outputs = model(*args, **kwargs)
    logits = outputs.get("logits") if hasattr(outputs, "get") else None
    if logits is None and isinstance(outputs, tuple):
        logits = outputs[0]
    record.check_transform(logits)
    return record.hidden, head, outputs


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place ``values`` ``[mask.sum()]`` at the True positions of ``mask``, 0 elsewhere (differentiable)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def compute_logprobs_and_entropy(model, input_ids, attention_mask, completion_mask, temperature=1.0,
                                 backend="auto", **kwargs):
    """Per-token log-prob and entropy of ``input_ids`` under a Hugging Face causal LM, logits-free.

    Args:
        model: a Hugging Face ``*ForCausalLM`` or vision-language ``*ForConditionalGeneration``
            (patched by :func:`entropy_ops.patch` or not), in the mode you want (``model.eval()`` for
            dropout-free log-probs). Refused, naming the family, when its output head is not a plain
            ``nn.Linear`` or its logit post-processing is not the one its config describes.
        input_ids: ``[B, T]`` token ids (prompt and completion, any padding).
        attention_mask: ``[B, T]`` 0/1 or bool, passed to the body unchanged (``None`` allowed).
        completion_mask: ``[B, T]`` bool or 0/1: the positions to score; ``completion_mask[:, 0]``
            must be False and every scored position must be attended (``attention_mask`` 1).
        temperature: ``tau > 0``; the distribution is ``softmax(logits / tau)`` as in TRL and verl.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"`` for the fused op.
        **kwargs: passed to the model's forward (e.g. ``position_ids`` for left-padded batches,
            ``pixel_values`` and ``image_grid_thw`` of a vision-language model).

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
    completion = check_bool_mask("completion_mask", completion_mask, shape, device, "input_ids'")
    if bool(completion[:, 0].any()):
        raise ValueError("completion_mask[:, 0] must be False: no prefix predicts the first token")
    if attention_mask is not None:
        attended = check_bool_mask("attention_mask", attention_mask, shape, device, "input_ids'")
        if bool((completion & ~attended).any()):
            raise ValueError("completion_mask selects a position whose attention_mask is 0")
    hidden, head, _ = captured_hidden(model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                      **kwargs)
    if hidden.shape[:2] != shape:
        raise ValueError(f"the model fed its output layer hidden states of shape {tuple(hidden.shape)}, not one "
                         f"per input position {tuple(shape)} (logits_to_keep in kwargs?)")
    scored = completion[:, 1:]  # scored[b, t - 1]: the hidden state at t - 1 predicts token t
    logp, H = head_logprobs_and_entropy(head, hidden[:, :-1][scored], input_ids[:, 1:][scored],
                                        temperature=temperature, backend=backend)
    first = torch.zeros(shape[0], 1, dtype=logp.dtype, device=logp.device)
    scored = scored.to(logp.device)
    return torch.cat((first, scatter_rows(logp, scored)), 1), torch.cat((first, scatter_rows(H, scored)), 1)
