"""Ratios of every implementation against ours, as rows for the console and the README.

For each group of cells with the same (op, shape, dtype, mode), the base is the
``ours`` cell. ``time_x = time(impl) / time(ours)`` (above 1: ours is faster) and
``mem_x = peak(impl) / peak(ours)`` (above 1: ours uses less). A ratio needs both
cells ``ok``; a peer that computes less than ours (log-prob only) is still compared,
and its ``computes`` column says so.
"""
from __future__ import annotations

BASE = "ours"


def _group_key(cell: dict) -> tuple:
    s = cell["shape"]
    return (cell["op"], s["preset"], s["n_tokens"], s["vocab"], s["hidden"], s["softcap"], cell["dtype"], cell["mode"])


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def rows(results: dict) -> list[dict]:
    """One row per cell, in run order, with the ratios to ours filled in where both ran."""
    computes = {(r["op"], r["name"]): r["computes"] for r in results["impls"]}
    base = {_group_key(c): c for c in results["cells"] if c["impl"] == BASE and c["status"] == "ok"}
    out = []
    for c in results["cells"]:
        b = base.get(_group_key(c))
        ok = c["status"] == "ok" and b is not None
        out.append({
            "op": c["op"], "shape": c["shape"]["label"], "preset": c["shape"]["preset"], "dtype": c["dtype"],
            "mode": c["mode"], "impl": c["impl"], "computes": computes.get((c["op"], c["impl"]), "?"),
            "status": c["status"], "reason": c.get("reason"),
            "time_ms": c.get("time_ms"), "peak_mem_bytes": c.get("peak_mem_bytes"),
            "time_x": _ratio(c.get("time_ms"), b.get("time_ms")) if ok else None,
            "mem_x": _ratio(c.get("peak_mem_bytes"), b.get("peak_mem_bytes")) if ok else None,
            "pct_of_floor": c.get("pct_of_floor"),
            "achieved": (f"{c['achieved_gbps']:.1f} GB/s" if c.get("achieved_gbps") is not None
                         else f"{c['achieved_tflops']:.2f} TFLOP/s" if c.get("achieved_tflops") is not None else None),
            "max_abs_diff": c.get("max_abs_diff_vs_naive"),
        })
    return out


def fmt_ms(v) -> str:
    return "" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def fmt_bytes(v) -> str:
    if v is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= size:
            x = v / size
            return f"{x:.3g} {unit}" if x < 100 else f"{x:.0f} {unit}"
    return f"{v} B"


def fmt_x(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def fmt_pct(v) -> str:
    return "" if v is None else f"{v:.0f}%"


def fmt_status(row: dict) -> str:
    if row["status"] == "ok":
        return "ok"
    return f"{row['status']}: {row['reason']}" if row["reason"] else row["status"]


COLUMNS = ("op", "shape", "dtype", "mode", "impl", "computes", "time ms", "peak mem", "time/ours", "mem/ours",
           "% floor", "status")


def table_cells(row: dict) -> list[str]:
    return [row["op"], row["shape"], row["dtype"], row["mode"], row["impl"], row["computes"],
            fmt_ms(row["time_ms"]), fmt_bytes(row["peak_mem_bytes"]), fmt_x(row["time_x"]), fmt_x(row["mem_x"]),
            fmt_pct(row["pct_of_floor"]), fmt_status(row)]


def console_table(results: dict, status_width: int = 60) -> str:
    """Plain-text table of every cell with its ratios to ours."""
    body = [[v if i < len(COLUMNS) - 1 else v[:status_width] for i, v in enumerate(table_cells(r))]
            for r in rows(results)]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(COLUMNS)]

    def line(vals) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()

    base = results["baselines"]
    head = (f"device: {results['environment'].get('device_name')} | copy {base['copy_gbps']:.1f} GB/s | matmul "
            + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in base["matmul_tflops"].items())
            + " | time/ours, mem/ours > 1: ours is faster / smaller")
    return "\n".join([head, line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


# ------------------------------------------------------------------ modeled figures, targets, anchors
# Targets and the anchors' published figures (TARGETS.md); ms at the named shape, bf16.
# ``gpu``: the hardware the anchor figure was measured on (an A100 figure is not an H100 one).
TARGETS = (
    {"op": "logits", "mode": "fwd_bwd", "shape": (32768, 152064, None), "target": ">= 90% of the copy floor",
     "target_pct_floor": 90.0, "anchors": ()},
    {"op": "logits", "mode": "fwd_bwd", "shape": (32768, 32000, None), "target": ">= 90% of the copy floor",
     "target_pct_floor": 90.0, "anchors": ()},
    {"op": "logits", "mode": "fwd_bwd", "shape": (32768, 262144, None), "target": ">= 90% of the copy floor",
     "target_pct_floor": 90.0, "anchors": ()},
    {"op": "linear", "mode": "fwd_bwd", "shape": (8192, 131072, 4096), "target": "<= 50 ms on H100",
     "target_ms": {"H100": 50.0},
     "anchors": (("Liger CuTe kernel with entropy (Hopper only)", 50.22, "H100"),
                 ("verl torch fallback", 165.63, "H100"))},
    {"op": "policy_one_pass", "mode": "one_pass", "shape": (8192, 131072, 4096),
     "target": "<= 0.8x the two-pass hidden-state op", "target_ratio_of": ("linear", "fwd_bwd", 0.8), "anchors": ()},
)


def _shape_key(row_shape: dict) -> tuple:
    return (row_shape["n_tokens"], row_shape["vocab"], row_shape["hidden"])


def modeled_vs_targets(model_rows: list[dict], design: str = "chunked") -> list[dict]:
    """One row per (target, GPU): modeled time, floor, % of floor, the target in ms, the anchors."""
    out = []
    for tgt in TARGETS:
        for r in model_rows:
            if r["op"] != tgt["op"] or r["mode"] != tgt["mode"] or r["design"] not in (None, design):
                continue
            key = _shape_key(r["shape"])
            if key[:2] != tgt["shape"][:2] or (tgt["shape"][2] is not None and key[2] != tgt["shape"][2]):
                continue
            target_ms = None
            if "target_pct_floor" in tgt:
                target_ms = r["floor_ms"] * 100.0 / tgt["target_pct_floor"]
            elif "target_ms" in tgt:
                target_ms = tgt["target_ms"].get(r["gpu"])
            elif "target_ratio_of" in tgt:
                op, mode, ratio = tgt["target_ratio_of"]
                base = next((b for b in model_rows if b["op"] == op and b["mode"] == mode and b["gpu"] == r["gpu"]
                             and b["design"] == r["design"] and _shape_key(b["shape"]) == key), None)
                target_ms = None if base is None else ratio * base["time_ms"]
            anchors = "; ".join(f"{name} {ms:g} ms ({gpu})" for name, ms, gpu in tgt["anchors"] if gpu == r["gpu"])
            out.append({"op": r["op"], "mode": r["mode"], "shape": r["shape"]["label"], "gpu": r["gpu"],
                        "design": r["design"], "modeled_ms": r["time_ms"], "floor_ms": r["floor_ms"],
                        "pct_of_floor": r["pct_of_floor"], "bound": r["bound"], "target": tgt["target"],
                        "target_ms": target_ms,
                        "meets_target": None if target_ms is None else r["time_ms"] <= target_ms * (1 + 1e-9),
                        "anchors": anchors})
    return out


def model_vs_measured(results: dict, gpu_key: str | None, static_rows=None) -> list[dict]:
    """Ours' measured cells beside the modeled time; ``model_error = (measured - modeled) / measured``."""
    from .perf_model import modeled_time_for_cell

    rows_out = []
    for c in results.get("cells", []):
        if c.get("impl") not in (BASE, "ours-inplace") or c.get("status") != "ok":
            continue
        modeled = modeled_time_for_cell(c, gpu_key, static_rows) if gpu_key else None
        measured = c.get("time_ms")
        rows_out.append({"op": c["op"], "impl": c["impl"], "shape": c["shape"]["label"], "dtype": c["dtype"],
                         "mode": c["mode"], "measured_ms": measured, "modeled_ms": modeled,
                         "model_error": (measured - modeled) / measured if modeled and measured else None})
    return rows_out


def _plain_table(cols, body) -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(cols)]

    def line(vals) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])


def targets_table(rows: list[dict]) -> str:
    cols = ("op", "shape", "gpu", "modeled ms", "floor ms", "% floor", "bound", "target", "target ms", "meets",
            "anchors")
    body = [[r["op"], r["shape"], r["gpu"], fmt_ms(r["modeled_ms"]), fmt_ms(r["floor_ms"]), fmt_pct(r["pct_of_floor"]),
             r["bound"], r["target"], fmt_ms(r["target_ms"]),
             "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "no"), r["anchors"]] for r in rows]
    return "modeled (no GPU run)\n" + _plain_table(cols, body)


def measured_table(rows: list[dict]) -> str:
    cols = ("op", "impl", "shape", "dtype", "mode", "measured ms", "modeled ms", "model error")
    body = [[r["op"], r["impl"], r["shape"], r["dtype"], r["mode"], fmt_ms(r["measured_ms"]), fmt_ms(r["modeled_ms"]),
             "" if r["model_error"] is None else f"{100 * r['model_error']:+.0f}%"] for r in rows]
    return _plain_table(cols, body)


def main(argv=None) -> int:
    """``python -m benchmarks.report [results.json ...]``: modeled vs targets and anchors; measured beside
    modeled for each results file (``benchmarks.runner`` or ``gpu_check`` output) given."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from .gpus import gpu_for_device_name
    from .perf_model import load_static, model
    from .shapes import parse_shapes

    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.split("\n")[0])
    p.add_argument("results", nargs="*", help="results JSON files of GPU runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    static_rows = load_static()
    print(targets_table(modeled_vs_targets(model(parse_shapes("headline,liger-hopper"), rows=static_rows))))
    for path in args.results:
        doc = json.loads(Path(path).read_text())
        name = (doc.get("environment") or {}).get("device_name") or (doc.get("device") or {}).get("name")
        gpu_key = gpu_for_device_name(name)
        print(f"\n{path}: {name} (model: {gpu_key or 'no model for this GPU'})")
        print(measured_table(model_vs_measured(doc, gpu_key, static_rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
