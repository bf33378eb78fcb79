"""One harness for every cell: time, peak memory, floor, and a check of the outputs.

A cell is (op, implementation, shape, dtype, mode). For each cell the harness

1. makes the inputs from a seed derived from (op, shape, dtype), so every
   implementation sees the same values (fresh per implementation, because some
   write into their inputs: ``ours-inplace``, Liger's cross-entropy);
2. calls once (``first_call_s``: includes Triton JIT, autotuning, ``torch.compile``)
   and compares the forward outputs with the naive implementation's
   (``max_abs_diff``);
3. measures the peak memory of one call beyond the inputs:

   - CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
     minus ``memory_allocated()`` before the call (the inputs and their rotated copies);
   - CPU: the running sum of the allocations and frees that the PyTorch profiler
     records (``profile_memory=True``, raw ``[memory]`` events in time order) during
     the call; its maximum is the peak. It counts every tensor the CPU allocator
     hands out, temporaries inside ops and compiled graphs included, and costs one
     profiled call. Memory outside PyTorch's allocator (Python objects) is not counted;

4. times it: CUDA ``triton.testing.do_bench`` (median, 20th and 80th percentiles;
   do_bench also flushes the L2 cache before each call), with the inputs rotated
   over up to 4 copies when one set is small (so no call finds its inputs in
   cache); CPU: the median of ``repeats`` timed calls after the first one.

Forward-only cells run under ``torch.no_grad()`` on inputs that do not require
grad. Forward+backward cells call ``torch.autograd.grad`` for the op's gradient
inputs with the op's upstream gradients, so every call is one full step and no
``.grad`` accumulates. Out-of-memory errors give status ``"oom"``; any other
exception ``"error"`` with its message.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import statistics
import sys
import time
import zlib

import torch

from .ops import Out

# Rotate input copies only while all copies together stay under this (CUDA); above
# it one set is far larger than any L2 cache and do_bench's flush suffices.
ROTATE_BUDGET_BYTES = 1 << 30
MAX_ROTATIONS = 4
# CPU guard: a cell is skipped as "oom" when this many fp32 [N, V] buffers (the
# naive forward+backward holds about five, measured with this harness) exceed
# MemAvailable: the kernel's OOM killer cannot be caught.
CPU_GUARD_LOGITS_COPIES = 6


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cell_seed(op: str, shape, dtype: torch.dtype) -> int:
    return zlib.crc32(f"{op}|{shape.label}|{dtype_name(dtype)}".encode())


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _describe(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit] if lines else ''}"


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _tensor_bytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _clone_inputs(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backward_pairs(out: Out, inputs: dict):
    """``(outputs, grad_outputs)`` of one backward: the loss, or ``g_logp``/``g_H`` into logp/H."""
    if out.loss is not None:
        return [out.loss], [None]
    pairs = [(t, inputs[g]) for t, g in ((out.logp, "g_logp"), (out.entropy, "g_H"))
             if t is not None and t.requires_grad]
    return [p[0] for p in pairs], [p[1].view_as(p[0]) for p in pairs]


def make_step(fn, input_sets: list[dict], grad_inputs: tuple[str, ...], train: bool):
    """The function one timed call runs (cycling through ``input_sets``)."""
    sets = itertools.cycle(input_sets)

    def step() -> Out:
        inputs = next(sets)
        if not train:
            with torch.no_grad():
                return fn(inputs, False)
        out = fn(inputs, True)
        outputs, grads = backward_pairs(out, inputs)
        torch.autograd.grad(outputs, [inputs[k] for k in grad_inputs], grads)
        return out

    return step


@contextlib.contextmanager
def _stderr_silenced():
    """Send file descriptor 2 to /dev/null: kineto prints two lines at every profiler
    start/stop straight to it (no log level turns them off), which would flood the
    progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def cpu_peak_bytes(step) -> int:
    """Peak bytes allocated by the PyTorch CPU allocator during one ``step()`` (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():
        prof.start()
    try:
        step()
    finally:
        with _stderr_silenced():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(step, device: torch.device) -> int:
    gc.collect()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def time_step(step, device: torch.device, repeats: int, cuda_rep_ms: int) -> dict:
    """Median time in ms (and spread) of ``step``; the caller has already warmed it up."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, lo, hi = do_bench(step, warmup=max(1, cuda_rep_ms // 4), rep=cuda_rep_ms, quantiles=[0.5, 0.2, 0.8])
        return {"time_ms": float(med), "time_ms_q20": float(lo), "time_ms_q80": float(hi)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    return {"time_ms": statistics.median(times), "times_ms": times}


def _max_abs_diff(out: Out, ref: Out | None) -> dict | None:
    if ref is None:
        return None
    diffs = {}
    for key in ("logp", "entropy", "loss"):
        a, b = getattr(out, key), getattr(ref, key)
        if a is not None and b is not None:
            diffs[key] = float((a.detach().float() - b.detach().float()).abs().max())
    return diffs or None


def _floor(op_mod, shape, dtype, mode, baselines: dict, time_ms: float | None) -> dict:
    kind, amount = op_mod.work(shape, dtype, mode)
    if kind == "bytes":
        rate = baselines["copy_gbps"] * 1e9
        out = {"work_bytes": amount}
    else:
        rate = baselines["matmul_tflops"].get(dtype_name(dtype), 0.0) * 1e12
        out = {"work_flops": amount}
    if rate > 0:
        out["floor_ms"] = 1e3 * amount / rate
    if time_ms:
        if kind == "bytes":
            out["achieved_gbps"] = amount / (time_ms * 1e-3) / 1e9
        else:
            out["achieved_tflops"] = amount / (time_ms * 1e-3) / 1e12
        if "floor_ms" in out:
            out["pct_of_floor"] = 100.0 * out["floor_ms"] / time_ms
    return out


def run_cell(op_mod, impl, fn, shape, dtype, device, mode, settings, reference: dict) -> dict:
    """Run one cell and return its record. ``reference`` maps (shape, dtype) to the naive outputs."""
    train = mode == "fwd_bwd"
    cell = {"op": impl.op, "impl": impl.name, "shape": shape.as_dict(), "dtype": dtype_name(dtype),
            "mode": mode, "status": "ok", "reason": None}
    reason = impl.supports(shape, dtype)
    if reason:
        return {**cell, "status": "unavailable", "reason": reason}
    if device.type == "cpu":
        need = CPU_GUARD_LOGITS_COPIES * shape.n_tokens * shape.vocab * 4
        avail = _mem_available_bytes()
        if avail is not None and need > avail:
            return {**cell, "status": "oom",
                    "reason": f"skipped: estimated {need / 2**30:.1f} GiB > MemAvailable {avail / 2**30:.1f} GiB"}
    key = (shape.label, dtype_name(dtype))
    try:
        gen = torch.Generator().manual_seed(cell_seed(impl.op, shape, dtype))
        inputs = op_mod.make_inputs(shape, dtype, device, train, gen)
        input_sets = [inputs]
        one = _tensor_bytes(inputs)
        if device.type == "cuda" and 0 < one * MAX_ROTATIONS <= ROTATE_BUDGET_BYTES:
            input_sets += [_clone_inputs(inputs) for _ in range(MAX_ROTATIONS - 1)]
        cell["input_bytes"] = one
        cell["input_copies"] = len(input_sets)
        step = make_step(fn, input_sets, op_mod.GRAD_INPUTS, train)

        _sync(device)
        t0 = time.perf_counter()
        out = step()
        _sync(device)
        cell["first_call_s"] = time.perf_counter() - t0
        out = Out(*(None if t is None else t.detach() for t in (out.logp, out.entropy, out.loss)))
        if impl.reference:
            reference[key] = out
        cell["max_abs_diff_vs_naive"] = None if impl.reference else _max_abs_diff(out, reference.get(key))
        del out

        if device.type == "cuda":
            cell["peak_mem_bytes"] = cuda_peak_bytes(step, device)
        else:
            cell["peak_mem_bytes"] = cpu_peak_bytes(step)
        cell.update(time_step(step, device, settings["repeats"], settings["cuda_rep_ms"]))
    except Exception as exc:  # a failing peer is a result, not a crash
        cell["status"] = "oom" if _is_oom(exc) else "error"
        cell["reason"] = _describe(exc)
    cell.update(_floor(op_mod, shape, dtype, mode, settings["baselines"], cell.get("time_ms")))
    return cell


def release(device: torch.device) -> None:
    """Free what a finished (or failed) cell left behind (a failed call's traceback can hold
    its tensors in reference cycles). The runner freezes the objects of the imported
    libraries first (``gc.freeze``), so a collection scans only what the cells made."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
