"""Triton kernel: ``C = A @ B`` (or ``C += A @ B``) with fp32 accumulation, for the gradient matmuls of the
hidden-state op.

Per vocab chunk the backward of ``linear_logprobs_and_entropy`` runs two plain matmuls on the chunk's
``dz`` ``[N, Vc]``: ``dW[chunk] = dz^T h`` (``[Vc, N] @ [N, D]``, written once in the weight's dtype) and
``dh += dz W[chunk]`` (``[N, Vc] @ [Vc, D]`` added into an fp32 ``[N, D]`` accumulator). They run in
cuBLAS by default (``torch.mm`` / ``torch.addmm`` with ``out_dtype``); this kernel is the switchable
alternative (``matmul="triton"``), so that a GPU run can settle which is faster.

One program = one ``[BLOCK_M, BLOCK_N]`` tile of ``C``, the whole ``K`` reduction in registers (fp32),
one store: no split-K, no atomics, deterministic. Programs in the grouped order of the Triton matmul
tutorial (``GROUP_M`` row blocks sweep the column blocks together, sharing ``B`` tiles in L2). Offsets in
int64. Operands may have any strides (``dz^T`` is read as a transposed view).
"""
import triton
import triton.language as tl

from ._aot import LaunchSpec, Pointer

from .linear_logprobs_entropy import _dot, _grouped_tile

# The Triton matmul tutorial's Hopper tile: m64n128k16 wgmma per warp group, 4 stages of
# (128 + 128) x 64 x 2 bytes = 128 KiB of shared memory (bf16). fp32 operands: BLOCK_K 32, the same
# bytes per stage (64 would need 256 KiB, above sm_90's 227 KiB per CTA). Not tuned on a GPU yet.
MATMUL_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)


def matmul_config(element_size: int) -> dict:
    """Tile constexprs of ``_matmul`` for operands of ``element_size`` bytes."""
    return dict(MATMUL_CONFIG, BLOCK_K=128 // element_size)


MATMUL_WARPS, MATMUL_STAGES = 8, 4


@triton.jit
def _matmul(
    # pointers
    a_ptr,  # [M, K] any strides
    b_ptr,  # [K, N] any strides, same dtype as a
    c_ptr,  # [M, N] any strides: out (ACCUMULATE: in/out); fp32 or the operands' dtype
    # shapes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACCUMULATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One program = one ``[BLOCK_M, BLOCK_N]`` tile of ``C = A @ B`` (``+ C`` when ``ACCUMULATE``), fp32
    accumulation over all of ``K``, one store in ``C``'s dtype: no atomics, no split-K."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = _dot(a, b, acc, INPUT_PRECISION, DOT_FP32)
    c = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=ok, other=0.0).to(tl.float32)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=ok)


def compile_specs() -> list[LaunchSpec]:
    """The launches of ``_matmul`` the dispatcher makes with ``matmul="triton"`` on CUDA (N=8192, D=4096,
    Vc=2048, V=131072), one per specialization: operand dtype (bf16 for 16-bit inputs, fp16 ones included;
    fp32 IEEE / TF32) x operand layout (``dz^T`` read transposed for ``dW``, ``dz`` row-major for ``dh``)
    x output (the weight dtype or fp32) x accumulate. bf16: ``dW`` into bf16 (two-pass, one-pass first
    chunk), added to bf16 (one-pass later chunks), into an fp32 block (fp16 weight), added to fp32 (token
    chunks); ``dh`` into fp32 (first chunk), added to fp32 (later chunks); the one-pass ``dh = dz W`` over
    the whole vocabulary into bf16. fp32: the same four products, all fp32."""
    n, d, vc, v = 8192, 4096, 2048, 131072
    dw_t = dict(M=vc, N=d, K=n, stride_am=1, stride_ak=vc, stride_bk=d, stride_bn=1)  # dW[chunk] (+)= dz^T h
    dh_t = dict(M=n, N=d, K=vc, stride_am=vc, stride_ak=1, stride_bk=d, stride_bn=1)  # dh (+)= dz W[chunk]
    dh_1 = dict(M=n, N=d, K=v, stride_am=v, stride_ak=1, stride_bk=d, stride_bn=1)  # one-pass dh = dz W
    launches = [("bf16", "ieee", "dW = dz^T h", dw_t, "bf16", False),
                # one-pass later token chunks ([V, n] @ [n, D]: the same specialization as dw_t)
                ("bf16", "ieee", "one-pass dW += dz^T h", dw_t, "bf16", True),
                ("bf16", "ieee", "dW = dz^T h, fp32 block", dw_t, "fp32", False),
                ("bf16", "ieee", "dW += dz^T h", dw_t, "fp32", True),
                ("bf16", "ieee", "dh = dz W", dh_t, "fp32", False),
                ("bf16", "ieee", "dh += dz W", dh_t, "fp32", True),
                ("bf16", "ieee", "one-pass dh = dz W", dh_1, "bf16", False)]
    for prec in ("ieee", "tf32"):
        launches += [("fp32", prec, "dW = dz^T h", dw_t, "fp32", False),
                     ("fp32", prec, "dW += dz^T h", dw_t, "fp32", True),
                     ("fp32", prec, "dh = dz W", dh_t, "fp32", False),
                     ("fp32", prec, "dh += dz W", dh_t, "fp32", True)]
    specs = []
    for dt, prec, label, shape, c_dtype, acc in launches:
        args = dict(a_ptr=Pointer(dt), b_ptr=Pointer(dt), c_ptr=Pointer(c_dtype), **shape, stride_cm=d, stride_cn=1,
                    **matmul_config(4 if dt == "fp32" else 2), ACCUMULATE=acc, INPUT_PRECISION=prec, DOT_FP32=False)
        specs.append(LaunchSpec(_matmul, args, MATMUL_WARPS, MATMUL_STAGES, f"{label} [{dt}, {prec}]"))
    return specs
