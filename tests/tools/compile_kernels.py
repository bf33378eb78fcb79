"""Compile every Triton kernel configuration ahead of time for sm_80 and sm_90, no GPU needed.

Run as a script (the Triton interpreter must be *off*: ``TRITON_INTERPRET`` unset),
prints one JSON line per configuration: kernel, target, constexprs, warps,
registers, spills (local memory bytes), shared memory, and any error.

    python tests/tools/compile_kernels.py [--module entropy_ops.kernels.token_logprobs_entropy ...]
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

MODULES = [
    "entropy_ops.kernels.token_logprobs_entropy",
    "entropy_ops.kernels.linear_logprobs_entropy",
]
ARCHS = (80, 90)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile_one(job):
    module_name, index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget

    spec = importlib.import_module(module_name).compile_specs()[index]
    kernel = spec["kernel"]
    row = dict(module=module_name, kernel=kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__,
               arch=arch, constexprs={k: v for k, v in spec["constexprs"].items()}, num_warps=spec["num_warps"],
               signature_dtypes=sorted({v for v in spec["signature"].values() if v.startswith("*")}))
    try:
        src = triton.compiler.ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"])
        options = {"num_warps": spec["num_warps"]}
        options.update(spec.get("options", {}))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        row.update(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                   local=int(m.group(4)), metadata_shared=int(compiled.metadata.shared))
    except Exception as exc:  # reported, and failed by the test
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--module", action="append", help="kernel module(s) to compile (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile kernels", file=sys.stderr)
        return 2
    jobs = []
    for module_name in args.module or MODULES:
        n = len(importlib.import_module(module_name).compile_specs())
        jobs += [(module_name, i, arch) for i in range(n) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(_compile_one, jobs):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
