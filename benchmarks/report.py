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
