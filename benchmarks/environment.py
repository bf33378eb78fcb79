"""What a results file records about the run, and the device's own speed limits.

:func:`describe` gathers the provenance (device, driver, library versions, git
SHA, UTC date, command line, machine load). :func:`measure_baselines` measures,
on the same device in the same run, the two rates the floors are computed from:

- copy bandwidth: a device-to-device ``copy_`` of a 1 GiB buffer on CUDA (256 MiB
  on CPU), counting read + write bytes;
- matmul rate: a square matmul per benchmarked dtype (8192^3 on CUDA, as the
  TARGETS.md H100 figure; 1024^3 on CPU, where BLAS already runs at its peak), ``2 n^3`` FLOPs.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_PACKAGES = ("liger-kernel", "cut-cross-entropy", "trl", "flash-attn", "verl", "transformers")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device, argv: list[str]) -> dict:
    """Provenance of a run (everything a reader needs to trust or reproduce the numbers)."""
    import triton

    env = {
        "device": device.type,
        "device_name": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "peers": {p: _version(p) for p in PEER_PACKAGES},
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks", *argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_bytes": props.total_memory,
            "cuda_runtime": torch.version.cuda,
            "driver": _cuda_driver(),
        })
    return env


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_ms(fn, device: torch.device, cpu_repeats: int = 5) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
    return 1e3 * _median_seconds(fn, cpu_repeats)


def measure_baselines(device: torch.device, dtypes: list[torch.dtype]) -> dict:
    """Copy bandwidth (GB/s, read + write) and matmul TFLOP/s per dtype, measured now on ``device``."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src), device)
    del src, dst
    out = {"copy_bytes": nbytes, "copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9, "matmul_tflops": {}}
    n = 8192 if cuda else 1024
    out["matmul_n"] = n
    for dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        ms = _time_ms(lambda: a @ b, device)
        out["matmul_tflops"][str(dtype).removeprefix("torch.")] = 2 * n**3 / (ms * 1e-3) / 1e12
        del a, b
    if cuda:
        torch.cuda.empty_cache()
    return out
