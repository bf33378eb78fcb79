"""The one-pass policy loss on hidden states: the gradient is formed in the forward pass.

``policy_loss(hidden=..., weight=...)`` in two passes runs the hidden-state op's forward (``2 N D V``
FLOPs), the O(tokens) loss, then the op's backward, which recomputes the logits (``6 N D V``): ``8 N D V``.
When every token's upstream gradient ``(d loss / d logp_t, d loss / d H_t)`` depends only on that
token's own ``logp_t``, ``H_t`` and constants, it can be formed as soon as the token's statistics are
known, so one pass per token chunk suffices (``6 N D V``)::

    for each chunk of n tokens:
        s = h_c W^T (+ b, soft-cap, / tau)  for all V columns, kept as s - m_tile   [n, V] workspace
        logp_c, H_c                          from the tiles' statistics (fp32, exact)
        (g_logp, g_H) = d loss / d (logp_c, H_c)          autograd on the chunk's O(n) token terms
        dz = logit_grad(...)                 in place in the workspace
        dh[c] = dz W   (one matmul over V, written once);  dW (+)= dz^T h_c (weight dtype);  db += sum_rows dz

That holds for the token-level ratio without the entropy mask: the aggregation weights (``token-mean``,
``seq-mean-token-mean``, ``seq-mean-token-sum-norm``) depend only on the mask, so they are constants
known before the pass. It does not hold for the sequence-level ratio (GSPO: ``exp(mean_t(logp - old))``
needs the whole response) nor for the entropy mask (its quantile needs every token's entropy): those
configurations use the two-pass form (:func:`one_pass_eligible`).

The returned loss and metrics are computed from the pass's ``logp``/``H`` by the same function as the
two-pass form (``policy_loss._loss_from_token_stats``); the per-chunk gradients come from the same
per-token terms (``policy_loss._token_terms``), so values, metrics and gradients agree with the
two-pass form up to fp32 summation order (tested for every eligible preset).

Memory (bytes beyond the inputs and the returned gradients, Triton path, ``e_g`` = 2 for 16-bit
inputs, 4 for fp32; :func:`onepass_peak_bytes`)::

    n V e_g + 12 n V' / B_V + n D e_g  (+ 4 V ceil(n / B_N) with a bias; + n D 4 + Vc D 6 for fp16)

the chunk's ``[n, V]`` workspace, its forward tile statistics (``V'``: ``V`` rounded up to whole
``B_V``-column tiles), the ``h`` operand of ``dW``; with a bias the per-token-block column sums; for fp16
the chunk's fp32 ``dh``, a bf16 ``W`` block and an fp32 ``dW`` block of ``Vc = D / 2`` vocab rows. No
``[N, V]`` buffer and no fp32 ``[V, D]``: ``d hidden`` and ``d weight`` are written in the inputs'
dtypes as the pass goes (``d hidden`` rows once per chunk; ``d weight`` added into by every chunk, see
below), ``d bias`` is an fp32 ``[V]`` accumulator. The default chunk (:func:`default_token_chunk`) is
the largest multiple of 128 rows with ``n V e_g <= ONEPASS_WORKSPACE_BYTES`` (256 MiB), at least 128,
at most ``N``: at ``N = 8192, D = 4096, V = 131072`` bf16, ``n = 1024`` (8 chunks), 289 MB; at
``N = 32768, D = 3584, V = 152064`` bf16, ``n = 768`` (43 chunks), 250 MB. ``token_chunk`` overrides it.

Precision: ``d weight`` is added chunk after chunk into the weight's own dtype, with fp32 accumulation
inside each matmul (cuBLAS ``addmm`` with ``beta = 1`` / the Triton matmul's ``ACCUMULATE``; fp16:
through the fp32 ``dW`` block), in a fixed order (deterministic): it is rounded to the weight's dtype
once per token chunk, ``ceil(N / n)`` times, where the two-pass form (and ``token_chunk >= N``) rounds
it once. For fp32 weights the gradient itself is the fp32 accumulator.

The CPU path runs each chunk as the op's forward and backward (same math, recomputed logits, blocks
of ``CPU_BLOCK_ELEMENTS``) with the op's memory; by default it runs all tokens as one chunk (its
measured budget), and with several chunks (``token_chunk``) it adds ``d weight`` into one fp32
``[V, D]`` accumulator, rounded once at the end.
"""
from dataclasses import dataclass

import torch

from . import linear_triton
from ._layout import as_rows3d
from ._validation import check_finite_rows, first_order_only, linear_row_max_abs
from .linear_ops import LinearOpParams, linear_backward_torch, linear_forward_torch
from .policy_checks import one_pass_eligible
from .token_chunking import token_chunks


ONEPASS_WORKSPACE_BYTES = 256 << 20  # the default token chunk's [n, V] workspace budget (256 MiB)


def default_token_chunk(n_rows: int, n_vocab: int, gemm_elem: int) -> int:
    """Tokens per one-pass chunk (Triton path): the largest multiple of 128 with
    ``n V e_g <= ONEPASS_WORKSPACE_BYTES``, at least 128, at most ``N`` (``N`` small: one chunk)."""
    n = ONEPASS_WORKSPACE_BYTES // (max(n_vocab, 1) * gemm_elem) // 128 * 128
    return max(1, min(n_rows, max(128, n)))


def onepass_peak_bytes(n_rows: int, dim: int, n_vocab: int, dtype: torch.dtype, *, token_chunk: int | None = None,
                       bias: bool = False) -> int:
    """The one-pass loss's peak extra bytes on the Triton path (module docstring), the returned gradients
    and ``O(N + V)`` terms left out (the conventions of ``linear_triton.backward_peak_bytes``)::

        n V e_g + 12 n V' / B_V + n D e_g + 4 V ceil(n / B_N) [bias] + n D 4 + Vc D 6 [fp16]

    ``n`` the token chunk (``token_chunk``, else :func:`default_token_chunk`; at most ``N``), ``V'``
    the vocabulary rounded up to whole ``B_V``-column tiles, ``B_N x B_V`` the forward tile of the
    dtype (the one-pass loss runs without TF32), ``Vc`` the fp16 vocab block (``D / 2`` rounded up to
    whole tiles, at most ``V'``).
    """
    from .kernels.linear_logprobs_entropy import launch_config

    if n_rows <= 0:
        return 0
    gd = linear_triton.gemm_dtype(dtype)
    e_g = gd.itemsize
    n = min(n_rows, token_chunk if token_chunk is not None else default_token_chunk(n_rows, n_vocab, e_g))
    cfg = launch_config(e_g, False)[0]
    tiles = -(-n_vocab // cfg.block_v)
    total = n * n_vocab * e_g + 12 * n * tiles + n * dim * e_g  # workspace, tile statistics, h operand of dW
    if bias:
        total += 4 * n_vocab * -(-n // cfg.block_n)  # per-token-block column sums of dz
    if dtype == torch.float16:  # fp32 dh of the chunk; a bf16 W block and an fp32 dW block
        vc = linear_triton.vocab_chunk_size(n, dim, n_vocab, e_g, cfg.block_v, dim // 2)
        total += n * dim * 4 + vc * dim * 6
    return total


@dataclass(frozen=True)
class OnePassParams:
    op: LinearOpParams
    token_chunk: int | None = None


class OnePassLinearGradients(torch.autograd.Function):
    """``(hidden [..., D], weight [V, D], bias | None, targets [N] int64, grad_fn) -> (anchor, logp [N], H [N])``.

    The forward runs the one-pass loop and keeps ``dh``, ``dW``, ``db`` of the loss;
    ``grad_fn(r0, r1, logp_c, H_c) -> (g_logp_c, g_H_c)`` gives the upstream gradients of the flat rows
    ``[r0, r1)``. ``anchor`` is a 0-dim zero: add it to the loss value and its gradient carries
    ``d loss`` into ``hidden``/``weight``/``bias`` (scaled by the incoming gradient). ``logp``/``H``
    are not differentiable. Once differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, flat_targets, grad_fn, params: OnePassParams):
        op = params.op
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        h3d = as_rows3d(hidden)
        n_rows, D = flat_targets.numel(), hidden.shape[-1]
        V = weight.shape[0]
        dev = hidden.device
        if op.backend == "triton":
            gd = linear_triton.gemm_dtype(hidden.dtype)
            size = params.token_chunk or default_token_chunk(n_rows, V, gd.itemsize)
            acc = torch.float32
        else:
            size = params.token_chunk or max(1, n_rows)
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        chunks = list(token_chunks(h3d, size))
        logp, H = (torch.empty(n_rows, dtype=acc, device=dev) for _ in range(2))
        stats = torch.empty(3, n_rows, dtype=acc, device=dev)
        if op.backend == "triton":
            # the gradients themselves, in the inputs' dtypes: every chunk writes its dh rows once and adds its
            # dW into dw (no fp32 [V, D]: one rounding to the weight's dtype per chunk)
            dh = torch.empty(n_rows, D, dtype=hidden.dtype, device=dev) if needs[0] else None
            dw = torch.empty(V, D, dtype=weight.dtype, device=dev) if needs[1] else None
        else:
            dh = torch.zeros(n_rows, D, dtype=acc, device=dev) if needs[0] else None
            dw = torch.zeros(V, D, dtype=acc, device=dev) if needs[1] else None
        db = torch.zeros(V, dtype=acc, device=dev) if needs[2] else None
        with torch.no_grad():
            for i, (r0, r1, index) in enumerate(chunks):
                t_c = flat_targets[r0:r1]

                def chunk_grads(lp, h, r0=r0, r1=r1):
                    return grad_fn(r0, r1, lp, h)

                if op.backend == "triton":
                    out = linear_triton.onepass_chunk(
                        h3d[index], weight, bias, t_c, op, needs, chunk_grads, matmul=op.matmul,
                        dh_rows=None if dh is None else dh[r0:r1], dw_acc=dw, dw_first=i == 0, db_acc=db)
                    logp[r0:r1], H[r0:r1], stats[:, r0:r1] = out
                else:
                    h_c = h3d[index].reshape(-1, D)
                    lp, h_, st = linear_forward_torch(h_c, weight, bias, t_c, op)
                    logp[r0:r1], H[r0:r1], stats[:, r0:r1] = lp, h_, st
                    g_lp, g_h = chunk_grads(lp, h_)
                    linear_backward_torch(h_c, weight, bias, t_c, st, g_lp, g_h, op, needs,
                                          dh_out=None if dh is None else dh[r0:r1], dw_out=dw, db_out=db)
        if op.check_values:
            check_finite_rows(stats[0] + stats[1], flat_targets != op.ignore_index, "logits (hidden @ weight.T)",
                              temperature=op.temperature,
                              row_max_abs=lambda i: linear_row_max_abs(hidden.reshape(-1, hidden.shape[-1])[i], weight,
                                                                       bias, op.logit_softcap))
        # Saved only as the anchors of first_order_only's refusing node (no copy: the inputs themselves).
        ctx.save_for_backward(hidden, weight, bias)
        ctx.grads = (None if dh is None else dh.view(hidden.shape),
                     None if dw is None else dw, None if db is None else db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp, H)
        return torch.zeros((), dtype=torch.float32, device=dev), logp, H

    @staticmethod
    @first_order_only("policy_loss (one pass)")
    def backward(ctx, grad_anchor, _grad_logp, _grad_H):
        out = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            # scaled in place: the stored gradients are this op's own buffers, so no second [V, D] / [N, D]
            out.append(None if g is None or grad_anchor is None else g.mul_(grad_anchor.to(g.dtype)).to(dtype))
        ctx.grads = None  # handed over
        return (*out, None, None, None)


def one_pass_policy_loss(targets, valid, advantages, hidden, weight, bias, old_logprobs, ref_logprobs, cfg, *,
                         ignore_index=-100, logit_softcap=None, backend="auto", token_chunk=None, matmul="auto",
                         validate="auto"):
    """``(loss, metrics)`` of ``policy_loss`` on the hidden-state path in one pass (module docstring).

    ``targets``/``valid`` ``[B, T]`` (``valid`` bool, already checked by ``policy_loss``); ``cfg`` must be
    :func:`one_pass_eligible`. ``token_chunk``: tokens per chunk (``None``: :func:`default_token_chunk`).
    """
    from ._validation import widen_targets
    from .linear_ops import linear_op_params
    from .policy_loss import _aggregation_weights, _constants, _loss_from_token_stats, _token_terms

    if not one_pass_eligible(cfg):
        raise ValueError("one_pass=True needs importance_sampling_level='token' and top_entropy_quantile=1.0 "
                         f"(got {cfg.importance_sampling_level!r}, {cfg.top_entropy_quantile}): a sequence-level "
                         "ratio or the entropy mask's quantile needs every token before any gradient")
    if token_chunk is not None and (isinstance(token_chunk, bool) or not isinstance(token_chunk, int)
                                    or token_chunk < 1):
        raise ValueError(f"token_chunk must be an int >= 1 or None, got {token_chunk!r}")
    shape = targets.shape
    wide = widen_targets(targets).view(shape)  # widened before the fill: no narrow dtype wraps ignore_index
    op_targets = torch.where(valid, wide, torch.full_like(wide, ignore_index))
    op = linear_op_params(hidden, weight, bias, op_targets, temperature=cfg.temperature, ignore_index=ignore_index,
                          logit_softcap=logit_softcap, allow_tf32=False, backend=backend, matmul=matmul,
                          validate=validate)
    flat_valid = valid.reshape(-1)
    agg = _aggregation_weights(valid, cfg).reshape(-1)
    adv = advantages.detach().to(torch.float32)
    adv = (adv.unsqueeze(-1).expand(shape) if adv.dim() == 1 else adv).reshape(-1)
    old = None if old_logprobs is None else old_logprobs.reshape(-1)
    ref = None if ref_logprobs is None else ref_logprobs.reshape(-1)
    # The chunk-invariant constants, once for all tokens. _constants reads the log-probs only where the mask
    # drops a token, and the op's log-probs are exactly 0 there (those rows reach it as ignore_index): zeros
    # give the same constants. On-policy (no old log-probs) "old" is the chunk's own detached log-probs.
    old_all, adv_all, ref_all = _constants(torch.zeros(flat_valid.shape, dtype=torch.float32, device=adv.device),
                                           flat_valid, adv, old, ref)

    def grad_fn(r0, r1, logp_c, H_c):
        """``d loss / d (logp, H)`` of the flat tokens ``[r0, r1)``: the same per-token terms and weights.

        ``logp_c``/``H_c`` are 0 on dropped tokens (the op's output there), whose weight in ``agg`` is 0."""
        v = flat_valid[r0:r1]
        with torch.enable_grad():
            lp = logp_c.detach().requires_grad_(True)
            ent = H_c.detach().requires_grad_(True)
            o = lp.detach() if old is None else old_all[r0:r1]
            r = None if ref is None else ref_all[r0:r1]
            loss_c = (_token_terms(lp, ent, v, v, o, adv_all[r0:r1], r, cfg)[0] * agg[r0:r1]).sum()
            g_lp, g_ent = torch.autograd.grad(loss_c, (lp, ent), allow_unused=True)
        return (torch.zeros_like(lp) if g_lp is None else g_lp), (torch.zeros_like(ent) if g_ent is None else g_ent)

    anchor, logp, H = OnePassLinearGradients.apply(hidden, weight, bias, op_targets.reshape(-1), grad_fn,
                                                   OnePassParams(op, token_chunk))
    loss, metrics = _loss_from_token_stats(logp.view(shape), H.view(shape), valid, advantages, old_logprobs,
                                           ref_logprobs, cfg)
    return loss + anchor, metrics
