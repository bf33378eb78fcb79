"""Token chunking for very long contexts (e.g. 128k tokens): per-token log-prob and entropy with working
memory bounded by a chunk of ``n = token_chunk_size`` tokens instead of all ``N``.

Two helpers, the same math as the ops they wrap (``logp = s_y - logsumexp(s)``,
``H = logsumexp(s) - sum_i p_i s_i``, ``s = z / tau``; ALGORITHMS.md section 1):

- :func:`chunked_logprobs_and_entropy` for logits produced by a callable ``logits_fn(start, end)``
  (any head: a final norm, a scaled or soft-capped lm_head, LoRA...). Each chunk is checkpointed
  (``torch.utils.checkpoint``, non-reentrant): its logits exist only while that chunk runs, in forward and
  again in backward. This is where chunking pays: ``O(n V)`` instead of ``O(N V)`` logits.
- :func:`chunked_linear_logprobs_and_entropy`: ``linear_logprobs_and_entropy`` run chunk by chunk in one
  ``autograd.Function``. That op never holds ``[N, V]`` logits anyway; chunking only bounds its fp32
  ``d hidden`` workspace (see its docstring for the exact trade-off, which today includes one extra
  ``[V, D]`` fp32 buffer).

Memory below: extra bytes beyond the inputs and what autograd keeps anyway, ``e_z`` / ``e_h`` the bytes per
element of the logits / of ``hidden`` and ``weight``.
"""
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ._dispatch import resolve_backend
from ._layout import as_rows3d
from ._validation import check_finite_rows, check_softcap, check_targets, check_temperature
from .linear_ops import (
    LinearOpParams,
    linear_backward,
    linear_forward,
    linear_logprobs_and_entropy,
)
from .token_ops import token_logprobs_and_entropy
from .vocab_parallel import check_lm_head


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


# The chunk's h3d view goes to the shared dispatcher of linear_ops (a copy of at most one chunk on the CPU path).
_launch_forward = linear_forward
_launch_backward = linear_backward


class ChunkedLinearLogprobsEntropy(torch.autograd.Function):
    """``linear_logprobs_and_entropy`` over token chunks; ``dW``/``db`` summed across chunks in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: ChunkedLinearParams):
        ctx.set_materialize_grads(False)
        op = params.op
        h3d = as_rows3d(hidden)
        flat = targets.reshape(-1).to(torch.int64).contiguous()
        n_rows = flat.numel()
        cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logp, H = (torch.empty(n_rows, dtype=cdtype, device=hidden.device) for _ in range(2))
        stats = torch.empty(3, n_rows, dtype=cdtype, device=hidden.device)
        for r0, r1, index in token_chunks(h3d, params.token_chunk_size):
            logp[r0:r1], H[r0:r1], stats[:, r0:r1] = _launch_forward(h3d[index], weight, bias, flat[r0:r1], op)
        check_finite_rows(stats[0] + stats[1], flat != op.ignore_index, "logits (hidden @ weight.T)")
        ctx.save_for_backward(hidden, weight, bias, flat, stats)
        ctx.params = params
        lead = hidden.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    def backward(ctx, grad_logp, grad_H):
        hidden, weight, bias, flat, stats = ctx.saved_tensors
        params: ChunkedLinearParams = ctx.params
        needs = tuple(bool(x) for x in ctx.needs_input_grad[:3])
        if not any(needs) or (grad_logp is None and grad_H is None):
            return None, None, None, None, None
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(torch.float32).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(torch.float32).contiguous()
        acc = stats.dtype  # fp32 (fp64 for fp64 inputs on the CPU path)
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
        db = torch.zeros(weight.shape[:1], dtype=acc, device=weight.device) if needs[2] else None
        h3d = as_rows3d(hidden)
        dh3d = None if dh is None else as_rows3d(dh)  # a view: dh is contiguous
        with torch.no_grad():
            for r0, r1, index in token_chunks(h3d, params.token_chunk_size):
                h_c = h3d[index]
                dh_c, dw_c, db_c = _launch_backward(
                    h_c, weight, bias, flat[r0:r1], stats[:, r0:r1].contiguous(),
                    None if g_logp is None else g_logp[r0:r1], None if g_H is None else g_H[r0:r1],
                    params.op, needs)
                if dh is not None:
                    dh3d[index].copy_(dh_c.view(h_c.shape))  # fp32 chunk -> hidden's dtype
                if dw is not None:
                    dw += dw_c  # the launch returns a fresh [V, D] per chunk (see the docstring's hook note)
                    del dw_c
                if db is not None:
                    db += db_c
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None)


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
):
    """:func:`~entropy_ops.linear_logprobs_and_entropy` run ``token_chunk_size`` tokens at a time.

    Same arguments, math and outputs (``logp``, ``H`` fp32, shaped like ``targets``); gradients for
    ``hidden``, ``weight``, ``bias`` equal the unchunked op's up to summation order (``dW`` and ``db``
    are summed over chunks in one fp32 buffer, cast to the weight's dtype once at the end).

    What chunking changes (``n = token_chunk_size``; ``e_h``, ``e_w`` bytes per element of ``hidden``,
    ``weight``). Backward peak of the unchunked op: ``dh`` in fp32 for all tokens and its cast,
    ``N D (4 + e_h)`` (``N D 4`` for fp32, where the cast is free), and ``dW`` in fp32 and its cast,
    ``V D (4 + e_w)`` (``V D 4`` for fp32). Chunked: each chunk's fp32 ``dh`` goes into the ``[N, D]``
    gradient at once, ``N D e_h + n D 4``; ``dW`` needs its fp32 accumulator *and* the fresh fp32 ``[V, D]``
    that the backward launch function returns for every chunk, ``V D (8 + e_w)`` (``V D 8`` for fp32).
    Net change ``V D 4 - (N - n) D 4`` for 16-bit ``hidden``: a saving only when ``N > V + n``; for fp32
    ``+ (V + n) D 4``, never a saving. (Example, Qwen2.5 ``V = 152064``, ``D = 3584``, bf16, ``N = 131072``,
    ``n = 8192``: ``(152064 - 122880) 3584 4`` bytes = 0.42 GB *more*.) Once the backward launch
    functions can accumulate into caller buffers, the ``V D 4`` term disappears and the saving is
    ``(N - n) D 4`` (1.76 GB in that example). Forward: ``20 N`` bytes of per-row outputs and statistics
    plus one chunk's launch workspace, as unchunked. Every chunk is a separate launch (``ceil(N / n)``
    of them): choose ``n`` in the thousands on a GPU. Neither form ever holds ``[N, V]`` logits.
    """
    check_lm_head(hidden, weight, bias)
    size = _check_chunk_size(token_chunk_size)
    temperature = check_temperature(temperature)
    logit_softcap = check_softcap(logit_softcap)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    n_rows = hidden.numel() // hidden.shape[-1]
    if size >= n_rows:  # one chunk: the op itself
        return linear_logprobs_and_entropy(hidden, weight, targets, bias=bias, temperature=temperature,
                                           ignore_index=ignore_index, logit_softcap=logit_softcap,
                                           allow_tf32=allow_tf32, backend=backend)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden.device)
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "triton" and hidden.dtype == torch.float64:
        raise TypeError("hidden must be fp32, bf16 or fp16 on the Triton backend, got torch.float64")
    params = ChunkedLinearParams(LinearOpParams(temperature, ignore_index, resolved, logit_softcap, allow_tf32), size)
    return ChunkedLinearLogprobsEntropy.apply(hidden, weight, bias, targets, params)
