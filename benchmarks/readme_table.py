"""Turn a results JSON into the markdown tables of the README.

    python -m benchmarks.readme_table benchmarks/results/<run>/results.json [--op logits] [--mode fwd_bwd]

Prints, per op: one row per cell (time, peak extra memory, ratios to ours,
percent of the floor, and the status or reason of cells that did not run), then
the provenance and the implementations' notes (what each computes, which code
path it took, why any is unavailable).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import report

OP_TITLES = {
    "logits": "log-prob + entropy from logits",
    "linear": "log-prob + entropy from hidden states and the lm-head weight",
    "policy": "full GRPO policy-loss step (hidden-state path)",
}
HEADER = ("shape", "dtype", "mode", "impl", "computes", "time (ms)", "peak extra mem", "time / ours",
          "mem / ours", "% of floor", "status")


def _md_row(values) -> str:
    return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"


def _provenance(results: dict) -> list[str]:
    env, base = results["environment"], results["baselines"]
    device = env.get("device_name", "?")
    if env.get("device") == "cuda":
        device += f" (driver {env.get('driver')}, CUDA {env.get('cuda_runtime')})"
    else:
        device += f" ({env.get('cpu_count')} cores, load average {env.get('load_avg_at_start', ['?'])[0]:.1f} at start)"
    sha = (env.get("git_sha") or "unknown")[:12] + (" (dirty)" if env.get("git_dirty") else "")
    rates = ", ".join(f"{k} matmul {v:.2f} TFLOP/s" for k, v in base["matmul_tflops"].items())
    return [
        f"Device: {device}; torch {env.get('torch')}, triton {env.get('triton')}; git {sha}; {env.get('date_utc')}.",
        f"Measured in the same run: copy {base['copy_gbps']:.1f} GB/s (read + write), {rates}.",
        f"Command: `{env.get('command')}`",
    ]


def render(results: dict, ops: list[str] | None = None, modes: list[str] | None = None) -> str:
    """Markdown for ``results`` (optionally only some ops / modes)."""
    all_rows = [r for r in report.rows(results)
                if (ops is None or r["op"] in ops) and (modes is None or r["mode"] in modes)]
    lines = _provenance(results) + [
        "",
        "Ratios are the implementation over ours: above 1 means ours is faster / uses less memory. "
        "Peak extra memory is beyond the inputs (gradients included in fwd_bwd). "
        "% of floor: the op's bytes over the measured copy bandwidth (logits op) or its matmul FLOPs over the "
        "measured matmul rate (hidden-state op, policy loss), divided by the measured time.",
    ]
    for op in dict.fromkeys(r["op"] for r in all_rows):
        lines += ["", f"#### {op} op: {OP_TITLES.get(op, op)}", "", _md_row(HEADER), _md_row(["---"] * len(HEADER))]
        for r in (r for r in all_rows if r["op"] == op):
            impl = f"**{r['impl']}**" if r["impl"].startswith("ours") else r["impl"]
            lines.append(_md_row([r["shape"], r["dtype"], r["mode"], impl, r["computes"], report.fmt_ms(r["time_ms"]),
                                  report.fmt_bytes(r["peak_mem_bytes"]), report.fmt_x(r["time_x"]),
                                  report.fmt_x(r["mem_x"]), report.fmt_pct(r["pct_of_floor"]),
                                  report.fmt_status(r)]))
    shown = {r["op"] for r in all_rows}
    notes = [i for i in results["impls"] if i["op"] in shown]
    if notes:
        lines += ["", "Implementations:", ""]
        for i in notes:
            extra = f" [{i['variant']}]" if i.get("variant") else ""
            state = "" if i["available"] else f" Unavailable: {i['reason']}."
            lines.append(f"- `{i['op']}/{i['name']}` ({i['computes']}): {i['note']}{extra}.{state}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_table", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="a results.json written by python -m benchmarks")
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--mode", action="append", choices=("fwd", "fwd_bwd"), help="only this mode (repeatable)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    sys.stdout.write(render(results, args.op, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
