"""The static lab's pieces, checked fast and in-process: specialization, SASS parsing, occupancy, subsets.

The specialization is compared with what Triton's own runtime binder produces for
real tensors and integers, and with the rules the runtime documents: an integer
equal to 1 becomes a constexpr, integers that fit in 32 bits are i32 (larger: i64),
integers and 16-byte aligned pointers divisible by 16 carry ``tt.divisibility``.
"""
import pytest
import torch
import triton
import triton.language as tl

from benchmarks.static import representatives
from benchmarks.static.occupancy import ctas_per_sm
from benchmarks.static.sass import analyze, dots, ldg_bytes
from benchmarks.static.specialize import as_launch_spec, jit_function, make_backend, specialize
from entropy_ops.kernels._aot import LaunchSpec, Pointer


@triton.jit  # an interpreted function under the suite's TRITON_INTERPRET=1: the lab re-wraps it
def _probe(x_ptr, y_ptr, n, stride, one, big, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs * stride + big * one, mask=offs < n)
    tl.store(y_ptr + offs, x * scale if FLAG else x, mask=offs < n)


def _spec(**overrides):
    args = dict(x_ptr=Pointer("bf16"), y_ptr=Pointer("fp32", aligned=False), n=1000, stride=48, one=1,
                big=2**31, scale=0.5, FLAG=True, BLOCK=128)
    args.update(overrides)
    return LaunchSpec(kernel=_probe, args=args, num_warps=4, num_stages=2, label="probe")


@pytest.mark.parametrize("arch", [80, 90])
def test_runtime_rules(arch):
    d = specialize(_spec(), arch).describe()
    assert d["x_ptr"] == "*bf16/16"  # aligned pointer: divisibility
    assert d["y_ptr"] == "*fp32"  # a view at an odd offset: none
    assert d["n"] == "i32"  # 1000 = 8 * 125: not divisible by 16
    assert d["stride"] == "i32/16"
    assert d["one"] == "=1"  # an integer equal to 1 is a constant
    assert d["big"] == "i64/16"  # 2**31 does not fit in i32
    assert d["scale"] == "fp32"
    assert d["FLAG"] == "=True" and d["BLOCK"] == "=128"
    assert specialize(_spec(big=2**31 - 1), arch).describe()["big"] == "i32"
    assert specialize(_spec(n=-(2**31) - 1), arch).describe()["n"] == "i64"


def test_options_are_the_runtime_defaults_plus_the_launch():
    opts = specialize(_spec(), 90).options
    assert opts["num_warps"] == 4 and opts["num_stages"] == 2 and opts["arch"] == "sm90"
    assert specialize(_spec(), 80).options["arch"] == "sm80"


def test_matches_triton_binder_on_real_tensors():
    """Stand-in pointers and real CPU tensors give Triton's binder the same specialization."""
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(_probe)
    backend = make_backend(90)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    x = torch.empty(256, dtype=torch.bfloat16)
    y = torch.empty(257, dtype=torch.float32)[1:]  # 4 bytes past an aligned allocation
    assert x.data_ptr() % 16 == 0 and y.data_ptr() % 16 != 0
    real = dict(x_ptr=x, y_ptr=y, n=1000, stride=48, one=1, big=2**31, scale=0.5, FLAG=True, BLOCK=128)
    kwargs = dict(num_warps=4, num_stages=2, debug=False, instrumentation_mode="", fpsan_homomorphic_casts=False)
    bound, spec, options = binder(**real, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    ours = specialize(_spec(), 90)
    assert ours.signature == signature
    assert ours.constexprs == constexprs
    assert ours.attrs == attrs


def test_spec_arguments_are_checked():
    with pytest.raises(ValueError, match="missing"):
        specialize(LaunchSpec(kernel=_probe, args={"n": 3}, num_warps=4), 90)
    with pytest.raises(ValueError, match="dtype"):
        specialize(_spec(x_ptr=Pointer("bfloat")), 90)


def test_legacy_format_is_read():
    legacy = dict(kernel=_probe, num_warps=8, constexprs={"FLAG": False, "BLOCK": 64},
                  signature={"x_ptr": "*fp16", "y_ptr": "*fp32", "n": "i32", "stride": "i64", "one": "i32",
                             "big": "i64", "scale": "fp32", "FLAG": "constexpr", "BLOCK": "constexpr"})
    spec = as_launch_spec(legacy)
    d = specialize(spec, 90).describe()
    assert spec.num_warps == 8
    assert d["x_ptr"] == "*fp16/16" and d["stride"] == "i32" and d["one"] == "i32" and d["BLOCK"] == "=64"


def test_representatives_keep_the_most_flags_per_configuration():
    specs = [_spec(FLAG=False), _spec(FLAG=True), _spec(BLOCK=256, FLAG=False)]
    assert representatives(specs) == [1, 2]


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R0], desc[UR6][R2.64] ;
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   LDG.E.U16 R8, desc[UR6][R2.64] ;
        /*0070*/                   FADD R8, R8, R9 ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/                   NOP ;
        /*00a0*/               @P1 BRA 0x60 ;
        /*00b0*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR6][R4.64], R9 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0 ;
"""
RES = " Function k:\n  REG:168 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:600\n"


def test_sass_counts_loops_and_hot_loop():
    info = analyze(RES, SASS)
    assert (info["registers"], info["local"], info["static_shared"]) == (168, 8, 1024)
    k = info["kernel_counts"]
    assert k["hgmma"] == 1 and k["mma_shapes"] == {"HGMMA.64x128x16": 1}
    assert k["red"] == 1 and k["ldgsts"] == 1 and k["bar"] == 2 and k["ldg"] == 2
    assert [(lp["start"], lp["end"]) for lp in info["loops"]] == [(0x20, 0x50), (0x60, 0xA0)]
    hot = info["hot_loop"]  # the loop with the tensor-core instruction, though the other is as long
    assert hot["start"] == 0x20 and hot["bar"] == 1 and hot["instructions"] == 4
    assert k["stream_bytes_per_thread"] == 16  # the one LDG.E.128; the LDG.E.U16 is a narrower scalar load
    assert ldg_bytes("LDG.E.128") == 16 and ldg_bytes("LDG.E") == 4 and ldg_bytes("LDG.E.U16") == 2


def test_dots_from_ttir():
    ttir = ("%a = tt.dot %h, %w, %c : tensor<128x32xbf16> * tensor<32x64xbf16> -> tensor<128x64xf32>\n"
            "%b = tt.dot %h, %w, %c : tensor<64x16xf32> * tensor<16x64xf32> -> tensor<64x64xf32>\n"
            "%d = tt.dot %h, %w, %c, inputPrecision = tf32 : tensor<64x16xf32> * tensor<16x64xf32> -> tensor<64x64xf32>\n")
    assert [(d["operand"], d["precision"], d["tensor_core"]) for d in dots(ttir)] == [
        ("bf16", "ieee", True), ("f32", "ieee", False), ("f32", "tf32", True)]


@pytest.mark.parametrize("arch,regs,shared,warps,ctas,limiter", [
    (90, 255, 0, 8, 1, "registers"),  # 255 regs -> 8192 per warp -> 8 warps per SM
    (90, 32, 0, 4, 16, "warps"),  # 64 warps / 4
    (90, 128, 0, 4, 4, "registers"),
    (90, 32, 100 * 1024, 4, 2, "shared"),  # 228 KiB / (100 + 1) KiB
    (80, 32, 100 * 1024, 4, 1, "shared"),  # 164 KiB / 101 KiB
    (80, 32, 200 * 1024, 4, 0, "shared"),  # over the 163 KiB per-CTA limit
])
def test_occupancy(arch, regs, shared, warps, ctas, limiter):
    occ = ctas_per_sm(arch, regs, shared, warps)
    assert (occ["ctas"], occ["limiter"]) == (ctas, limiter)
