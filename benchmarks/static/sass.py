"""Read a cubin's SASS and resource usage with the ``cuobjdump`` that ships with Triton.

What the lab counts, per kernel (static counts: each instruction once, however
often it runs):

- resources: registers per thread, local memory (spills) and stack bytes, static shared memory;
- tensor-core instructions with their shapes: ``HGMMA.<M>x<N>x<K>`` (wgmma, sm_90) and
  ``HMMA.<MNK>`` (mma.sync, sm_80 and later);
- global atomics: ``RED`` / ``REDG`` (no return value) and ``ATOM`` / ``ATOMG``;
- asynchronous copies: ``LDGSTS`` (cp.async), ``UTMALDG`` (TMA loads), ``UBLKCP`` (bulk copies);
- block barriers ``BAR`` (``BAR.SYNC``, ``BAR.RED``, ...);
- subroutine calls ``CALL`` (e.g. the IEEE fp32 division slow path) and local-memory accesses
  ``STL`` / ``LDL`` (register spills, or registers saved around a call);
- loops: every backward branch ``BRA`` to a lower address closes a loop ``[target, branch]`` (the
  branch-to-self after ``EXIT`` is not one);
  the *hot loop* is the innermost loop that issues tensor-core instructions, else the
  innermost loop with the most instructions. Its per-iteration counts are what the model uses.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_BRA_TARGET = re.compile(r"0x([0-9a-f]+)")
# Bytes moved by one thread's global load, from the width suffix (no suffix: 32-bit).
_LDG_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def tool(name: str) -> str:
    """Path of one of the CUDA binary tools bundled with Triton (``cuobjdump``, ``nvdisasm``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path}: this Triton wheel does not bundle it")
    return path


def dump(cubin: bytes) -> tuple[str, str]:
    """``(res_usage_text, sass_text)`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True)
    return res.stdout, sass.stdout


def resources(res_text: str) -> dict:
    """Registers, stack, static shared and local (spill) bytes from ``cuobjdump -res-usage``."""
    m = _RES.search(res_text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump output: {res_text[:300]!r}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_shared": int(m.group(3)),
            "local": int(m.group(4))}


def instructions(sass_text: str) -> list[tuple[int, str, str]]:
    """``[(address, mnemonic, operands)]`` in program order."""
    out = []
    for line in sass_text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return out


def classify(mnemonic: str) -> str | None:
    """The counted class of one mnemonic, or None."""
    base = mnemonic.split(".")[0]
    if base == "HGMMA":
        return "hgmma"
    if base == "HMMA":
        return "hmma"
    if base in ("RED", "REDG"):
        return "red"
    if base in ("ATOM", "ATOMG"):
        return "atom"
    if base == "LDGSTS":
        return "ldgsts"
    if base in ("UTMALDG",):
        return "utmaldg"
    if base in ("UBLKCP",):
        return "bulk_copy"
    if base == "BAR":
        return "bar"
    if base == "LDG":
        return "ldg"
    if base == "STG":
        return "stg"
    if base == "SHFL":
        return "shfl"
    if base == "MUFU":
        return "mufu"
    if base == "CALL":
        return "call"
    if base in ("STL", "LDL"):
        return "local_access"
    return None


def mma_shape(mnemonic: str) -> str | None:
    """``"64x128x16"`` from ``HGMMA.64x128x16.F32.BF16``, ``"16816"`` from ``HMMA.16816.F32.BF16``."""
    parts = mnemonic.split(".")
    return parts[1] if len(parts) > 1 and parts[0] in ("HGMMA", "HMMA") else None


def ldg_bytes(mnemonic: str) -> int:
    """Bytes per thread of one ``LDG`` (``LDG.E.128`` -> 16, ``LDG.E`` -> 4, ``LDG.E.U16`` -> 2)."""
    for part in reversed(mnemonic.split(".")[1:]):
        if part in _LDG_BYTES:
            return _LDG_BYTES[part]
    return 4


def _counts(instrs) -> dict:
    classes = Counter(c for _, m, _ in instrs if (c := classify(m)) is not None)
    shapes = Counter(f"{m.split('.')[0]}.{s}" for _, m, _ in instrs if (s := mma_shape(m)) is not None)
    return {"instructions": sum(1 for _, m, _ in instrs if m != "NOP"), **{k: classes.get(k, 0) for k in (
        "hgmma", "hmma", "red", "atom", "ldgsts", "utmaldg", "bulk_copy", "bar", "ldg", "stg", "shfl", "mufu", "call", "local_access")},
        "mma_shapes": dict(sorted(shapes.items())),
        "ldg_bytes_per_thread": sum(ldg_bytes(m) for _, m, _ in instrs if classify(m) == "ldg"),
        "stream_bytes_per_thread": stream_bytes(instrs)}


def stream_bytes(instrs) -> int:
    """Bytes per thread of the streaming loads: the global loads of the widest width in ``instrs``.

    A streaming kernel loads its tile with vector loads (``LDG.E.128``) and a few per-row scalars with
    narrow ones; counting only the widest keeps the scalars out of "elements per thread".
    """
    widths = [ldg_bytes(m) for _, m, _ in instrs if classify(m) == "ldg"]
    return max(widths) * widths.count(max(widths)) if widths else 0


def loops(instrs) -> list[dict]:
    """Every loop closed by a backward branch, innermost flagged, with its static counts."""
    found = []
    for addr, mnem, ops in instrs:
        if mnem.split(".")[0] != "BRA":
            continue
        m = _BRA_TARGET.search(ops)
        # A branch to itself is the trap after EXIT that pads every kernel, not a loop.
        if m and int(m.group(1), 16) < addr:
            found.append((int(m.group(1), 16), addr))
    found = sorted(set(found))
    out = []
    for start, end in found:
        body = [i for i in instrs if start <= i[0] <= end]
        inner = not any(s >= start and e <= end and (s, e) != (start, end) for s, e in found)
        out.append({"start": start, "end": end, "innermost": inner, **_counts(body)})
    return out


def hot_loop(loop_list: list[dict]) -> dict | None:
    """The innermost loop with tensor-core instructions, else the innermost loop with the most instructions."""
    inner = [lp for lp in loop_list if lp["innermost"]]
    if not inner:
        return None
    mma = [lp for lp in inner if lp["hgmma"] or lp["hmma"]]
    return max(mma or inner, key=lambda lp: lp["instructions"])


_TT_DOT = re.compile(r"tt\.dot\s.*?:\s*tensor<[0-9x]+x([a-zA-Z0-9]+)")


def dots(ttir: str) -> list[dict]:
    """The ``tt.dot`` operations in Triton IR: operand element type, input precision, tensor-core eligible.

    A dot can run on tensor cores (wgmma on sm_90, mma.sync on sm_80) when its operands are 16- or
    8-bit floats, or fp32 with a ``tf32`` input precision; an IEEE fp32 dot runs on the FMA units.
    """
    out = []
    for line in ttir.splitlines():
        m = _TT_DOT.search(line)
        if m is None:
            continue
        elem = m.group(1)
        prec = re.search(r"inputPrecision = (\w+)", line)
        precision = prec.group(1) if prec else "ieee"
        eligible = elem in ("bf16", "f16") or elem.startswith("f8") or (elem == "f32" and precision.startswith("tf32"))
        out.append({"operand": elem, "precision": precision, "tensor_core": eligible})
    return out


def analyze(res_text: str, sass_text: str) -> dict:
    """Resources, whole-kernel counts, loops and the hot loop of one cubin."""
    instrs = instructions(sass_text)
    loop_list = loops(instrs)
    brief = [{k: lp[k] for k in ("start", "end", "innermost", "instructions", "bar", "hgmma", "hmma", "red", "ldg",
                                 "ldgsts", "mufu")} for lp in loop_list]
    return {**resources(res_text), "kernel_counts": _counts(instrs), "loops": brief, "hot_loop": hot_loop(loop_list)}
