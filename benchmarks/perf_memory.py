"""Modeled peak extra memory of the hidden-state op (logits never materialized) and of the designs it is
compared with, at named shapes.

``python -m benchmarks.perf_memory [--shapes liger-hopper,issue14,cce-gemma2] [--dtype bf16] [--json FILE]``

*Extra* means bytes beyond the inputs (``hidden [N, D]``, ``weight [V, D]``, targets) and the returned
gradients (``d hidden``, ``d weight`` in their own dtypes), at the highest point of forward + backward.
Every figure is **modeled** from the allocations each design's code makes (read from its source), not
measured on a GPU. The rows and what they hold at their peak:

- ``entropy-ops (two-pass)``: :func:`entropy_ops.linear_triton.backward_peak_bytes` (its terms are
  checked against traced allocations in the tests): the fp32 ``d hidden`` accumulator ``4 N D``
  (16-bit ``hidden``), the ``h`` operand of ``dW = dz^T h`` (``N D e``, ignored rows zeroed) and the
  ``dz`` buffer ``N Vc e``. The forward holds ``N (36 + 12 R)`` bytes of statistics (``R`` vocab strips,
  8 at these shapes: 1.1 MB at N=8192).
  Deterministic, both gradients rounded once to their dtype.
- ``entropy-ops chunked, fp32_weight_grad=False``: ``chunked_linear_logprobs_and_entropy`` with ``n = N / 4``
  tokens a chunk, each chunk's ``dW`` rounded into the weight-dtype gradient: one chunk's backward,
  ``backward_peak_bytes(n, D, V)``; 4 roundings of ``dW``.
- ``entropy-ops (one-pass loss)``: :func:`entropy_ops.policy_onepass.onepass_peak_bytes`.
- ``naive PyTorch``: ``log_softmax((h @ W.T).float())`` and its autograd: at least ``16 N V`` bytes (the
  fp32 log-probabilities and probabilities kept for backward and two fp32 ``[N, V]`` gradients).
- ``Cut Cross-Entropy, impl="cce"`` (its default): the gradients are accumulated in place into the
  returned tensors by atomic adds in the input dtype from every vocab block, so the extra is O(N)
  (the log-sum-exp and the upstream gradient, ``8 N``; lock arrays left out). Not deterministic
  (atomic order), each gradient element summed in the 16-bit dtype ``V / B_V`` resp. ``N / B_N`` times,
  small blocks skipped by its gradient filter.
- ``Cut Cross-Entropy, impl="cce_exact"`` (also ``cce_kahan_full*``): fp32 gradient accumulators for both
  ``d hidden`` and ``d weight`` (``4 N D + 4 V D``), then cast. Not deterministic (atomic order).
- ``Liger-Kernel FLCE``: token chunks of ``c = next_pow2(ceil(N / ceil(V / D)))`` rows whose ``[c, V]``
  logits (input dtype) are turned into their gradient in place; ``d weight`` accumulated chunk by chunk
  in the weight's dtype (``N / c`` roundings; its fp32 option adds ``4 V D``). Deterministic.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .shapes import Shape, parse_shapes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# The issue-14 target shapes and the shape of Cut Cross-Entropy's published table (Gemma 2 2B,
# 8192 tokens), next to the named presets.
EXTRA_PRESETS = {
    "issue14": (Shape(8192, 131072, 4096, preset="issue14"), Shape(32768, 152064, 3584, preset="issue14")),
    "cce-gemma2": (Shape(8192, 256000, 2304, preset="cce-gemma2"),),
}


def _shapes(spec: str) -> list[Shape]:
    out = []
    for part in spec.split(","):
        out.extend(EXTRA_PRESETS[part] if part in EXTRA_PRESETS else parse_shapes(part))
    return out


def ours_forward_bytes(n: int, d: int, v: int, dtype: torch.dtype) -> int:
    """Forward extra: fp32 statistics and outputs (36 bytes a row) and the strips' partial statistics
    (``12`` bytes per row per strip, :func:`entropy_ops.linear_triton.forward_strips`)."""
    from entropy_ops import linear_triton as lt
    from entropy_ops.kernels import linear_logprobs_entropy as k

    cfg = k.launch_config(torch.empty((), dtype=dtype).element_size(), False)[0]
    tiles = math.ceil(v / cfg.block_v)
    strips = math.ceil(tiles / lt.forward_strips(n, tiles, cfg.block_n))
    return n * (36 + 12 * strips)


def designs(shape: Shape, dtype: torch.dtype) -> list[dict]:
    """One row per design: ``extra_bytes`` (modeled peak), ``deterministic``, ``dw_roundings`` (how many
    times each ``d weight`` element is rounded to a 16-bit dtype; ``None`` for an order-dependent count, 0
    for the forward alone)."""
    from entropy_ops import linear_triton as lt
    from entropy_ops.policy_onepass import default_token_chunk, onepass_peak_bytes

    n, d, v = shape.n_tokens, shape.hidden, shape.vocab
    e = torch.empty((), dtype=dtype).element_size()
    ours_bwd = lt.backward_peak_bytes(n, d, v, dtype)
    rows = [dict(design="entropy-ops (two-pass)", extra_bytes=max(ours_bwd, ours_forward_bytes(n, d, v, dtype)),
                 deterministic=True, dw_roundings=1)]
    rows.append(dict(design="entropy-ops forward alone (either form)", extra_bytes=ours_forward_bytes(n, d, v, dtype),
                     deterministic=True, dw_roundings=0))
    quarter = max(1, n // 4)  # the chunked helper at N / 4 tokens a chunk: a chunk's own backward, dW in place
    rows.append(dict(design="entropy-ops chunked, fp32_weight_grad=False, N/4 tokens a chunk",
                     extra_bytes=lt.backward_peak_bytes(quarter, d, v, dtype), deterministic=True,
                     dw_roundings=math.ceil(n / quarter)))
    chunk = default_token_chunk(n, v, lt.gemm_dtype(dtype).itemsize)
    rows.append(dict(design="entropy-ops (one-pass loss)", extra_bytes=onepass_peak_bytes(n, d, v, dtype),
                     deterministic=True, dw_roundings=math.ceil(n / chunk)))
    liger_chunk = 1 << max(0, math.ceil(math.log2(math.ceil(n / math.ceil(v / d)))))
    rows += [
        dict(design="naive PyTorch (lower bound)", extra_bytes=16 * n * v, deterministic=True, dw_roundings=1),
        dict(design='Cut Cross-Entropy impl="cce"', extra_bytes=8 * n, deterministic=False, dw_roundings=None),
        dict(design='Cut Cross-Entropy impl="cce_exact"', extra_bytes=4 * n * d + 4 * v * d, deterministic=False,
             dw_roundings=1),
        dict(design="Liger-Kernel FLCE", extra_bytes=min(liger_chunk, n) * v * e, deterministic=True,
             dw_roundings=math.ceil(n / liger_chunk)),
    ]
    for r in rows:
        r.update(shape=shape.label, dtype=str(dtype).removeprefix("torch."))
    return rows


def fmt_bytes(b: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | design | peak extra (modeled) | vs entropy-ops two-pass | deterministic | d weight roundings |",
             "|---|---|---|---|---|---|"]
    ours = {r["shape"]: r["extra_bytes"] for r in rows if r["design"] == "entropy-ops (two-pass)"}
    for r in rows:
        ratio = r["extra_bytes"] / ours[r["shape"]]
        rnd = {None: "order-dependent", 0: "-"}.get(r["dw_roundings"], str(r["dw_roundings"]))
        lines.append(f"| {r['shape']} | {r['design']} | {fmt_bytes(r['extra_bytes'])} | {ratio:.3g}x | "
                     f"{'yes' if r['deterministic'] else 'no'} | {rnd} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="issue14,cce-gemma2")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    shapes = [s for s in _shapes(args.shapes) if s.hidden is not None]
    if not shapes:
        print("no shape with a hidden size D in --shapes", file=sys.stderr)
        return 2
    rows = [r for s in shapes for r in designs(s, DTYPES[args.dtype])]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
