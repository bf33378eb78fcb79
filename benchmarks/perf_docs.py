"""Rewrite the figure sections of docs/performance.md from a static report, so the figures there are
the committed kernels' own.

``python -m benchmarks.perf_docs [--static benchmarks/results/static-report.json] [--doc docs/performance.md]``

Replaces the text between ``<!-- figures:static -->`` / ``<!-- /figures:static -->`` (per-kernel
summary and the headline configurations) and ``<!-- figures:model -->`` / ``<!-- /figures:model -->``
(modeled times at every named shape, and against the targets).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .perf_model import MODEL_PRESETS, model, summary_markdown
from .perf_pieces import DTYPE_BYTES, STATIC_REPORT, load_static, static_row
from .report import modeled_vs_targets
from .shapes import parse_shapes
from .static.__main__ import markdown_summary

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
# (module suffix, kernel-name part, needs tensor cores, vocabulary): the launches of the headline cells.
HEADLINE_KERNELS = (("token_logprobs_entropy", "fwd", False, 152064), ("token_logprobs_entropy", "bwd", False, 152064),
                    ("linear_logprobs_entropy", "fwd", True, None), ("linear_logprobs_entropy", "logit_grad", True, None),
                    ("linear_logprobs_entropy", "onepass_grad", False, None),
                    ("linear_logprobs_entropy", "stats_merge", False, None), ("linear_matmul", "matmul", True, None))


def _detail(r: dict) -> str:
    hot = r.get("hot_loop") or {}
    body = hot or r["kernel_counts"]
    mma = ", ".join(f"{k} x{v}" for k, v in r["kernel_counts"]["mma_shapes"].items()) or "-"
    ipe = r.get("instructions_per_element")
    dtype = next(t[1:].split("/")[0] for t in r["specialization"].values() if t.startswith("*"))
    stream = body.get("stream_bytes_per_thread") or 0
    mufu = body["mufu"] / (stream / DTYPE_BYTES.get(dtype, 4)) if ipe and stream else None
    return (f"| `{r['kernel']}` | {r['label']} | {r['num_warps']} | {r['registers']} | {r['shared'] / 1024:.0f} | "
            f"{r['ctas']} ({r['limiter']}) | {mma} | {r['kernel_counts']['red'] + r['kernel_counts']['atom']} | "
            f"{r['kernel_counts']['ldgsts']} / {r['kernel_counts']['utmaldg']} | "
            f"{hot['bar'] if hot else '- (no loop)'} | {'' if ipe is None else f'{ipe:.1f}'} | "
            f"{'' if mufu is None else f'{mufu:.2f}'} |")


def _sha(doc: dict) -> str:
    sha = (doc.get("git_sha") or "?")[:7]
    return sha + (" + uncommitted kernel edits" if doc.get("kernels_dirty") else "")


def static_section(doc: dict, rows: list[dict]) -> str:
    out = [f"### Static figures (git `{_sha(doc)}`, Triton {doc['triton']}, `python -m benchmarks.static`)", "",
           f"{len(doc['rows'])} compiled rows (every configuration of every kernel module, sm_80 and sm_90), "
           f"{sum('error' in r for r in doc['rows'])} errors. Per kernel, ranges over its configurations:", "",
           markdown_summary(doc["rows"]), "",
           "The launches of the headline cells (sm_90, bf16; logits op N=32768 V=152064, hidden-state op "
           "N=8192 D=4096 V=131072):", "",
           "| kernel | configuration | warps | registers | shared KiB | CTAs/SM (limit) | tensor-core instructions | "
           "RED/ATOM | LDGSTS / TMA | BAR per hot-loop iteration | instr/elem | MUFU/elem |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for module, role, tensor_core, vocab in HEADLINE_KERNELS:
        r = static_row(rows, module, role, "bf16", vocab=vocab, tensor_core=tensor_core)
        if r is not None:
            out.append(_detail(r))
    return "\n".join(out)


def model_section(doc: dict, rows: list[dict]) -> str:
    shapes = parse_shapes(",".join(MODEL_PRESETS))
    targets = modeled_vs_targets(model(parse_shapes("headline,liger-hopper"), rows=rows))
    lines = [f"### Modeled times (bf16; git `{_sha(doc)}`; "
             "`python -m benchmarks.perf_model --summary`)", "",
             "Each cell: modeled ms (% of the floor, limiting bound). The hidden-state op is the shipped design "
             "(`--design cublas,atomic` models the all-cuBLAS chunked pattern and the earlier atomic design).", "",
             summary_markdown(model(shapes, rows=rows, designs=("chunked",))), "",
             "Against the targets and the anchors' published figures (`python -m benchmarks.report`):", "",
             "| op | shape | GPU | modeled ms | floor ms | % of floor | bound | target | anchors | meets |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in targets:
        meets = "" if t["meets_target"] is None else ("yes" if t["meets_target"] else "no")
        lines.append(f"| {t['op']} | {t['shape']} | {t['gpu']} | {t['modeled_ms']:.3g} | {t['floor_ms']:.3g} | "
                     f"{t['pct_of_floor']:.0f}% | {t['bound']} | {t['target']} | {t['anchors']} | {meets} |")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- figures:{name} -->).*?(<!-- /figures:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- figures:{name} --> ... <!-- /figures:{name} --> section in the document")
    return pattern.sub(lambda m: m.group(1) + "\n" + body + "\n" + m.group(2), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--static", default=str(STATIC_REPORT))
    p.add_argument("--doc", default=str(DOC))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    doc = json.loads(Path(args.static).read_text())
    rows = load_static(args.static)
    text = Path(args.doc).read_text()
    text = replace_section(text, "static", static_section(doc, rows))
    text = replace_section(text, "model", model_section(doc, rows))
    Path(args.doc).write_text(text)
    print(f"{args.doc}: figures from {args.static} (git {doc.get('git_sha')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
