"""The GPU run kit: CUDA tests, the headline benchmark cells, and model-vs-measured rows, in one command.

``bash benchmarks/gpu_check.sh`` (or ``python -m benchmarks.gpu_check``) on an H100/H200 machine, no
network needed (torch and triton preinstalled; absent peers are recorded as unavailable):

1. ``tests/test_cuda.py`` with the compiled kernels (``TRITON_INTERPRET=0``), junit XML collected;
2. the headline cells: the logits op at N=32768, V in {32000, 152064, 262144} bf16 (ours, the
   in-place variant, naive and the installed peers), the hidden-state op and the policy loss at the
   Liger-Hopper shape N=8192, D=4096, V=131072 bf16;
3. ``benchmarks/results/<device>-<UTC date>.json``: environment, test outcome, every cell, and one
   row per measured cell of ours with the modeled time (:mod:`benchmarks.perf_model`) and the
   model's error.

Each step has a time limit so the whole kit stays under 8 minutes. Without a CUDA device it says so,
runs the parts that need none (the CUDA tests collect and skip, the model is evaluated, a dry-run
results file is written to a temporary folder) and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = "entropy-ops-gpu-check/1"
# (name, runner arguments, time limit in seconds): the headline cells.
BENCH_STEPS = (
    ("logits", ["--ops", "logits", "--shapes", "headline", "--dtypes", "bf16", "--mode", "both",
                "--impls", "ours,ours-inplace,naive,liger-ce,flash-attn-ce,trl,trl-fused,verl"], 120),
    ("linear", ["--ops", "linear,policy", "--shapes", "liger-hopper", "--dtypes", "bf16", "--mode", "both",
                "--impls", "ours,naive,liger-flce,liger-scaled-ce,cce,trl-chunked,liger-grpo"], 100),
)
TEST_LIMIT_S = 210  # with the two benchmark steps: at most 7 min 10 s, plus start-up


def _run(cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s, env=env)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    return {"command": " ".join(cmd), "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "stdout_tail": out[-3000:], "stderr_tail": err[-3000:]}


def device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "name": None, "slug": "no-gpu"}
    name = torch.cuda.get_device_name(0)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {"cuda": True, "name": name, "slug": slug, "capability": list(torch.cuda.get_device_capability(0)),
            "memory_bytes": torch.cuda.get_device_properties(0).total_memory}


def run_tests(xml_path: Path, limit_s: float) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    rec = _run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_cuda.py", f"--junitxml={xml_path}"],
               limit_s, env)
    rec.update(summarize_junit(xml_path))
    return rec


def summarize_junit(xml_path: Path) -> dict:
    """Counts and failures from a junit XML file (empty when pytest wrote none)."""
    if not xml_path.exists():
        return {"tests": None}
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    reasons = sorted({s.find("skipped").get("message", "") for s in skipped})
    return {"tests": len(cases), "passed": len(cases) - len(failed) - len(skipped), "failed": failed,
            "skipped": len(skipped), "skip_reasons": reasons}


def run_benchmarks(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """The headline cells: ``(step records, cells)``."""
    steps, cells = [], []
    for name, args, limit in BENCH_STEPS:
        folder = out_dir / name
        rec = _run([sys.executable, "-m", "benchmarks", "--device", "cuda", "--no-plots", "--no-progress",
                    "--cuda-rep-ms", "50", "--out", str(folder), *args], limit,
                   {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"})
        rec["step"] = name
        results = folder / "results.json"
        if results.exists():
            doc = json.loads(results.read_text())
            cells += doc["cells"]
            rec["baselines"] = doc.get("baselines")
        steps.append(rec)
    return steps, cells


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-tests", action="store_true", help="only the benchmark cells")
    p.add_argument("--out", default=None, help="results file (default: benchmarks/results/<device>-<date>.json)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from . import environment
    from .gpus import gpu_for_device_name
    from .perf_model import model
    from .report import model_vs_measured
    from .shapes import parse_shapes

    t0 = time.perf_counter()
    dev = device_info()
    gpu_key = gpu_for_device_name(dev["name"])
    stamp = datetime.datetime.now(datetime.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="entropy-ops-gpu-check-"))
    if not dev["cuda"]:
        print("gpu_check: no CUDA device on this machine. Dry run: the CUDA tests are collected and skip, the "
              "model is evaluated, and a dry-run results file goes to a temporary folder (nothing is committed).")
    tests = None if args.skip_tests else run_tests(work / "junit.xml", TEST_LIMIT_S)
    if tests is not None:
        print(f"tests/test_cuda.py: {tests.get('passed')} passed, {len(tests.get('failed') or [])} failed, "
              f"{tests.get('skipped')} skipped in {tests['wall_s']} s"
              + (f" ({'; '.join(tests['skip_reasons'])})" if tests.get("skip_reasons") else ""))
        for name in tests.get("failed") or []:
            print(f"  FAILED {name}")
    steps, cells = run_benchmarks(work) if dev["cuda"] else ([], [])
    modeled = model(parse_shapes("headline,liger-hopper"), gpus=(gpu_key,) if gpu_key else ("H100", "H200"))
    comparison = model_vs_measured({"cells": cells}, gpu_key)
    doc = {"schema": SCHEMA, "date_utc": stamp.isoformat(timespec="seconds"), "device": dev,
           "model_gpu": gpu_key, "environment": environment.describe(_torch_device(dev), sys.argv),
           "tests": tests, "benchmark_steps": steps, "cells": cells, "model_vs_measured": comparison,
           "modeled": modeled, "wall_s": None}
    if dev["cuda"]:
        out = Path(args.out) if args.out else RESULTS / f"{dev['slug']}-{stamp:%Y%m%d-%H%M}.json"
    else:
        out = Path(args.out) if args.out else work / f"dry-run-{stamp:%Y%m%d-%H%M}.json"
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    for row in comparison:
        err = row["model_error"]
        print(f"{row['op']:<7} {row['impl']:<13} {row['shape']:<24} {row['mode']:<8} measured "
              f"{row['measured_ms']:.3g} ms  modeled {row['modeled_ms'] or float('nan'):.3g} ms  "
              f"error {'' if err is None else f'{100 * err:+.0f}%'}")
    print(f"results: {out} ({doc['wall_s']} s)")
    if not dev["cuda"]:
        print("gpu_check: dry run complete (no GPU). On an H100/H200 the same command writes "
              "benchmarks/results/<device>-<date>.json; commit that file.")
        return 0
    failed = bool(tests and (tests.get("failed") or tests["returncode"] not in (0, 5)))
    return 1 if failed else 0


def _torch_device(dev: dict):
    import torch

    return torch.device("cuda" if dev["cuda"] else "cpu")


if __name__ == "__main__":
    sys.exit(main())
