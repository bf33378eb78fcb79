"""Property-based test of the logits op: random shapes, strides, dtypes, temperatures, masks and magnitudes,
both paths (Triton under the interpreter, chunked CPU) against the float64 oracle.

Derandomized (hypothesis draws the same examples on every run), so CI is deterministic; the bound on the
examples keeps it within about a minute on the interpreter.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import entropy_ops
from oracle import TOL, logprobs_entropy_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = 2.0**-24


@st.composite
def cases(draw):
    n = draw(st.integers(1, 9))
    v = draw(st.sampled_from([1, 2, 7, 64, 129, 300, 1000, 2500]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 8.0, 60.0, 3e3]))
    offset = draw(st.sampled_from([0.0, 40.0, -1e3]))
    if dtype == torch.float16:  # keep within fp16's range (6.5e4)
        scale, offset = min(scale, 60.0), max(offset, -40.0)
    return dict(
        n=n, v=v, dtype=dtype, scale=scale, offset=offset,
        temperature=draw(st.sampled_from([0.25, 0.7, 1.0, 1.9])),
        layout=draw(st.sampled_from(["contiguous", "sliced_rows", "vocab_stride_2", "transposed"])),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])),
        inf_frac=draw(st.sampled_from([0.0, 0.2, 0.9])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    """``(logits [n, v], targets, base, view)``: the logits laid out as ``view(base)``, a view of a larger
    buffer ``base`` where the layout says so (``view`` is differentiable, so gradients land on ``base``)."""
    g = torch.Generator().manual_seed(case["seed"])
    n, v, dtype = case["n"], case["v"], case["dtype"]
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * case["scale"] + case["offset"]).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < case["ignore_frac"]] = -100
    masked = torch.rand(n, v, generator=g) < case["inf_frac"]
    masked[torch.arange(n), targets.clamp_min(0)] = False  # a kept row keeps its target finite
    z = z.masked_fill(masked, float("-inf"))
    layout = case["layout"]
    if layout == "sliced_rows":  # logits[:, :-1] of a [1, n + 1, v] buffer
        base = torch.cat([z, torch.zeros(1, v, dtype=dtype)]).unsqueeze(0)
        return z, targets, base, lambda b: b[0, :n]
    if layout == "vocab_stride_2":
        base = torch.stack([z, torch.zeros_like(z)], dim=-1).reshape(n, 2 * v)
        return z, targets, base, lambda b: b[:, ::2]
    if layout == "transposed":
        return z, targets, z.t().contiguous(), lambda b: b.t()
    return z, targets, z.clone(), lambda b: b


def check(actual, expected, s_max, rel, name, rowwise_of=None):
    """``|a - e| <= rel (|e| + scale) + 16 eps32 max|s|``: the second term is fp32's rounding of
    ``s = z / tau`` itself (relative 2^-24 per logit), which every fp32 implementation has."""
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"{name}: NaN"
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite pattern differs"
    a, e = torch.where(finite, a, 0.0), torch.where(finite, e, 0.0)
    scale = e.abs().amax(-1, keepdim=True) if rowwise_of is not None else e.abs().mean()
    slack = 16 * EPS32 * s_max * (rowwise_of if rowwise_of is not None else 1.0)
    bound = rel * (e.abs() + scale) + slack + 1e-30
    err = (a - e).abs()
    worst = int((err / bound).flatten().argmax())
    assert (err <= bound).all(), (f"{name}: worst flat index {worst}: got {a.flatten()[worst].item():.9g}, "
                                  f"expected {e.flatten()[worst].item():.9g}")


@settings(max_examples=250, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_both_paths_match_float64_oracle(case):
    z, targets, base, view = build(case)
    tau = case["temperature"]
    finite = z[torch.isfinite(z)].double()
    s_max = float(finite.abs().max()) / tau if finite.numel() else 0.0
    ref = z.detach().double().requires_grad_(True)
    r_logp, r_H = logprobs_entropy_reference(ref, targets, tau)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    g_logp, g_H = torch.randn(case["n"], generator=g), torch.randn(case["n"], generator=g)
    ((r_logp * g_logp.double()).sum() + (r_H * g_H.double()).sum()).backward()
    expected = ref.grad.to(case["dtype"]).double() if case["dtype"] != torch.float32 else ref.grad
    grad_scale = (g_logp.abs() + g_H.abs()).double()[:, None] / tau
    tol = TOL[case["dtype"]]
    ignored = targets == -100
    for backend in ("torch", "triton"):
        leaf = base.detach().clone().requires_grad_(True)
        logits = view(leaf)
        assert logits.stride() == view(base).stride()
        logp, H = entropy_ops.token_logprobs_and_entropy(logits, targets, temperature=tau, backend=backend)
        check(logp, r_logp, s_max, tol["fwd"], f"{backend} logp")
        check(H, r_H, s_max, tol["fwd"], f"{backend} entropy")
        ((logp * g_logp).sum() + (H * g_H).sum()).backward()
        grad = view(leaf.grad)
        check(grad, expected, s_max, tol["grad"], f"{backend} dlogits", rowwise_of=grad_scale)
        assert (grad[ignored] == 0).all() and (logp[ignored] == 0).all() and (H[ignored] == 0).all()
