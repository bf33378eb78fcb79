"""Side-by-side runs of several algorithms on one task: ``entropy-ops compare``.

Every algorithm trains from the same model, with the same seed (so the same
prompt order), the same step budget and the same config overrides; only
``--algo`` differs. Each run is a separate ``entropy-ops train`` process
(``--jobs`` of them at a time) writing to ``OUTPUT_DIR/<algo>/``; when they
are done, their ``metrics.jsonl`` files are read back into:

- ``OUTPUT_DIR/comparison.png``: per algorithm, the training reward (moving
  average of the batch mean), the rollout entropy (nats/token) and the
  held-out greedy accuracy, over steps;
- ``OUTPUT_DIR/comparison.md`` and ``comparison.json``: the table of the first
  and last held-out evaluations, the training reward and entropy of the first
  and last ``window`` steps, and the wall time of each run.

The reward logged for EM-FT and EM-RL is the correctness reward of their
samples: measured, never trained on (those algorithms use no reward).
``--report-only`` rebuilds the table and plot from runs already on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from .logging_utils import _smooth, read_metrics

DEFAULT_ALGOS = ("grpo", "dr-grpo", "rloo", "gtpo", "grpo-s", "seed-grpo", "em-ft", "em-rl")


def run_command(algo: str, *, seed: int, max_steps: int, output_dir: str, overrides: list[str]) -> list[str]:
    """The ``entropy-ops train`` command line of one algorithm's run."""
    return [sys.executable, "-m", "entropy_ops.trainers", "train", "--algo", algo, "--seed", str(seed),
            "--max-steps", str(max_steps), "--output-dir", output_dir, *overrides]


def run_all(algos, *, seed: int, max_steps: int, output_dir: str, overrides: list[str], jobs: int) -> dict:
    """Train every algorithm (``jobs`` processes at a time); returns ``{algo: {"returncode", "wall_s"}}``."""
    os.makedirs(output_dir, exist_ok=True)
    pending, running, done = list(algos), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            algo = pending.pop(0)
            run_dir = os.path.join(output_dir, algo)
            log = open(os.path.join(output_dir, f"{algo}.log"), "w", encoding="utf-8")
            cmd = run_command(algo, seed=seed, max_steps=max_steps, output_dir=run_dir, overrides=overrides)
            print(f"[compare] start {algo}: {' '.join(cmd[1:])}", flush=True)
            running[algo] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
        time.sleep(0.5)
        for algo, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[algo] = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
                print(f"[compare] {algo} finished: exit {proc.returncode} in {done[algo]['wall_s']} s", flush=True)
                del running[algo]
    return done


def summarize(run_dir: str, *, window: int = 10) -> dict | None:
    """First/last held-out evaluation and first/last-``window`` training means of one run (None: no log)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = read_metrics(path)
    train = [r for r in rows if r["kind"] == "train" and "entropy" in r]
    evals = [r for r in rows if r["kind"] == "eval"]

    def mean(key, part):
        values = [float(r[key]) for r in part if key in r]
        return sum(values) / len(values) if values else None

    out = {"steps": train[-1]["step"] if train else 0}
    for key in ("reward/mean", "entropy", "completion_length/mean"):
        out[f"{key} first"] = mean(key, train[:window])
        out[f"{key} last"] = mean(key, train[-window:])
    for key in ("eval/greedy_correct", "eval/sampled_correct", "eval/entropy"):
        out[f"{key} first"] = float(evals[0][key]) if evals and key in evals[0] else None
        out[f"{key} last"] = float(evals[-1][key]) if evals and key in evals[-1] else None
    return out


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(summaries: dict, walls: dict, window: int) -> str:
    """The comparison as a Markdown table, one row per algorithm."""
    head = ("| algorithm | held-out greedy acc. | held-out sampled acc. | held-out entropy | "
            f"train reward (first -> last {window} steps) | rollout entropy (first -> last {window}) | wall |")
    lines = [head, "|" + "---|" * 7]
    for algo, s in summaries.items():
        if s is None:
            lines.append(f"| {algo} | no log | | | | | |")
            continue
        wall = walls.get(algo, {}).get("wall_s")
        cells = [f"{_fmt(s[f'{k} first'])} -> {_fmt(s[f'{k} last'])}" for k in
                 ("eval/greedy_correct", "eval/sampled_correct", "eval/entropy", "reward/mean", "entropy")]
        lines.append(f"| {algo} | " + " | ".join(cells) + f" | {'-' if wall is None else f'{wall:.0f} s'} |")
    return "\n".join(lines) + "\n"


def plot(output_dir: str, algos, png_path: str) -> str:
    """Training reward (moving average), rollout entropy and held-out greedy accuracy per algorithm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 10), dpi=110)
    FigureCanvasAgg(fig)
    ax_r, ax_h, ax_e = fig.subplots(3, 1, sharex=True)
    for i, algo in enumerate(algos):
        path = os.path.join(output_dir, algo, "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        rows = read_metrics(path)
        train = [r for r in rows if r["kind"] == "train" and "entropy" in r]
        evals = [r for r in rows if r["kind"] == "eval" and "eval/greedy_correct" in r]
        color = f"C{i % 10}"
        steps = [r["step"] for r in train]
        ax_r.plot(steps, _smooth([float(r["reward/mean"]) for r in train]), color=color, lw=1.6, label=algo)
        ax_h.plot(steps, _smooth([float(r["entropy"]) for r in train], window=5), color=color, lw=1.2, label=algo)
        ax_e.plot([r["step"] for r in evals], [r["eval/greedy_correct"] for r in evals], "o-", color=color,
                  label=algo)
    ax_r.set_ylabel("train reward\n(20-step moving avg)")
    ax_h.set_ylabel("rollout entropy\n(nats/token, 5-step avg)")
    ax_e.set_ylabel("held-out\ngreedy accuracy")
    ax_e.set_xlabel("step")
    for ax in (ax_r, ax_h, ax_e):
        ax.grid(alpha=0.3)
    ax_r.legend(loc="best", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def report(output_dir: str, algos, *, walls: dict | None = None, window: int = 10, meta: dict | None = None) -> dict:
    """Write ``comparison.{json,md,png}`` in ``output_dir`` from the runs found there; returns the summaries."""
    walls = walls or {}
    summaries = {algo: summarize(os.path.join(output_dir, algo), window=window) for algo in algos}
    table = markdown_table(summaries, walls, window)
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(output_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta or {}, "runs": walls, "summaries": summaries}, f, indent=2)
    plot(output_dir, algos, os.path.join(output_dir, "comparison.png"))
    return summaries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entropy-ops compare",
        description="Train several algorithms with the same seed and step budget; plot and tabulate them. "
                    "Other --key=value arguments go to every run.")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma-separated algorithm names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses the trainer's thread setting)")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--window", type=int, default=10, help="steps averaged for the first/last training figures")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from existing runs")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    from .algorithms import algorithm_class

    try:
        for algo in algos:
            algorithm_class(algo)
        if args.jobs < 1 or args.max_steps < 1 or args.window < 1:
            raise ValueError("--jobs, --max-steps and --window must be >= 1")
    except ValueError as e:
        parser.exit(2, f"entropy-ops compare: error: {e}\n")
    walls = {}
    walls_path = os.path.join(args.output_dir, "comparison.json")
    if args.report_only and os.path.isfile(walls_path):
        with open(walls_path, encoding="utf-8") as f:
            walls = json.load(f).get("runs", {})
    if not args.report_only:
        walls = run_all(algos, seed=args.seed, max_steps=args.max_steps, output_dir=args.output_dir,
                        overrides=overrides, jobs=args.jobs)
    meta = {"seed": args.seed, "max_steps": args.max_steps, "overrides": overrides, "jobs": args.jobs,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": "entropy-ops compare " + " ".join(argv)}
    report(args.output_dir, algos, walls=walls, window=args.window, meta=meta)
    print(open(os.path.join(args.output_dir, "comparison.md"), encoding="utf-8").read())
    print(f"plot: {os.path.join(args.output_dir, 'comparison.png')}")
    failed = [a for a, w in walls.items() if w["returncode"] != 0]
    if failed:
        print(f"failed runs (see OUTPUT_DIR/<algo>.log): {failed}", file=sys.stderr)
    return 1 if failed else 0
