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
