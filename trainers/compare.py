"""Side-by-side runs of several algorithms over several seeds: ``entropy-ops compare``.

Every algorithm trains from the same model with the same step budget and the
same config overrides, once per seed (seed ``s`` fixes the prompt order and
the sampling streams, so seed ``s`` of every algorithm sees the same prompts);
only ``--algo`` (and the algorithm's default learning rate, unless
``--learning_rate`` is given) differs. Each run is a separate
``entropy-ops train`` process (``--jobs`` at a time), writing to
``OUTPUT_DIR/<algo>/seed<s>/``.

The held-out evaluation before training does not depend on the algorithm, so
it runs once per seed (``OUTPUT_DIR/base/seed<s>``, a 0-step run) and every
algorithm's run skips it (``eval_at_start=false``) and evaluates only at the end
(``eval_every=0`` unless overridden). Runs go seed by seed (all algorithms of
seed 0 first), so a stopped comparison still holds whole seeds.

When the runs are done, ``compare_report.py`` reads their logs back into
``comparison.{md,json,png}``: per algorithm the mean over seeds of the final
held-out greedy and sampled accuracy with a 95% confidence interval
(Student t over seeds), the paired difference to the base model and to GRPO
(per seed, then mean and interval), the planted slice, and each algorithm's
mechanism check from its training log. ``--report-only`` rebuilds them from
runs already on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_ALGOS = ("grpo", "dr-grpo", "rloo", "gtpo", "grpo-s", "seed-grpo", "em-ft", "em-rl")
BASE = "base"


def run_command(algo: str | None, *, seed: int, max_steps: int, output_dir: str, overrides: list[str]) -> list[str]:
    """The ``entropy-ops train`` command line of one run (``algo=None``: the 0-step base evaluation)."""
    cmd = [sys.executable, "-m", "entropy_ops.trainers", "train", "--seed", str(seed), "--output-dir", output_dir]
    if algo is None:
        return cmd + ["--max-steps", "0", "--save_every=0", *overrides, "--eval_at_start=true"]
    return cmd + ["--algo", algo, "--max-steps", str(max_steps), "--eval_at_start=false", "--eval_every=0",
                  *overrides]


def run_dir(output_dir: str, name: str, seed: int) -> str:
    return os.path.join(output_dir, name, f"seed{seed}")


def plan(algos, seeds) -> list[tuple[str, int]]:
    """``(name, seed)`` in run order: per seed, the base evaluation, then every algorithm."""
    return [(name, seed) for seed in seeds for name in (BASE, *algos)]


def run_all(algos, *, seeds, max_steps: int, output_dir: str, overrides: list[str], jobs: int) -> dict:
    """Run every ``(algorithm, seed)`` (``jobs`` at a time); returns ``{"algo/seed<s>": {returncode, wall_s}}``.

    A run whose ``summary.json`` already exists is not run again (a stopped comparison resumes).
    """
    os.makedirs(output_dir, exist_ok=True)
    pending, running, done = plan(algos, seeds), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            name, seed = pending.pop(0)
            key, rdir = f"{name}/seed{seed}", run_dir(output_dir, name, seed)
            if os.path.isfile(os.path.join(rdir, "summary.json")):
                done[key] = {"returncode": 0, "wall_s": None, "reused": True}
                continue
            os.makedirs(os.path.dirname(rdir), exist_ok=True)
            log = open(rdir + ".log", "w", encoding="utf-8")
            cmd = run_command(None if name == BASE else name, seed=seed, max_steps=max_steps, output_dir=rdir,
                              overrides=["--overwrite", *overrides])
            print(f"[compare] start {key}: {' '.join(cmd[1:])}", flush=True)
            running[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.perf_counter())
        time.sleep(0.5)
        for key, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                done[key] = {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1)}
                print(f"[compare] {key} finished: exit {proc.returncode} in {done[key]['wall_s']} s", flush=True)
                del running[key]
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entropy-ops compare",
        description="Train several algorithms over several seeds with the same step budget; tabulate the held-out "
                    "accuracy (mean and 95%% interval over seeds, paired differences) and plot it. "
                    "Other --key=value arguments go to every run.")
    p.add_argument("--algos", default=",".join(DEFAULT_ALGOS), help="comma-separated algorithm names")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, or A-B for a range (e.g. 0-4)")
    p.add_argument("--seed", type=int, default=None, help="a single seed (same as --seeds S)")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses the trainer's thread setting)")
    p.add_argument("--output-dir", default="runs/compare")
    p.add_argument("--baseline", default="grpo", help="the algorithm paired differences are taken against")
    p.add_argument("--window", type=int, default=10, help="steps averaged for the first/last training figures")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plot from existing runs")
    return p


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name distinct integers, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    from .compare_report import report

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    from .algorithms import algorithm_class

    try:
        for algo in algos:
            algorithm_class(algo)
        seeds = [args.seed] if args.seed is not None else parse_seeds(args.seeds)
        if args.jobs < 1 or args.max_steps < 1 or args.window < 1:
            raise ValueError("--jobs, --max-steps and --window must be >= 1")
    except ValueError as e:
        parser.exit(2, f"entropy-ops compare: error: {e}\n")
    walls = {}
    json_path = os.path.join(args.output_dir, "comparison.json")
    meta = {"algos": algos, "seeds": seeds, "max_steps": args.max_steps, "overrides": overrides, "jobs": args.jobs,
            "baseline": args.baseline, "command": "entropy-ops compare " + " ".join(argv)}
    if args.report_only and os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            old = json.load(f)
        walls, meta = old.get("runs", {}), {**old.get("meta", {}), **{k: meta[k] for k in ("algos", "seeds")}}
    if not args.report_only:
        t0 = time.perf_counter()
        walls = run_all(algos, seeds=seeds, max_steps=args.max_steps, output_dir=args.output_dir,
                        overrides=overrides, jobs=args.jobs)
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report(args.output_dir, algos, seeds, walls=walls, meta=meta, baseline=args.baseline, window=args.window)
    print(open(os.path.join(args.output_dir, "comparison.md"), encoding="utf-8").read())
    print(f"plot: {os.path.join(args.output_dir, 'comparison.png')}")
    failed = [k for k, w in walls.items() if w["returncode"] != 0]
    if failed:
        print(f"failed runs (see OUTPUT_DIR/<algo>/seed<s>.log): {failed}", file=sys.stderr)
    return 1 if failed else 0
