"""Smoke test of the benchmark suite: ``python -m benchmarks`` at tiny shapes on the CPU.

One run of every op, every implementation (minus the CPU's opt-in ``torch-compile``),
both modes, then ``benchmarks.readme_table`` on its results. The runs go through
subprocesses from the repository root, exactly as a user types them (the library
never imports ``benchmarks``, so it is not on the test path).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STATUSES = {"ok", "oom", "unavailable", "error"}
# fp32 at V=500: ours, the peers' CPU paths and the naive form agree to rounding.
MAX_DIFF_VS_NAIVE = 1e-4


def _run(*args, check=True):
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(args[:2])} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
                    f"stderr:\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = _run("benchmarks", "--device", "cpu", "--shapes", "tiny", "--mode", "both", "--repeats", "2",
                "--threads", "1", "--no-progress", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    return out, results, done.stdout


def test_results_schema_and_provenance(bench_run):
    _, results, _ = bench_run
    assert results["schema"] == "entropy-ops-bench/1"
    env = results["environment"]
    for key in ("device", "device_name", "torch", "triton", "git_sha", "date_utc", "command", "peers"):
        assert key in env, f"environment lacks {key!r}"
    assert env["device"] == "cpu"
    assert "-m benchmarks --device cpu --shapes tiny" in env["command"]
    base = results["baselines"]
    assert base["copy_gbps"] > 0 and base["matmul_tflops"]["float32"] > 0
    assert {c["op"] for c in results["cells"]} == {"logits", "linear", "policy"}


def test_every_listed_implementation_ran_or_says_why_not(bench_run):
    _, results, _ = bench_run
    cells = results["cells"]
    groups = {(c["op"], c["shape"]["label"], c["dtype"], c["mode"]) for c in cells}
    for impl in results["impls"]:
        if not impl["available"]:
            assert isinstance(impl["reason"], str) and impl["reason"], f"{impl['name']}: no reason"
        mine = [c for c in cells if c["op"] == impl["op"] and c["impl"] == impl["name"]]
        expected = {g for g in groups if g[0] == impl["op"] and g[3] in impl["modes"]}
        got = {(c["op"], c["shape"]["label"], c["dtype"], c["mode"]) for c in mine}
        assert got == expected, f"{impl['op']}/{impl['name']}: cells {sorted(got)} != {sorted(expected)}"
    for c in cells:
        assert c["status"] in STATUSES
        where = f"{c['op']}/{c['impl']} {c['shape']['label']} {c['mode']}"
        assert c["status"] != "error", f"{where} failed: {c['reason']}"
        if c["status"] != "ok":
            assert c["reason"], f"{where}: status {c['status']} without a reason"
            continue
        assert c["time_ms"] > 0 and c["peak_mem_bytes"] >= 0, where
        assert c["floor_ms"] > 0 and c["pct_of_floor"] > 0, where
        assert c.get("achieved_gbps", c.get("achieved_tflops", 0)) > 0, where
        for quantity, diff in (c["max_abs_diff_vs_naive"] or {}).items():
            assert diff < MAX_DIFF_VS_NAIVE, f"{where}: {quantity} differs from naive by {diff}"
    # The Triton-only peers say why they cannot run on the CPU; the CPU-capable ones ran.
    by_name = {(i["op"], i["name"]): i for i in results["impls"]}
    for key in (("logits", "liger-ce"), ("logits", "trl-fused"), ("linear", "liger-flce"), ("linear", "cce")):
        assert not by_name[key]["available"] and "CUDA" in by_name[key]["reason"]
    for key in (("logits", "naive"), ("logits", "ours"), ("logits", "trl"), ("logits", "verl"),
                ("linear", "trl-chunked"), ("linear", "liger-scaled-ce"), ("policy", "liger-grpo")):
        assert by_name[key]["available"], f"{key}: {by_name[key]['reason']}"
    assert ("logits", "torch-compile") not in by_name  # opt-in on the CPU


def test_naive_uses_more_memory_than_ours_on_the_logits_op(bench_run):
    _, results, _ = bench_run
    peak = {(c["impl"], c["shape"]["n_tokens"], c["mode"]): c["peak_mem_bytes"]
            for c in results["cells"] if c["op"] == "logits" and c["status"] == "ok"}
    for n in (64, 128):
        assert peak[("ours", n, "fwd_bwd")] < peak[("naive", n, "fwd_bwd")]
        assert peak[("ours-inplace", n, "fwd_bwd")] < peak[("ours", n, "fwd_bwd")]


def test_plots_are_png_files(bench_run):
    out, results, stdout = bench_run
    pngs = sorted(out.glob("*.png"))
    assert {p.name.split("_")[0] for p in pngs} == {"logits", "linear", "policy"}
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, p
    assert "time/ours" in stdout  # the console ratio table


def test_readme_table_renders(bench_run):
    out, results, _ = bench_run
    text = _run("benchmarks.readme_table", str(out / "results.json")).stdout
    assert "| shape | dtype | mode | impl |" in text
    for op in ("logits", "linear", "policy"):
        assert f"#### {op} op" in text
    assert "**ours**" in text and "needs CUDA" in text and "verl-math" in text
    n_rows = sum(1 for line in text.splitlines() if line.startswith("| N="))
    assert n_rows == len(results["cells"])
    only = _run("benchmarks.readme_table", str(out / "results.json"), "--op", "logits", "--mode", "fwd").stdout
    assert "#### logits op" in only and "#### linear op" not in only
    assert not any("| fwd_bwd |" in line for line in only.splitlines())


def test_bad_arguments_are_rejected():
    done = _run("benchmarks", "--device", "cpu", "--impls", "no-such-impl", "--no-plots", check=False)
    assert done.returncode != 0 and "no-such-impl" in done.stderr
    done = _run("benchmarks", "--device", "cpu", "--shapes", "12xV", "--no-plots", check=False)
    assert done.returncode != 0 and "12xV" in done.stderr


# ------------------------------------------------------------------------- performance model, GPU kit
def test_model_reproduces_the_targets_floors():
    """TARGETS.md's worked floors: logits N=32768 V=152064 bf16 on H100 3.3 ms fwd / 6.6 ms bwd;
    hidden-state op N=32768 D=3584 V=152064: 8NDV = 1.43e14 FLOP, 179 ms at ~800 TFLOP/s."""
    from benchmarks.gpus import GPUS
    from benchmarks.perf_model import linear_floor, logits_floor
    from benchmarks.shapes import Shape

    h100 = GPUS["H100"]
    shape = Shape(32768, 152064, 3584)
    assert logits_floor(shape, "bf16", "fwd", h100) * 1e3 == pytest.approx(3.32, rel=0.01)
    assert logits_floor(shape, "bf16", "bwd", h100) * 1e3 == pytest.approx(6.64, rel=0.01)
    assert linear_floor(shape, "fwd_bwd", h100) * h100.matmul_rate == pytest.approx(1.43e14, rel=0.01)
    assert linear_floor(shape, "fwd_bwd", h100) * 1e3 == pytest.approx(179 * 800 / 785, rel=0.01)


def test_model_atomic_design_moves_the_reviewed_atomic_bytes():
    """The fused atomic backward (64 x 128 tiles) adds 4 (NDV/128 + VDN/64) bytes of fp32 RED:
    412 GB at the Liger-Hopper shape, the figure of the static review; the chunked design none."""
    from benchmarks.gpus import GPUS
    from benchmarks.perf_model import DESIGNS, linear_op
    from benchmarks.shapes import PRESETS

    shape = PRESETS["liger-hopper"][0]
    atomic = linear_op(shape, "bf16", GPUS["H100"], [], DESIGNS["atomic"])
    assert sum(p.atomic_bytes for p in atomic["bwd"]) / 1e9 == pytest.approx(412, rel=0.01)
    chunked = linear_op(shape, "bf16", GPUS["H100"], [], DESIGNS["chunked"])
    assert sum(p.atomic_bytes for ps in chunked.values() for p in ps) == 0
    t = {mode: sum(p.time_s for p in ps) for mode, ps in chunked.items()}
    assert t["fwd_bwd"] == pytest.approx(t["fwd"] + t["bwd"])
    assert t["one_pass"] < t["fwd_bwd"]


def test_model_issue_bound_from_static_rows():
    """A static row's instructions per element become the issue bound: elements * ipe / 32 lanes /
    (4 issue slots x SMs x clock)."""
    from benchmarks.gpus import GPUS
    from benchmarks.perf_model import logits_op
    from benchmarks.shapes import Shape

    hot = {"instructions": 40, "hgmma": 0, "hmma": 0, "mufu": 4, "stream_bytes_per_thread": 16, "red": 0}
    row = {"module": "entropy_ops.kernels.token_logprobs_entropy", "kernel": "_token_fwd", "arch": 90,
           "specialization": {"logits_ptr": "*bf16/16"}, "scalars": {"V": 152064}, "kernel_counts": hot,
           "hot_loop": hot, "loops": [], "ctas": 8, "num_warps": 8, "instructions_per_element": 5.0}
    gpu = GPUS["H100"]
    n, v = 32768, 152064
    piece = logits_op(Shape(n, v), "bf16", gpu, [row])["fwd"][0]
    assert piece.bounds["issue"] == pytest.approx(n * v * 5.0 / 32 / (4 * gpu.sms * gpu.clock_hz))
    assert piece.bounds["mufu"] == pytest.approx(n * v * 0.5 / (16 * gpu.sms * gpu.clock_hz))
    assert piece.bound == "bandwidth"


def test_perf_model_and_report_commands():
    text = _run("benchmarks.perf_model", "--shapes", "liger-hopper", "--gpu", "H100").stdout
    assert "modeled" in text and "chunked" in text and "atomic" in text and "N=8192 V=131072 D=4096" in text
    text = _run("benchmarks.report").stdout
    assert "modeled (no GPU run)" in text and "50.22" in text and ">= 90% of the copy floor" in text


def test_memory_model_rows_come_from_the_library_formulas():
    """The memory model's own rows are the library's formulas; the peers' rows follow their designs'
    allocations, and the issue-14 shapes are at least 50x below the naive form."""
    import torch

    from benchmarks.perf_memory import EXTRA_PRESETS, designs
    from entropy_ops.linear_triton import backward_peak_bytes
    from entropy_ops.policy_onepass import onepass_peak_bytes

    for shape in EXTRA_PRESETS["issue14"]:
        n, v, d = shape.n_tokens, shape.vocab, shape.hidden
        rows = {r["design"]: r for r in designs(shape, torch.bfloat16)}
        ours = rows["entropy-ops (two-pass)"]["extra_bytes"]
        assert ours == backward_peak_bytes(n, d, v, torch.bfloat16)
        assert rows["naive PyTorch (lower bound)"]["extra_bytes"] == 16 * n * v >= 50 * ours
        assert rows['Cut Cross-Entropy impl="cce_exact"']["extra_bytes"] == 4 * n * d + 4 * v * d > ours
        assert not rows['Cut Cross-Entropy impl="cce"']["deterministic"]
        lean = rows["entropy-ops chunked, fp32_weight_grad=False, N/4 tokens a chunk"]
        assert lean["extra_bytes"] == backward_peak_bytes(n // 4, d, v, torch.bfloat16) < ours
        assert lean["dw_roundings"] == 4 < rows["Liger-Kernel FLCE"]["dw_roundings"]
        one_pass = rows["entropy-ops (one-pass loss)"]
        assert one_pass["extra_bytes"] == onepass_peak_bytes(n, d, v, torch.bfloat16) <= 16 * n * v / 50
    text = _run("benchmarks.perf_memory", "--shapes", "issue14").stdout
    assert "N=32768 V=152064 D=3584" in text and "Liger-Kernel FLCE" in text


def test_report_puts_measured_beside_modeled():
    from benchmarks.report import measured_table, model_vs_measured

    cell = {"op": "logits", "impl": "ours", "status": "ok", "dtype": "bf16", "mode": "fwd", "time_ms": 4.0,
            "shape": {"n_tokens": 32768, "vocab": 152064, "hidden": None, "softcap": None, "preset": "headline",
                      "label": "N=32768 V=152064"}}
    rows = model_vs_measured({"cells": [cell]}, "H100", static_rows=[])
    assert rows[0]["modeled_ms"] == pytest.approx(3.32, rel=0.01)
    assert rows[0]["model_error"] == pytest.approx((4.0 - rows[0]["modeled_ms"]) / 4.0)
    assert "+17%" in measured_table(rows)


def test_gpu_check_dry_run_without_a_gpu(tmp_path):
    """bash benchmarks/gpu_check.sh on a machine without CUDA: says so, CUDA tests skip, exit 0."""
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: the kit would run for real")
    out = tmp_path / "dry.json"
    env = {**__import__("os").environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device" in done.stdout and "dry run complete" in done.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "entropy-ops-gpu-check/1" and doc["device"]["cuda"] is False
    assert doc["tests"]["tests"] > 0 and doc["tests"]["skipped"] == doc["tests"]["tests"]
    assert any("CUDA" in r for r in doc["tests"]["skip_reasons"])
    assert doc["modeled"] and doc["cells"] == []


def test_perf_docs_rewrites_only_the_marked_sections(tmp_path):
    from benchmarks.perf_docs import replace_section

    text = "intro\n<!-- figures:model -->\nold\n<!-- /figures:model -->\noutro\n"
    once = replace_section(text, "model", "| new |")
    assert once == "intro\n<!-- figures:model -->\n| new |\n<!-- /figures:model -->\noutro\n"
    assert replace_section(once, "model", "| new |") == once
    with pytest.raises(ValueError, match="figures:static"):
        replace_section(text, "static", "x")
