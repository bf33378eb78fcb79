"""CTAs per SM from registers, shared memory and warps: the CUDA occupancy rules for sm_80 and sm_90.

Per-SM limits (CUDA C++ Programming Guide, "Compute Capabilities" table, and the
A100 / H100 tuning guides):

=========================  =============  =============
limit                      sm_80 (A100)   sm_90 (H100)
=========================  =============  =============
32-bit registers per SM    65536          65536
register allocation unit   256 per warp   256 per warp
resident warps per SM      64             64
resident CTAs per SM       32             32
shared memory per SM       164 KiB        228 KiB
shared memory per CTA      163 KiB        227 KiB
reserved shared per CTA    1 KiB          1 KiB
=========================  =============  =============

Registers are allocated per warp: ``ceil(regs * 32 / 256) * 256``. A CTA's shared
memory footprint is what Triton allocates plus the 1 KiB the driver reserves.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536
    register_unit: int = 256
    warps: int = 64
    ctas: int = 32
    shared_per_sm: int = 0
    shared_per_cta: int = 0
    reserved_shared_per_cta: int = 1024


LIMITS = {
    80: SMLimits(shared_per_sm=164 * 1024, shared_per_cta=163 * 1024),
    90: SMLimits(shared_per_sm=228 * 1024, shared_per_cta=227 * 1024),
}


def ctas_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> dict:
    """Resident CTAs per SM and which resource limits them.

    Returns ``{"ctas": int, "limiter": "registers"|"shared"|"warps"|"ctas", "warps_per_sm": int,
    "occupancy": resident warps / 64}``. ``ctas`` is 0 when one CTA does not fit.
    """
    lim = LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // lim.register_unit) * lim.register_unit
    by = {
        "registers": (lim.registers // regs_per_warp) // num_warps,
        "warps": lim.warps // num_warps,
        "ctas": lim.ctas,
        "shared": (lim.shared_per_sm // (shared + lim.reserved_shared_per_cta)
                   if shared <= lim.shared_per_cta else 0),
    }
    # On a tie the hard per-SM limits (warps, CTAs) are named first, then shared memory, then registers.
    order = ("warps", "ctas", "shared", "registers")
    limiter = min(order, key=lambda k: (by[k], order.index(k)))
    ctas = by[limiter]
    return {"ctas": ctas, "limiter": limiter, "warps_per_sm": ctas * num_warps,
            "occupancy": ctas * num_warps / lim.warps}
