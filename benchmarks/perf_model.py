"""Modeled time of every op at every named shape on H100 and H200, from bytes, FLOPs and the SASS.

``python -m benchmarks.perf_model [--shapes PRESETS] [--gpu H100,H200] [--static FILE] [--out FILE]``

Each op is a sequence of *pieces* (kernel launches or GEMMs run one after the other). A piece's time
is the 4-norm of its bounds (the largest, plus a penalty when another bound comes close: ``P_NORM``),
and the op's time is the sum over its pieces:

- ``bandwidth``: HBM bytes / measured copy bandwidth. Bytes count the compulsory traffic plus the
  re-reads the tiling implies when the re-used data does not stay in L2 (:func:`reread_bytes`).
- ``compute``: FLOPs / measured dense GEMM rate, times an efficiency for Triton GEMMs read from the
  kernel's wgmma shape (:func:`triton_gemm_efficiency`); cuBLAS pieces run at the measured rate.
- ``issue``: SASS instructions per element in the hot loop (static report) x elements / 32 lanes /
  (4 warp instructions per clock per SM x SMs x clock).
- ``mufu``: MUFU (exp2/log2) instructions per element / (16 per clock per SM x SMs x clock).
- ``latency``: bytes / (bytes in flight / DRAM latency) when too few loads are in flight to cover
  the latency (Little's law; bytes in flight from the hot loop's loads x resident threads).
- ``atomics``: fp32 RED bytes / atomic bandwidth (see :mod:`benchmarks.gpus`).

Floors (TARGETS): the logits op moves its bytes at the copy bandwidth; the hidden-state op does its
FLOPs (2NDV forward, 6NDV backward with recompute, 8NDV both, 6NDV one-pass) at the GEMM rate.
Every figure here is *modeled*; docs/performance.md documents the formulas and their provenance.
Pieces, bounds and static-report lookups live in :mod:`benchmarks.perf_pieces`, the hidden-state op's
designs in :mod:`benchmarks.perf_linear`; this module models the logits op and assembles the tables.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .gpus import GPU, GPUS
from .perf_linear import DESIGNS, linear_floor, linear_op
from .perf_pieces import (DTYPE_BYTES, STATIC_REPORT, TOKEN_MODULE, Piece, _streaming_bounds, bandwidth_piece,
                          load_static, reread_bytes, static_row)
from .shapes import Shape, parse_shapes

MODEL_PRESETS = ("headline", "liger-hopper", "verl-qwen32b", "slime-248k", "skyrl-65k", "qwen2.5-7b",
                 "llama3-8b", "gemma3", "gemma2-9b")


# ---------------------------------------------------------------------------------------- logits op
def logits_op(shape: Shape, dtype: str, gpu: GPU, rows: list[dict]) -> dict[str, list[Piece]]:
    """Pieces of the logits op: forward reads the logits once, backward reads them and writes dlogits.

    Per row O(1) extras: the int64 target, fp32 statistics and outputs (32 bytes forward, 40 backward).
    A kernel whose SASS has several loops loading the row reads it once per loop; those re-reads come
    from L2 only if the rows in flight fit in it.
    """
    n, v, e = shape.n_tokens, shape.vocab, DTYPE_BYTES[dtype]
    out = {}
    for mode, role, writes in (("fwd", "fwd", 0), ("bwd", "bwd", 1)):
        row = static_row(rows, TOKEN_MODULE, role, dtype, vocab=v)
        passes = max(1, sum(1 for lp in (row or {}).get("loops", []) if lp["innermost"] and lp["ldg"]))
        rows_in_flight = gpu.sms * (row["ctas"] if row else 1)
        reads = reread_bytes(n * v * e, passes, rows_in_flight * v * e, gpu)
        piece = bandwidth_piece(f"logits {mode}", reads + writes * n * v * e + n * (32 + 8 * writes), gpu)
        _streaming_bounds(piece, n * v * passes, row, gpu)
        out[mode] = [piece]
    out["fwd_bwd"] = out["fwd"] + out["bwd"]
    return out


def logits_floor(shape: Shape, dtype: str, mode: str, gpu: GPU) -> float:
    passes = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode]
    return passes * shape.n_tokens * shape.vocab * DTYPE_BYTES[dtype] / gpu.copy_bw


# ---------------------------------------------------------------------------------------- the table
def _row(op, mode, shape, dtype, gpu_key, pieces, floor_s, design=None) -> dict:
    t = sum(p.time_s for p in pieces)
    per_bound: dict[str, float] = {}
    for p in pieces:
        per_bound[p.bound] = per_bound.get(p.bound, 0.0) + p.time_s
    return {"op": op, "mode": mode, "design": design, "shape": shape.as_dict(), "dtype": dtype, "gpu": gpu_key,
            "flops": sum(p.flops for p in pieces), "hbm_bytes": sum(p.hbm_bytes for p in pieces),
            "atomic_bytes": sum(p.atomic_bytes for p in pieces), "time_ms": t * 1e3, "floor_ms": floor_s * 1e3,
            "pct_of_floor": 100.0 * floor_s / t if t else None,
            "bound": max(per_bound, key=per_bound.get) if per_bound else "-",
            "pieces": [{"name": p.name, "time_ms": p.time_s * 1e3, "bound": p.bound,
                        "bounds_ms": {k: v * 1e3 for k, v in p.bounds.items()}} for p in pieces]}


def model(shapes, gpus=("H100", "H200"), dtype: str = "bf16", rows: list[dict] | None = None,
          designs=("chunked", "cublas", "atomic")) -> list[dict]:
    """Modeled rows for the logits op (every shape) and the hidden-state op (shapes with ``D``)."""
    rows = load_static() if rows is None else rows
    out = []
    seen = set()
    for shape in shapes:
        for key in gpus:
            gpu = GPUS[key]
            logit_key = (shape.n_tokens, shape.vocab, key)
            if logit_key not in seen:
                seen.add(logit_key)
                logit_shape = Shape(shape.n_tokens, shape.vocab, None, None, shape.preset)
                for mode, pieces in logits_op(logit_shape, dtype, gpu, rows).items():
                    out.append(_row("logits", mode, logit_shape, dtype, key, pieces,
                                    logits_floor(logit_shape, dtype, mode, gpu)))
            if shape.hidden is None:
                continue
            for name in designs:
                for mode, pieces in linear_op(shape, dtype, gpu, rows, DESIGNS[name]).items():
                    if mode == "one_pass" and name != CURRENT_LINEAR_DESIGN:
                        continue  # the one-pass loss is modeled as the library runs it, whatever the design
                    op = "policy_one_pass" if mode == "one_pass" else "linear"
                    out.append(_row(op, mode, shape, dtype, key, pieces, linear_floor(shape, mode, gpu), name))
    return out


# The hidden-state op's design as the library ships it (entropy_ops/linear_ops.py): what measured
# cells of ``linear`` and ``policy`` are compared against.
CURRENT_LINEAR_DESIGN = "chunked"


def modeled_time_for_cell(cell: dict, gpu_key: str, rows: list[dict] | None = None) -> float | None:
    """Modeled ms for one benchmark cell (``benchmarks.runner`` format) of ours; None if not modeled."""
    if gpu_key not in GPUS or cell["dtype"] not in DTYPE_BYTES:
        return None
    s = cell["shape"]
    shape = Shape(s["n_tokens"], s["vocab"], s.get("hidden"), s.get("softcap"), s.get("preset", "custom"))
    rows = load_static() if rows is None else rows
    gpu = GPUS[gpu_key]
    if cell["op"] == "logits":
        pieces = logits_op(shape, cell["dtype"], gpu, rows).get(cell["mode"])
    elif cell["op"] in ("linear", "policy") and shape.hidden:
        # policy_loss(config="grpo") on hidden states takes the one-pass form when it trains.
        mode = "one_pass" if cell["op"] == "policy" and cell["mode"] == "fwd_bwd" else cell["mode"]
        pieces = linear_op(shape, cell["dtype"], gpu, rows, DESIGNS[CURRENT_LINEAR_DESIGN]).get(mode)
    else:
        return None
    return None if pieces is None else 1e3 * sum(p.time_s for p in pieces)


def format_rows(rows: list[dict]) -> str:
    cols = ("op", "design", "mode", "shape", "gpu", "modeled ms", "floor ms", "% floor", "bound", "HBM GB",
            "atomic GB")
    body = [[r["op"], r["design"] or "", r["mode"], r["shape"]["label"], r["gpu"], f"{r['time_ms']:.3g}",
             f"{r['floor_ms']:.3g}", f"{r['pct_of_floor']:.0f}%", r["bound"], f"{r['hbm_bytes'] / 1e9:.1f}",
             f"{r['atomic_bytes'] / 1e9:.0f}" if r["atomic_bytes"] else ""] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])


def markdown_rows(rows: list[dict]) -> str:
    lines = ["| op | design | mode | shape | GPU | modeled ms | floor ms | % of floor | bound | HBM GB | atomic GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['design'] or ''} | {r['mode']} | {r['shape']['label']} | {r['gpu']} | "
                     f"{r['time_ms']:.3g} | {r['floor_ms']:.3g} | {r['pct_of_floor']:.0f}% | {r['bound']} | "
                     f"{r['hbm_bytes'] / 1e9:.1f} | {r['atomic_bytes'] / 1e9:.0f} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], design: str = CURRENT_LINEAR_DESIGN) -> str:
    """One line per (op, shape): modeled ms (% of floor, bound) per GPU and mode; the docs' table."""
    gpus = sorted({r["gpu"] for r in rows})
    modes = {"logits": ("fwd", "bwd", "fwd_bwd"), "linear": ("fwd", "bwd", "fwd_bwd"), "policy_one_pass": ("one_pass",)}
    table: dict = {}
    for r in rows:
        if r["design"] not in (None, design):
            continue
        key = (r["op"], r["shape"]["label"])
        table.setdefault(key, {})[(r["gpu"], r["mode"])] = r
    head = ["op", "shape"] + [f"{g} {m}" for g in gpus for m in ("fwd", "bwd", "fwd+bwd / one-pass")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, label), cells in table.items():
        vals = []
        for g in gpus:
            ms = modes[op] if op != "policy_one_pass" else ("", "", "one_pass")
            for m in ms:
                r = cells.get((g, m))
                vals.append("" if r is None else f"{r['time_ms']:.3g} ({r['pct_of_floor']:.0f}%, {r['bound']})")
        lines.append("| " + " | ".join([op, label, *vals]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(MODEL_PRESETS), help="presets / NxV / NxVxD (benchmarks/shapes.py)")
    p.add_argument("--gpu", default="H100,H200", help=f"comma-separated subset of {','.join(GPUS)}")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    p.add_argument("--design", default="chunked,cublas,atomic", help=f"hidden-state designs: {','.join(DESIGNS)}")
    p.add_argument("--static", default=str(STATIC_REPORT), help="static report JSON (python -m benchmarks.static)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    p.add_argument("--summary", action="store_true", help="print one markdown line per (op, shape)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    gpus = [g.strip() for g in args.gpu.split(",") if g.strip()]
    designs = [d.strip() for d in args.design.split(",") if d.strip()]
    bad = [g for g in gpus if g not in GPUS] + [d for d in designs if d not in DESIGNS]
    if bad:
        p.error(f"unknown GPU or design: {bad}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        p.error(str(exc))
    static_rows = load_static(args.static)
    rows = model(shapes, gpus, args.dtype, static_rows, designs)
    print("modeled (no GPU run): " + (f"static report {args.static}" if static_rows else
                                       "no static report: issue/latency bounds left out"))
    print(summary_markdown(rows) if args.summary else markdown_rows(rows) if args.markdown else format_rows(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
