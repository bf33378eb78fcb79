"""The partial-statistics helpers (merge of ``(m, S, T)`` across vocab chunks, soft-cap) in both twins:
``entropy_ops/softmax_stats.py`` (PyTorch) and ``kernels/softmax_stats.py`` (Triton, under the interpreter)."""
import torch
import triton
import triton.language as tl

from entropy_ops import softmax_stats
from entropy_ops.kernels.softmax_stats import merge_stats, softcap_tanh, tile_stats_rows
from oracle import assert_close


def rows_with_masked_vocab(seed, n=6, v=97):
    """fp32 scaled logits; row 1 is ``-inf`` on its whole first chunk, row 2 everywhere but one entry."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 4 + 20.0
    s[torch.rand(n, v, generator=g) < 0.3] = float("-inf")
    s[1, :40] = float("-inf")
    s[2, :] = float("-inf")
    s[2, 60] = 3.0
    return s


def reference(s):
    s = s.double()
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1)
    return lse, -(p * torch.where(p > 0, s - lse[:, None], 0.0)).sum(-1)


def test_torch_merge_matches_whole_row():
    s = rows_with_masked_vocab(1)
    parts = [softmax_stats.block_online_stats_(s[:, a:b].clone()) for a, b in ((0, 40), (40, 41), (41, 97))]
    for order in ((0, 1, 2), (2, 0, 1)):  # any merge order
        m, S, T = parts[order[0]]
        for i in order[1:]:
            m, S, T = softmax_stats.merge_stats(m, S, T, *parts[i])
        stats = softmax_stats.finalize_stats(m, S, T)
        ref_lse, ref_H = reference(s)
        assert_close(stats.lse, ref_lse, 1e-6, "lse")
        assert_close(stats.H, ref_H, 1e-5, "H")


def test_torch_merge_of_empty_partials():
    empty = softmax_stats.block_online_stats_(torch.full((3, 5), float("-inf")))
    assert torch.isneginf(empty[0]).all() and (empty[1] == 0).all() and (empty[2] == 0).all()
    m, S, T = softmax_stats.merge_stats(*empty, *empty)
    assert torch.isneginf(m).all() and (S == 0).all() and (T == 0).all()
    full = softmax_stats.block_online_stats_(torch.tensor([[1.0, 2.0, 3.0]] * 3))
    for a, b in ((empty, full), (full, empty)):
        merged = softmax_stats.merge_stats(*a, *b)
        for x, y in zip(merged, full):
            assert torch.equal(x, y)


@triton.jit
def _merge_probe(s_ptr, out_ptr, V, SPLIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_V)
    ok = cols[None, :] < V
    s = tl.load(s_ptr + rows[:, None] * V + cols[None, :], mask=ok, other=float("-inf"))
    m1, S1, T1 = tile_stats_rows(s, ok & (cols[None, :] < SPLIT))
    m2, S2, T2 = tile_stats_rows(s, ok & (cols[None, :] >= SPLIT))
    m0 = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK_R,), tl.float32)
    m, S, T = merge_stats(m0, z, z, m1, S1, T1)  # fold into an empty start
    m, S, T = merge_stats(m, S, T, m2, S2, T2)
    tl.store(out_ptr + rows, m + tl.log(S))
    tl.store(out_ptr + BLOCK_R + rows, tl.log(S) - T / S)


def test_triton_tile_stats_and_merge():
    s = rows_with_masked_vocab(2, n=8, v=97)
    out = torch.empty(2, 8)
    _merge_probe[(1,)](s, out, 97, SPLIT=40, BLOCK_R=8, BLOCK_V=128)
    ref_lse, ref_H = reference(s)
    assert_close(out[0], ref_lse, 1e-6, "lse")
    assert_close(out[1], ref_H, 1e-5, "H")


@triton.jit
def _softcap_probe(x_ptr, t_ptr, d_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    t, d = softcap_tanh(tl.load(x_ptr + i))
    tl.store(t_ptr + i, t)
    tl.store(d_ptr + i, d)


def test_triton_softcap_tanh():
    """``tanh`` and ``1 - tanh^2`` to ~1e-7 relative, across the series / exp switch at |x| = 0.25."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.linspace(-0.3, 0.3, 301), torch.randn(400, generator=g) * 4,
                   torch.tensor([0.0, 1e-30, -1e-8, 0.2499999, 0.25, 30.0, -90.0, 1e4]),
                   torch.logspace(-6, 1.5, 315)])
    t, d = torch.empty_like(x), torch.empty_like(x)
    _softcap_probe[(1,)](x, t, d, BLOCK=1024)
    ref_t = torch.tanh(x.double())
    ref_d = 1.0 / torch.cosh(x.double()) ** 2
    assert ((t.double() - ref_t).abs() <= 3e-7 * ref_t.abs() + 1e-37).all()
    assert ((d.double() - ref_d).abs() <= 1e-6 * ref_d + 1e-37).all()
