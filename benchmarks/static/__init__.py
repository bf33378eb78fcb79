"""The static performance lab: every launchable kernel configuration, compiled for sm_80 and sm_90 as
the runtime JIT specializes it, and read from its SASS, with no GPU.

``python -m benchmarks.static`` prints one table row per (configuration, architecture) and writes
the rows as JSON (``--out``). :func:`run` is the same thing as a function (the compile gates in
``tests/test_kernel_compile.py`` call it through the command line).

Modules: :mod:`.specialize` (launch spec -> Triton's own runtime specialization),
:mod:`.compile` (one compile + analysis per worker process, cached), :mod:`.sass` (SASS counts,
loops), :mod:`.occupancy` (CTAs per SM), :mod:`.gates` (the floors the tests enforce).
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import pkgutil
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)


def kernel_modules() -> list[str]:
    """Every ``entropy_ops.kernels`` module that defines ``compile_specs()``.

    A module that fails to import is listed too, so that its error shows in the report and fails
    the gates instead of the module silently dropping out.
    """
    import entropy_ops.kernels as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{pkg.__name__}.{info.name}"
        try:
            listed = hasattr(importlib.import_module(name), "compile_specs")
        except Exception:
            listed = True
        if listed:
            names.append(name)
    return sorted(names)


def _subset_key(spec) -> tuple:
    """Everything but the boolean feature flags: pointer dtypes, tile sizes, scalar values, warps, stages."""
    from .compile import kernel_name

    items = tuple(sorted((k, repr(v)) for k, v in spec.args.items() if not isinstance(v, bool)))
    return (kernel_name(spec), items, spec.num_warps, spec.num_stages, tuple(sorted(spec.options.items())))


def representatives(specs: list) -> list[int]:
    """Indices of one spec per configuration up to boolean feature flags, keeping the one with most flags on.

    Boolean constexprs (``HAS_BIAS``, ``GRAD_WEIGHT``, ...) only add code; the variant with the most of
    them on has the most live values, so it bounds registers, spills and shared memory of the others.
    The CI gates compile these; the full static report compiles everything.
    """
    best: dict[tuple, tuple[int, int]] = {}
    for i, spec in enumerate(specs):
        on = sum(1 for v in spec.args.values() if v is True)
        key = _subset_key(spec)
        if key not in best or on > best[key][0]:
            best[key] = (on, i)
    return sorted(i for _, i in best.values())


def _worker_init() -> None:
    # Workers compile real kernels: the interpreter (on for the test suite) must be off before
    # triton is first imported in this process. FP fusion stays on, the runtime's default in 3.9.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def plan(modules: list[str] | None = None, archs=ARCHS, subset: str = "all") -> list[tuple[str, int, int]]:
    """The ``(module, index, arch)`` jobs: every spec (``subset="all"``) or :func:`representatives` (``"ci"``)."""
    from .compile import load_specs

    jobs = []
    for module in modules or kernel_modules():
        try:
            specs = load_specs(module)
        except Exception:  # compile_job reports the import error as the module's row
            jobs += [(module, -1, arch) for arch in archs]
            continue
        indices = range(len(specs)) if subset == "all" else representatives(specs)
        jobs += [(module, i, arch) for i in indices for arch in archs]
    return jobs


def run(modules: list[str] | None = None, archs=ARCHS, subset: str = "all", jobs: int | None = None,
        cache_dir=None) -> list[dict]:
    """Compile and analyze every planned configuration in parallel; one row per (spec, arch)."""
    from .compile import compile_job

    work = [(m, i, a, None if cache_dir is None else str(cache_dir)) for m, i, a in plan(modules, archs, subset)]
    # Heaviest first (sm_90 matmul kernels take longest), so the pool's tail is short.
    work.sort(key=lambda j: (-j[2], "linear" not in j[0]))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1), mp_context=ctx,
                             initializer=_worker_init) as pool:
        rows = list(pool.map(compile_job, work, chunksize=1))
    rows.sort(key=lambda r: (r["module"], r["index"], r["arch"]))
    return rows
