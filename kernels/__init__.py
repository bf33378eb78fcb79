"""Triton kernels of entropy-ops (installed as ``entropy_ops.kernels``).

Only ``@triton.jit`` code and launch-configuration helpers live here; the
autograd ops, validation and the CPU path are in ``entropy_ops``.
"""
