"""Memory of the CPU path: forward + backward at N=4096, V=32000 fp32 against the naive form."""
import sys

import pytest

from memory_utils import peak_extra_bytes

N, V = 4096, 32000
SETUP = f"""
import entropy_ops
g = torch.Generator().manual_seed(0)
logits = torch.randn({N}, {V}, generator=g).requires_grad_(True)
targets = torch.randint(0, {V}, ({N},), generator=g)
"""
OURS = """
logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, backend="torch")
(logp.sum() + 0.1 * H.sum()).backward()
"""
# The realistic in-place case: logits are the output of lm_head (a non-leaf), so the gradient the op
# writes into their buffer flows straight on to the matmul's backward. (For a *leaf* logits tensor
# autograd must keep .grad apart from the data, and copies it.)
SETUP_LM_HEAD = f"""
import entropy_ops
g = torch.Generator().manual_seed(0)
hidden = torch.randn({N}, 64, generator=g).requires_grad_(True)
weight = (torch.randn({V}, 64, generator=g) / 8).requires_grad_(True)
targets = torch.randint(0, {V}, ({N},), generator=g)
logits = hidden @ weight.t()
"""
OURS_INPLACE = """
logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, backend="torch", inplace_backward=True)
del logits
(logp.sum() + 0.1 * H.sum()).backward()
"""
NAIVE = """
logp_all = torch.log_softmax(logits.float(), dim=-1)
logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
H = -(logp_all.exp() * logp_all).sum(-1)
(logp.sum() + 0.1 * H.sum()).backward()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
def test_cpu_path_peak_memory_at_least_4x_below_naive():
    logits_bytes = N * V * 4
    ours = peak_extra_bytes(SETUP, OURS)
    naive = peak_extra_bytes(SETUP, NAIVE)
    print(f"peak extra: ours {ours / 2**20:.0f} MiB, naive {naive / 2**20:.0f} MiB, "
          f"ratio {naive / ours:.1f}x (logits {logits_bytes / 2**20:.0f} MiB)")
    # ours = the gradient itself (one [N, V] fp32, unavoidable without inplace_backward) + O(block)
    assert ours < logits_bytes * 1.15
    assert naive >= 4 * ours


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
def test_inplace_backward_needs_no_vocab_sized_buffer():
    ours = peak_extra_bytes(SETUP_LM_HEAD, OURS_INPLACE)
    print(f"peak extra with inplace_backward: {ours / 2**20:.1f} MiB")
    assert ours < 64 * 2**20  # a few 4 MiB blocks and O(N) vectors, never [N, V]
