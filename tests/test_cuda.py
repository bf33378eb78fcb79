"""Every public op on CUDA with the compiled Triton kernels, against float64 references at real sizes.

Run by ``bash benchmarks/gpu_check.sh`` (which sets ``TRITON_INTERPRET=0``); on a machine without a
CUDA device every test skips with the reason. Written against the public API only. Covered:

- the logits op (``token_logprobs_and_entropy`` / ``token_logprobs`` / ``token_entropy``) at V=152064
  in fp32/bf16/fp16 with temperature, ignored rows, ``-inf`` logits, a non-contiguous ``[B, T, V]``
  view, ``inplace_backward``; and a bf16 ``[N, V]`` with ``N * V > 2**31`` elements, checked on the
  rows whose offsets cross 2**31 (float64 reference of those rows only);
- a CUDA-graph capture of the logits op's forward + backward, replayed on new data;
- the hidden-state op (``linear_logprobs_and_entropy``) at D=4096, V=152064 in every dtype, with
  bias, soft-cap and temperature, both gradient-matmul paths, and bitwise-equal gradients across two
  runs (the op promises determinism); the token-chunked form with ``d weight`` rounded into bf16 per chunk;
- ``policy_loss`` on both input paths and ``linear_cross_entropy``, against the same math in float64.
"""
import inspect
import os

import pytest
import torch

import entropy_ops as eo
from oracle import assert_close, logprobs_entropy_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Forward outputs are fp32 but, on the hidden-state op, come from input-dtype matmuls: 16-bit inputs
# within 1e-2 (the project's tolerance for 16-bit inputs), fp32 within 1e-4 (IEEE fp32 dot products
# of length D summed in another order than float64's).
FWD_REL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
LINEAR_REL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: none is present on this machine")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is on: the CUDA tests need the compiled kernels "
                    "(run them with bash benchmarks/gpu_check.sh, which sets TRITON_INTERPRET=0)")
    return torch.device("cuda")


def _gen(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _no_sync_kwargs(fn) -> dict:
    """``validate=False`` where an op offers the switch (no host-side checks: needed in a CUDA graph)."""
    return {"validate": False} if "validate" in inspect.signature(fn).parameters else {}


def _logits(n, v, dtype, device, seed, spread=4.0):
    g = _gen(seed, device)
    z = (torch.randn(n, v, device=device, generator=g) * spread).to(dtype)
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return z, t, g


# ------------------------------------------------------------------------------------------ logits op
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_op_real_vocab(cuda, dtype):
    n, v, tau = 301, 152064, 0.7
    z, t, g = _logits(n, v, dtype, cuda, seed=1)
    z[3, : v // 2] = float("-inf")  # half a row masked out
    t[5] = -100  # an ignored row
    z.requires_grad_(True)
    logp, H = eo.token_logprobs_and_entropy(z, t, temperature=tau)
    ref_logp, ref_H = logprobs_entropy_reference(z.detach(), t, temperature=tau)
    assert logp.dtype == torch.float32 and H.dtype == torch.float32
    assert_close(logp, ref_logp, FWD_REL[dtype], "logp")
    assert_close(H, ref_H, FWD_REL[dtype], "entropy")
    g_logp = torch.randn(n, device=cuda, generator=g)
    g_H = torch.randn(n, device=cuda, generator=g)
    (dz,) = torch.autograd.grad((logp * g_logp + H * g_H).sum(), z)
    z64 = z.detach().double().requires_grad_(True)
    rl, rh = logprobs_entropy_reference(z64, t, temperature=tau)
    (ref_dz,) = torch.autograd.grad((rl * g_logp.double() + rh * g_H.double()).sum(), z64)
    assert dz.dtype == dtype
    assert_close(dz, ref_dz, GRAD_REL[dtype], "dlogits", rowwise=True)
    assert torch.equal(eo.token_logprobs(z.detach(), t, temperature=tau), logp.detach())
    keep = t != -100  # token_entropy has no targets: every row's entropy
    assert_close(eo.token_entropy(z.detach(), temperature=tau)[keep], ref_H[keep], FWD_REL[dtype], "token_entropy")


def test_logits_op_strided_view_and_inplace_backward(cuda):
    b, T, v = 3, 97, 152064
    g = _gen(2, cuda)
    full = (torch.randn(b, T + 1, v, device=cuda, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, v, (b, T), device=cuda, generator=g)
    view = full[:, :-1]  # [B, T, V] not contiguous: the usual "drop the last position" slice
    ref_logp, ref_H = logprobs_entropy_reference(view, t)
    logp, H = eo.token_logprobs_and_entropy(view, t)
    assert_close(logp, ref_logp, 1e-5, "logp (view)")
    assert_close(H, ref_H, 1e-5, "entropy (view)")
    # inplace_backward writes dlogits into the logits' buffer: same values as the out-of-place gradient.
    z1 = view.contiguous().requires_grad_(True)
    l1, h1 = eo.token_logprobs_and_entropy(z1, t)
    (d1,) = torch.autograd.grad((l1 - 0.5 * h1).sum(), z1)
    z2 = view.contiguous().requires_grad_(True)
    leaf = z2 * 1  # a non-leaf the op may overwrite
    l2, h2 = eo.token_logprobs_and_entropy(leaf, t, inplace_backward=True)
    (d2,) = torch.autograd.grad((l2 - 0.5 * h2).sum(), z2)
    assert torch.equal(d1, d2)


def test_logits_op_offsets_past_2_31(cuda):
    """bf16 [N, V] with N * V > 2**31: rows whose element offsets cross 2**31 match float64."""
    v = 152064
    cross = (2**31) // v  # the row holding element 2**31
    n = cross + 64
    z, t, g = _logits(n, v, torch.bfloat16, cuda, seed=3)
    assert n * v > 2**31
    z.requires_grad_(True)
    logp, H = eo.token_logprobs_and_entropy(z, t)
    g_logp = torch.randn(n, device=cuda, generator=g)
    (dz,) = torch.autograd.grad((logp * g_logp).sum() + H.sum(), z)
    rows = torch.tensor([0, 1, cross - 1, cross, cross + 1, n - 1], device=cuda)
    zr = z.detach()[rows].double().requires_grad_(True)
    rl, rh = logprobs_entropy_reference(zr, t[rows])
    (rdz,) = torch.autograd.grad((rl * g_logp[rows].double()).sum() + rh.sum(), zr)
    assert_close(logp[rows], rl.detach(), 1e-5, "logp rows across 2**31")
    assert_close(H[rows], rh.detach(), 1e-5, "entropy rows across 2**31")
    assert_close(dz[rows], rdz, 1e-2, "dlogits rows across 2**31", rowwise=True)


def test_logits_op_cuda_graph_capture(cuda):
    """Forward + backward of the logits op captured in one CUDA graph and replayed on new inputs."""
    n, v = 256, 152064
    z, t, g = _logits(n, v, torch.bfloat16, cuda, seed=4)
    static_z = z.clone().requires_grad_(True)
    static_t = t.clone()
    kwargs = _no_sync_kwargs(eo.token_logprobs_and_entropy)

    def step():
        logp, H = eo.token_logprobs_and_entropy(static_z, static_t, **kwargs)
        (dz,) = torch.autograd.grad((logp - 0.1 * H).sum(), static_z)
        return logp, H, dz

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_z, new_t, _ = _logits(n, v, torch.bfloat16, cuda, seed=5)
    with torch.no_grad():
        static_z.copy_(new_z)
    static_t.copy_(new_t)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for name, a, b in zip(("logp", "entropy", "dlogits"), out, expected):
        assert torch.equal(a, b), f"{name}: the replayed graph differs from an eager run"


# ---------------------------------------------------------------------------------- hidden-state op
def _linear_reference(h, w, b, t, tau, cap):
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return logprobs_entropy_reference(z, t, temperature=tau)


def _linear_inputs(n, d, v, dtype, device, seed, bias):
    g = _gen(seed, device)
    h = (torch.randn(n, d, device=device, generator=g) / d**0.25).to(dtype).requires_grad_(True)
    w = (torch.randn(v, d, device=device, generator=g) / d**0.25).to(dtype).requires_grad_(True)
    b = (torch.randn(v, device=device, generator=g) * 0.1).to(dtype).requires_grad_(True) if bias else None
    t = torch.randint(0, v, (n,), device=device, generator=g)
    t[7] = -100
    return h, w, b, t, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("matmul", ["auto", "triton"])
@pytest.mark.parametrize("features", ["plain", "bias+softcap+temperature"])
def test_linear_op_real_sizes(cuda, dtype, matmul, features):
    n, d, v = 333, 4096, 152064
    extras = features != "plain"
    tau, cap = (0.8, 30.0) if extras else (1.0, None)
    h, w, b, t, g = _linear_inputs(n, d, v, dtype, cuda, seed=6, bias=extras)
    logp, H = eo.linear_logprobs_and_entropy(h, w, t, bias=b, temperature=tau, logit_softcap=cap, matmul=matmul)
    args = [x.detach().double().requires_grad_(True) for x in (h, w)] + (
        [b.detach().double().requires_grad_(True)] if b is not None else [None])
    rl, rh = _linear_reference(args[0], args[1], args[2], t, tau, cap)
    assert_close(logp, rl.detach(), LINEAR_REL[dtype], "logp")
    assert_close(H, rh.detach(), LINEAR_REL[dtype], "entropy")
    g_logp = torch.randn(n, device=cuda, generator=g)
    g_H = torch.randn(n, device=cuda, generator=g)
    params = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad((logp * g_logp + H * g_H).sum(), params)
    ref = torch.autograd.grad((rl * g_logp.double() + rh * g_H.double()).sum(), [a for a in args if a is not None])
    for name, got, want in zip(("dh", "dW", "db"), grads, ref):
        assert got.dtype == dtype
        assert_close(got, want, 5 * LINEAR_REL[dtype], name, rowwise=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_op_gradients_are_deterministic(cuda, dtype):
    n, d, v = 2048, 4096, 131072
    outs = []
    for _ in range(2):
        h, w, b, t, g = _linear_inputs(n, d, v, dtype, cuda, seed=7, bias=True)
        logp, H = eo.linear_logprobs_and_entropy(h, w, t, bias=b)
        outs.append((logp, H, *torch.autograd.grad((logp - H).sum(), (h, w, b))))
    for name, a, b_ in zip(("logp", "entropy", "dh", "dW", "db"), *outs):
        assert torch.equal(a, b_), f"{name} differs between two identical runs"


def test_chunked_linear_weight_grad_in_weight_dtype(cuda):
    """The token-chunked hidden-state op with ``fp32_weight_grad=False`` (d weight rounded into bf16 once per
    chunk, no fp32 [V, D]): within the bf16 tolerance of float64, bitwise equal across two runs."""
    from entropy_ops.token_chunking import chunked_linear_logprobs_and_entropy

    n, d, v, chunk = 1536, 2048, 131072, 512
    runs = []
    for _ in range(2):
        h, w, _, t, g = _linear_inputs(n, d, v, torch.bfloat16, cuda, seed=10, bias=False)
        logp, H = chunked_linear_logprobs_and_entropy(h, w, t, token_chunk_size=chunk, fp32_weight_grad=False)
        runs.append((logp, H, *torch.autograd.grad((logp - 0.5 * H).sum(), (h, w))))
    for name, a, b_ in zip(("logp", "entropy", "dh", "dW"), *runs):
        assert torch.equal(a, b_), f"{name} differs between two identical runs"
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    rl, rh = _linear_reference(h64, w64, None, t, 1.0, None)
    rdh, rdw = torch.autograd.grad((rl - 0.5 * rh).sum(), (h64, w64))
    assert_close(runs[0][2], rdh, 5 * LINEAR_REL[torch.bfloat16], "dh", rowwise=True)
    assert_close(runs[0][3], rdw, 5 * LINEAR_REL[torch.bfloat16], "dW", rowwise=True)


# --------------------------------------------------------------------------- losses on top of the ops
@pytest.mark.parametrize("path", ["logits", "hidden", "hidden-two-pass"])
def test_policy_loss_matches_float64(cuda, path):
    """The logits path, the hidden-state path (one-pass by default for GRPO) and its two-pass form."""
    B, T, d, v = 4, 129, 2048, 152064
    g = _gen(8, cuda)
    t = torch.randint(0, v, (B, T), device=cuda, generator=g)
    mask = torch.rand(B, T, device=cuda, generator=g) > 0.2
    adv = torch.randn(B, device=cuda, generator=g)
    old = -torch.rand(B, T, device=cuda, generator=g) * 3
    if path == "logits":
        x = (torch.randn(B, T, v, device=cuda, generator=g) * 3).requires_grad_(True)
        inputs = {"logits": x}
        ref_inputs = {"logits": x.detach().double().requires_grad_(True)}
    else:
        h = (torch.randn(B, T, d, device=cuda, generator=g) / d**0.25).requires_grad_(True)
        w = (torch.randn(v, d, device=cuda, generator=g) / d**0.25).requires_grad_(True)
        x = h
        inputs = {"hidden": h, "weight": w}
        ref_inputs = {"hidden": h.detach().double().requires_grad_(True),
                      "weight": w.detach().double().requires_grad_(True)}
    extra = {"one_pass": False} if path == "hidden-two-pass" else {}
    loss, _ = eo.policy_loss(targets=t, mask=mask, advantages=adv, old_logprobs=old, config="grpo", **inputs,
                             **extra)
    # The same loss on the float64 path (the chunked PyTorch implementation of the same math).
    ref_loss, _ = eo.policy_loss(targets=t, mask=mask, advantages=adv, old_logprobs=old.double(), config="grpo",
                                 backend="torch", **ref_inputs)
    assert_close(loss, ref_loss.detach(), 1e-4, "loss")
    (gx,) = torch.autograd.grad(loss, x)
    (rgx,) = torch.autograd.grad(ref_loss, next(iter(ref_inputs.values())))
    assert_close(gx, rgx, 1e-4, "d loss / d input", rowwise=True)


def test_linear_cross_entropy_matches_float64(cuda):
    n, d, v = 517, 4096, 128256
    h, w, _, t, _ = _linear_inputs(n, d, v, torch.bfloat16, cuda, seed=9, bias=False)
    loss = eo.linear_cross_entropy(h, w, t)
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    ref = torch.nn.functional.cross_entropy(h64 @ w64.T, t, ignore_index=-100)
    assert_close(loss, ref.detach(), 1e-2, "loss")
    dh, dw = torch.autograd.grad(loss, (h, w))
    rdh, rdw = torch.autograd.grad(ref, (h64, w64))
    assert_close(dh, rdh, 5e-2, "dh", rowwise=True)
    assert_close(dw, rdw, 5e-2, "dW", rowwise=True)


def test_em_inf_and_adaptive_temperature_match_the_torch_path(cuda):
    g = _gen(10, cuda)
    z = torch.randn(8, 152064, device=cuda, generator=g) * 4
    torch.testing.assert_close(eo.em_inf(z, n_steps=3), eo.em_inf(z, n_steps=3, backend="torch"),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eo.adaptive_temperature(z, 0.5, 0.3),
                               eo.adaptive_temperature(z, 0.5, 0.3, backend="torch"), rtol=1e-4, atol=1e-4)
