"""The static gates the compile tests enforce, and the occupancy floors they hold each kernel to.

For every compiled (configuration, architecture) row of the static report:

1. it compiled (no error);
2. no spills: zero local-memory bytes, and zero stack bytes unless the kernel has a subroutine call
   (registers saved around the call need a frame; the report shows calls and STL/LDL counts);
3. shared memory within the architecture's per-CTA limit (:mod:`.occupancy`);
4. tensor cores where a ``tl.dot`` can use them: a kernel with a tensor-core eligible dot
   (16-bit operands, or fp32 with tf32 input precision; :func:`.sass.dots`) emits ``HGMMA`` (wgmma)
   on sm_90 and ``HMMA`` on sm_80;
5. at least ``OCCUPANCY_FLOORS[kernel][arch]`` resident CTAs per SM.

The floors are what the kernels achieve at the SHA named in docs/performance.md, minimum over
their configurations: a change that lowers a kernel's occupancy fails until the floor is lowered
here on purpose, with the reason next to it. A kernel missing from the table gets
``DEFAULT_FLOOR`` (one resident CTA: it fits at all).
"""
from __future__ import annotations

from .occupancy import LIMITS

DEFAULT_FLOOR = 1
# kernel name -> {arch: minimum CTAs per SM over its configurations}, as reached at the SHA of
# docs/performance.md (python -m benchmarks.static; gates.achieved_floors of its rows).
OCCUPANCY_FLOORS: dict[str, dict[int, int]] = {
    # Streaming kernels: enough rows in flight to cover DRAM latency (docs/performance.md, latency bound).
    "_token_logprobs_entropy_fwd": {80: 8, 90: 8},
    "_token_logprobs_entropy_bwd": {80: 5, 90: 5},
    "_linear_stats_merge": {80: 16, 90: 16},
    # Matmul-shaped kernels: one CTA of 8 warps per SM with a 3-4 stage pipeline is the design
    # (wgmma tiles 128 x 128; registers and shared memory go to the tile, not to more CTAs).
    "_linear_logprobs_entropy_fwd": {80: 1, 90: 1},
    "_linear_logit_grad": {80: 1, 90: 1},
    "_linear_onepass_grad": {80: 1, 90: 1},
    "_matmul": {80: 1, 90: 1},
}


def floor(kernel: str, arch: int) -> int:
    return OCCUPANCY_FLOORS.get(kernel, {}).get(arch, DEFAULT_FLOOR)


def _where(row: dict) -> str:
    return f"{row.get('kernel', row['module'])} #{row['index']} sm_{row['arch']} ({row.get('label') or ''})"


def compiled(row: dict) -> list[str]:
    return [f"{_where(row)}: compile error: {row['error']}"] if "error" in row else []


def no_spills(row: dict) -> list[str]:
    """No local memory, and no stack frame unless the kernel calls a subroutine (registers saved
    around a ``CALL``, such as the IEEE fp32 division slow path, need one; the table reports it)."""
    if "error" in row:
        return []
    calls = row["kernel_counts"].get("call", 0)
    if not row["local"] and (not row["stack"] or calls):
        return []
    return [f"{_where(row)}: spills {row['local']} B local, {row['stack']} B stack, {calls} calls "
            f"({row['registers']} registers)"]


def shared_within_limit(row: dict) -> list[str]:
    limit = LIMITS[row["arch"]].shared_per_cta
    if "error" in row or row["shared"] <= limit:
        return []
    return [f"{_where(row)}: {row['shared']} B shared memory > {limit} B per CTA"]


def tensor_cores(row: dict) -> list[str]:
    """A tensor-core eligible ``tl.dot`` must emit HGMMA (wgmma) on sm_90 and HMMA on sm_80."""
    if "error" in row or not any(d["tensor_core"] for d in row["dots"]):
        return []
    want = "hgmma" if row["arch"] >= 90 else "hmma"
    if row["kernel_counts"][want]:
        return []
    dot = next(d for d in row["dots"] if d["tensor_core"])
    return [f"{_where(row)}: tl.dot on {dot['operand']} ({dot['precision']}) emits no {want.upper()}"]


def occupancy_floor(row: dict) -> list[str]:
    if "error" in row:
        return []
    need = floor(row["kernel"], row["arch"])
    if row["ctas"] >= need:
        return []
    return [f"{_where(row)}: {row['ctas']} CTAs/SM (limited by {row['limiter']}: {row['registers']} registers, "
            f"{row['shared']} B shared, {row['num_warps']} warps) < floor {need}"]


GATES = {"compiled": compiled, "no_spills": no_spills, "shared_within_limit": shared_within_limit,
         "tensor_cores": tensor_cores, "occupancy_floor": occupancy_floor}


def check_row(row: dict) -> list[str]:
    """Violations of one row (empty: it passes)."""
    return [v for gate in GATES.values() for v in gate(row)]


def check(rows: list[dict]) -> list[str]:
    return [v for r in rows for v in check_row(r)]


def achieved_floors(rows: list[dict]) -> dict[str, dict[int, int]]:
    """The minimum CTAs per SM each kernel reaches over its rows: what a new floor would be."""
    out: dict[str, dict[int, int]] = {}
    for r in rows:
        if "error" not in r:
            per = out.setdefault(r["kernel"], {})
            per[r["arch"]] = min(per.get(r["arch"], r["ctas"]), r["ctas"])
    return out
