"""Test harness: the Triton kernels run under the interpreter on CPU tensors.

``TRITON_INTERPRET=1`` must be in the environment before any ``@triton.jit``
kernel is decorated; entropy-ops imports its kernel modules lazily (at the
first Triton launch), so setting it here, before the tests import anything,
is enough. Tests pick a path with the ``backend=`` argument of each op.
"""
import os
import signal

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


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load a model or tokenizer (checks must come first)."""
    from entropy_ops.trainers import grpo_trainer

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks that must come first")

    monkeypatch.setattr(grpo_trainer, "load_model", forbidden)
    monkeypatch.setattr(grpo_trainer, "load_tokenizer", forbidden)


@pytest.fixture
def ctrl_c_after_each_step(monkeypatch):
    """``install()``: from then on every ``Trainer.train_step`` sends SIGINT to this process once the step
    is done, as a user's Ctrl-C during the step would; it returns ``restore()``, which puts the real step
    back (the monkeypatch restores it at the test's end anyway)."""
    from entropy_ops.trainers.grpo_trainer import Trainer

    original = Trainer.train_step

    def step_then_interrupt(self):
        metrics = original(self)
        os.kill(os.getpid(), signal.SIGINT)
        return metrics

    def install():
        monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
        return lambda: monkeypatch.setattr(Trainer, "train_step", original)

    return install
