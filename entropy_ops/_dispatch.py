"""Backend choice: compiled Triton kernels on CUDA, the chunked PyTorch path on CPU.

``backend`` is an explicit argument of every op (``"auto"``, ``"triton"`` or
``"torch"``); ``"auto"`` reads ``ENTROPY_OPS_BACKEND`` at call time (never at
import), then falls back to the tensors' device. Forcing ``"triton"`` on CPU
tensors runs the real kernels under the Triton interpreter, which requires
``TRITON_INTERPRET=1`` in the environment *before* ``entropy_ops`` is imported
(Triton decides at decoration time whether a kernel is interpreted).
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "ENTROPY_OPS_BACKEND"


def triton_interpreting() -> bool:
    """True when Triton kernels run under the interpreter (``TRITON_INTERPRET=1``)."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; to run the Triton kernels on the CPU "
            "set TRITON_INTERPRET=1 before importing entropy_ops"
        )
    return backend
