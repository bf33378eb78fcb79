"""Token chunking for very long contexts (e.g. 128k tokens): per-token log-prob and entropy with working
memory bounded by a chunk of ``n = token_chunk_size`` tokens instead of all ``N``.

Two helpers, the same math as the ops they wrap (``logp = s_y - logsumexp(s)``,
``H = logsumexp(s) - sum_i p_i s_i``, ``s = z / tau``; docs/math.md section 1):

- :func:`chunked_logprobs_and_entropy` for logits produced by a callable ``logits_fn(start, end)``
  (any head: a final norm, a scaled or soft-capped lm_head, LoRA...). Each chunk is checkpointed
  (``torch.utils.checkpoint``, non-reentrant): its logits exist only while that chunk runs, in forward and
  again in backward. This is where chunking pays: ``O(n V)`` instead of ``O(N V)`` logits.
- :func:`chunked_linear_logprobs_and_entropy`: ``linear_logprobs_and_entropy`` run chunk by chunk in one
  ``autograd.Function``. That op never holds ``[N, V]`` logits anyway; chunking replaces its fp32
  ``d hidden`` for all ``N`` tokens (and that buffer's cast) by one chunk's, while ``d weight`` is added by
  every chunk's launch into one fp32 accumulator (no per-chunk ``[V, D]``). For 16-bit inputs on the Triton
  path the backward peak goes from ``(N + V) D e + N D (4 + e) + N Vc e`` to
  ``N D e + V D 4 + D max(n (4 + e) + n Vc' e / D, e R)`` bytes (``R <= V`` vocab rows per accumulator
  block): it pays when ``N`` exceeds about ``V``. Exact terms, the CPU path and a worked example in its
  docstring.

Memory below: extra bytes beyond the inputs and what autograd keeps anyway, ``e_z`` / ``e`` the bytes per
element of the logits / of ``hidden`` and ``weight``.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ._layout import as_rows3d
from ._validation import check_finite_rows, first_order_only, linear_row_max_abs, widen_targets
from .linear_ops import (
    LinearOpParams,
    linear_backward,
    linear_forward,
    linear_logprobs_and_entropy,
    linear_op_params,
)
from .token_ops import token_logprobs_and_entropy
from .vocab_parallel import shard_targets  # a block of vocab rows is addressed as a vocab shard


def _check_chunk_size(token_chunk_size) -> int:
    if isinstance(token_chunk_size, bool) or not isinstance(token_chunk_size, int):
        raise TypeError(f"token_chunk_size must be an int, got {type(token_chunk_size).__name__}")
    if token_chunk_size < 1:
        raise ValueError(f"token_chunk_size must be >= 1, got {token_chunk_size}")
    return token_chunk_size


def token_chunks(x3d: torch.Tensor, size: int):
    """Yield ``(r0, r1, index)``: ``x3d[index]`` is a ``[a, b, K]`` view (no copy) of the flat rows ``[r0, r1)``
    of the ``[A, B, K]`` ``x3d``, ``r1 - r0 <= size``: whole outer blocks when ``B <= size``, else pieces
    of one outer block. The same ``index`` addresses those rows in any tensor of the same ``[A, B]``."""
    A, B, _ = x3d.shape
    if B <= size:
        step = size // B
        for a0 in range(0, A, step):
            a1 = min(A, a0 + step)
            yield a0 * B, a1 * B, (slice(a0, a1),)
    else:
        for a in range(A):
            for b0 in range(0, B, size):
                b1 = min(B, b0 + size)
                yield a * B + b0, a * B + b1, (slice(a, a + 1), slice(b0, b1))


# ---------------------------------------------------------------- logits from a callable
def chunked_logprobs_and_entropy(
    logits_fn,
    targets: torch.Tensor,
    *,
    token_chunk_size: int,
    temperature: float = 1.0,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    backend: str = "auto",
):
    """:func:`~entropy_ops.token_logprobs_and_entropy` of logits made ``token_chunk_size`` tokens at a time.

    Equals ``token_logprobs_and_entropy(logits_fn(0, N), targets, ...)`` with ``N = targets.numel()``,
    but at no time do more than one chunk's logits exist: chunk ``[start, end)`` (over the flattened
    tokens) is ``logits_fn(start, end)`` ``[end - start, V]``, fed to the fused op and dropped; in
    backward ``logits_fn`` runs again for that chunk (activation checkpointing), its gradient is formed
    and pushed through ``logits_fn``'s graph, and the chunk is dropped before the next one.

    ``logits_fn`` reads its inputs from its closure, e.g.
    ``lambda s, e: lm_head(norm(hidden.view(-1, D)[s:e]))``; gradients reach every tensor it uses
    (``requires_grad``), as with ``torch.utils.checkpoint``. It must be deterministic (it is recomputed;
    the RNG state is replayed, so dropout is fine) and must not modify its inputs.

    Memory (``n = token_chunk_size``): forward ``n V e_z`` for one chunk's logits plus ``logits_fn``'s
    own intermediates for ``n`` tokens; between forward and backward only the outputs, ``8 N`` bytes;
    backward ``2 n V e_z`` (recomputed logits and their gradient; ``n V e_z`` with ``inplace_backward``)
    plus ``logits_fn``'s backward for one chunk (for ``hidden[s:e] @ W.T``: one ``[V, D]`` weight
    gradient and, from autograd's slice backward, one ``[N, D]`` zero-padded hidden gradient, both
    added into the running gradients). Unchunked: ``N V e_z`` held from forward to backward, ``2 N V e_z``
    at the backward peak. Cost: ``logits_fn`` and the fused forward run twice per chunk. The first
    non-reentrant checkpoint of a process imports ``torch._dynamo`` (measured here: 1.2 s, 150 MB of host
    memory, once).

    Args:
        logits_fn: ``(start: int, end: int) -> logits [end - start, V]`` for the flat tokens ``[start, end)``.
        targets: ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``; ``N = targets.numel()`` tokens.
        token_chunk_size: tokens per chunk, ``>= 1``.
        temperature, ignore_index, backend: as in ``token_logprobs_and_entropy``.
        inplace_backward: write each chunk's gradient into its recomputed logits (saves ``n V e_z``);
            wrong if ``logits_fn``'s last operation saved its own output for backward (e.g. ends in
            ``tanh``/``sigmoid``/``exp``): end it with a linear, an add or a multiply by a constant.

    Returns:
        ``(logp, entropy)``, fp32 (fp64 for fp64 logits on the CPU path), shaped like ``targets``.
    """
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable (start, end) -> logits [end - start, V], "
                        f"got {type(logits_fn).__name__}")
    size = _check_chunk_size(token_chunk_size)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    flat = targets.reshape(-1)
    n_tokens = flat.numel()
    vocab = []

    def chunk(start: int, end: int, t: torch.Tensor):
        z = logits_fn(start, end)
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != end - start:
            raise ValueError(f"logits_fn({start}, {end}) must return a [{end - start}, V] tensor, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        if vocab and z.shape[1] != vocab[0]:
            raise ValueError(f"logits_fn({start}, {end}) returned V = {z.shape[1]}, earlier chunks V = {vocab[0]}")
        vocab.append(z.shape[1])
        return token_logprobs_and_entropy(z, t, temperature=temperature, ignore_index=ignore_index,
                                          inplace_backward=inplace_backward, backend=backend)

    pieces = []
    for start in range(0, n_tokens, size):
        end = min(n_tokens, start + size)
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk, start, end, flat[start:end], use_reentrant=False))
        else:
            pieces.append(chunk(start, end, flat[start:end]))
    if not pieces:
        raise ValueError("targets must hold at least one token, got shape " + str(tuple(targets.shape)))
    logp, H = (torch.cat(parts).view(targets.shape) for parts in zip(*pieces))
    return logp, H


# ---------------------------------------------------------------- hidden states and lm_head
@dataclass(frozen=True)
class ChunkedLinearParams:
    """Non-tensor options: the fused op's own, and the tokens per chunk."""

    op: LinearOpParams
    token_chunk_size: int
    fp32_weight_grad: bool = True


# The chunk's h3d view goes to the shared dispatcher of linear_ops (a copy of at most one chunk on the CPU path,
# when the chunk's rows cannot be flattened into one [n, D] view).
_launch_forward = linear_forward
_launch_backward = linear_backward
# A 16-bit weight's fp32 dW accumulator is split into at most this many blocks of vocab rows.
_MAX_DW_BLOCKS = 16


def _dw_block_rows(n_vocab: int, chunk: int, elem: int) -> int:
    """Vocab rows per fp32 ``dW`` block for a weight of ``elem`` bytes per element: ``4 n / elem`` (casting
    one block then needs no more than one chunk's fp32 ``dh``, ``n D 4`` bytes), at most ``_MAX_DW_BLOCKS``
    blocks (launches per chunk), rounded up to a multiple of 16 rows (aligned weight/bias slices), at most ``V``."""
    rows = max(-(-n_vocab // _MAX_DW_BLOCKS), 4 * chunk // elem)
    return min(n_vocab, -(-rows // 16) * 16)


class ChunkedLinearLogprobsEntropy(torch.autograd.Function):
    """``linear_logprobs_and_entropy`` over token chunks; every chunk's launches add its ``dW``/``db`` into
    one fp32 accumulator (``dw_out``/``db_out``; for a 16-bit weight ``dW``'s is split into vocab blocks,
    one launch each, so that it can be cast block by block) or, with ``fp32_weight_grad=False``, its ``dW``
    straight into the weight-dtype gradient (one rounding per chunk), and, for fp32 ``hidden``, its ``dh``
    into the gradient itself (``dh_out``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: ChunkedLinearParams):
        ctx.set_materialize_grads(False)
        op = params.op
        h3d = as_rows3d(hidden)
        flat = widen_targets(targets)
        n_rows = flat.numel()
        cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp, H = (torch.empty(n_rows, dtype=cdtype, device=hidden.device) for _ in range(2))
        stats = torch.empty(3, n_rows, dtype=cdtype, device=hidden.device)
        for r0, r1, index in token_chunks(h3d, params.token_chunk_size):
            logp[r0:r1], H[r0:r1], stats[:, r0:r1] = _launch_forward(h3d[index], weight, bias, flat[r0:r1], op)
        if op.check_values:
            check_finite_rows(stats[0] + stats[1], flat != op.ignore_index, "logits (hidden @ weight.T)",
                              temperature=op.temperature,
                              row_max_abs=lambda i: linear_row_max_abs(hidden.reshape(-1, hidden.shape[-1])[i], weight,
                                                                       bias, op.logit_softcap))
        ctx.save_for_backward(hidden, weight, bias, flat, stats)
        ctx.params = params
        lead = hidden.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    @first_order_only("chunked_linear_logprobs_and_entropy")
    def backward(ctx, grad_logp, grad_H):
        hidden, weight, bias, flat, stats = ctx.saved_tensors
        params: ChunkedLinearParams = ctx.params
        op = params.op
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        if not any(needs) or (grad_logp is None and grad_H is None):
            return None, None, None, None, None
        acc = stats.dtype  # accumulation dtype: fp32 (fp64 for fp64 inputs on the CPU path)
        dev = hidden.device
        V, D = weight.shape
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(acc).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(acc).contiguous()
        # dh: the launches add straight into a zeroed slice of it when hidden has the accumulation dtype;
        # otherwise into one zeroed fp32 [n, D] buffer per chunk, then cast into it.
        dh_direct = hidden.dtype == acc
        dh = None
        if needs[0]:
            dh = torch.zeros(hidden.shape, dtype=acc, device=dev) if dh_direct else \
                torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
        # dW: accumulators that every chunk's launches add into, one per block of vocab rows. With the
        # accumulation dtype it is one block, returned as is; for a 16-bit weight each block is cast and
        # freed in turn at the end, so the cast adds one block (rows D e_w bytes), not a whole [V, D].
        # With fp32_weight_grad=False a 16-bit weight's gradient is itself the accumulator (one block).
        in_weight_dtype = needs[1] and weight.dtype != acc and not params.fp32_weight_grad
        rows = V if not needs[1] or weight.dtype == acc or in_weight_dtype else \
            _dw_block_rows(V, params.token_chunk_size, weight.element_size())
        blocks = [(v0, min(V, v0 + rows)) for v0 in range(0, V, rows)]
        dw_dtype = weight.dtype if in_weight_dtype else acc
        dw_parts = [torch.zeros(v1 - v0, D, dtype=dw_dtype, device=dev) if needs[1] else None for v0, v1 in blocks]
        db = torch.zeros(V, dtype=acc, device=dev) if needs[2] else None
        h3d = as_rows3d(hidden)
        dh3d = None if dh is None else as_rows3d(dh)  # a view with h3d's [A, B] (dh is contiguous)
        with torch.no_grad():
            for r0, r1, index in token_chunks(h3d, params.token_chunk_size):
                h_c = h3d[index]
                if op.backend == "torch":  # at most one [n, D] copy per chunk (rows that do not flatten), not per block
                    h_c = h_c.reshape(-1, D)
                t_c, st_c = flat[r0:r1], stats[:, r0:r1].contiguous()
                g_c = (None if g_logp is None else g_logp[r0:r1], None if g_H is None else g_H[r0:r1])
                dh_c = None
                if dh is not None:
                    dh_c = dh3d[index].view(r1 - r0, D) if dh_direct else \
                        torch.zeros(r1 - r0, D, dtype=acc, device=dev)
                for (v0, v1), dw_part in zip(blocks, dw_parts):
                    whole = v1 - v0 == V
                    _launch_backward(
                        h_c, weight if whole else weight[v0:v1],
                        bias if bias is None or whole else bias[v0:v1],
                        t_c if whole else shard_targets(t_c, v0, v1 - v0, op.ignore_index)[1], st_c, *g_c, op, needs,
                        dh_out=dh_c, dw_out=dw_part, db_out=None if db is None else db[v0:v1])
                if dh is not None and not dh_direct:
                    dh3d[index].copy_(dh_c.view(dh3d[index].shape))  # fp32 chunk -> hidden's dtype
                del dh_c  # before the next chunk allocates its own
        dw = None
        if needs[1]:
            if weight.dtype == acc or in_weight_dtype:
                dw = dw_parts[0]
            else:
                pieces = []
                for i in range(len(dw_parts)):
                    pieces.append(dw_parts[i].to(weight.dtype))
                    dw_parts[i] = None  # the fp32 block goes as soon as it is cast
                dw = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                del pieces
        if db is not None and bias.dtype != acc:
            db = db.to(bias.dtype)
        return dh, dw, db, None, None


def chunked_linear_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    token_chunk_size: int,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    logit_softcap: float | None = None,
    allow_tf32: bool = False,
    backend: str = "auto",
    validate="auto",
    fp32_weight_grad: bool = True,
):
    """:func:`~entropy_ops.linear_logprobs_and_entropy` run ``token_chunk_size`` tokens at a time.

    Same arguments, math and outputs (``logp``, ``H`` fp32, shaped like ``targets``); gradients for
    ``hidden``, ``weight``, ``bias`` equal the unchunked op's up to summation order (``dW`` and ``db``
    are summed over chunks in fp32, cast to the weight's dtype once at the end).

    ``fp32_weight_grad=False`` (16-bit weights): each chunk's ``dW`` (fp32 accumulation inside its
    matmuls) is added straight into the weight-dtype gradient, so ``dW`` is rounded ``ceil(N / n)``
    times instead of once, and the fp32 ``V D 4`` accumulator is gone: the backward peak beyond the
    returned gradients is then ``n D (4 + e) + n Vc' e`` on the Triton path, independent of ``N`` and
    ``V`` (bf16, N=32768, D=3584, V=152064, ``n = 4096``: 105 MB beyond the gradients, against 822 MB
    unchunked; 8 roundings). Deterministic either way (fixed chunk order, no atomics).

    Memory, in bytes beyond the inputs, the returned gradients included (``n = token_chunk_size``,
    ``e`` bytes per element of ``hidden`` and ``weight``, ``N`` tokens)::

        forward, both forms: 20 N held until backward (fp32 logp, H and [3, N] statistics; 8 N more for
            targets that are not contiguous int64) + one launch's workspace, for n rows instead of N
            (Triton: 36 + 12 Vc / 128 bytes a row, Vc the op's vocab chunk; CPU: W below + O(rows));
            chunked also 20 n for the chunk's own outputs before they are copied
        backward peak, 16-bit hidden/weight (e = 2; the gradients themselves are (N + V) D e):
            Triton  unchunked  (N + V) D e + N D (4 + e) + N Vc e     fp32 dh, h operand, dz [N, Vc] (dW in e)
                    chunked    N D e + V D 4 + D max(n (4 + e) + n Vc' e / D, e R)   per chunk the same for
                               n rows (Vc' its vocab chunk), plus the fp32 dW accumulator
            CPU     unchunked  max(N D (4 + e) + V D e, N D 4 + V D e + W)
                    chunked    N D e + V D 4 + max(n D 4 + W, R D e)
        backward peak, fp32 (fp64 on the CPU path with 8 for 4): (N + V) D 4 (+ W on the CPU), both forms

    Chunked, every launch adds its ``dW`` and ``db`` into the caller's accumulators (``dw_out``/``db_out``
    of ``linear_ops.linear_backward``) and, for fp32 ``hidden``, its ``dh`` straight into the zeroed
    gradient (``dh_out``); for 16-bit ``hidden`` each chunk's fp32 ``dh`` (``n D 4``) is cast into it. For
    a 16-bit weight the fp32 ``dW`` accumulator is ``ceil(V / R)`` blocks of ``R = min(V, max(ceil(V / 16),
    4 n / e))`` vocab rows, rounded up to a multiple of 16 (one launch per chunk and block, targets shifted
    to the block); at the end
    each block is cast and freed in turn and the pieces concatenated (``2 V D e <= V D 4``), so the cast
    costs ``R D e``, not ``V D e``. For fp32 the accumulator is returned as the gradient: no cast, no copy.
    The unchunked CPU path keeps ``dW`` in the weight's dtype (fp32 only per vocab block), which is why
    chunking pays there only when ``(N - n) D 4 > V D (4 - e) + W``. ``W``: the CPU blocks, at most
    ``CPU_LIVE_BLOCKS`` of ``CPU_BLOCK_ELEMENTS`` fp32 (24 MiB); ``O(N)`` terms (upstream gradients, the
    statistics) left out. Measured in tests/test_linear_memory.py. Rare copies, both forms: a ``hidden``
    whose leading dims do not merge into ``[A, B]`` is copied whole (``N D e``); on the CPU path a chunk
    whose rows do not flatten is copied (``n D e``, the unchunked op ``N D e``).

    Example, Qwen2.5-7B lm_head (``V = 152064``, ``D = 3584``), bf16, ``N = 131072``, ``n = 8192``
    (``R = 16384``, 10 blocks): gradients 2.03 GB; Triton backward peak unchunked 5.32 GB
    (``Vc = 1792``: fp32 ``dh`` 1.88 GB, ``h`` operand 0.94 GB, ``dz`` 0.47 GB), chunked 3.33 GB
    (``Vc' = 1024``). CPU:
    unchunked 3.91 GB, chunked 3.24 GB + ``W``. In fp32: 4.06 GB both ways. Every chunk is a separate
    launch per ``dW`` block (``ceil(N / n) ceil(V / R)`` of them): choose ``n`` in the thousands on a GPU.
    Neither form ever holds ``[N, V]`` logits.
    """
    size = _check_chunk_size(token_chunk_size)
    if not isinstance(fp32_weight_grad, bool):
        raise TypeError(f"fp32_weight_grad must be a bool, got {type(fp32_weight_grad).__name__}")
    n_rows = hidden.numel() // hidden.shape[-1] if isinstance(hidden, torch.Tensor) and hidden.dim() else 0
    if size >= n_rows:  # one chunk: the op itself
        return linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, logit_softcap=logit_softcap,
                                           allow_tf32=allow_tf32, backend=backend, validate=validate)
    op = linear_op_params(hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
                          logit_softcap=logit_softcap, allow_tf32=allow_tf32, backend=backend, validate=validate)
    return ChunkedLinearLogprobsEntropy.apply(hidden, weight, bias, targets,
                                              ChunkedLinearParams(op, size, fp32_weight_grad))
