"""Test harness: the Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be in the environment before any ``@triton.jit``
kernel is decorated; entropy-ops imports its kernel modules lazily (at the
first Triton launch), so setting it here, before the tests import anything,
is enough. Tests pick a path with the ``backend=`` argument of each op.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def cuda_device():
    """A CUDA device, or a skip when none is present (GPU-only tests)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: none is present on this machine")
    return torch.device("cuda")


def pytest_configure(config):
    # Each test seeds its own generator; this only guards against accidental reliance.
    torch.manual_seed(0)
    # The suite's tensors are small: one intra-op thread avoids thread hand-off costs that dominate
    # at these sizes (measured: a 55x32 @ 32x48 matmul 23 ms with 2 threads, 0.006 ms with 1), and
    # leaves the second core to the subprocess-based tests.
    torch.set_num_threads(1)
