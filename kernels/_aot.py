"""Launch descriptions for ahead-of-time compilation (the static performance lab).

Each kernel module lists every configuration its dispatcher can launch in one
function, ``compile_specs() -> list[LaunchSpec]``. A spec names the kernel and
gives its arguments *as the dispatcher passes them* at a representative shape:
pointers as :class:`Pointer` (dtype, and whether the address is 16-byte
aligned, as every fresh PyTorch allocation is), integers and floats as the
Python values the launcher passes, constexprs by value. The lab
(``python -m benchmarks.static``) turns a spec into the exact signature and
specialization attributes the runtime JIT would build for those arguments
(an integer equal to 1 becomes a constant, integers below 2**31 are i32,
pointers and integers divisible by 16 carry that attribute), so what it
compiles is what launches.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pointer:
    """A tensor argument: Triton dtype name (``"bf16"``, ``"fp32"``, ``"i64"``, ...) and its alignment."""

    dtype: str
    aligned: bool = True


@dataclass(frozen=True)
class LaunchSpec:
    """One launchable configuration of one kernel.

    ``args`` maps every kernel parameter (constexprs included) to its value;
    ``label`` says which dispatcher branch launches it (shown in reports).
    """

    kernel: object
    args: dict
    num_warps: int
    num_stages: int = 3
    label: str = ""
    options: dict = field(default_factory=dict)
