"""Input checks shared by the public ops: every message names the argument.

Two kinds of checks:

- *metadata* checks (types, dtypes, shapes, devices, option values) read no tensor data and
  always run;
- *value* checks read tensor data (targets in ``[0, V)``, every kept row has a finite logit,
  ``logits / temperature`` within fp32). On CUDA they synchronize with the host, which stalls
  the stream and prevents CUDA-graph capture. The ``validate=`` argument of the ops decides
  when they run (:func:`value_checks_enabled`):

  ``validate=True``   always (on CUDA: one host synchronization per check);
  ``validate=False``  never;
  ``validate="auto"`` (default) on CPU tensors, where they cost no synchronization, and never
                      on other devices. There the kernels guard instead: a target outside
                      ``[0, V)`` (other than ``ignore_index``) is never dereferenced and its row
                      gives NaN outputs and a NaN gradient; a kept row with no finite logit (or
                      whose scaled logits overflow fp32) gives NaN. NaN is never silently
                      replaced by a number, so a training loss shows it.
"""
import functools
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALIDATE_CHOICES = (True, False, "auto")
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal


def check_validate(validate):
    """``validate`` must be ``True``, ``False`` or ``"auto"``; returns it."""
    if validate is True or validate is False or (isinstance(validate, str) and validate == "auto"):
        return validate
    raise ValueError(f"validate must be True, False or 'auto', got {validate!r}")


def value_checks_enabled(validate, device: torch.device) -> bool:
    """Whether the data-reading (host-synchronizing) checks run for tensors on ``device``.

    ``True`` -> always, ``False`` -> never, ``"auto"`` -> only on CPU tensors (module docstring).
    """
    validate = check_validate(validate)
    if validate == "auto":
        return torch.device(device).type == "cpu"
    return validate


def widen_targets(targets: torch.Tensor) -> torch.Tensor:
    """``targets`` flattened to a contiguous int64 ``[N]``: every comparison with ``ignore_index``
    and the vocabulary happens after widening, so a narrow (e.g. ``uint8``) dtype cannot wrap."""
    return targets.reshape(-1).to(torch.int64).contiguous()


def check_bool_mask(name: str, mask, shape, device, reference: str) -> torch.Tensor:
    """``mask`` as a bool tensor of ``shape`` on ``device`` (``reference`` names the tensor it must match,
    e.g. ``"the targets'"``); a non-bool mask must hold only 0/1 (a host sync, non-bool masks only)."""
    if not isinstance(mask, torch.Tensor) or mask.shape != shape:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of {reference} shape {tuple(shape)}, got {got}")
    if mask.device != device:
        raise ValueError(f"{name} must be on {reference} device ({device}), got {mask.device}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or hold only 0/1 values")
        mask = mask != 0
    return mask


def check_float_tensor(name: str, x, *, min_dim: int = 1, allow_fp64: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = FLOAT_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")


def check_temperature(temperature) -> float:
    """A finite ``temperature > 0`` whose inverse (the kernels' scale) is a finite, normal fp32 (never rounded to 0)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if 1.0 / temperature > _FLOAT32_MAX:
        raise ValueError(f"temperature must be >= {1.0 / _FLOAT32_MAX:.3g} (1 / temperature must be a finite "
                         f"float32), got {temperature}")
    if 1.0 / temperature < _FLOAT32_TINY:
        # 1 / temperature would round to 0 (or a subnormal that GPUs flush to 0) in fp32: a masked
        # -inf logit times 0 is NaN, so the scale must stay a normal fp32.
        raise ValueError(f"temperature must be <= {1.0 / _FLOAT32_TINY:.3g} (1 / temperature must be a normal "
                         f"float32, not rounded to 0), got {temperature}")
    return temperature


def check_targets(targets, lead_shape: torch.Size, n_classes: int, ignore_index: int, device: torch.device,
                  *, validate=True) -> None:
    """``targets`` must be an integer tensor of shape ``lead_shape`` with ids in ``[0, n_classes)`` or ``ignore_index``.

    The id range is a value check (read after widening to int64, so no dtype wraps): it runs when
    :func:`value_checks_enabled` says so for ``validate`` (default ``True``: always, as before the
    switch existed; the ops pass their own ``validate=``).
    """
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must have an integer dtype, got {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(f"targets must have shape {tuple(lead_shape)} (the leading dims), got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets must be on the same device as the inputs ({device}), got {targets.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if 0 <= ignore_index < n_classes:
        raise ValueError(f"ignore_index must lie outside [0, {n_classes}) (the vocabulary), got {ignore_index}")
    if targets.numel() and value_checks_enabled(validate, targets.device):
        wide = targets.to(torch.int64)
        bad = (wide != ignore_index) & ((wide < 0) | (wide >= n_classes))
        if bool(bad.any()):
            value = int(wide[bad].flatten()[0])
            raise ValueError(
                f"targets must be in [0, {n_classes}) or equal ignore_index={ignore_index}; found {value}"
            )


def check_finite_rows(lse: torch.Tensor, keep: torch.Tensor, name: str, *, rows: torch.Tensor | None = None,
                      temperature: float | None = None, row_max_abs=None) -> None:
    """Raise when a non-ignored row had only ``-inf`` (or NaN) logits: its log-prob is undefined.

    A value check (host sync on CUDA): callers run it when :func:`value_checks_enabled`. With
    ``temperature`` and either ``rows`` (the ``[..., V]`` logits, rows in the order of ``lse``) or
    ``row_max_abs`` (``idx -> max |finite logit|`` of flattened row ``idx`` before the temperature, as a
    float; for callers that hold no logits, e.g. the hidden-state ops, or a vocab shard that must
    combine its answer with the other ranks'), a failing row whose logits are finite fp32 numbers but
    overflow fp32 once divided by ``temperature`` is blamed on ``temperature``.
    """
    bad = keep & ~torch.isfinite(lse)
    if bad.numel() and bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        if temperature is not None and (rows is not None or row_max_abs is not None):
            if row_max_abs is None:
                largest = max_abs_finite(rows.reshape(-1, rows.shape[-1])[idx])
            else:
                largest = float(row_max_abs(idx))
            _check_scaled_row(largest, temperature, idx)
        raise ValueError(
            f"{name} row {idx} (flattened) has no finite logit (all -inf, or NaN) while its target is not "
            "ignored; mask that position with ignore_index"
        )


def max_abs_finite(z: torch.Tensor) -> float:
    """``max |z_i|`` over the finite entries of ``z`` (0 when none), as a Python float (host sync)."""
    finite = z[torch.isfinite(z)].double()
    return float(finite.abs().max()) if finite.numel() else 0.0


def linear_row_max_abs(hidden_row: torch.Tensor, weight: torch.Tensor, bias, softcap) -> float:
    """:func:`max_abs_finite` of one row of ``cap(hidden_row @ weight.T + bias)``, formed in float64 (a
    row whose fp32 logits overflow comes out above the fp32 range, and is then not blamed on the temperature),
    ``_ROW_BLOCK`` vocab rows at a time (never a float64 copy of the whole weight)."""
    h = hidden_row.double()
    largest = 0.0
    for v0 in range(0, weight.shape[0], _ROW_BLOCK):
        z = weight[v0:v0 + _ROW_BLOCK].double() @ h
        if bias is not None:
            z = z + bias[v0:v0 + _ROW_BLOCK].double()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        largest = max(largest, max_abs_finite(z))
    return largest


_ROW_BLOCK = 8192  # vocab rows per float64 block of linear_row_max_abs (8192 D 8 bytes)


def _check_scaled_row(largest: float, temperature: float, idx: int) -> None:
    if largest <= _FLOAT32_MAX and largest / temperature > _FLOAT32_MAX:
        raise ValueError(
            f"temperature={temperature} makes logits / temperature overflow float32 (row {idx} (flattened) has "
            f"|logit| up to {largest:.4g}); use a larger temperature"
        )


def check_softcap(softcap) -> float | None:
    """``logit_softcap`` must be ``None`` or a finite float > 0; returns it as a float (or ``None``)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"logit_softcap must be a float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap <= 0.0:
        raise ValueError(f"logit_softcap must be finite and > 0 (or None), got {softcap}")
    return softcap


def check_same_dtype_device(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must share ``ref``'s dtype (``TypeError``) and device (``ValueError``)."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")


def check_lm_head(hidden, weight, bias, weight_name: str = "weight", bias_name: str = "bias") -> None:
    """``hidden [..., D]``, ``weight [V, D]`` (V >= 1), ``bias [V]`` or ``None``: float, same dtype and device.

    The lm_head checks of every hidden-state op (``linear_logprobs_and_entropy``, its token-chunked and
    vocab-parallel forms), with the caller's argument names (``weight_shard``/``bias_shard``).
    """
    check_float_tensor("hidden", hidden)
    check_float_tensor(weight_name, weight)
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        if weight.dim() != 2:
            why = f"it has {weight.dim()} dimension(s)"
        elif weight.shape[0] == 0:
            why = "V = 0"
        else:
            why = f"its D = {weight.shape[1]} differs"
        raise ValueError(f"{weight_name} must have shape [V, D] with V >= 1 and D = hidden.shape[-1] = {D}, "
                         f"got {tuple(weight.shape)} ({why})")
    check_same_dtype_device(weight_name, weight, "hidden", hidden)
    if bias is not None:
        check_float_tensor(bias_name, bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{bias_name} must have shape [V] = [{weight.shape[0]}] ({weight_name}.shape[0]), "
                             f"got {tuple(bias.shape)}")
        check_same_dtype_device(bias_name, bias, "hidden", hidden)


def check_accumulator(name: str, out, shape, dtype: torch.dtype, device: torch.device, *,
                      contiguous: bool) -> None:
    """A caller-provided gradient accumulator: a tensor of exactly ``shape``, ``dtype`` and ``device``
    (``TypeError`` for the type/dtype, ``ValueError`` otherwise), contiguous when the kernel needs it."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the accumulation dtype), got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"{name} must be on {device}, got {out.device}")
    if contiguous and not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel adds into it row-major), got strides {out.stride()}")


_SECOND_ORDER_MESSAGE = (
    "{name} has no second derivative: its backward is first-order only. A gradient taken with "
    "create_graph=True cannot be differentiated again (the second-order terms would be silently zero)"
)


def first_order_only(name: str):
    """Decorator for ``autograd.Function.backward``: run it without a graph, and refuse double backward.

    Like ``torch.autograd.function.once_differentiable``, but also when the upstream gradients do
    not require grad: under ``create_graph=True`` every returned gradient gets a node that raises
    ``RuntimeError`` (naming ``name``) as soon as anything differentiates through it, instead of
    a gradient with no graph whose second-order terms are silently missing. Plain backward and
    first-order ``create_graph=True`` uses that never differentiate the gradient are unaffected.
    """
    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                outputs = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            # The refusing node must lie on a path to the inputs, or autograd.grad(..., inputs) prunes it:
            # it takes the saved tensors that require grad (the op's inputs) as extra inputs.
            # The upstream gradients join them: a mixed derivative (d/dw of a gradient taken from w * out)
            # differentiates the backward with respect to its grad_outputs, which it cannot do either.
            anchors = tuple(t for t in (*ctx.saved_tensors, *grad_outputs)
                            if isinstance(t, torch.Tensor) and t.requires_grad)
            guarded = tuple(_refuse_second_order(o, anchors, name) if isinstance(o, torch.Tensor) else o
                            for o in outputs)
            return guarded[0] if single else guarded
        return wrapper
    return decorate


def _refuse_second_order(grad: torch.Tensor, anchors: tuple, name: str) -> torch.Tensor:
    from torch._C import _functions  # the node once_differentiable uses to raise on differentiation

    alias = grad.detach()
    alias.requires_grad_(True)
    err = _functions.DelayedError(_SECOND_ORDER_MESSAGE.format(name=name).encode(), 1 + len(anchors))
    out = err(alias, *anchors)
    return out[0] if isinstance(out, tuple) else out
