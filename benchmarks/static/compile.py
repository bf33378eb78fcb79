"""Compile one launch specification for one architecture and read its SASS (runs in a worker process).

A job is ``(module, index, arch, cache_dir)``: the ``index``-th entry of the
module's ``compile_specs()``, specialized exactly as the runtime JIT would
(:mod:`benchmarks.static.specialize`), compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` and analyzed (:mod:`benchmarks.static.sass`).

Results are cached as JSON under ``cache_dir``, keyed by the kernel's source
hash (``JITFunction.cache_key``: its source and every jit function it calls),
the specialization, the options, the architecture and the Triton version.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from pathlib import Path

LAB_VERSION = "4"  # bump when the analysis changes, so cached rows are recomputed


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "entropy-ops" / "static"


def load_specs(module_name: str) -> list:
    """The module's ``compile_specs()`` as :class:`LaunchSpec` objects (either format accepted)."""
    from .specialize import as_launch_spec

    return [as_launch_spec(s) for s in importlib.import_module(module_name).compile_specs()]


def kernel_name(spec) -> str:
    fn = getattr(spec.kernel, "fn", spec.kernel)
    return getattr(fn, "__name__", repr(fn))


def stream_element_size(spec) -> int | None:
    """Element size of the kernel's first pointer argument: the tensor the hot loop streams."""
    from .specialize import TORCH_DTYPES, Pointer

    for value in spec.args.values():
        if isinstance(value, Pointer):
            return TORCH_DTYPES[value.dtype].itemsize
    return None


def cache_key(spec, spec_desc: dict, options: dict, arch: int) -> str:
    import triton

    from .specialize import jit_function

    opts = {k: v for k, v in options.items() if k != "extern_libs"}
    blob = json.dumps({"source": jit_function(spec.kernel).cache_key, "spec": spec_desc, "options": opts,
                       "arch": arch, "triton": triton.__version__, "lab": LAB_VERSION}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _per_element(info: dict, elem: int | None) -> float | None:
    """SASS instructions per streamed element, per thread, for kernels without tensor cores.

    Body: the hot loop (one iteration), or the whole kernel when it has no loop (one tile per
    program). ``instructions / (streaming-load bytes per thread / element size)``; None for matmul
    kernels or bodies that stream nothing.
    """
    body = info["hot_loop"] or info["kernel_counts"]
    if elem is None or body["hgmma"] or body["hmma"] or not body["stream_bytes_per_thread"]:
        return None
    return body["instructions"] / (body["stream_bytes_per_thread"] / elem)


def compile_job(job: tuple) -> dict:
    """Compile and analyze one ``(module, index, arch, cache_dir_or_None)``; never raises."""
    module_name, index, arch, cache_dir = job
    row = {"module": module_name, "index": index, "arch": arch}
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        from . import sass
        from .occupancy import ctas_per_sm
        from .specialize import jit_function, specialize

        specs = load_specs(module_name)
        if index < 0:
            raise RuntimeError(f"{module_name}.compile_specs() could not be listed")
        spec = specs[index]
        row.update(kernel=kernel_name(spec), label=spec.label, num_warps=spec.num_warps, num_stages=spec.num_stages,
                   scalars={k: v for k, v in spec.args.items() if isinstance(v, (bool, int, float, str))})
        sp = specialize(spec, arch)
        row["specialization"] = sp.describe()
        key = cache_key(spec, row["specialization"], sp.options, arch)
        path = Path(cache_dir) / f"{key}.json" if cache_dir else None
        if path is not None and path.exists():
            return {**row, **json.loads(path.read_text()), "cached": True}
        t0 = time.perf_counter()
        src = triton.compiler.ASTSource(fn=jit_function(spec.kernel), signature=sp.signature,
                                        constexprs=sp.constexprs, attrs=sp.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=sp.options)
        compile_s = time.perf_counter() - t0
        res_text, sass_text = sass.dump(compiled.asm["cubin"])
        info = sass.analyze(res_text, sass_text)
        shared = max(info["static_shared"], int(compiled.metadata.shared))
        occ = ctas_per_sm(arch, info["registers"], shared, spec.num_warps)
        result = {**info, "dots": sass.dots(compiled.asm["ttir"]), "shared": shared, "triton_shared": int(compiled.metadata.shared), **occ,
                  "instructions_per_element": _per_element(info, stream_element_size(spec)),
                  "compile_s": round(compile_s, 2)}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)
        return {**row, **result, "cached": False}
    except Exception as exc:  # reported per row; the gates fail on it
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return row
