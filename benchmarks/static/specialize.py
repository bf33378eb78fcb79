"""Turn a launch description into the exact compile inputs the runtime JIT would build.

Triton's launcher (``JITFunction.run`` in ``triton/runtime/jit.py``) binds the
call's arguments with a generated ``binder`` (``create_function_from_signature``),
which calls the native ``specialize_impl`` on every non-constexpr argument, then
``JITFunction._pack_args`` turns that specialization into the signature, the
constants and the ``tt.divisibility`` attributes handed to ``triton.compile``.
This module calls those same functions, for a chosen target instead of the
current device, on stand-in arguments:

- an integer equal to 1 becomes a constexpr; an integer in ``[-2**31, 2**31)`` is
  ``i32``, a larger one ``i64``; an integer divisible by 16 carries
  ``tt.divisibility = 16``;
- a pointer carries ``tt.divisibility = 16`` when its address is 16-byte aligned
  (every fresh PyTorch allocation is; a view at an odd offset is not);
- floats are ``fp32``; constexprs are passed by value.

Nothing here re-implements those rules: they come from the installed Triton, so
what the lab compiles is what would launch. Works with the interpreter on
(``TRITON_INTERPRET=1``) for the specialization itself; compiling needs it off.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from entropy_ops.kernels._aot import LaunchSpec, Pointer  # noqa: F401  (re-exported for the tools)

# Triton dtype name -> torch dtype of the stand-in tensor (the names _aot.Pointer takes).
TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
    "i1": torch.bool,
}
# A 16-byte aligned address and one that is only element-aligned (a view at an odd offset).
ALIGNED_ADDRESS = 1 << 24
MISALIGNED_ADDRESS = (1 << 24) + 2


class StandInTensor:
    """What the binder reads of a tensor argument: ``dtype`` and ``data_ptr()`` (never dereferenced)."""

    def __init__(self, pointer: Pointer):
        if pointer.dtype not in TORCH_DTYPES:
            raise ValueError(f"Pointer dtype must be one of {sorted(TORCH_DTYPES)}, got {pointer.dtype!r}")
        self.dtype = TORCH_DTYPES[pointer.dtype]
        self._address = ALIGNED_ADDRESS if pointer.aligned else MISALIGNED_ADDRESS

    def data_ptr(self) -> int:
        return self._address


@dataclass(frozen=True)
class Specialization:
    """The compile inputs of one launch: what ``JITFunction.run`` would pass to ``triton.compile``."""

    signature: dict  # parameter name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # (index,) -> value, as _pack_args builds it
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] or []
    options: dict  # backend options (num_warps, num_stages, arch, ...)

    def describe(self) -> dict:
        """JSON-friendly summary: argument -> type, with ``/16`` for divisibility and ``=v`` for constants."""
        names = list(self.signature)
        out = {}
        for i, name in enumerate(names):
            ty = self.signature[name]
            if ty == "constexpr":
                out[name] = f"={self.constexprs.get((i,))!r}"
            else:
                div = any(a[0] == "tt.divisibility" for a in self.attrs.get((i,), []))
                out[name] = ty + ("/16" if div else "")
        return out


def jit_function(kernel):
    """The ``JITFunction`` behind ``kernel`` (an interpreted kernel is re-wrapped, for specialization only)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None or not callable(fn):
        raise TypeError(f"kernel must be a @triton.jit function, got {type(kernel).__name__}")
    return JITFunction(fn)


def make_backend(arch: int):
    """Triton's CUDA compiler backend for ``sm_<arch>`` (no GPU or driver needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend as _make_backend

    return _make_backend(GPUTarget("cuda", arch, 32))


def stand_in(value):
    """The object the binder sees for one argument value of a spec."""
    return StandInTensor(value) if isinstance(value, Pointer) else value


def runtime_kwargs(spec: LaunchSpec) -> dict:
    """The keyword arguments ``JITFunction.run`` hands to the binder: launch options plus the knobs it adds."""
    from triton import knobs

    kwargs = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
    kwargs["debug"] = kwargs.get("debug", False) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


def specialize(spec: LaunchSpec, arch: int) -> Specialization:
    """Specialize ``spec`` for ``sm_<arch>`` with Triton's own runtime binder and ``_pack_args``."""
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(spec.kernel)
    names = [p.name for p in fn.params]
    missing = [n for n in names if n not in spec.args and fn.signature.parameters[n].default is inspect.Parameter.empty]
    unknown = [n for n in spec.args if n not in names]
    if missing or unknown:
        raise ValueError(f"LaunchSpec {spec.label or fn.__name__}: arguments missing {missing}, unknown {unknown}")
    backend = make_backend(arch)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = runtime_kwargs(spec)
    args = {k: stand_in(v) for k, v in spec.args.items()}
    bound_args, specialization, options = binder(**args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialization(signature, constexprs, attrs, dict(options.__dict__))


# ----------------------------------------------------------------------------------------------
# The older spec format: {"kernel", "signature": {name: type}, "constexprs": {...}, "num_warps"}.
# It gives types, not values, so the lab picks stand-in values that give the runtime's most
# conservative specialization of each type: pointers aligned (as fresh allocations are),
# integers odd and above 1 (no constant, no divisibility), i64 only where the type says so.
LEGACY_INT = {"i32": 4097, "i64": 4097}


def from_legacy(spec: dict) -> LaunchSpec:
    """Convert an old ``signature``-dict spec to a :class:`LaunchSpec` with conservative stand-in values."""
    args = {}
    for name, ty in spec["signature"].items():
        if ty == "constexpr":
            args[name] = spec["constexprs"][name]
        elif ty.startswith("*"):
            args[name] = Pointer(ty[1:])
        elif ty in LEGACY_INT:
            args[name] = LEGACY_INT[ty]
        elif ty.startswith("fp"):
            args[name] = 1.5
        else:
            raise ValueError(f"legacy spec: unsupported type {ty!r} for {name!r}")
    for name, value in spec.get("constexprs", {}).items():
        args.setdefault(name, value)
    opts = dict(spec.get("options", {}))
    num_stages = opts.pop("num_stages", 3)
    return LaunchSpec(kernel=spec["kernel"], args=args, num_warps=spec["num_warps"], num_stages=num_stages,
                      label=spec.get("label", "legacy spec (types only)"), options=opts)


def as_launch_spec(spec) -> LaunchSpec:
    """A :class:`LaunchSpec` for either spec format."""
    if isinstance(spec, LaunchSpec):
        return spec
    if isinstance(spec, dict) and "signature" in spec:
        return from_legacy(spec)
    raise TypeError(f"compile_specs() entries must be LaunchSpec or signature dicts, got {type(spec).__name__}")
