"""The hidden-state op against a float64 oracle written here, on both paths (chunked CPU, Triton under the
interpreter): values and the gradients of hidden, weight and bias."""
import zlib

import pytest
import torch

from entropy_ops import linear_ops
from entropy_ops.linear_ops import LinearOpParams, linear_logprobs_and_entropy
from oracle import TOL, assert_close

IGNORE = -100


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def make_inputs(n, d, v, dtype, seed, *, bias=True, ignore_frac=0.25):
    """Logits ``h W^T + b`` with a spread of about 3 (so a soft-cap of 5 bends them), some targets ignored."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 3.0 / d**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 1:
        targets[torch.rand(n, generator=g) < ignore_frac] = IGNORE
        targets[0] = min(1, v - 1)  # at least one kept row
    return hidden, weight, b, targets


def reference(hidden, weight, bias, targets, temperature=1.0, softcap=None):
    """float64 ``(logp, H)`` from the formulas: ``z = h W^T + b``, ``c tanh(z / c)``, ``/ tau``, log_softmax."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    H = -(logp_all.exp() * logp_all).sum(-1)
    keep = targets != IGNORE
    logp = logp_all.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, 0.0), torch.where(keep, H, 0.0)


def _grad_view(name, got, expected):
    """The layout whose rows set the error scale. ``dz`` is accurate relative to its token's row, not to
    each entry (``log p + H`` cancels; see ``oracle.assert_close``), so ``dh`` (a token per row) and ``db``
    are compared row-wise; an entry ``dW[v, k] = sum_n dz[n, v] h[n, k]`` mixes many tokens' rows and is
    compared relative to the largest entry of its column ``k`` (rows of ``dW^T``)."""
    return (got.T, expected.T) if name == "d_weight" else (got, expected)


def check(hidden, weight, bias, targets, backend, *, temperature=1.0, softcap=None, needs=(True, True, True),
          which=("logp", "H"), seed=0):
    """Run the op and the oracle with the same random upstream gradients; compare values and gradients."""
    dtype = hidden.dtype
    needs = (needs[0], needs[1], needs[2] and bias is not None)
    leaves = [None if x is None else x.detach().clone().requires_grad_(need)
              for x, need in zip((hidden, weight, bias), needs)]
    logp, H = linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2], temperature=temperature,
                                          logit_softcap=softcap, backend=backend)
    assert logp.dtype == torch.float32 and H.dtype == torch.float32 and logp.shape == targets.shape
    refs = [None if x is None else x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_logp, ref_H = reference(refs[0], refs[1], refs[2], targets, temperature, softcap)
    assert_close(logp, ref_logp, TOL[dtype]["fwd"], "logp")
    assert_close(H, ref_H, TOL[dtype]["fwd"], "entropy")
    ignored = targets == IGNORE
    assert (logp[ignored] == 0).all() and (H[ignored] == 0).all()
    if not any(needs):
        return
    g = torch.Generator().manual_seed(seed + 1)
    g_logp, g_H = torch.randn(targets.shape, generator=g), torch.randn(targets.shape, generator=g)
    pairs = [(out, ref, gr) for out, ref, gr, name in ((logp, ref_logp, g_logp, "logp"), (H, ref_H, g_H, "H"))
             if name in which]
    sum((out * gr).sum() for out, _, gr in pairs).backward()
    sum((ref * gr.double()).sum() for _, ref, gr in pairs).backward()
    for name, leaf, ref, need in zip(("d_hidden", "d_weight", "d_bias"), leaves, refs, needs):
        if leaf is None:
            continue
        if not need:
            assert leaf.grad is None, f"{name}: computed for an input that needs no gradient"
            continue
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        expected = ref.grad if dtype == torch.float32 else ref.grad.to(dtype).double()
        assert_close(*_grad_view(name, leaf.grad, expected), TOL[dtype]["grad"], name, rowwise=True)
    if needs[0]:
        assert (leaves[0].grad.reshape(-1, hidden.shape[-1])[ignored.reshape(-1)] == 0).all()


@pytest.fixture
def interpreter_tiles(monkeypatch):
    """Large tiles for the Triton path under the interpreter, whose cost grows with the number of tile steps
    (the kernels are the same; the default tiles run in test_default_tiles and the compile check)."""
    from entropy_ops.kernels import linear_logprobs_entropy as k

    def use(fwd, bwd=None):
        fwd_cfg, bwd_cfg = k.LinearConfig(*fwd, 1, 1), k.LinearConfig(*(bwd or fwd), 1, 1)
        monkeypatch.setattr(k, "launch_config", lambda element_size, allow_tf32=False: (fwd_cfg, bwd_cfg))

    return use


DIMS, VOCABS, ROWS = (16, 64, 96), (1, 33, 1000, 5003), (1, 7, 300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("d", DIMS)
def test_torch_path_grid(d, v, n, dtype):
    """Full D x V x N x dtype grid on the chunked CPU path (V = 5003, N = 300 span two vocab and two token
    chunks); bias + soft-cap + temperature 0.7 on half the (D, N) pairs, none of them on the other half."""
    seed = seed_of(d, v, n, dtype)
    extra = (DIMS.index(d) + ROWS.index(n)) % 2 == 0
    hidden, weight, bias, targets = make_inputs(n, d, v, dtype, seed, bias=extra)
    check(hidden, weight, bias, targets, "torch", temperature=0.7 if extra else 1.0,
          softcap=5.0 if extra else None, seed=seed)


# Triton under the interpreter: a covering subset (every D, V, N, both dtypes, bias/softcap/temperature on
# and off, fp16 once). Tiles (BLOCK_N, BLOCK_V, BLOCK_D): partial edges in every dim, D and V in several
# steps, and the vocab split + merge (4 pretend SMs) whenever there are fewer than 4 token blocks.
TRITON_CASES = [
    # d, v, n, dtype, bias, softcap, temperature, tiles
    (96, 5003, 300, torch.float32, True, 5.0, 0.7, (128, 1024, 128)),
    (64, 1000, 7, torch.bfloat16, False, None, 1.0, (16, 256, 32)),
    (64, 1000, 7, torch.float16, True, 5.0, 0.8, (16, 256, 32)),
    (16, 1, 7, torch.float32, True, None, 2.0, (16, 16, 16)),
    (96, 33, 1, torch.bfloat16, True, 5.0, 0.5, (16, 16, 32)),
    (16, 5003, 1, torch.bfloat16, False, 5.0, 1.3, (16, 1024, 16)),
    (64, 33, 300, torch.float32, False, None, 1.0, (128, 64, 64)),
]


@pytest.mark.parametrize("d,v,n,dtype,bias,softcap,temperature,tiles", TRITON_CASES,
                         ids=[f"d{c[0]}-v{c[1]}-n{c[2]}-{str(c[3])[6:]}" for c in TRITON_CASES])
def test_triton_path(interpreter_tiles, d, v, n, dtype, bias, softcap, temperature, tiles):
    interpreter_tiles(tiles)
    seed = seed_of(d, v, n, dtype, bias, softcap)
    hidden, weight, b, targets = make_inputs(n, d, v, dtype, seed, bias=bias)
    check(hidden, weight, b, targets, "triton", temperature=temperature, softcap=softcap, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_default_tiles(dtype):
    """The tiles launch_config gives the GPU, on a small problem (every tile is an edge tile)."""
    hidden, weight, bias, targets = make_inputs(7, 64, 33, dtype, seed=21)
    check(hidden, weight, bias, targets, "triton", temperature=0.9, softcap=5.0, seed=21)


NEEDS = [(True, False, False), (False, True, False), (False, True, True), (True, False, True), (False, False, True),
         (False, False, False)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("needs", NEEDS, ids=lambda t: "".join("hwb"[i] for i in range(3) if t[i]) or "none")
def test_partial_requires_grad(interpreter_tiles, backend, needs):
    interpreter_tiles((16, 128, 64))
    hidden, weight, bias, targets = make_inputs(7, 64, 200, torch.float32, seed=31)
    check(hidden, weight, bias, targets, backend, temperature=1.3, softcap=5.0, needs=needs, seed=31)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("which", [("logp",), ("H",)])
def test_one_output_unused(interpreter_tiles, backend, which):
    interpreter_tiles((16, 128, 64))
    hidden, weight, bias, targets = make_inputs(9, 64, 300, torch.float32, seed=41)
    check(hidden, weight, bias, targets, backend, temperature=0.8, which=which, seed=41)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_hidden(interpreter_tiles, backend, dtype):
    """``hidden[:, :-1]`` of a ``[B, T, D]`` buffer (no flat view: read in place), and a strided ``D``."""
    interpreter_tiles((16, 128, 32))
    g = torch.Generator().manual_seed(51)
    base = torch.randn(3, 6, 2 * 48, generator=g).to(dtype)
    weight = (torch.randn(150, 48, generator=g) * 0.4).to(dtype)
    targets = torch.randint(0, 150, (3, 5), generator=g)
    targets[1, 2] = IGNORE
    for hidden in (base[:, :-1, :48], base[:, :-1, ::2]):
        assert not hidden.is_contiguous()
        check(hidden, weight, None, targets, backend, temperature=1.1, seed=51)


def test_cpu_small_blocks():
    """Many vocab and token chunks (tiny block budget) through the launch functions, against the oracle."""
    hidden, weight, bias, targets = make_inputs(300, 16, 200, torch.float32, seed=61)
    params = LinearOpParams(temperature=0.6, logit_softcap=4.0)
    assert linear_ops._cpu_chunks(300, 200, 16, 4096) == (256, 16)  # 2 token chunks x 13 vocab chunks
    logp, H, stats = linear_ops.linear_forward_torch(hidden, weight, bias, targets, params, block_elements=4096)
    refs = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_logp, ref_H = reference(*refs, targets, 0.6, 4.0)
    assert_close(logp, ref_logp, 1e-5, "logp")
    assert_close(H, ref_H, 1e-5, "entropy")
    g = torch.Generator().manual_seed(62)
    g_logp, g_H = torch.randn(300, generator=g), torch.randn(300, generator=g)
    grads = linear_ops.linear_backward_torch(hidden, weight, bias, targets, stats, g_logp, g_H, params,
                                             (True, True, True), block_elements=4096)
    ((ref_logp * g_logp.double()).sum() + (ref_H * g_H.double()).sum()).backward()
    for name, got, ref in zip(("d_hidden", "d_weight", "d_bias"), grads, refs):
        assert_close(*_grad_view(name, got, ref.grad), 1e-5, name, rowwise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_strips_agree(dtype):
    """The forward with every program walking a strip of several vocab tiles (16 tiles of 64 columns in
    strips of 16, 3 (the last one short) or 1) agrees with the oracle, and the strip forms agree with each
    other (saved statistics included: each program folds its tiles in order, the merge its strips)."""
    from entropy_ops import linear_triton
    from entropy_ops.kernels.linear_logprobs_entropy import LinearConfig

    cfg = LinearConfig(16, 64, 32, 1, 1)
    hidden, weight, bias, targets = make_inputs(7, 32, 1000, dtype, seed=71)
    params = LinearOpParams(backend="triton", temperature=0.9)
    outs = [linear_triton.forward_tiles(hidden.unsqueeze(0), weight, bias, targets, params, config=(cfg, cfg),
                                        tiles_per_prog=per_prog)[:3] for per_prog in (16, 3, 1, None)]
    assert linear_triton.forward_strips(7, 16, 16) == 1  # small N: one tile per program
    ref_logp, ref_H = reference(hidden, weight, bias, targets, 0.9)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for out in outs:
        assert_close(out[0], ref_logp, tol, "logp")
        assert_close(out[1], ref_H, tol, "entropy")
        assert_close(out[2], outs[0][2], 1e-6, "saved stats")


def test_forward_strips_rule():
    """Strips per token block: at least FORWARD_MIN_STRIPS, about FORWARD_PROGRAMS programs in all, at most
    one per tile; the partial statistics stay O(N) (8 strips at N=8192 and N=32768)."""
    from entropy_ops.linear_triton import FORWARD_MIN_STRIPS, FORWARD_PROGRAMS, forward_strips

    for n, tiles, want in ((8192, 1024, 128), (32768, 1188, 149), (1024, 1024, 16), (128, 1024, 2), (8192, 8, 1)):
        per_prog = forward_strips(n, tiles, 128)
        assert per_prog == want, (n, tiles, per_prog)
        strips = -(-tiles // per_prog)
        assert strips >= min(tiles, FORWARD_MIN_STRIPS)
        assert strips * -(-n // 128) <= max(FORWARD_PROGRAMS, FORWARD_MIN_STRIPS * -(-n // 128)) + -(-n // 128)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_hidden(interpreter_tiles, backend):
    """NaN in a kept row raises; NaN in an ignored row is inert (finite outputs, zero gradient row)."""
    interpreter_tiles((16, 64, 32))
    hidden, weight, bias, targets = make_inputs(5, 32, 50, torch.float32, seed=81, ignore_frac=0.0)
    bad = hidden.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="no finite logit"):
        linear_logprobs_and_entropy(bad, weight, targets, bias=bias, backend=backend)
    targets[2] = IGNORE
    leaves = [x.clone().requires_grad_(True) for x in (bad, weight, bias)]
    logp, H = linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend)
    (logp.sum() + H.sum()).backward()
    assert torch.isfinite(logp).all() and torch.isfinite(H).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    assert (leaves[0].grad[2] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_no_worse_than_torch(interpreter_tiles, backend):
    """bf16: our error against the float64 oracle is no worse than PyTorch's own bf16 computation."""
    interpreter_tiles((16, 256, 64))
    hidden, weight, bias, targets = make_inputs(7, 64, 1000, torch.bfloat16, seed=91)
    refs = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    ref_logp, ref_H = reference(*refs, targets)
    (ref_logp.sum() + ref_H.sum()).backward()
    errors = {}
    for name in ("ours", "torch_bf16"):
        leaves = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
        if name == "ours":
            logp, H = linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend)
        else:  # PyTorch: bf16 logits, fp32 softmax
            logp_all = torch.log_softmax((leaves[0] @ leaves[1].T + leaves[2]).float(), -1)
            keep = targets != IGNORE
            logp = torch.where(keep, logp_all.gather(-1, targets.clamp_min(0)[:, None])[:, 0], 0.0)
            H = torch.where(keep, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        (logp.sum() + H.sum()).backward()
        errors[name] = [((got.double() - ref).abs().max() / ref.abs().max()).item()
                        for got, ref in ((logp, ref_logp), (H, ref_H), (leaves[0].grad, refs[0].grad),
                                         (leaves[1].grad, refs[1].grad), (leaves[2].grad, refs[2].grad))]
    for ours, theirs in zip(errors["ours"], errors["torch_bf16"]):
        assert ours <= theirs + 1e-3, errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_and_no_entropy(backend):
    weight = torch.randn(20, 16)
    logp, H = linear_logprobs_and_entropy(torch.zeros(0, 16, requires_grad=True), weight,
                                          torch.zeros(0, dtype=torch.long), backend=backend)
    assert logp.shape == (0,) and H.shape == (0,)
    hidden, weight, _, targets = make_inputs(3, 16, 20, torch.float32, seed=5, bias=False)
    logp, H = linear_logprobs_and_entropy(hidden, weight, targets, return_entropy=False, allow_tf32=True,
                                          backend=backend)
    assert H is None and torch.isfinite(logp).all()


def test_launch_config_and_precision():
    from entropy_ops.kernels.linear_logprobs_entropy import input_precision, launch_config
    from entropy_ops.linear_triton import vocab_chunk_size

    assert vocab_chunk_size(8192, 4096, 131072, 2, 128) == 2048  # N Vc 2 <= N D: Vc = D / 2
    assert vocab_chunk_size(8, 64, 1000, 2, 128) == 1024  # 16 MiB floor: the whole (tile-rounded) vocab
    assert vocab_chunk_size(8, 64, 1000, 2, 128, 200) == 256  # an explicit chunk: whole tiles

    assert input_precision(4, False) == "ieee" and input_precision(4, True) == "tf32"
    assert input_precision(2, True) == "ieee"
    assert launch_config(2, True) == launch_config(2, False)
    for elem, tf32 in ((2, False), (4, False), (4, True)):
        for cfg in launch_config(elem, tf32):  # tl.dot needs every tile dim >= 16, powers of two
            assert all(x >= 16 and x & (x - 1) == 0 for x in cfg[:3])
    with pytest.raises(ValueError, match="element_size"):
        launch_config(8)


def _bad_calls():
    h, w, b, t = torch.randn(4, 8), torch.randn(10, 8), torch.randn(10), torch.randint(0, 10, (4,))
    return [
        (dict(hidden=[1.0]), TypeError, "hidden must be a torch.Tensor"),
        (dict(hidden=h.long()), TypeError, "hidden must have dtype"),
        (dict(weight=torch.randn(10, 9)), ValueError, "D = hidden.shape"),
        (dict(weight=torch.randn(10)), ValueError, "weight must have shape"),
        (dict(weight=w.double()), TypeError, "weight must have the same dtype as hidden"),
        (dict(weight=w.to("meta")), ValueError, "weight must be on the same device"),
        (dict(bias=torch.randn(11)), ValueError, r"bias must have shape \[V\]"),
        (dict(bias=b.half()), TypeError, "bias must have the same dtype"),
        (dict(targets=torch.tensor([0, 1, 2, 10])), ValueError, "targets must be in"),
        (dict(targets=t[:3]), ValueError, "targets must have shape"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(logit_softcap=-1.0), ValueError, "logit_softcap must be finite and > 0"),
        (dict(logit_softcap="30"), TypeError, "logit_softcap must be a float"),
        (dict(allow_tf32=1), TypeError, "allow_tf32 must be a bool"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(hidden=h.double(), weight=w.double(), bias=None, backend="triton"), TypeError, "Triton backend"),
    ], dict(hidden=h, weight=w, targets=t, bias=b)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_validation(index):
    bad, exc, match = _bad_calls()[0][index]
    kwargs = {**_bad_calls()[1], **bad}
    with pytest.raises(exc, match=match):
        linear_logprobs_and_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)
