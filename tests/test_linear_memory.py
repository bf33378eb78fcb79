"""Memory of the hidden-state op's CPU path: forward + backward at N=2048, D=256, V=32000 fp32, measured
(peak resident growth in a fresh subprocess, see memory_utils) against its stated budget and the naive form."""
import sys

import pytest

from memory_utils import peak_extra_bytes

N, D, V = 2048, 256, 32000
SETUP = f"""
from entropy_ops.linear_ops import linear_logprobs_and_entropy
g = torch.Generator().manual_seed(0)
hidden = torch.randn({N}, {D}, generator=g).requires_grad_(True)
weight = (torch.randn({V}, {D}, generator=g) * 0.1).requires_grad_(True)
targets = torch.randint(0, {V}, ({N},), generator=g)
# warm-up outside the measurement: BLAS workspaces and autograd/dispatcher state, allocated once per process
_h, _w = torch.randn(8, {D}, requires_grad=True), torch.randn(300, {D}, requires_grad=True)
(torch.log_softmax(_h @ _w.t(), -1).sum() + linear_logprobs_and_entropy(_h, _w, targets[:8] % 300)[0].sum()).backward()
del _h, _w
"""
OURS = """
logp, H = linear_logprobs_and_entropy(hidden, weight, targets, backend="torch")
(logp.sum() + 0.1 * H.sum()).backward()
"""
NAIVE = """
logp_all = torch.log_softmax(hidden @ weight.t(), dim=-1)
logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
H = -(logp_all.exp() * logp_all).sum(-1)
(logp.sum() + 0.1 * H.sum()).backward()
"""
# glibc serves every allocation above 64 KiB with its own mapping, unmapped when freed, so the
# high-water mark follows the live tensors rather than the heap's cached free blocks.
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
def test_cpu_path_peak_memory_within_budget_and_8x_below_naive():
    from entropy_ops.linear_ops import CPU_BLOCK_ELEMENTS, CPU_LIVE_BLOCKS

    ours = peak_extra_bytes(SETUP, OURS, ENV)
    naive = peak_extra_bytes(SETUP, NAIVE, ENV)
    gradients = 4 * (N * D + V * D)  # dh and dW themselves
    chunks = 4 * CPU_LIVE_BLOCKS * CPU_BLOCK_ELEMENTS
    print(f"peak extra: ours {ours / 2**20:.1f} MiB (budget {(gradients + chunks) / 2**20:.1f} MiB = gradients "
          f"{gradients / 2**20:.1f} + chunks {chunks / 2**20:.0f}), naive {naive / 2**20:.1f} MiB, "
          f"ratio {naive / ours:.1f}x")
    assert ours <= gradients + chunks
    assert naive >= 8 * ours


# ---------------------------------------------------------------- token-chunked form vs unchunked (CPU path)
CHUNK_SETUP = """
from entropy_ops.linear_ops import linear_logprobs_and_entropy
from entropy_ops.token_chunking import chunked_linear_logprobs_and_entropy
g = torch.Generator().manual_seed(0)
hidden = torch.randn({N}, {D}, generator=g).to({dtype}).requires_grad_(True)
weight = (torch.randn({V}, {D}, generator=g) * {D}**-0.5).to({dtype}).requires_grad_(True)
targets = torch.randint(0, {V}, ({N},), generator=g)
# warm-up outside the measurement (BLAS workspaces, autograd/dispatcher state), both forms. The BLAS
# library keeps a per-thread packing buffer whose touched pages grow with the largest GEMM it has run
# (measured: ~4 MiB more resident after the first [512, {D}] blocks): warm it with the op's own block
# shapes (512 rows and the full vocab give the same [rows, cols] blocks as the measured call).
_h, _w = torch.randn(512, {D}).to({dtype}).requires_grad_(True), torch.randn({V}, {D}).to({dtype}).requires_grad_(True)
_t = targets[:512] % {V}
(linear_logprobs_and_entropy(_h, _w, _t, backend="torch")[0].sum()
 + chunked_linear_logprobs_and_entropy(_h[:8], _w, _t[:8], token_chunk_size=4, backend="torch")[0].sum()
 ).backward()
del _h, _w, _t
"""
CHUNK_CODE = """
logp, H = chunked_linear_logprobs_and_entropy(hidden, weight, targets, token_chunk_size={n}, backend="torch")
(logp.sum() + 0.1 * H.sum()).backward()
"""
PLAIN_CODE = """
logp, H = linear_logprobs_and_entropy(hidden, weight, targets, backend="torch")
(logp.sum() + 0.1 * H.sum()).backward()
"""


def cpu_backward_peak(N, D, V, e, n=None, work=0):
    """The CPU-path backward peak of the docstring of ``chunked_linear_logprobs_and_entropy`` (gradients
    included, ``O(N)`` terms left out): ``e`` bytes per element of hidden/weight, ``n`` the chunk
    (``None``: unchunked), ``work`` the block workspace (``<= 4 CPU_LIVE_BLOCKS CPU_BLOCK_ELEMENTS``)."""
    from entropy_ops.token_chunking import _dw_block_rows

    if e == 4:  # both forms: dh and dW are the fp32 gradients themselves
        return N * D * 4 + V * D * 4 + work
    if n is None:  # fp32 dh for all tokens, then its cast; dW in the weight's dtype
        return max(N * D * (4 + e) + V * D * e, N * D * 4 + V * D * e + work)
    block = _dw_block_rows(V, n, e) * D * e  # one fp32 dW block's cast
    return N * D * e + max(V * D * 4 + max(n * D * 4 + work, block), 2 * V * D * e)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
@pytest.mark.parametrize("N, D, V, n", [(16384, 2048, 512, 2048), (2048, 512, 16384, 512)])
def test_chunked_linear_peak_memory_follows_formula(N, D, V, n):
    """Measured peak (forward + backward) of the chunked and the unchunked op, bf16 and fp32, against the
    docstring's formula; in fp32 the two are equal (the old chunked backward held ``(V + n) D 4`` more:
    a fresh fp32 ``[V, D]`` per chunk and the chunk's fp32 ``dh``), in bf16 chunking saves
    ``(N - n) D 4 - V D 2`` minus the block workspace (when ``N > V``: the first shape)."""
    import torch

    from entropy_ops.linear_ops import CPU_BLOCK_ELEMENTS, CPU_LIVE_BLOCKS

    work_max = 4 * CPU_LIVE_BLOCKS * CPU_BLOCK_ELEMENTS
    slack = 64 * N + 2 * 2**20  # O(N) outputs, statistics and upstream gradients; allocator rounding
    peaks = {}
    for dtype, e in ((torch.bfloat16, 2), (torch.float32, 4)):
        setup = CHUNK_SETUP.format(N=N, D=D, V=V, dtype=dtype)
        chunked = peak_extra_bytes(setup, CHUNK_CODE.format(n=n), ENV)
        plain = peak_extra_bytes(setup, PLAIN_CODE, ENV)
        peaks[e] = chunked, plain
        print(f"N={N} D={D} V={V} n={n} {dtype}: chunked {chunked / 2**20:.2f} MiB (formula "
              f"{cpu_backward_peak(N, D, V, e, n) / 2**20:.2f} + workspace), unchunked {plain / 2**20:.2f} MiB "
              f"(formula {cpu_backward_peak(N, D, V, e) / 2**20:.2f} + workspace)")
        for got, want in ((chunked, lambda w: cpu_backward_peak(N, D, V, e, n, w)),
                          (plain, lambda w: cpu_backward_peak(N, D, V, e, None, w))):
            assert want(0) <= got <= want(work_max) + slack
    chunked, plain = peaks[4]
    assert abs(chunked - plain) <= 2 * 2**20  # fp32: no [V, D] (nor [n, D]) beyond the gradients themselves
    assert (V + n) * D * 4 >= 16 * 2**20  # ... which is what the old chunked backward added on top
    chunked, plain = peaks[2]
    if N > V:  # bf16: the fp32 dh of N tokens is gone, one fp32 dW accumulator came in
        assert plain - chunked >= (N - n) * D * 4 - V * D * 2 - work_max
