"""``entropy_ops.patch(model)``: a Hugging Face causal LM whose training loss never builds the logits.

After ``patch(model)``, ``model(input_ids, labels=labels)`` (any other forward argument too:
``attention_mask``, ``pixel_values`` of a vision-language model, ``num_items_in_batch``,
``shift_labels``, ...) returns the same ``loss`` as before, computed by the fused hidden-state op,
and ``logits=None``. How (:mod:`entropy_ops.output_head`): the model's own ``forward`` runs with its
output layer replaced by a recorder of its input hidden states ``h`` and its ``loss_function`` by a
recorder of the labels and loss options; then, with ``W``, ``b``, the logit scale ``s`` and the
final soft-cap ``cap`` of the model's head::

    targets = labels[..., 1:] padded with ignore_index at the end   (or shift_labels when given)
    loss_t  = -log_softmax(cap(s (h_t W^T + b)))[targets_t]          (targets_t != ignore_index)
    loss    = sum_t loss_t / #{t: targets_t != ignore_index}          (num_items_in_batch None)
            = sum_t loss_t / num_items_in_batch                       (otherwise)

which is ``transformers``' ``ForCausalLMLoss`` (its shift, ``ignore_index=-100`` default, fp32
loss). The output layer is never called, so the ``[B, T, V]`` logits never exist, in forward or
backward, and only the rows with a target reach the vocabulary (a masked prompt costs no vocabulary
pass); gradients reach every parameter (body, head, tied embeddings) as before.

* Without ``labels`` the call is the model's own ``forward``, unchanged: logits
  as usual (``generate`` works).
* ``return_logits=True`` (in :func:`patch`, or per call ``model(..., return_logits=True)``) also
  returns the logits, computed from the captured ``h`` (the loss stays fused).
* ``return_dict=False`` gives the usual tuple (``(loss, ...)`` without logits).
* The per-token log-probs and entropies of given tokens at a temperature (the RL path) are
  :func:`entropy_ops.integrations.hf.compute_logprobs_and_entropy`, which works on a patched or an
  unpatched model alike.

The patch is per instance (``model.forward`` is set on the instance; the class and every other
instance are untouched), idempotent, and undone by :func:`unpatch`. It refuses, naming the family,
a model whose output layer is not a plain ``nn.Linear`` or whose ``loss_function`` is not
``ForCausalLMLoss``; a family whose forward post-processes the logits differently from what its
config says is refused at its first forward (:meth:`~entropy_ops.output_head.HeadCapture.check_transform`).
"""
from __future__ import annotations

import functools
import inspect

import torch

from .cross_entropy import linear_cross_entropy
from .output_head import OutputHead, capture_head, family_name, head_operands, output_head

__all__ = ["patch", "unpatch", "is_patched", "causal_lm_loss"]


def causal_lm_loss(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor | None, *,
                   shift_labels: torch.Tensor | None = None, ignore_index: int = -100, num_items_in_batch=None,
                   backend: str = "auto") -> torch.Tensor:
    """``ForCausalLMLoss`` of a model with output head ``head`` from its last hidden states ``hidden [..., D]``.

    ``labels [...]`` are shifted here (``labels[..., 1:]``, ``ignore_index`` appended), unless
    ``shift_labels`` (already aligned with ``hidden``) is given. Mean over the non-ignored targets,
    or the sum divided by ``num_items_in_batch`` when that is given. fp32 scalar (fp64 for an fp64 model).
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1)
    if targets.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match the {tuple(hidden.shape[:-1])} "
                         "positions whose hidden states reached the output layer (logits_to_keep?)")
    targets = targets.to(hidden.device)
    keep = targets != ignore_index  # only these rows reach the vocabulary (one host sync)
    h, w, b = head_operands(head, hidden.reshape(-1, hidden.shape[-1])[keep])
    with torch.autocast(w.device.type, enabled=False):
        loss = linear_cross_entropy(h, w, targets[keep].to(w.device), bias=b, reduction="sum",
                                    ignore_index=ignore_index, logit_softcap=head.softcap,
                                    temperature=head.op_temperature(1.0), backend=backend)
    if num_items_in_batch is None:
        return loss / keep.sum().to(loss.device)  # NaN when every target is ignored, as in transformers
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


class FusedLossForward:
    """The patched ``forward`` of one model instance (see the module docstring). Picklable; holds the
    forward it replaced in :attr:`original`."""

    def __init__(self, model, original, *, return_logits: bool, backend: str):
        functools.update_wrapper(self, original)  # signature and name stay the model's (HF Trainer reads them)
        self.model = model
        self.original = original
        self.return_logits = return_logits
        self.backend = backend

    def __call__(self, *args, return_logits: bool | None = None, **kwargs):
        model = self.model
        if not _has_labels(self.original, args, kwargs):
            return self.original(*args, **kwargs)
        return_logits = self.return_logits if return_logits is None else bool(return_logits)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(getattr(model, "config", None), "return_dict", True)
        head = output_head(model)  # looked up per call: the weight may have been replaced since patch()
        with capture_head(model, head) as record:
            out = self.original(*args, return_dict=True, **kwargs)
        call = record.loss_call
        if call is None:
            raise TypeError(f"{record.family}: labels were given but the forward computed no loss; "
                            "entropy_ops.patch only supports causal LMs whose forward calls self.loss_function")
        record.check_vocab_size()
        loss = causal_lm_loss(head, record.hidden, call.labels, shift_labels=call.shift_labels,
                              ignore_index=call.ignore_index, num_items_in_batch=call.num_items_in_batch,
                              backend=self.backend)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        logits = head.logits(record.hidden) if return_logits else None
        out = type(out)(loss=loss, logits=logits, **fields)
        return out if return_dict else out.to_tuple()


def _has_labels(forward, args, kwargs) -> bool:
    if kwargs.get("labels") is not None:
        return True
    if not args:
        return False
    try:
        bound = inspect.signature(forward).bind_partial(*args)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("labels") is not None


def is_patched(model) -> bool:
    """Whether :func:`patch` was applied to this instance."""
    return isinstance(getattr(model, "__dict__", {}).get("forward"), FusedLossForward)


def patch(model, *, return_logits: bool = False, backend: str = "auto"):
    """Make ``model(..., labels=...)`` compute its cross-entropy with the fused op; returns ``model``.

    Args:
        model: a Hugging Face ``*ForCausalLM`` or ``*ForConditionalGeneration`` (vision-language):
            its output layer must be ``get_output_embeddings()``, a plain ``nn.Linear``, and its loss
            ``ForCausalLMLoss`` (the default of every causal LM in ``transformers``).
        return_logits: also return the logits when labels are given (default ``None`` logits);
            overridable per call with ``model(..., return_logits=...)``.
        backend: the fused op's backend, ``"auto"`` | ``"triton"`` | ``"torch"``.

    Calling it again updates the options. Raises ``TypeError`` naming the family for a model it
    cannot patch (module docstring).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch() takes a torch.nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    if not isinstance(return_logits, bool):
        raise TypeError(f"return_logits must be a bool, got {type(return_logits).__name__}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    output_head(model)  # refuse an unusable head now, not at the first training step
    loss_fn = getattr(model, "loss_function", None)
    if getattr(loss_fn, "__name__", None) != "ForCausalLMLoss":
        raise TypeError(f"{family_name(model)}: its loss_function is {getattr(loss_fn, '__name__', loss_fn)!r}, "
                        "not transformers' ForCausalLMLoss; entropy_ops.patch reproduces only that loss")
    current = model.__dict__.get("forward")
    if isinstance(current, FusedLossForward):
        current.return_logits, current.backend = return_logits, backend
        return model
    model.forward = FusedLossForward(model, model.forward, return_logits=return_logits, backend=backend)
    return model


def unpatch(model):
    """Undo :func:`patch` on this instance (no-op when it is not patched); returns ``model``."""
    current = model.__dict__.get("forward")
    if isinstance(current, FusedLossForward):
        del model.__dict__["forward"]
        original = current.original
        if getattr(original, "__self__", None) is not model or getattr(original, "__func__", None) is not type(model).forward:
            model.forward = original  # an instance-level forward (e.g. an accelerate hook) was there before
    return model
