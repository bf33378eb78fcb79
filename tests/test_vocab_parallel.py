"""Vocab-parallel ops against the float64 oracle and the single-process ops.

Real ``torch.distributed`` groups on the CPU (``gloo``): each spawn starts ``world`` processes that run
every case of a list in one go (process start-up and imports cost seconds; the cases take much less).
Every rank builds the same full inputs from the case's seed, runs the op on its own shard, then
all-gathers the shard gradients and checks the full tensors, so each rank checks every shard.
"""
import os
import tempfile
import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entropy_ops import linear_logprobs_and_entropy, token_logprobs_and_entropy
from entropy_ops import vocab_parallel as vp
from entropy_ops.token_ops import TokenOpParams, token_forward_torch
from oracle import TOL, assert_close, logprobs_entropy_reference

IGNORE = -100
# (start, size) of every rank's shard: uneven, and for 4 ranks not in rank order.
LAYOUTS = {
    (2, 37): [(0, 20), (20, 17)],
    (4, 37): [(26, 11), (0, 3), (3, 15), (18, 8)],
    (2, 40): [(0, 23), (23, 17)],
    (4, 40): [(0, 10), (10, 10), (20, 10), (30, 10)],
}


def seed_of(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def make_targets(lead, V, g, *, ignore_frac=0.25):
    targets = torch.randint(0, V, lead, generator=g)
    targets[torch.rand(lead, generator=g) < ignore_frac] = IGNORE
    targets.view(-1)[0] = 1  # at least one kept row
    return targets


def gather_shards(shard: torch.Tensor, start: int, dim: int) -> torch.Tensor:
    """The full tensor from every rank's ``(start, shard)`` along ``dim`` (sizes may differ: object gather)."""
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (start, shard.detach()))
    return torch.cat([p for _, p in sorted(pieces, key=lambda x: x[0])], dim=dim)


def assert_zero_rows(grad, targets, name):
    ignored = grad[targets == IGNORE]
    assert ignored.numel() == 0 or bool((ignored == 0).all()), f"{name}: ignored rows have a non-zero gradient"


# ---------------------------------------------------------------- cases (run inside every rank)
def token_case(rank, world, *, V=37, lead=(3, 5), dtype=torch.float32, temperature=0.7, backend="torch",
               inf=True, grads=("logp", "H")):
    start, size = LAYOUTS[(world, V)][rank]
    g = torch.Generator().manual_seed(seed_of("token", world, V, lead, dtype, temperature, backend))
    full = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    targets = make_targets(lead, V, g)
    if inf:  # -inf columns, and one row whose first shard is all -inf (its target lies elsewhere)
        full[..., 2] = float("-inf")
        first = min(LAYOUTS[(world, V)])
        full[0, 1, first[0]:first[0] + first[1]] = float("-inf")
        targets[0, 1] = V - 1
    g_logp = torch.randn(lead, generator=g) if "logp" in grads else None
    g_H = torch.randn(lead, generator=g) if "H" in grads else None

    shard = full[..., start:start + size].detach().requires_grad_(True)  # a strided view: rows of stride V
    logp, H = vp.vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start, temperature=temperature,
                                                     ignore_index=IGNORE, backend=backend)
    loss = sum((out * gr).sum() for out, gr in ((logp, g_logp), (H, g_H)) if gr is not None)
    loss.backward()
    grad = gather_shards(shard.grad, start, dim=-1)

    ref = full.double().requires_grad_(True)
    r_logp, r_H = logprobs_entropy_reference(ref, targets, temperature, IGNORE)
    sum((out * gr.double()).sum() for out, gr in ((r_logp, g_logp), (r_H, g_H)) if gr is not None).backward()
    tol = TOL[dtype]
    assert logp.dtype == H.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(logp, r_logp, tol["fwd"], "logp")
    assert_close(H, r_H, tol["fwd"], "H")
    assert_close(grad, ref.grad, tol["grad"], "d logits", rowwise=True)
    assert_zero_rows(grad, targets, "d logits")

    one = full.detach().requires_grad_(True)
    s_logp, s_H = token_logprobs_and_entropy(one, targets, temperature=temperature, ignore_index=IGNORE,
                                             backend=backend)
    sum((out * gr).sum() for out, gr in ((s_logp, g_logp), (s_H, g_H)) if gr is not None).backward()
    assert_close(logp, s_logp, TOL[torch.float32]["fwd"], "logp vs single process")
    assert_close(H, s_H, TOL[torch.float32]["fwd"], "H vs single process")
    assert_close(grad, one.grad, tol["grad"], "d logits vs single process", rowwise=True)


def linear_case(rank, world, *, V=40, N=9, D=24, dtype=torch.float32, temperature=0.8, softcap=4.0, bias=True,
                backend="torch", needs=(True, True, True)):
    start, size = LAYOUTS[(world, V)][rank]
    g = torch.Generator().manual_seed(seed_of("linear", world, V, N, D, dtype, softcap, bias, backend))
    hidden = torch.randn(2, N, D, generator=g).to(dtype)[:, 1:]  # [2, N-1, D], not flattenable to 2-D
    weight = (torch.randn(V, D, generator=g) * 3.0 / D**0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = make_targets(hidden.shape[:-1], V, g)
    g_logp, g_H = torch.randn(hidden.shape[:-1], generator=g), torch.randn(hidden.shape[:-1], generator=g)
    needs = (needs[0], needs[1], needs[2] and bias)

    opts = dict(temperature=temperature, ignore_index=IGNORE, logit_softcap=softcap, backend=backend)

    def leaves(*xs):
        return [None if x is None else x.detach().requires_grad_(n) for x, n in zip(xs, needs)]  # views kept

    def backward(logp, H):
        ((logp * g_logp).sum() + (H * g_H).sum()).backward()

    def grads(xs):
        return [x.grad if x is not None and x.requires_grad else None for x in xs]

    mine = leaves(hidden, weight[start:start + size], None if b is None else b[start:start + size])
    logp, H = vp.vocab_parallel_linear_logprobs_and_entropy(mine[0], mine[1], targets, vocab_start=start,
                                                            bias_shard=mine[2], **opts)
    backward(logp, H)
    dh, dw_r, db_r = grads(mine)
    single = leaves(hidden, weight, b)
    s_logp, s_H = linear_logprobs_and_entropy(single[0], single[1], targets, bias=single[2], **opts)
    backward(s_logp, s_H)
    s_dh, s_dw, s_db = grads(single)
    ref = leaves(hidden.double(), weight.double(), None if b is None else b.double())
    z = ref[0] @ ref[1].T + (0 if b is None else ref[2])
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    r_logp, r_H = logprobs_entropy_reference(z, targets, temperature, IGNORE)
    backward(r_logp, r_H)
    r_dh, r_dw, r_db = grads(ref)
    tol = TOL[dtype]
    assert_close(logp, r_logp, tol["fwd"], "logp")
    assert_close(H, r_H, tol["fwd"], "H")
    assert_close(logp, s_logp, TOL[torch.float32]["fwd"], "logp vs single process")
    assert_close(H, s_H, TOL[torch.float32]["fwd"], "H vs single process")
    if needs[0]:
        assert_close(dh, r_dh, tol["grad"], "d hidden", rowwise=True)
        assert_close(dh, s_dh, tol["grad"], "d hidden vs single process", rowwise=True)
        assert_zero_rows(dh, targets, "d hidden")
    else:
        assert dh is None
    if needs[1]:
        dw = gather_shards(dw_r, start, dim=0)
        assert_close(dw.T, r_dw.T, tol["grad"], "d weight", rowwise=True)  # column-wise scale
        assert_close(dw.T, s_dw.T, tol["grad"], "d weight vs single process", rowwise=True)
    if needs[2]:
        db = gather_shards(db_r, start, dim=0)
        assert_close(db, r_db, tol["grad"], "d bias", rowwise=True)
        assert_close(db, s_db, tol["grad"], "d bias vs single process", rowwise=True)


def validation_case(rank, world):
    V = 37
    start, size = LAYOUTS[(world, V)][rank]
    logits = torch.randn(4, size)
    targets = torch.tensor([0, 5, IGNORE, V - 1])
    # Every rank gets the same layout from the all-gather, so every rank raises (no rank left waiting).
    with pytest.raises(ValueError, match="tile"):
        vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=start + (1 if rank == 0 else 0))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 37\)"):
        vp.vocab_parallel_logprobs_and_entropy(logits, torch.tensor([0, V, 1, 2]), vocab_start=start)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=float(start))
    with pytest.raises(ValueError, match="weight_shard must have shape"):
        vp.vocab_parallel_linear_logprobs_and_entropy(torch.randn(4, 8), torch.randn(size, 7), targets,
                                                      vocab_start=start)
    # the group still works after the errors
    logp, _ = vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=start)
    assert torch.isfinite(logp).all()


def nonfinite_case(rank, world):
    """A NaN or +inf logit in one shard is never taken for an empty shard (both paths, both forms): with the
    value checks the call raises on every rank, without them the row is NaN; a temperature that makes
    finite logits overflow fp32 is named as such on every rank, whichever shard holds them."""
    V = 37
    start, size = LAYOUTS[(world, V)][rank]
    targets = torch.tensor([1, 2, 3])
    for backend in ("torch", "triton"):
        for bad in (float("nan"), float("inf")):
            g = torch.Generator().manual_seed(seed_of("nonfinite", backend))
            logits = torch.randn(3, V, generator=g)
            logits[1, 30] = bad  # one shard only
            shard = logits[:, start:start + size]
            with pytest.raises(ValueError, match="row 1"):
                vp.vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start, backend=backend)
            logp, H = vp.vocab_parallel_logprobs_and_entropy(shard, targets, vocab_start=start, backend=backend,
                                                             validate=False)
            assert torch.isnan(logp[1]) and torch.isnan(H[1]) and torch.isfinite(logp[[0, 2]]).all()
            weight = torch.randn(V, 4, generator=g)
            weight[30] = bad
            with pytest.raises(ValueError, match="row 0"):
                vp.vocab_parallel_linear_logprobs_and_entropy(torch.ones(3, 4), weight[start:start + size], targets,
                                                              vocab_start=start, backend=backend)
            logp, H = vp.vocab_parallel_linear_logprobs_and_entropy(
                torch.ones(3, 4), weight[start:start + size], targets, vocab_start=start, backend=backend,
                validate=False)
            assert torch.isnan(logp).all() and torch.isnan(H).all()
        logits[1] = float("-inf")  # no finite logit on any shard: NaN, not H = 0
        logp, H = vp.vocab_parallel_logprobs_and_entropy(logits[:, start:start + size], targets, vocab_start=start,
                                                         backend=backend, validate=False)
        assert torch.isnan(logp[1]) and torch.isnan(H[1]) and torch.isfinite(H[[0, 2]]).all()
        logits[1] = 0.0
        logits[1, 30] = 1e37
        with pytest.raises(ValueError, match="temperature=0.001 makes logits / temperature overflow"):
            vp.vocab_parallel_logprobs_and_entropy(logits[:, start:start + size], targets, vocab_start=start,
                                                   temperature=1e-3, backend=backend)
        weight[30] = 1e37
        with pytest.raises(ValueError, match="temperature=0.001 makes logits / temperature overflow"):
            vp.vocab_parallel_linear_logprobs_and_entropy(torch.ones(3, 4), weight[start:start + size], targets,
                                                          vocab_start=start, temperature=1e-3, backend=backend)


CASES = {
    "token_fp32": lambda r, w: token_case(r, w),
    "token_bf16": lambda r, w: token_case(r, w, dtype=torch.bfloat16, temperature=1.0, lead=(2, 7)),
    "token_entropy_grad_only": lambda r, w: token_case(r, w, grads=("H",), temperature=1.3),
    "token_logp_grad_only": lambda r, w: token_case(r, w, grads=("logp",), inf=False),
    "token_fp64": lambda r, w: token_case(r, w, dtype=torch.float64),
    "linear_fp32": lambda r, w: linear_case(r, w),
    "linear_bf16_no_bias": lambda r, w: linear_case(r, w, dtype=torch.bfloat16, bias=False, softcap=None,
                                                     temperature=1.0),
    "linear_weight_grad_only": lambda r, w: linear_case(r, w, needs=(False, True, True)),
    "linear_hidden_grad_only": lambda r, w: linear_case(r, w, needs=(True, False, False)),
    "validation": validation_case,
    "nonfinite": nonfinite_case,
    "token_triton": lambda r, w: token_case(r, w, backend="triton", lead=(2, 3)),
    "linear_triton": lambda r, w: linear_case(r, w, backend="triton", N=5, D=16),
}


def _worker(rank, world, init_file, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for name in names:
            CASES[name](rank, world)
    finally:
        dist.destroy_process_group()


def spawn(world, names):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), names), nprocs=world, join=True)


# ---------------------------------------------------------------- tests
@pytest.mark.slow
def test_two_ranks_every_case():
    spawn(2, list(CASES))


@pytest.mark.slow
def test_four_ranks_uneven_unordered_shards():
    spawn(4, ["token_fp32", "token_bf16", "linear_fp32", "linear_bf16_no_bias", "validation", "nonfinite"])


def test_partials_merge_across_shards_in_one_process():
    """The statistics algebra alone (no collectives): 5 shards of one vocab, reduced by hand."""
    g = torch.Generator().manual_seed(seed_of("partials"))
    N, V, tau = 11, 53, 0.6
    z = torch.randn(N, V, generator=g) * 4
    z[:, 7] = float("-inf")
    z[3, :20] = float("-inf")  # the first two shards of row 3 are empty
    targets = make_targets((N,), V, g)
    targets[3] = 30
    cuts = [0, 9, 20, 21, 40, V]
    params = TokenOpParams(tau, IGNORE, "torch")
    parts, owns = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        fwd, _, owned = vp.shard_targets(targets, a, b - a, IGNORE)
        logp_r, H_r, m_r, log_S_r = token_forward_torch(z[:, a:b].unsqueeze(0), fwd, params)
        parts.append(vp.shard_partials(logp_r, m_r, log_S_r, H_r, owned))
        owns.append(owned)
    m_global = torch.stack([p[0] for p in parts]).amax(0)
    stats, logp = vp.finish_partials(m_global, sum(vp.rescale_partials(p, o, m_global) for p, o in zip(parts, owns)))
    r_logp, r_H = logprobs_entropy_reference(z, targets, tau, IGNORE)
    keep = targets != IGNORE
    assert_close(torch.where(keep, logp, 0.0), r_logp, TOL[torch.float32]["fwd"], "logp")
    assert_close(torch.where(keep, stats.H, 0.0), r_H, TOL[torch.float32]["fwd"], "H")


def test_shard_targets_owner_and_sentinels():
    targets = torch.tensor([0, 4, 5, 9, IGNORE, 7])
    fwd, bwd, owned = vp.shard_targets(targets, 4, 3, IGNORE)  # shard = ids 4, 5, 6
    assert owned.tolist() == [False, True, True, False, False, False]
    assert fwd.tolist() == [0, 0, 1, 0, IGNORE, 0]
    assert bwd.tolist() == [-1, 0, 1, -1, IGNORE, -1]
    _, bwd, _ = vp.shard_targets(torch.tensor([0, -1]), 4, 3, -1)  # sentinel avoids ignore_index
    assert bwd.tolist() == [-2, -1]


def test_one_rank_group_equals_single_process_ops_and_needs_init(tmp_path):
    g = torch.Generator().manual_seed(seed_of("one rank"))
    logits = torch.randn(6, 29, generator=g)
    hidden, weight = torch.randn(6, 8, generator=g), torch.randn(29, 8, generator=g)
    targets = make_targets((6,), 29, g)
    with pytest.raises(ValueError, match="init_process_group"):
        vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for temperature in (1.0, 0.7):
            got = vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=0, temperature=temperature)
            want = token_logprobs_and_entropy(logits, targets, temperature=temperature)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            got = vp.vocab_parallel_linear_logprobs_and_entropy(hidden, weight, targets, vocab_start=0,
                                                                temperature=temperature, logit_softcap=3.0)
            want = linear_logprobs_and_entropy(hidden, weight, targets, temperature=temperature, logit_softcap=3.0)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        with pytest.raises(ValueError, match="vocab_start must be 0"):
            vp.vocab_parallel_logprobs_and_entropy(logits, targets, vocab_start=3)
    finally:
        dist.destroy_process_group()
