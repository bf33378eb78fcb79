"""``python -m benchmarks``: run the cells, write the results JSON, print ratios, draw plots.

Defaults depend on ``--device``:

- ``cpu`` (the CPU mode, a few minutes on 2 cores): preset ``cpu-small``, fp32, both
  modes, 3 timed runs per cell; ``torch-compile`` only when named in ``--impls``
  (compiling costs about 40 s for the first graph and 8-13 s per further graph on 2 cores, more
  than the rest of the mode).
- ``cuda``: presets ``llama3-8b,qwen2.5-7b,liger-hopper``, bf16, both modes,
  ``do_bench`` with a 100 ms budget per cell.

The results file (``results.json`` in ``--out``) holds the provenance, the measured
device baselines, the implementations (with the reason any is unavailable) and
every cell; see ``benchmarks/README.md`` for the schema.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
from pathlib import Path

import torch

from . import environment, harness, report
from .ops import OP_NAMES, get_op
from .shapes import DEFAULT_PRESETS, parse_shapes, shapes_for_op

SCHEMA = "entropy-ops-bench/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = {"fwd": ("fwd",), "fwd_bwd": ("fwd_bwd",), "both": ("fwd", "fwd_bwd")}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--ops", default=",".join(OP_NAMES), help=f"comma-separated subset of {','.join(OP_NAMES)}")
    p.add_argument("--shapes", default=None,
                   help="comma-separated presets and/or NxV / NxVxD sizes (see benchmarks/shapes.py)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementation names (default: all, minus the device's opt-in ones)")
    p.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(DTYPES)}")
    p.add_argument("--mode", choices=tuple(MODES), default="both")
    p.add_argument("--repeats", type=int, default=3, help="CPU: timed runs per cell (median reported)")
    p.add_argument("--cuda-rep-ms", type=int, default=100, help="CUDA: do_bench time budget per cell (ms)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/out/<device>-<UTC time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def _split(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"{what}: unknown {bad or 'empty'}; choose from {', '.join(allowed)}")
    return items


def select_impls(op_mod, names: list[str] | None, device: torch.device):
    """The implementations to run: the named ones, or all but the device's opt-in ones."""
    if names is None:
        return [i for i in op_mod.IMPLS if device.type not in i.opt_in_on]
    return [i for i in op_mod.IMPLS if i.name in names]


def _order(impls):
    """The naive reference first (the others are checked against it), then ours, then peers."""
    return sorted(impls, key=lambda i: (not i.reference, not i.ours))


def prepare_impls(op_mod, impls, device: torch.device):
    """Probe and build each implementation: ``(records, {name: fn})``."""
    records, fns = [], {}
    for impl in impls:
        reason = impl.unavailable_reason(device)
        fn = None
        if reason is None:
            try:
                fn = impl.build(device)
            except Exception as exc:
                reason = f"build failed: {type(exc).__name__}: {exc}"
        variant = None
        if impl.variant is not None and reason is None:
            variant = impl.variant(device)
        records.append({"name": impl.name, "op": impl.op, "computes": impl.computes, "note": impl.note,
                        "ours": impl.ours, "reference": impl.reference, "modes": list(impl.modes),
                        "variant": variant, "available": reason is None, "reason": reason})
        if fn is not None:
            fns[impl.name] = fn
    return records, fns


def run(argv: list[str]) -> tuple[dict, Path]:
    """Run the benchmark described by ``argv``; returns the results and the output folder."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    ops = _split(args.ops, OP_NAMES, "--ops")
    dtype_names = _split(args.dtypes or ("fp32" if device.type == "cpu" else "bf16"), tuple(DTYPES), "--dtypes")
    dtypes = [DTYPES[d] for d in dtype_names]
    try:
        shapes = parse_shapes(args.shapes or ",".join(DEFAULT_PRESETS[device.type]))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    impl_names = None if args.impls is None else [s.strip() for s in args.impls.split(",") if s.strip()]
    if impl_names is not None:
        known = {i.name for op in ops for i in get_op(op).IMPLS}
        unknown = sorted(set(impl_names) - known)
        if unknown:
            raise SystemExit(f"--impls: unknown {unknown}; the chosen ops have {sorted(known)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path(__file__).parent / "out" / f"{device.type}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)

    env = environment.describe(device, argv)
    env["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    baselines = environment.measure_baselines(device, dtypes)
    settings = {"repeats": args.repeats, "cuda_rep_ms": args.cuda_rep_ms, "baselines": baselines}

    plan, impl_records = [], []
    for op in ops:
        op_mod = get_op(op)
        impls = _order(select_impls(op_mod, impl_names, device))
        records, fns = prepare_impls(op_mod, impls, device)
        impl_records += records
        for shape in shapes_for_op(shapes, op):
            for dtype in dtypes:
                for mode in MODES[args.mode]:
                    for impl in impls:
                        if mode in impl.modes:
                            plan.append((op_mod, impl, fns.get(impl.name), shape, dtype, mode))

    reasons = {(r["op"], r["name"]): r["reason"] for r in impl_records}
    gc.freeze()  # the peers' imports leave ~10^6 objects; keep them out of every gc.collect()
    try:
        cells = _run_plan(plan, reasons, device, settings, show_progress=not args.no_progress)
    finally:
        gc.unfreeze()

    env["load_avg_at_end"] = list(os.getloadavg())
    results = {"schema": SCHEMA, "environment": env, "baselines": baselines,
               "settings": dict(vars(args)), "impls": impl_records, "cells": cells}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results, out_dir


def _run_plan(plan, reasons, device, settings, show_progress: bool) -> list[dict]:
    cells, reference = [], {}
    progress = _progress(len(plan)) if show_progress else None
    for op_mod, impl, fn, shape, dtype, mode in plan:
        if progress is not None:
            progress.set_description(f"{impl.op}/{impl.name} {shape.label} {harness.dtype_name(dtype)} {mode}")
        if fn is None:
            cells.append({"op": impl.op, "impl": impl.name, "shape": shape.as_dict(),
                          "dtype": harness.dtype_name(dtype), "mode": mode, "status": "unavailable",
                          "reason": reasons[(impl.op, impl.name)]})
        else:
            cells.append(harness.run_cell(op_mod, impl, fn, shape, dtype, device, mode, settings, reference))
            harness.release(device)
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    return cells


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    results, out_dir = run(argv)
    print(report.console_table(results))
    if results["environment"].get("device") == "cuda":
        # Measured beside modeled (benchmarks.perf_model), saved into the results file too.
        from .gpus import gpu_for_device_name

        gpu_key = gpu_for_device_name(results["environment"].get("device_name"))
        results["model_vs_measured"] = report.model_vs_measured(results, gpu_key)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        print(f"\nmeasured vs modeled ({gpu_key or 'no model for this GPU'}):")
        print(report.measured_table(results["model_vs_measured"]))
    if not results["settings"]["no_plots"]:
        from .plots import draw_all

        for path in draw_all(results, out_dir):
            print(f"plot: {path}")
    print(f"results: {out_dir / 'results.json'}")
    return 0
