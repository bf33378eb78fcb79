"""Modeled time of every op at every named shape on H100 and H200, from bytes, FLOPs and the SASS.

``python -m benchmarks.perf_model [--shapes PRESETS] [--gpu H100,H200] [--static FILE] [--out FILE]``

Each op is a sequence of *pieces* (kernel launches or GEMMs run one after the other). A piece's time
is the 4-norm of its bounds (the largest, plus a penalty when another bound comes close: ``P_NORM``),
and the op's time is the sum over its pieces:

- ``bandwidth``: HBM bytes / measured copy bandwidth. Bytes count the compulsory traffic plus the
  re-reads the tiling implies when the re-used data does not stay in L2 (:func:`reread_bytes`).
- ``compute``: FLOPs / measured dense GEMM rate, times an efficiency for Triton GEMMs read from the
  kernel's wgmma shape (:func:`triton_gemm_efficiency`); cuBLAS pieces run at the measured rate.
- ``issue``: SASS instructions per element in the hot loop (static report) x elements / 32 lanes /
  (4 warp instructions per clock per SM x SMs x clock).
- ``mufu``: MUFU (exp2/log2) instructions per element / (16 per clock per SM x SMs x clock).
- ``latency``: bytes / (bytes in flight / DRAM latency) when too few loads are in flight to cover
  the latency (Little's law; bytes in flight from the hot loop's loads x resident threads).
- ``atomics``: fp32 RED bytes / atomic bandwidth (see :mod:`benchmarks.gpus`).

Floors (TARGETS): the logits op moves its bytes at the copy bandwidth; the hidden-state op does its
FLOPs (2NDV forward, 6NDV backward with recompute, 8NDV both, 6NDV one-pass) at the GEMM rate.
Every figure here is *modeled*; docs/performance.md documents the formulas and their provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .gpus import GPU, GPUS, MiB
from .shapes import PRESETS, Shape, parse_shapes

STATIC_REPORT = Path(__file__).parent / "results" / "static-report.json"
MODEL_PRESETS = ("headline", "liger-hopper", "verl-qwen32b", "slime-248k", "skyrl-65k", "qwen2.5-7b",
                 "llama3-8b", "gemma3")
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


# ---------------------------------------------------------------------------------------- logits op
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


def logits_op(shape: Shape, dtype: str, gpu: GPU, rows: list[dict]) -> dict[str, list[Piece]]:
    """Pieces of the logits op: forward reads the logits once, backward reads them and writes dlogits.

    Per row O(1) extras: the int64 target, fp32 statistics and outputs (32 bytes forward, 40 backward).
    A kernel whose SASS has several loops loading the row reads it once per loop; those re-reads come
    from L2 only if the rows in flight fit in it.
    """
    n, v, e = shape.n_tokens, shape.vocab, DTYPE_BYTES[dtype]
    out = {}
    for mode, role, writes in (("fwd", "fwd", 0), ("bwd", "bwd", 1)):
        row = static_row(rows, TOKEN_MODULE, role, dtype, vocab=v)
        passes = max(1, sum(1 for lp in (row or {}).get("loops", []) if lp["innermost"] and lp["ldg"]))
        rows_in_flight = gpu.sms * (row["ctas"] if row else 1)
        reads = reread_bytes(n * v * e, passes, rows_in_flight * v * e, gpu)
        piece = bandwidth_piece(f"logits {mode}", reads + writes * n * v * e + n * (32 + 8 * writes), gpu)
        _streaming_bounds(piece, n * v * passes, row, gpu)
        out[mode] = [piece]
    out["fwd_bwd"] = out["fwd"] + out["bwd"]
    return out


def logits_floor(shape: Shape, dtype: str, mode: str, gpu: GPU) -> float:
    passes = {"fwd": 1, "bwd": 2, "fwd_bwd": 3}[mode]
    return passes * shape.n_tokens * shape.vocab * DTYPE_BYTES[dtype] / gpu.copy_bw


# ---------------------------------------------------------------------------------- hidden-state op
@dataclass(frozen=True)
class LinearDesign:
    """A hidden-state op design, as pieces.

    ``kind="chunked"``: the vocabulary in chunks of ``chunk`` columns (``None``: the library's default,
    ``max(N D, 16 MiB) / (N e)``, i.e. ``D / 2`` for 16-bit inputs at large ``N``), no atomics.
    ``forward``: ``"triton"`` (fused tiles: GEMM + statistics epilogue, partial statistics merged per
    chunk) or ``"cublas"`` (GEMM into an ``[N, Vc]`` workspace, then a statistics pass over it).
    ``recompute``: ``"triton"`` (a fused tile kernel recomputes the logits and writes ``dz``) or
    ``"cublas"`` (GEMM into the workspace, then a ``dz`` pass). ``dW[chunk] = dz^T h`` and
    ``dh += dz W[chunk]`` always run in cuBLAS (fp32 ``dh`` read and written per chunk). The one-pass
    loss keeps the whole ``[n, V]`` logits of a token chunk in a workspace: forward tiles store them,
    one in-place ``dz`` pass, then ``dh = dz W`` and ``dW (+)= dz^T h``.
    ``kind="atomic"``: the earlier fused Triton design with fp32 atomics for ``dh`` and ``dW``.
    Triton GEMM pieces run at the cuBLAS rate times :func:`triton_gemm_efficiency` of their static row.
    """

    name: str
    kind: str
    chunk: int | None = None
    forward: str = "triton"
    recompute: str = "triton"
    block_n: int = 128
    block_v: int = 64
    bwd_block_n: int = 64
    bwd_block_v: int = 128


DESIGNS = {
    # What entropy_ops.linear_triton ships: fused Triton forward tiles (128 x 128 x 64), a fused Triton
    # recompute + dz kernel per chunk, cuBLAS gradient matmuls, Vc = D / 2 (16-bit).
    "chunked": LinearDesign("chunked: Triton fused tiles, cuBLAS gradient GEMMs, no atomics", "chunked"),
    # The portable pattern of verl / Liger's non-Hopper paths: every GEMM in cuBLAS, statistics and dz as
    # bandwidth passes over a bf16 [N, Vc] workspace (Vc = 4096).
    "cublas": LinearDesign("chunked: every GEMM in cuBLAS, workspace passes", "chunked", chunk=4096,
                           forward="cublas", recompute="cublas"),
    # The fused Triton design before: split-vocab forward (128 x 64 tiles), backward 64 x 128 tiles with
    # fp32 RED into dh [N, D] and dW [V, D].
    "atomic": LinearDesign("atomic: fused Triton, fp32 RED", "atomic"),
}


def _chunk(design: LinearDesign, n: int, d: int, v: int, e: int) -> int:
    if design.chunk is not None:
        return min(design.chunk, v)
    return min(v, max(128, max(n * d, 16 * MiB) // (n * e) // 128 * 128))


def linear_op(shape: Shape, dtype: str, gpu: GPU, rows: list[dict], design: LinearDesign) -> dict[str, list[Piece]]:
    """Pieces of the hidden-state op (forward, backward with recompute, both) and the one-pass loss."""
    n, v, d, e = shape.n_tokens, shape.vocab, shape.hidden, DTYPE_BYTES[dtype]
    h, w, mm = n * d * e, v * d * e, 2.0 * n * d * v
    if design.kind == "atomic":
        fwd_row = static_row(rows, LINEAR_MODULE, "fwd", dtype, tensor_core=True)
        bwd_row = static_row(rows, LINEAR_MODULE, "bwd", dtype, tensor_core=True)
        # Those kernels are gone from the tree; without their static rows, the review's SASS facts stand
        # in (TARGETS.md: forward HGMMA 64x64x16 -> 0.6; backward 64x16 / 64x32 HGMMAs -> 0.35).
        eff_f = triton_gemm_efficiency(fwd_row)[0] if fwd_row else 0.6
        eff_b = triton_gemm_efficiency(bwd_row)[0] if bwd_row else 0.35
        resident = gpu.sms * max(1, (fwd_row or {}).get("ctas", 1))
        # Forward: every program re-reads its [block_n, D] rows of h for each vocab tile.
        h_reads = reread_bytes(h, v / design.block_v, resident * design.block_n * d * e, gpu)
        w_reads = w * math.ceil(n / design.block_n / resident)
        fwd = [gemm_piece("fused fwd (Triton)", mm, h_reads + w_reads, gpu, eff_f)]
        # Backward: recompute + dh + dW on tensor cores; fp32 RED of each program's dh and dW tiles.
        red = 4.0 * (n * d * v / design.bwd_block_v + v * d * n / design.bwd_block_n)
        bwd_gemm = gemm_piece("fused bwd (Triton)", 3 * mm, 2 * h + 2 * w, gpu, eff_b)
        bwd_gemm.atomic_bytes = red
        bwd_gemm.bounds["atomics"] = red / gpu.red_bw
        bwd = [bwd_gemm, bandwidth_piece("dW fp32 -> weight dtype", v * d * (4 + e), gpu)]
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}

    vc = _chunk(design, n, d, v, e)
    chunks = math.ceil(v / vc)
    h_per_chunk = reread_bytes(h, chunks, h, gpu)  # each chunk's GEMMs read h again unless it stays in L2
    partials = 2 * 12.0 * n * v / 128  # fp32 (m, S, T) per 128-column tile, written then merged
    fwd_row = static_row(rows, LINEAR_MODULE, "fwd", dtype, tensor_core=True)
    grad_row = static_row(rows, LINEAR_MODULE, "logit_grad", dtype, tensor_core=True)
    if design.forward == "triton":
        fwd = [gemm_piece("fused forward tiles (Triton)", mm, h_per_chunk + w + partials, gpu,
                          triton_gemm_efficiency(fwd_row)[0])]
    else:
        fwd = [gemm_piece("z = h W_c^T (cuBLAS)", mm, h_per_chunk + w + n * v * e, gpu),
               bandwidth_piece("statistics pass over z", n * v * e + 16 * n * chunks, gpu)]
    if design.recompute == "triton":
        recompute = [gemm_piece("recompute + dz tiles (Triton)", mm, h_per_chunk + w + n * v * e, gpu,
                                triton_gemm_efficiency(grad_row)[0])]
    else:
        recompute = [gemm_piece("recompute z (cuBLAS)", mm, h_per_chunk + w + n * v * e, gpu),
                     bandwidth_piece("dz pass (read z, write dz)", 2 * n * v * e, gpu)]
    dh_acc = n * d * 4 * 2 * chunks  # fp32 dh read + written by each chunk's addmm
    grads = [gemm_piece("dW_c = dz^T h (cuBLAS)", mm, h_per_chunk + n * v * e + w, gpu),
             gemm_piece("dh += dz W_c (cuBLAS)", mm, n * v * e + w + dh_acc, gpu),
             bandwidth_piece("dh fp32 -> input dtype", n * d * (4 + e), gpu)]
    bwd = recompute + grads
    # One-pass: per token chunk of n_c = min(N, 4 D / e) rows, forward tiles store the logits in an
    # [n_c, V] workspace, one in-place dz pass, dh = dz W (over all V), dW (+)= dz^T h_c.
    n_c = min(n, max(128, 4 * d // e))
    t_chunks = math.ceil(n / n_c)
    w_per_chunk = reread_bytes(w, t_chunks, w, gpu)
    dz_pass = bandwidth_piece("dz in place (read + write, Triton)", 2 * n * v * e, gpu)
    _streaming_bounds(dz_pass, n * v, static_row(rows, LINEAR_MODULE, "onepass_grad", dtype), gpu)
    one_pass = [gemm_piece("forward tiles storing logits (Triton)", mm, h + w_per_chunk + n * v * e + partials, gpu,
                           triton_gemm_efficiency(fwd_row)[0]),
                dz_pass,
                gemm_piece("dh_c = dz W (cuBLAS)", mm, n * v * e + w_per_chunk + n * d * e, gpu),
                gemm_piece("dW (+)= dz^T h_c (cuBLAS)", mm, n * v * e + h + (v * d * 8 if t_chunks > 1 else 0) * t_chunks,
                           gpu)]
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd, "one_pass": one_pass}


def linear_floor(shape: Shape, mode: str, gpu: GPU) -> float:
    factor = {"fwd": 2, "bwd": 6, "fwd_bwd": 8, "one_pass": 6}[mode]
    return factor * shape.n_tokens * shape.hidden * shape.vocab / gpu.matmul_rate


# ---------------------------------------------------------------------------------------- the table
def _row(op, mode, shape, dtype, gpu_key, pieces, floor_s, design=None) -> dict:
    t = sum(p.time_s for p in pieces)
    per_bound: dict[str, float] = {}
    for p in pieces:
        per_bound[p.bound] = per_bound.get(p.bound, 0.0) + p.time_s
    return {"op": op, "mode": mode, "design": design, "shape": shape.as_dict(), "dtype": dtype, "gpu": gpu_key,
            "flops": sum(p.flops for p in pieces), "hbm_bytes": sum(p.hbm_bytes for p in pieces),
            "atomic_bytes": sum(p.atomic_bytes for p in pieces), "time_ms": t * 1e3, "floor_ms": floor_s * 1e3,
            "pct_of_floor": 100.0 * floor_s / t if t else None,
            "bound": max(per_bound, key=per_bound.get) if per_bound else "-",
            "pieces": [{"name": p.name, "time_ms": p.time_s * 1e3, "bound": p.bound,
                        "bounds_ms": {k: v * 1e3 for k, v in p.bounds.items()}} for p in pieces]}


def model(shapes, gpus=("H100", "H200"), dtype: str = "bf16", rows: list[dict] | None = None,
          designs=("chunked", "cublas", "atomic")) -> list[dict]:
    """Modeled rows for the logits op (every shape) and the hidden-state op (shapes with ``D``)."""
    rows = load_static() if rows is None else rows
    out = []
    seen = set()
    for shape in shapes:
        for key in gpus:
            gpu = GPUS[key]
            logit_key = (shape.n_tokens, shape.vocab, key)
            if logit_key not in seen:
                seen.add(logit_key)
                logit_shape = Shape(shape.n_tokens, shape.vocab, None, None, shape.preset)
                for mode, pieces in logits_op(logit_shape, dtype, gpu, rows).items():
                    out.append(_row("logits", mode, logit_shape, dtype, key, pieces,
                                    logits_floor(logit_shape, dtype, mode, gpu)))
            if shape.hidden is None:
                continue
            for name in designs:
                for mode, pieces in linear_op(shape, dtype, gpu, rows, DESIGNS[name]).items():
                    op = "policy_one_pass" if mode == "one_pass" else "linear"
                    out.append(_row(op, mode, shape, dtype, key, pieces, linear_floor(shape, mode, gpu), name))
    return out


# The hidden-state op's design as the library ships it (entropy_ops/linear_ops.py): what measured
# cells of ``linear`` and ``policy`` are compared against.
CURRENT_LINEAR_DESIGN = "chunked"


def modeled_time_for_cell(cell: dict, gpu_key: str, rows: list[dict] | None = None) -> float | None:
    """Modeled ms for one benchmark cell (``benchmarks.runner`` format) of ours; None if not modeled."""
    if gpu_key not in GPUS or cell["dtype"] not in DTYPE_BYTES:
        return None
    s = cell["shape"]
    shape = Shape(s["n_tokens"], s["vocab"], s.get("hidden"), s.get("softcap"), s.get("preset", "custom"))
    rows = load_static() if rows is None else rows
    gpu = GPUS[gpu_key]
    if cell["op"] == "logits":
        pieces = logits_op(shape, cell["dtype"], gpu, rows).get(cell["mode"])
    elif cell["op"] in ("linear", "policy") and shape.hidden:
        # policy_loss(config="grpo") on hidden states takes the one-pass form when it trains.
        mode = "one_pass" if cell["op"] == "policy" and cell["mode"] == "fwd_bwd" else cell["mode"]
        pieces = linear_op(shape, cell["dtype"], gpu, rows, DESIGNS[CURRENT_LINEAR_DESIGN]).get(mode)
    else:
        return None
    return None if pieces is None else 1e3 * sum(p.time_s for p in pieces)


def format_rows(rows: list[dict]) -> str:
    cols = ("op", "design", "mode", "shape", "gpu", "modeled ms", "floor ms", "% floor", "bound", "HBM GB",
            "atomic GB")
    body = [[r["op"], r["design"] or "", r["mode"], r["shape"]["label"], r["gpu"], f"{r['time_ms']:.3g}",
             f"{r['floor_ms']:.3g}", f"{r['pct_of_floor']:.0f}%", r["bound"], f"{r['hbm_bytes'] / 1e9:.1f}",
             f"{r['atomic_bytes'] / 1e9:.0f}" if r["atomic_bytes"] else ""] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(b) for b in body)])


def markdown_rows(rows: list[dict]) -> str:
    lines = ["| op | design | mode | shape | GPU | modeled ms | floor ms | % of floor | bound | HBM GB | atomic GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['design'] or ''} | {r['mode']} | {r['shape']['label']} | {r['gpu']} | "
                     f"{r['time_ms']:.3g} | {r['floor_ms']:.3g} | {r['pct_of_floor']:.0f}% | {r['bound']} | "
                     f"{r['hbm_bytes'] / 1e9:.1f} | {r['atomic_bytes'] / 1e9:.0f} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], design: str = CURRENT_LINEAR_DESIGN) -> str:
    """One line per (op, shape): modeled ms (% of floor, bound) per GPU and mode; the docs' table."""
    gpus = sorted({r["gpu"] for r in rows})
    modes = {"logits": ("fwd", "bwd", "fwd_bwd"), "linear": ("fwd", "bwd", "fwd_bwd"), "policy_one_pass": ("one_pass",)}
    table: dict = {}
    for r in rows:
        if r["design"] not in (None, design):
            continue
        key = (r["op"], r["shape"]["label"])
        table.setdefault(key, {})[(r["gpu"], r["mode"])] = r
    head = ["op", "shape"] + [f"{g} {m}" for g in gpus for m in ("fwd", "bwd", "fwd+bwd / one-pass")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, label), cells in table.items():
        vals = []
        for g in gpus:
            ms = modes[op] if op != "policy_one_pass" else ("", "", "one_pass")
            for m in ms:
                r = cells.get((g, m))
                vals.append("" if r is None else f"{r['time_ms']:.3g} ({r['pct_of_floor']:.0f}%, {r['bound']})")
        lines.append("| " + " | ".join([op, label, *vals]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(MODEL_PRESETS), help="presets / NxV / NxVxD (benchmarks/shapes.py)")
    p.add_argument("--gpu", default="H100,H200", help=f"comma-separated subset of {','.join(GPUS)}")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16")
    p.add_argument("--design", default="chunked,cublas,atomic", help=f"hidden-state designs: {','.join(DESIGNS)}")
    p.add_argument("--static", default=str(STATIC_REPORT), help="static report JSON (python -m benchmarks.static)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table instead")
    p.add_argument("--summary", action="store_true", help="print one markdown line per (op, shape)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    gpus = [g.strip() for g in args.gpu.split(",") if g.strip()]
    designs = [d.strip() for d in args.design.split(",") if d.strip()]
    bad = [g for g in gpus if g not in GPUS] + [d for d in designs if d not in DESIGNS]
    if bad:
        p.error(f"unknown GPU or design: {bad}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        p.error(str(exc))
    static_rows = load_static(args.static)
    rows = model(shapes, gpus, args.dtype, static_rows, designs)
    print("modeled (no GPU run): " + (f"static report {args.static}" if static_rows else
                                       "no static report: issue/latency bounds left out"))
    print(summary_markdown(rows) if args.summary else markdown_rows(rows) if args.markdown else format_rows(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
