"""Static gates: every launchable kernel configuration, compiled as the runtime JIT specializes it.

The interpreter (which runs the numerical tests) accepts code the compiler rejects
and knows nothing of registers or tensor cores. These tests run the static lab
(``python -m benchmarks.static --subset ci``) in a subprocess (``TRITON_INTERPRET``
must be off to compile) for sm_80 and sm_90, with Triton's own runtime
specialization of each spec's arguments, and hold every compiled row to the gates
of ``benchmarks/static/gates.py``: it compiles, no spills, shared memory within the
per-CTA limit, HGMMA (wgmma) on sm_90 / HMMA on sm_80 wherever a ``tl.dot`` can use
tensor cores, and each kernel's occupancy floor.

CI compiles one configuration per kernel, tile, dtype and warp count, keeping the
variant with the most boolean feature flags on (``benchmarks.static.representatives``);
``python -m benchmarks.static`` reports every configuration.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static import gates, kernel_modules, plan
from benchmarks.static.compile import default_cache_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.static", "--subset", "ci", "--out", str(out),
           "--cache-dir", str(default_cache_dir())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["rows"], "the static lab compiled no configuration"
    print(proc.stdout)  # the table, shown with pytest -s / -rA
    return doc["rows"]


@pytest.mark.parametrize("gate", sorted(gates.GATES))
def test_gate(rows, gate):
    violations = [v for r in rows for v in gates.GATES[gate](r)]
    assert not violations, "\n".join(violations)


def test_both_architectures_and_every_module_compiled(rows):
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["module"] for r in rows} == set(kernel_modules())


def test_ci_subset_covers_every_kernel_and_tile():
    """The CI subset drops only boolean-flag variants: every kernel, dtype, tile and warp count is compiled."""
    from benchmarks.static import _subset_key
    from benchmarks.static.compile import load_specs

    for module in kernel_modules():
        specs = load_specs(module)
        ci = {i for m, i, a in plan([module], (90,), "ci")}
        assert {_subset_key(specs[i]) for i in ci} == {_subset_key(s) for s in specs}, module


def test_every_kernel_module_lists_its_configurations():
    """Every kernels/*.py module with a @triton.jit kernel that launches defines compile_specs()."""
    kernel_dir = ROOT / "kernels"
    # softmax_stats holds only jit helpers inlined into the other kernels (nothing launches it alone).
    helpers = {"softmax_stats"}
    modules = {p.stem for p in kernel_dir.glob("*.py") if not p.stem.startswith("_") and p.stem not in helpers}
    listed = {m.rsplit(".", 1)[-1] for m in kernel_modules()}
    assert modules <= listed, f"kernel modules without compile_specs(): {sorted(modules - listed)}"
