"""Every Triton kernel configuration the dispatchers can launch compiles for real GPUs, with no GPU.

The interpreter (which runs the numerical tests) accepts code that the compiler
rejects (tl.dot tiles < 16, dtype mixes) and knows nothing of registers. This
test compiles each configuration ahead of time for sm_80 and sm_90 with
``triton.compile`` (Triton ships ptxas), reads registers, spills and shared
memory with the bundled ``cuobjdump -res-usage``, and fails on any error, any
local-memory spill, or shared memory above the architecture's per-block limit.
It runs in a subprocess because ``TRITON_INTERPRET=1`` (set for the rest of the
suite) turns kernels into interpreted functions that cannot be compiled.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parent / "tools" / "compile_kernels.py"
# Largest dynamic shared memory per block (opt-in): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.fixture(scope="module")
def compiled_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows, "the compile tool listed no kernel configuration"
    return rows


def test_every_configuration_compiles_without_spills(compiled_rows):
    errors = [r for r in compiled_rows if "error" in r]
    assert not errors, "\n".join(f"{r['kernel']} sm_{r['arch']} {r['constexprs']}: {r['error']}" for r in errors)
    for r in compiled_rows:
        where = f"{r['kernel']} sm_{r['arch']} warps={r['num_warps']} {r['constexprs']} {r['signature_dtypes']}"
        assert r["local"] == 0 and r["stack"] == 0, f"{where}: spills {r['local']} B local, {r['stack']} B stack"
        shared = max(r["shared"], r["metadata_shared"])
        assert shared <= SHARED_LIMIT[r["arch"]], f"{where}: {shared} B shared > {SHARED_LIMIT[r['arch']]}"
        assert 0 < r["registers"] <= 255, f"{where}: {r['registers']} registers"
    # Registers per thread, recorded in the test output (pytest -rA or -s shows it).
    for r in compiled_rows:
        print(f"{r['kernel']:<36} sm_{r['arch']} warps={r['num_warps']:<2} regs={r['registers']:<3} "
              f"shared={max(r['shared'], r['metadata_shared']):<6} {r['constexprs']} {r['signature_dtypes']}")


def test_every_kernel_module_is_listed():
    """A new kernel module must be added to the compile tool's list."""
    sys.path.insert(0, str(TOOL.parent))
    try:
        import compile_kernels
    finally:
        sys.path.pop(0)
    kernel_dir = Path(__file__).parents[1] / "kernels"
    modules = {p.stem for p in kernel_dir.glob("*.py") if p.stem not in ("__init__", "softmax_stats")}
    listed = {m.rsplit(".", 1)[-1] for m in compile_kernels.MODULES}
    assert modules <= listed, f"kernel modules missing from tests/tools/compile_kernels.py: {sorted(modules - listed)}"
