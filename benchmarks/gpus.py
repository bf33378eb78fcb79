"""The GPUs the performance model knows: published peaks and the reference rates the model uses as roofs.

Every number has its provenance next to it; docs/performance.md repeats the table. The copy bandwidth
and dense bf16 matmul rate are reference figures for what a well-written kernel reaches on these GPUs
(the project's targets quote them; not yet measured by this project), so the model uses them, not the
datasheet peaks, as its roofs.
"""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2


@dataclass(frozen=True)
class GPU:
    name: str
    hbm_peak: float  # B/s, datasheet
    copy_bw: float  # B/s, device-to-device copy (read + write counted) reference figure (not yet measured here)
    l2_bytes: int  # product L2 size
    sms: int
    clock_hz: float  # max boost clock, datasheet (the issue bound is therefore optimistic)
    bf16_peak: float  # FLOP/s dense bf16 tensor core, datasheet
    matmul_rate: float  # FLOP/s dense bf16 GEMM (cuBLAS), reference figure (not yet measured here)
    # Issue: 4 schedulers per SM, one warp instruction each per clock (Hopper/Ampere SM).
    warp_issue_per_clk: int = 4
    # MUFU (ex2, lg2, rcp): 16 results per clock per SM (CUDA C++ Programming Guide, arithmetic
    # instruction throughput table, compute capability 8.x/9.0).
    mufu_per_clk: int = 16
    # DRAM latency seen by a load that misses L2, about 600-800 ns on H100 in published
    # microbenchmarks; assumption, not measured here. Little's law: bytes in flight = bw x latency.
    dram_latency_s: float = 700e-9
    # fp32 RED (global atomic add) throughput on targets larger than L2. Assumption, not measured:
    # each reduction is a read-modify-write of its bytes whose lines go to HBM, so RED bytes move at
    # about the copy bandwidth. The least certain number of the model.
    atomic_bw: float | None = None

    @property
    def red_bw(self) -> float:
        return self.atomic_bw if self.atomic_bw is not None else self.copy_bw


GPUS = {
    # H100 SXM5: 3.35 TB/s HBM3, 50 MB L2, 132 SMs, 1.98 GHz max boost, 989 TFLOP/s dense bf16
    # (NVIDIA H100 datasheet and Hopper architecture whitepaper). Reference rates: copy ~3.0 TB/s,
    # bf16 GEMM 770-800 TFLOP/s (reference figure quoted by the project targets); 785 is the midpoint.
    "H100": GPU("H100 SXM", 3.35e12, 3.0e12, 50 * MiB, 132, 1.98e9, 989e12, 785e12),
    # H200 SXM: the same GH100 configuration (132 SMs, 50 MB L2: the full die's 60 MB is not
    # enabled in either product) with 141 GB HBM3e at 4.8 TB/s (NVIDIA H200 datasheet).
    # Reference rates (not yet measured here): copy ~4.3 TB/s, bf16 GEMM 770-800 TFLOP/s like the H100.
    "H200": GPU("H200 SXM", 4.8e12, 4.3e12, 50 * MiB, 132, 1.98e9, 989e12, 785e12),
}


def gpu_for_device_name(name: str | None) -> str | None:
    """The model's GPU key for a CUDA device name (``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``)."""
    if not name:
        return None
    for key in GPUS:
        if key in name.upper():
            return key
    return None
