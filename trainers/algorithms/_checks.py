"""Argument checks shared by the entropy-aware advantage plug-ins; every message names the argument.

A rollout batch holds ``B = n * G`` rows grouped contiguously by prompt (rows
``g*G .. g*G + G - 1`` answer prompt ``g``); per-token tensors are ``[B, T]``
with a bool ``[B, T]`` mask. The group statistics themselves (GRPO, Dr.GRPO,
RLOO) live in ``entropy_ops.trainers.advantages``.
"""
from __future__ import annotations

import math

import torch


def check_group_size(group_size, n_rows: int) -> int:
    """``group_size`` must be a positive int dividing ``n_rows``; returns it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if n_rows % group_size:
        raise ValueError(f"the batch size ({n_rows}) must be a multiple of group_size ({group_size})")
    return group_size


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real ``value`` in ``[low, high]`` (``(low, high]`` with ``low_open``); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_rows(name: str, x, n_rows: int, *, dtype_kind: str = "float") -> None:
    """``x`` must be a 1-D tensor of ``n_rows`` entries, floating (``"float"``) or bool (``"bool"``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != n_rows:
        raise ValueError(f"{name} must have shape ({n_rows},), got {tuple(x.shape)}")
    if dtype_kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
    if dtype_kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_tokens(name: str, x, mask: torch.Tensor) -> None:
    """``x`` must be a floating ``[B, T]`` tensor shaped like ``mask`` and on its device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape != mask.shape:
        raise ValueError(f"{name} must have the shape of the mask {tuple(mask.shape)}, got {tuple(x.shape)}")
    if x.device != mask.device:
        raise ValueError(f"{name} must be on the mask's device ({mask.device}), got {x.device}")


def check_mask(mask) -> None:
    """``mask`` must be a ``[B, T]`` bool tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [B, T], got {tuple(mask.shape)}")


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 when any input is fp64 (exact tests), else fp32: advantages are always at least fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
