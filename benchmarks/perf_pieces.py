"""Building blocks of the performance model: pieces and their bounds, static-report rows, Triton GEMM
efficiency, and the bounds of a streaming kernel. See :mod:`benchmarks.perf_model` for the formulas."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .gpus import GPU

STATIC_REPORT = Path(__file__).parent / "results" / "static-report.json"
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Bounds overlap imperfectly: a piece takes the p-norm of its bounds. p = 4: two equal bounds cost 19%
# over either alone, a bound at half the largest 1.5%, at a quarter 0.1%; p -> infinity is the plain
# roofline (perfect overlap). A heuristic, to be fitted once GPU runs give model errors.
P_NORM = 4.0
TOKEN_MODULE = "token_logprobs_entropy"
LINEAR_MODULE = "linear_logprobs_entropy"


# ---------------------------------------------------------------------------------------------- pieces
@dataclass
class Piece:
    """One launch: its work and the bounds that limit it. ``bounds`` maps bound name -> seconds."""

    name: str
    flops: float = 0.0
    hbm_bytes: float = 0.0
    atomic_bytes: float = 0.0
    bounds: dict = field(default_factory=dict)

    @property
    def time_s(self) -> float:
        """The ``P_NORM``-norm of the bounds: the largest bound, plus a little for bounds close to it."""
        return sum(b**P_NORM for b in self.bounds.values()) ** (1.0 / P_NORM) if self.bounds else 0.0

    @property
    def bound(self) -> str:
        return max(self.bounds, key=self.bounds.get) if self.bounds else "-"


def bandwidth_piece(name: str, hbm_bytes: float, gpu: GPU) -> Piece:
    return Piece(name, hbm_bytes=hbm_bytes, bounds={"bandwidth": hbm_bytes / gpu.copy_bw})


def gemm_piece(name: str, flops: float, hbm_bytes: float, gpu: GPU, efficiency: float = 1.0) -> Piece:
    return Piece(name, flops=flops, hbm_bytes=hbm_bytes,
                 bounds={"compute": flops / (gpu.matmul_rate * efficiency), "bandwidth": hbm_bytes / gpu.copy_bw})


def reread_bytes(data_bytes: float, reads: float, window_bytes: float, gpu: GPU) -> float:
    """HBM bytes of data read ``reads`` times: once if the re-use window fits in L2, else every time.

    ``window_bytes`` is what the programs resident at one time keep re-using (their tiles of the data);
    half of L2 is credited, the rest holding the streamed operands.
    """
    return data_bytes * (1.0 if window_bytes <= gpu.l2_bytes / 2 else max(reads, 1.0))


# ---------------------------------------------------------------------------------------- static rows
def load_static(path: Path | str | None = STATIC_REPORT) -> list[dict]:
    """Rows of a static report (``python -m benchmarks.static --out``); empty if there is none."""
    if path is None or not Path(path).exists():
        return []
    return [r for r in json.loads(Path(path).read_text())["rows"] if "error" not in r]


def _first_pointer_dtype(row: dict) -> str | None:
    return next((t[1:].split("/")[0] for t in row["specialization"].values() if t.startswith("*")), None)


def static_row(rows: list[dict], module: str, role: str, dtype: str, arch: int = 90, vocab: int | None = None,
               tensor_core: bool = False) -> dict | None:
    """The static row for one kernel role: module suffix, ``role`` in the kernel name, operand dtype.

    Prefers the row specialized at the vocabulary nearest to ``vocab`` (the spec's argument ``V``, in
    ratio); otherwise the most conservative row (most instructions per element, then fewest CTAs).
    """
    cands = [r for r in rows if r["module"].endswith(module) and role in r["kernel"] and r["arch"] == arch
             and _first_pointer_dtype(r) == dtype and (not tensor_core or r["kernel_counts"]["hgmma"])]
    if not cands:
        return None
    with_v = [r for r in cands if isinstance(r.get("scalars", {}).get("V"), int) and r["scalars"]["V"] > 0]
    if vocab is not None and with_v:
        # The configuration the dispatcher picks for this vocabulary is the one specialized nearest to it.
        return min(with_v, key=lambda r: (abs(math.log(r["scalars"]["V"] / vocab)), -(r.get("instructions_per_element") or 0)))
    return max(cands, key=lambda r: (r.get("instructions_per_element") or 0.0, -r["ctas"]))


def triton_gemm_efficiency(row: dict | None) -> tuple[float, str]:
    """Fraction of the measured cuBLAS rate a Triton GEMM kernel reaches, from its wgmma shape (sm_90).

    Assumed table (not measured; documented in docs/performance.md): HGMMA with N >= 128 and no
    atomics in the hot loop 0.85; N = 64: 0.6 (the B operand is re-read from shared memory for half
    the work of an N=128 tile); N <= 32 or barriers/waits serializing each HGMMA: 0.35; no HGMMA
    (mma.sync only): 0.3.
    """
    if row is None:
        return 0.6, "no static row: assumed 0.6"
    hot = row.get("hot_loop") or {}
    shapes = [s for s in row["kernel_counts"]["mma_shapes"] if s.startswith("HGMMA.")]
    if not shapes:
        return 0.3, "no HGMMA"
    widest = max(int(s.split(".")[1].split("x")[1]) for s in shapes)
    if widest >= 128 and not hot.get("red"):
        return 0.85, f"HGMMA N={widest}"
    if widest >= 64:
        return 0.6, f"HGMMA N={widest}"
    return 0.35, f"HGMMA N={widest}"


def _streaming_bounds(piece: Piece, elements: float, row: dict | None, gpu: GPU) -> None:
    """Add issue, MUFU and latency bounds of a streaming token kernel from its static row."""
    if row is None:
        return
    clocks = gpu.sms * gpu.clock_hz
    ipe = row.get("instructions_per_element")
    hot = row.get("hot_loop") or row["kernel_counts"]
    ldg = hot.get("stream_bytes_per_thread", 0)
    if ipe:
        piece.bounds["issue"] = elements * ipe / 32 / (gpu.warp_issue_per_clk * clocks)
        elems_per_thread = ldg / DTYPE_BYTES.get(_first_pointer_dtype(row), 2) if ldg else 0
        if elems_per_thread:
            piece.bounds["mufu"] = elements * hot.get("mufu", 0) / elems_per_thread / (gpu.mufu_per_clk * clocks)
    if ldg and row.get("ctas"):
        in_flight = gpu.sms * row["ctas"] * row["num_warps"] * 32 * ldg
        piece.bounds["latency"] = piece.hbm_bytes / (in_flight / gpu.dram_latency_s)
