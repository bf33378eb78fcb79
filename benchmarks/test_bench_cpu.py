"""pytest-benchmark targets for the CPU path at small shapes.

    python -m pytest benchmarks/ --benchmark-only

Outside the project's test paths (``testpaths = ["tests"]``), so the normal test
command never runs them. They time the same steps as ``python -m benchmarks``
(``harness.make_step``: one forward, or one forward + ``torch.autograd.grad``),
with 1 warm-up round and 3 timed rounds each, ours beside the naive form.
"""
import pytest
import torch

from benchmarks.harness import make_step
from benchmarks.ops import get_op
from benchmarks.shapes import Shape

LOGITS_SHAPE = Shape(1024, 32000, None, None, "bench-cpu")
LINEAR_SHAPE = Shape(512, 32000, 256, None, "bench-cpu")
CASES = [
    ("logits", LOGITS_SHAPE, "ours"), ("logits", LOGITS_SHAPE, "naive"),
    ("linear", LINEAR_SHAPE, "ours"), ("linear", LINEAR_SHAPE, "naive"),
    ("policy", LINEAR_SHAPE, "ours"), ("policy", LINEAR_SHAPE, "naive"),
]


def _step(op: str, shape: Shape, impl_name: str, train: bool):
    op_mod = get_op(op)
    impl = next(i for i in op_mod.IMPLS if i.name == impl_name)
    reason = impl.unavailable_reason(torch.device("cpu"))
    if reason:
        pytest.skip(f"{op}/{impl_name}: {reason}")
    inputs = op_mod.make_inputs(shape, torch.float32, torch.device("cpu"), train, torch.Generator().manual_seed(0))
    return make_step(impl.build(torch.device("cpu")), [inputs], op_mod.GRAD_INPUTS, train)


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("op,shape,impl", CASES, ids=[f"{op}-{impl}" for op, _, impl in CASES])
def test_cpu_step(benchmark, op, shape, impl, mode):
    step = _step(op, shape, impl, train=mode == "fwd_bwd")
    benchmark.group = f"{op} {shape.label} fp32 {mode}"
    out = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    values = [t for t in (out.logp, out.entropy, out.loss) if t is not None]
    assert values and all(bool(torch.isfinite(t).all()) for t in values)
