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
