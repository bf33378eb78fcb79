"""``python -m benchmarks.static``: compile every kernel configuration for sm_80 and sm_90 and report.

Prints a table (one row per configuration and architecture) and writes every row, with the loop
analysis, to ``--out`` (JSON). No GPU needed; a few minutes on 2 cores without the cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from . import ARCHS, gates, kernel_modules, run
from .compile import default_cache_dir

COLUMNS = ("kernel", "config", "sm", "warps", "regs", "local/stack", "calls", "smem KiB", "CTA/SM", "limit", "tensor core",
           "RED/ATOM", "LDGSTS", "TMA", "BAR/iter", "instr/elem", "error")


def config_text(row: dict) -> str:
    """Short configuration: first pointer dtype, integer constexprs, flags that are on, notable scalars."""
    spec = row.get("specialization", {})
    parts = []
    first_ptr = next((t for t in spec.values() if t.startswith("*")), None)
    if first_ptr:
        parts.append(first_ptr[1:].split("/")[0])
    for name, t in spec.items():
        if t.startswith("="):
            value = t[1:]
            if value == "True":
                parts.append(name)
            elif value not in ("False", "None") and name.isupper():
                parts.append(f"{name}={value.strip(chr(39))}")
            elif value == "1":  # a runtime integer equal to 1, specialized to a constant
                parts.append(f"{name}=1")
    return " ".join(parts) + (f" [{row['label']}]" if row.get("label") else "")


def table_row(row: dict) -> list[str]:
    if "error" in row:
        return [row.get("kernel", "?"), row.get("label", ""), str(row["arch"]), str(row.get("num_warps", ""))]\
            + [""] * (len(COLUMNS) - 5) + [row["error"][:80]]
    hot = row.get("hot_loop") or {}
    counts = row["kernel_counts"]
    mma = ", ".join(f"{k} x{v}" for k, v in counts["mma_shapes"].items()) or "-"
    ipe = row.get("instructions_per_element")
    return [row["kernel"], config_text(row), str(row["arch"]), str(row["num_warps"]), str(row["registers"]),
            f"{row['local']}/{row['stack']}", str(counts.get("call", 0)), f"{row['shared'] / 1024:.1f}", str(row["ctas"]), row["limiter"],
            mma, f"{counts['red']}/{counts['atom']}", str(counts["ldgsts"]), str(counts["utmaldg"]),
            str(hot.get("bar", 0)), "" if ipe is None else f"{ipe:.1f}", ""]


def format_table(rows: list[dict]) -> str:
    body = [table_row(r) for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(COLUMNS)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


def markdown_summary(rows: list[dict]) -> str:
    """Per kernel and architecture: ranges over its configurations (the docs' table)."""
    groups: dict = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    lines = ["| kernel | sm | configs | registers | local / stack B | calls | shared KiB | CTAs/SM | tensor-core instructions | "
             "RED/ATOM | LDGSTS / TMA | BAR per hot-loop iteration | instr/elem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def rng(vals, fmt="{}"):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "-"
        lo, hi = min(vals), max(vals)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    for (kernel, arch), rs in sorted(groups.items()):
        shapes = sorted({k for r in rs for k in r["kernel_counts"]["mma_shapes"]})
        lines.append(" | ".join([
            f"| `{kernel}`", str(arch), str(len(rs)), rng([r["registers"] for r in rs]),
            f"{rng([r['local'] for r in rs])} / {rng([r['stack'] for r in rs])}",
            rng([r["kernel_counts"].get("call", 0) for r in rs]), rng([r["shared"] / 1024 for r in rs], "{:.0f}"),
            rng([r["ctas"] for r in rs]), ", ".join(shapes) or "-",
            rng([r["kernel_counts"]["red"] + r["kernel_counts"]["atom"] for r in rs]),
            f"{rng([r['kernel_counts']['ldgsts'] for r in rs])} / {rng([r['kernel_counts']['utmaldg'] for r in rs])}",
            rng([(r.get("hot_loop") or {}).get("bar", 0) for r in rs]),
            rng([r.get("instructions_per_element") for r in rs], "{:.1f}")]) + " |")
    return "\n".join(lines)


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def kernels_dirty() -> bool | None:
    """Whether ``kernels/`` has uncommitted changes (the report then describes no commit exactly)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "kernels"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parents[2]).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return bool(out.strip())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--module", action="append", help="kernel module(s) (default: every entropy_ops.kernels "
                   "module with compile_specs())")
    p.add_argument("--arch", action="append", type=int, choices=ARCHS, help="target(s), default both")
    p.add_argument("--subset", choices=("all", "ci"), default="all",
                   help="all configurations, or one per configuration up to boolean flags (what CI gates)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="result cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="compile everything afresh, store nothing")
    p.add_argument("--out", default=None, help="JSON output file (default: benchmarks/out/static-<UTC time>.json)")
    p.add_argument("--markdown", action="store_true", help="also print a per-kernel markdown summary")
    p.add_argument("--gates", action="store_true", help="also check the gates; exit 1 on a violation")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import triton

    modules = args.module or kernel_modules()
    rows = run(modules, tuple(args.arch or ARCHS), args.subset, args.jobs, None if args.no_cache else args.cache_dir)
    print(format_table(rows))
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) if args.out else Path(__file__).parents[1] / "out" / f"static-{stamp:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": "entropy-ops-static/1", "date": stamp.isoformat(timespec="seconds"), "git_sha": git_sha(), "kernels_dirty": kernels_dirty(),
           "triton": triton.__version__, "modules": modules, "subset": args.subset, "rows": rows}
    out.write_text(json.dumps(doc, indent=1))
    print(f"{len(rows)} rows, {sum('error' in r for r in rows)} errors, "
          f"{sum(bool(r.get('cached')) for r in rows)} from the cache; json: {out}")
    if args.markdown:
        print(markdown_summary(rows))
    if args.gates:
        violations = gates.check(rows)
        for v in violations:
            print(f"GATE: {v}")
        return 1 if violations else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
