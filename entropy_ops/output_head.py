"""The output head of a Hugging Face causal LM, found generically, and its hidden states captured.

A causal LM's ``forward`` is ``body -> hidden h -> output layer -> logit transform f -> logits``::

    z = h W^T + b                    (the output layer: ``model.get_output_embeddings()``, an nn.Linear)
    logits = f(z) = cap(s z)         s: logit scale,  cap(x) = c tanh(x / c)  (c: final soft-cap)

Everything before the output layer (final norm, an embedding or hidden multiplier, a vision
tower, masks, rope) belongs to the body; :func:`output_head` reads the output layer and ``f``
from the model and its config, without a list of families:

=================================  =======================================================
``W``, ``b``                       ``model.get_output_embeddings()``: its ``weight`` (the
                                   input embedding itself when tied, so gradients reach
                                   both uses) and ``bias`` (GPT-J style heads have one)
``s`` (logit scale)                ``config.logit_scale`` (Cohere) times
                                   ``1 / config.logits_scaling`` (Granite); default 1
``c`` (final soft-cap)             ``config.final_logit_softcapping`` (Gemma 2/3); default none
=================================  =======================================================

A field missing from ``model.config`` is read from ``config.get_text_config()`` (vision-language
models keep the language model's settings there). ``s`` is folded into the fused op's
temperature (``s z / tau = z / (tau / s)``); ``c`` is its ``logit_softcap``.

Capture (:func:`capture_head`): to get ``h`` exactly as the model feeds its head (vision-language
preprocessing, ``logits_to_keep``, every family's quirks stay the model's), the model's own
``forward`` runs with the output layer swapped for a module that records its input and returns a
small *probe* ``P`` ``[..., K]`` (K = 9 fixed values) instead of ``[..., V]`` logits, and with the
model's ``loss_function`` swapped for one that records its arguments and computes nothing. The
model applies its own logit transform to the probe, so the logits it hands back are ``f(P)``:
:meth:`HeadCapture.check_transform` compares them with the ``f`` read from the config and raises,
naming the family, when they differ (a family whose forward post-processes logits in a way this
module does not know is refused rather than silently mis-scored); the vocabulary size the model
passes to its loss is checked against ``W``'s rows the same way. The real output layer is never
called, and the swap is undone when the forward returns or raises. Cost: one ``[..., K]`` tensor
and one host sync for the check.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ._validation import check_temperature
from .linear_ops import linear_logprobs_and_entropy

# Probe values fed through the model's logit transform: exact in bf16/fp16, spread from far inside
# to far outside any soft-cap (Gemma uses 30), signs both ways, so a scale or a cap shows.
PROBE_VALUES = (-1024.0, -32.0, -2.0, -0.5, 0.0, 0.75, 3.0, 48.0, 2048.0)
# Relative tolerance of the probe check per probe dtype: the model computes f(P) in that dtype.
_PROBE_RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def family_name(model) -> str:
    """``"<model_type> (<ClassName>)"``, for error messages."""
    config = getattr(model, "config", None)
    return f"{getattr(config, 'model_type', None)!r} ({type(model).__name__})"


@dataclass(frozen=True)
class OutputHead:
    """``logits = cap(scale * (h @ weight.T + bias))`` with ``cap(x) = softcap * tanh(x / softcap)``.

    ``scale`` must be > 0; ``softcap`` is ``c`` or ``None``. At most one of the two is not the
    identity: no Hugging Face family has both, and with both the scale could not be folded into the
    temperature.
    """

    weight: torch.Tensor  # [V, D]
    bias: torch.Tensor | None = None  # [V]
    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self):
        if not isinstance(self.weight, torch.Tensor) or self.weight.dim() != 2:
            got = tuple(self.weight.shape) if isinstance(self.weight, torch.Tensor) else type(self.weight).__name__
            raise ValueError(f"OutputHead.weight must be a [V, D] tensor, got {got}")
        _check_positive("OutputHead.scale", self.scale)
        if self.softcap is not None:
            _check_positive("OutputHead.softcap", self.softcap)
            if self.scale != 1.0:
                raise ValueError("OutputHead takes a logit scale or a soft-cap, not both "
                                 f"(scale={self.scale}, softcap={self.softcap})")

    @property
    def logit_softcap(self) -> float | None:
        """The fused ops' name for :attr:`softcap`."""
        return self.softcap

    def op_temperature(self, temperature: float) -> float:
        """The fused op's temperature with the scale folded in: ``scale * z / t = z / (t / scale)``."""
        return check_temperature(temperature) / self.scale

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """``f(z)``: the logit transform applied to the output layer's result ``z``."""
        if self.softcap is not None:
            return torch.tanh(z / self.softcap) * self.softcap
        return z * self.scale if self.scale != 1.0 else z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits ``f(hidden @ weight.T + bias)``, materialized (``[..., V]``)."""
        return self.transform(torch.nn.functional.linear(hidden, self.weight, self.bias))


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _config_field(config, name: str):
    """``config.<name>``, else the text config's (vision-language models), else ``None``."""
    if hasattr(config, name):
        return getattr(config, name)
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return getattr(text, name, None) if text is not None and text is not config else None


def output_layer(model) -> torch.nn.Linear:
    """``model.get_output_embeddings()``, checked to be a plain ``nn.Linear`` (the fused op reads ``.weight``).

    Raises ``TypeError`` naming the family for a model without one, or whose output layer computes
    something else than ``h @ weight.T + bias`` (a PEFT adapter or a quantized layer on it).
    """
    getter = getattr(model, "get_output_embeddings", None)
    layer = getter() if callable(getter) else None
    if layer is None:
        raise TypeError(f"{family_name(model)} has no output layer (get_output_embeddings() returned None): "
                        "entropy_ops needs a causal LM whose logits are an nn.Linear of the last hidden states")
    if not isinstance(layer, torch.nn.Linear) or type(layer).forward is not torch.nn.Linear.forward:
        raise TypeError(f"{family_name(model)}: the output layer is a {type(layer).__name__}, not a plain "
                        "torch.nn.Linear; entropy_ops reads its weight directly, so a layer that computes "
                        "anything else (an adapter, a quantized weight) is refused (merge or unwrap it first)")
    return layer


def output_head(model) -> OutputHead:
    """The :class:`OutputHead` of a Hugging Face causal LM (module docstring for where each part comes from).

    Raises ``TypeError`` (no usable output layer) or ``ValueError`` (a scale or cap that is not a
    positive number, or both at once), naming the family.
    """
    layer = output_layer(model)
    config = getattr(model, "config", None)
    scale = 1.0
    try:
        logit_scale = _config_field(config, "logit_scale")
        if logit_scale is not None:
            scale *= _check_positive("config.logit_scale", logit_scale)
        logits_scaling = _config_field(config, "logits_scaling")
        if logits_scaling is not None:
            scale /= _check_positive("config.logits_scaling", logits_scaling)
        softcap = _config_field(config, "final_logit_softcapping")
        return OutputHead(layer.weight, layer.bias, scale=scale,
                          softcap=None if softcap is None else _check_positive("config.final_logit_softcapping",
                                                                                softcap))
    except ValueError as err:
        raise ValueError(f"{family_name(model)}: {err}") from None


def head_operands(head: OutputHead, hidden: torch.Tensor, dtype: torch.dtype | None = None):
    """``(hidden, weight, bias)`` cast (differentiably) to the dtype the output layer's matmul would read.

    That is ``dtype`` when given, else the autocast dtype when autocast is on for the head's device
    (e.g. bf16 with fp32 master weights), else the head's dtype; ``hidden`` moves to the head's device.
    Run the fused op on them with autocast off.
    """
    weight, bias = head.weight, head.bias
    device_type = weight.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    bias = None if bias is None else bias.to(dtype)
    return hidden.to(device=weight.device, dtype=dtype), weight.to(dtype), bias


def head_logprobs_and_entropy(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, *,
                              temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = True,
                              backend: str = "auto", dtype: torch.dtype | None = None):
    """``(logp, H)`` fp32 ``[...]`` of ``targets [...]`` under ``softmax(f(hidden W^T + b) / temperature)``.

    ``hidden`` ``[..., D]``; rows whose target is ``ignore_index`` give 0 and no gradient. The
    matmuls read ``dtype`` (:func:`head_operands`); the op runs with autocast off.
    """
    hidden, weight, bias = head_operands(head, hidden, dtype)
    with torch.autocast(weight.device.type, enabled=False):
        return linear_logprobs_and_entropy(
            hidden, weight, targets.to(weight.device), bias=bias, temperature=head.op_temperature(temperature),
            ignore_index=ignore_index, return_entropy=return_entropy, logit_softcap=head.softcap, backend=backend)


# ---------------------------------------------------------------- capture
class _HiddenCapture(torch.nn.Module):
    """Stands in for the output layer during one forward: records its input, returns the probe."""

    def __init__(self, record: "HeadCapture"):
        super().__init__()
        self._record = record

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        record = self._record
        if record.hidden is not None:
            raise RuntimeError(f"{record.family}: the output layer was called twice in one forward; "
                               "entropy_ops captures exactly one call")
        record.hidden = hidden
        probe = torch.tensor(PROBE_VALUES, dtype=hidden.dtype, device=hidden.device)
        record.probe = probe.expand(*hidden.shape[:-1], len(PROBE_VALUES)).contiguous()
        return record.probe


@dataclass
class LossCall:
    """The arguments the model passed to its ``loss_function`` (``ForCausalLMLoss``'s signature)."""

    labels: torch.Tensor | None
    vocab_size: int | None
    num_items_in_batch: object = None
    ignore_index: int = -100
    shift_labels: torch.Tensor | None = None


class HeadCapture:
    """What one captured forward recorded: ``hidden`` (the output layer's input), the ``probe`` it got
    back, and ``loss_call`` (``None`` when the model computed no loss)."""

    def __init__(self, model, head: OutputHead):
        self.family = family_name(model)
        self.head = head
        self.hidden: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.loss_call: LossCall | None = None

    def loss_function(self, logits, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        """Stands in for the model's ``loss_function``: records its arguments, checks the logits it got."""
        self.check_transform(logits)
        self.loss_call = LossCall(labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)
        return logits.new_zeros(())  # replaced by the caller

    def check_transform(self, logits) -> None:
        """Raise ``TypeError`` unless ``logits`` is ``head.transform(probe)``: the model post-processes its
        logits the way the config says (one host sync)."""
        if self.probe is None:
            raise TypeError(f"{self.family}: the forward never called its output layer "
                            "(get_output_embeddings()); entropy_ops cannot find its hidden states")
        if not isinstance(logits, torch.Tensor) or logits.shape != self.probe.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise TypeError(f"{self.family}: the logits the forward built from its output layer have shape {got}, "
                            f"not the output layer's {tuple(self.probe.shape)}: this family reshapes or slices "
                            "its logits, which entropy_ops does not reproduce")
        expected = self.head.transform(self.probe.double())
        rtol = _PROBE_RTOL.get(self.probe.dtype, 1e-5)
        if not torch.allclose(logits.double(), expected, rtol=rtol, atol=rtol):
            got = logits.reshape(-1, len(PROBE_VALUES))[0].tolist()
            raise TypeError(
                f"{self.family} post-processes its logits differently from what its config says "
                f"(scale={self.head.scale}, final soft-cap={self.head.softcap}): f({list(PROBE_VALUES)}) = "
                f"{[round(v, 4) for v in got]}; entropy_ops does not know this output head")

    def check_vocab_size(self) -> None:
        vocab = None if self.loss_call is None else self.loss_call.vocab_size
        rows = self.head.weight.shape[0]
        if vocab is not None and int(vocab) != rows:
            raise TypeError(f"{self.family} computes its loss over vocab_size={vocab} classes while its output "
                            f"layer has {rows} rows; entropy_ops does not reproduce that")


def _parent_and_name(model, layer: torch.nn.Module):
    for name, module in model.named_modules():
        for child_name, child in module._modules.items():
            if child is layer:
                return module, child_name
    raise TypeError(f"{family_name(model)}: the output layer is not a submodule of the model")


@contextlib.contextmanager
def capture_head(model, head: OutputHead | None = None):
    """Within the block, ``model``'s output layer records its input instead of computing logits, and its
    ``loss_function`` records its arguments; yields the :class:`HeadCapture`. Restores both on exit."""
    head = output_head(model) if head is None else head
    layer = output_layer(model)
    parent, name = _parent_and_name(model, layer)
    record = HeadCapture(model, head)
    had_loss = "_loss_function" in model.__dict__
    saved_loss = model.__dict__.get("_loss_function")
    setattr(parent, name, _HiddenCapture(record))
    model.__dict__["_loss_function"] = record.loss_function  # the loss_function property reads this
    try:
        yield record
    finally:
        setattr(parent, name, layer)
        if had_loss:
            model.__dict__["_loss_function"] = saved_loss
        else:
            model.__dict__.pop("_loss_function", None)
