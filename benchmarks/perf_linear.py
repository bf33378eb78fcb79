"""The hidden-state op in the performance model: its designs, as sequences of pieces.

The model is parametric in the design (:class:`LinearDesign`) so the design the library ships, the
all-cuBLAS chunked pattern and the earlier atomic design are modeled side by side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .gpus import GPU, MiB
from .perf_pieces import (DTYPE_BYTES, LINEAR_MODULE, Piece, _streaming_bounds, bandwidth_piece, gemm_piece,
                          reread_bytes, static_row, triton_gemm_efficiency)
from .shapes import Shape

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
    forward_chunks: int = 16  # backward chunks per forward chunk (entropy_ops.linear_triton.FORWARD_CHUNKS)
    forward: str = "triton"
    recompute: str = "triton"
    block_n: int = 128
    block_v: int = 64
    bwd_block_n: int = 64
    bwd_block_v: int = 128


DESIGNS = {
    # What entropy_ops.linear_triton ships: fused Triton forward tiles (128 x 128 x 64) over chunks of
    # 16 Vc columns, a fused Triton recompute + dz kernel per chunk of Vc = D / 2 (16-bit) columns, cuBLAS
    # gradient matmuls.
    "chunked": LinearDesign("chunked: Triton fused tiles, cuBLAS gradient GEMMs, no atomics", "chunked"),
    # The portable pattern of verl / Liger's non-Hopper paths: every GEMM in cuBLAS, statistics and dz as
    # bandwidth passes over a bf16 [N, Vc] workspace (Vc = 4096).
    "cublas": LinearDesign("chunked: every GEMM in cuBLAS, workspace passes", "chunked", chunk=4096,
                           forward_chunks=1, forward="cublas", recompute="cublas"),
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
        h_per_fwd_chunk = reread_bytes(h, math.ceil(v / (vc * design.forward_chunks)), h, gpu)
        fwd = [gemm_piece("fused forward tiles (Triton)", mm, h_per_fwd_chunk + w + partials, gpu,
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
