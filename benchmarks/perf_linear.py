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
    ``forward``: ``"triton"`` (fused tiles in one launch over the whole vocabulary, each program folding
    a strip of tiles in registers, one partial per strip merged after) or ``"cublas"`` (GEMM into an
    ``[N, Vc]`` workspace per chunk, then a statistics pass over it).
    ``recompute``: ``"triton"`` (a fused tile kernel recomputes the logits and writes ``dz``) or
    ``"cublas"`` (GEMM into the workspace, then a ``dz`` pass). ``dW[chunk] = dz^T h`` and
    ``dh += dz W[chunk]`` always run in cuBLAS (fp32 ``dh`` read and written per chunk). The one-pass
    loss (:func:`one_pass_pieces`) is modeled as the library runs it, whatever the design.
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
    # What entropy_ops.linear_triton ships: fused Triton forward tiles (128 x 128 x 64) in one launch, each
    # program folding a strip of tiles, a fused Triton recompute + dz kernel per chunk of Vc = D / 2 (16-bit)
    # columns, cuBLAS gradient matmuls.
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
    fwd_row = static_row(rows, LINEAR_MODULE, "fwd", dtype, tensor_core=True)
    grad_row = static_row(rows, LINEAR_MODULE, "logit_grad", dtype, tensor_core=True)
    if design.forward == "triton":
        from entropy_ops.linear_triton import forward_strips

        tiles = math.ceil(v / 128)
        strips = math.ceil(tiles / forward_strips(n, tiles, 128))
        partials = 12.0 * n * strips  # fp32 (m, S, T) per strip: written by the tiles, read by the merge
        fwd = [gemm_piece("fused forward tiles (Triton)", mm, h + w + partials + 12 * n, gpu,
                          triton_gemm_efficiency(fwd_row)[0]),
               bandwidth_piece("merge of the strips' statistics", partials + 36 * n, gpu)]
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
    one_pass = one_pass_pieces(shape, dtype, gpu, rows)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd, "one_pass": one_pass}


# The one-pass loss's small launches per token chunk, besides its four large pieces (forward tiles, dz kernel,
# two matmuls): the loss's per-token gradient (autograd on the chunk's token terms) and the chunk's own
# (statistics merge, slices of logp / H / stats, the dW operand's copy and mask). Measured at the dispatcher
# level by tests/test_one_pass_loss.py::test_small_launches_per_chunk_are_the_models for the GRPO preset: 51
# (86 with a KL term, an entropy bonus and the dual clip). Each is assumed to cost SMALL_LAUNCH_S of GPU time
# (a tiny kernel plus the gap to the next; not measured on a GPU).
ONEPASS_SMALL_LAUNCHES = 51
SMALL_LAUNCH_S = 3e-6


def one_pass_pieces(shape: Shape, dtype: str, gpu: GPU, rows: list[dict],
                    token_chunk: int | None = None) -> list[Piece]:
    """Pieces of the one-pass loss (``entropy_ops.policy_onepass``) in token chunks of ``token_chunk`` rows
    (``None``: the library's ``default_token_chunk``). Per chunk of ``r`` rows::

        forward tiles storing the logits   2 r D V FLOP   h_c, all of W, the [r, V] workspace, tile partials
        dz in place                        read + write the workspace (static row of the dz kernel)
        dh_c = dz W          (cuBLAS)      2 r D V FLOP   workspace, all of W, dh_c
        dW (+)= dz^T h_c     (cuBLAS)      2 r D V FLOP   workspace, h_c, dW written (first chunk) or read
                                                          and written (later chunks: C read in the epilogue)
        ONEPASS_SMALL_LAUNCHES small launches

    Each GEMM piece is bounded by ``max(compute, its bytes / bandwidth)`` like the other pieces; chunks of the
    same kind are one piece (their bounds scaled by their count, exact as they are identical).
    """
    from entropy_ops.policy_onepass import default_token_chunk

    n, v, d, e = shape.n_tokens, shape.vocab, shape.hidden, DTYPE_BYTES[dtype]
    w = v * d * e
    n_c = default_token_chunk(n, v, 4 if dtype == "fp32" else 2) if token_chunk is None else min(n, token_chunk)
    full, rest = divmod(n, n_c)
    # (rows, count, first): the first chunk writes dW, the later ones read and write it
    kinds = [(n_c, 1, True)] + ([(n_c, full - 1, False)] if full > 1 else []) + ([(rest, 1, False)] if rest else [])
    fwd_eff = triton_gemm_efficiency(static_row(rows, LINEAR_MODULE, "fwd", dtype, tensor_core=True))[0]
    dz_row = static_row(rows, LINEAR_MODULE, "onepass_grad", dtype)
    pieces = []
    for r, count, first in kinds:
        mm = 2.0 * r * d * v
        label = f" [{'first chunk' if first else f'{count} chunk' + ('s' if count > 1 else '')} of {r}]"
        dz_pass = bandwidth_piece("dz in place (read + write, Triton)" + label, 2 * r * v * e, gpu)
        _streaming_bounds(dz_pass, r * v, dz_row, gpu)
        chunk = [gemm_piece("forward tiles storing logits (Triton)" + label, mm,
                            r * d * e + w + r * v * e + 2 * 12.0 * r * v / 128, gpu, fwd_eff),
                 dz_pass,
                 gemm_piece("dh_c = dz W (cuBLAS)" + label, mm, r * v * e + w + r * d * e, gpu),
                 gemm_piece("dW (+)= dz^T h_c (cuBLAS)" + label, mm, r * v * e + r * d * e + (w if first else 2 * w),
                            gpu),
                 Piece("small launches" + label, bounds={"launch": ONEPASS_SMALL_LAUNCHES * SMALL_LAUNCH_S})]
        for p in chunk:
            p.flops, p.hbm_bytes = p.flops * count, p.hbm_bytes * count
            p.bounds = {k: b * count for k, b in p.bounds.items()}
        pieces += chunk
    return pieces


def linear_floor(shape: Shape, mode: str, gpu: GPU) -> float:
    factor = {"fwd": 2, "bwd": 6, "fwd_bwd": 8, "one_pass": 6}[mode]
    return factor * shape.n_tokens * shape.hidden * shape.vocab / gpu.matmul_rate
