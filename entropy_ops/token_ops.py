"""Per-token log-prob and entropy from logits, fused: ``token_logprobs_and_entropy``.

Math (``s = z / tau``, ``p = softmax(s)``, target ``y``)::

    logp = s_y - logsumexp(s)
    H    = logsumexp(s) - sum_i p_i s_i
    dz_i = (g_logp (1[i = y] - p_i) - g_H p_i (log p_i + H)) / tau

Equals ``log_softmax(z.float() / tau).gather(-1, y)`` and
``-(softmax * log_softmax).sum(-1)`` without materializing either: the CUDA
path streams each row once per direction through the Triton kernels of
``entropy_ops.kernels.token_logprobs_entropy``; the CPU path streams blocks of
``chunk_rows`` rows through the PyTorch twin in ``entropy_ops.softmax_stats``.
Forward saves only three fp32 numbers per row, ``(m, log S, H)`` with
``lse = m + log S`` (plus the logits reference); backward recomputes ``p``.

Module layout: launch functions (usable without autograd), the CPU functions,
the ``autograd.Function``, then the public functionals.
"""
import contextlib
from dataclasses import dataclass

import torch
import triton

from . import softmax_stats
from .softmax_stats import RowStats
from ._dispatch import resolve_backend
from ._layout import as_rows3d, may_overlap
from ._validation import (
    check_finite_rows,
    check_float_tensor,
    first_order_only,
    check_targets,
    check_temperature,
    value_checks_enabled,
    widen_targets,
)

# CPU path working set: each block holds about this many fp32 elements (4 MiB).
# Measured on this project's 2-core machine, N=4096, V=32000, fp32, fwd+bwd, torch's
# default 2 threads, best of runs: 2^19 0.54 s, 2^20 0.50 s, 2^21 0.51 s, 2^22 0.56 s
# (naive 1.77 s); peak memory grows with the block (2^24: only 3.6x below naive).
# With one thread 2^18 was best (0.54 s vs 0.74 s at N=2048): blocks must feed both cores.
CPU_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class TokenOpParams:
    """Non-tensor options of one call, carried through autograd."""

    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "torch"  # already resolved: "triton" or "torch"
    inplace_backward: bool = False
    check_values: bool = False  # run the host-synchronizing value checks (validate=, resolved)

    @property
    def inv_tau(self) -> float:
        return 1.0 / self.temperature


# ---------------------------------------------------------------- Triton launches
def _on_device(x: torch.Tensor):
    """Launch under ``x``'s device (not the current one): a CUDA device guard, a no-op elsewhere."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _forward_outputs(n_rows: int, dtype: torch.dtype, device: torch.device, out):
    if out is not None:  # caller-provided buffers (tests poison them to prove every element is written)
        return out
    return tuple(torch.empty(n_rows, dtype=dtype, device=device) for _ in range(4))


def token_forward_triton(logits3d: torch.Tensor, targets: torch.Tensor, params: TokenOpParams, out=None):
    """Launch the forward kernel. ``logits3d`` ``[A, B, V]`` (any strides), ``targets`` ``[A*B]`` int64.

    Returns fp32 ``(logp, H, m, log_S)``, each ``[A*B]`` (written into ``out`` when given);
    ``(m, log_S, H)`` are the row statistics backward needs (``lse = m + log_S``).
    """
    from .kernels.token_logprobs_entropy import _token_logprobs_entropy_fwd, _vector, launch_config

    A, B, V = logits3d.shape
    n_rows = A * B
    logp, H, m, log_S = _forward_outputs(n_rows, torch.float32, logits3d.device, out)
    if n_rows == 0:
        return logp, H, m, log_S
    block, num_warps = launch_config(V, logits3d.element_size())
    with _on_device(logits3d):
        _token_logprobs_entropy_fwd[(n_rows,)](
            logits3d, targets, logp, H, m, log_S,
            B, V,
            logits3d.stride(0), logits3d.stride(1), logits3d.stride(2),
            params.inv_tau, params.ignore_index,
            BLOCK=block, VEC=_vector(logits3d.element_size()), num_warps=num_warps,
        )
    return logp, H, m, log_S


def token_backward_triton(logits3d, targets, stats: RowStats, g_logp, g_H, params: TokenOpParams, out3d):
    """Launch the backward kernel, writing ``dz`` into ``out3d`` (may be ``logits3d`` itself)."""
    from .kernels.token_logprobs_entropy import _token_logprobs_entropy_bwd, backward_launch_config

    A, B, V = logits3d.shape
    if A * B == 0:
        return out3d
    block, num_warps = backward_launch_config(V, logits3d.element_size())
    with _on_device(logits3d):
        _token_logprobs_entropy_bwd[(A * B, triton.cdiv(V, block))](
            logits3d, targets, stats.m, stats.log_S, stats.H,
            g_logp if g_logp is not None else stats.H,  # placeholder pointer, never read
            g_H if g_H is not None else stats.H,
            out3d,
            B, V,
            logits3d.stride(0), logits3d.stride(1), logits3d.stride(2),
            out3d.stride(0), out3d.stride(1), out3d.stride(2),
            params.inv_tau, params.ignore_index,
            BLOCK=block, HAS_GRAD_LOGP=g_logp is not None, HAS_GRAD_ENTROPY=g_H is not None,
            num_warps=num_warps,
        )
    return out3d


# ---------------------------------------------------------------- CPU (chunked torch)
def _row_blocks(logits3d: torch.Tensor):
    """Yield ``(flat_start, block [n, V])`` views covering the rows, ``n * V <= CPU_BLOCK_ELEMENTS``."""
    A, B, V = logits3d.shape
    rows = max(1, CPU_BLOCK_ELEMENTS // max(V, 1))
    for a in range(A):
        for b0 in range(0, B, rows):
            yield a * B + b0, logits3d[a, b0:b0 + rows]


def _target_guard(targets: torch.Tensor, V: int, ignore_index: int):
    """``(keep, ok, safe)``: kept rows, kept rows with an id in ``[0, V)``, ids safe to gather (0 elsewhere).

    Kept rows that are not ``ok`` get NaN outputs and gradients, as in the kernels' guard.
    """
    keep = targets != ignore_index
    ok = keep & (targets >= 0) & (targets < V)
    return keep, ok, torch.where(ok, targets, 0)


def token_forward_torch(logits3d: torch.Tensor, targets: torch.Tensor, params: TokenOpParams, out=None):
    """CPU forward: same outputs as :func:`token_forward_triton`; extra memory ``O(block)``."""
    A, B, V = logits3d.shape
    out_dtype = torch.float64 if logits3d.dtype == torch.float64 else torch.float32
    logp, H, m, log_S = _forward_outputs(A * B, out_dtype, logits3d.device, out)
    keep, ok, safe_targets = _target_guard(targets, V, params.ignore_index)
    for start, z in _row_blocks(logits3d):
        sl = slice(start, start + z.shape[0])
        z_y = z.gather(1, safe_targets[sl].unsqueeze(1)).view(-1).to(out_dtype) * params.inv_tau
        stats = softmax_stats.block_stats_(softmax_stats.scaled_block(z, params.inv_tau))
        m[sl], log_S[sl], H[sl], logp[sl] = stats.m, stats.log_S, stats.H, stats.logprob(z_y)
    H.masked_fill_(torch.isneginf(log_S), float("nan"))  # no finite logit: no entropy (as the kernel)
    for t in (logp, H, m, log_S):  # ignored rows: 0 for every output; guarded rows: NaN
        t.masked_fill_(keep & ~ok, float("nan")).masked_fill_(~keep, 0.0)
    return logp, H, m, log_S


def _zero_ignored_rows_(dz: torch.Tensor, keep: torch.Tensor) -> None:
    """Exactly zero gradient on ignored rows, whatever their logits hold (NaN and inf included)."""
    if dz.device.type == "cpu" and bool(keep.all()):  # reading a CPU mask costs no synchronization
        return
    dz.masked_fill_(~keep.unsqueeze(1), 0.0)


def token_backward_torch(logits3d, targets, stats: RowStats, g_logp, g_H, params: TokenOpParams, out3d):
    """CPU backward: writes ``dz`` block by block into ``out3d`` (may be ``logits3d`` itself)."""
    keep, _, safe_targets = _target_guard(targets, logits3d.shape[-1], params.ignore_index)
    # Ignored rows carry zeroed statistics; m = +inf makes p = 0 there (exp(s - 0) could overflow).
    stats = RowStats(torch.where(keep, stats.m, float("inf")), stats.log_S, stats.H)
    if g_logp is not None:
        g_logp = torch.where(keep, g_logp, 0.0)
    if g_H is not None:
        g_H = torch.where(keep, g_H, 0.0)
    B = logits3d.shape[1]
    for start, z in _row_blocks(logits3d):
        n = z.shape[0]
        sl = slice(start, start + n)
        dz = softmax_stats.block_grad_(
            softmax_stats.scaled_block(z, params.inv_tau),
            safe_targets[sl], RowStats(stats.m[sl], stats.log_S[sl], stats.H[sl]),
            None if g_logp is None else g_logp[sl],
            None if g_H is None else g_H[sl],
            params.inv_tau,
        )
        _zero_ignored_rows_(dz, keep[sl])
        a, b0 = divmod(start, B)
        out3d[a, b0:b0 + n].copy_(dz)
    return out3d


# ---------------------------------------------------------------- autograd
class TokenLogprobsEntropy(torch.autograd.Function):
    """``(logits [..., V], targets [...]) -> (logp [...], H [...])``, fp32; see the module docstring.

    First-order only (``first_order_only``): a second derivative through it (``create_graph=True``
    then another ``grad``) raises ``RuntimeError`` instead of returning silent zeros.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, params: TokenOpParams):
        logits3d = as_rows3d(logits)
        flat_targets = widen_targets(targets)
        forward = token_forward_triton if params.backend == "triton" else token_forward_torch
        logp, H, m, log_S = forward(logits3d, flat_targets, params)
        if params.check_values:
            check_finite_rows(m + log_S, flat_targets != params.ignore_index, "logits", rows=logits3d,
                              temperature=params.temperature)
        ctx.save_for_backward(logits, flat_targets, m, log_S, H)
        ctx.params = params
        lead = logits.shape[:-1]
        return logp.view(lead), H.view(lead)

    @staticmethod
    @first_order_only("token_logprobs_and_entropy")
    def backward(ctx, grad_logp, grad_H):
        logits, flat_targets, m, log_S, H = ctx.saved_tensors
        params: TokenOpParams = ctx.params
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_H is None):
            return None, None, None
        g_logp = None if grad_logp is None else grad_logp.reshape(-1).to(H.dtype).contiguous()
        g_H = None if grad_H is None else grad_H.reshape(-1).to(H.dtype).contiguous()
        logits3d = as_rows3d(logits)
        in_place = params.inplace_backward and logits3d.data_ptr() == logits.data_ptr()  # a view, not a copy
        if in_place:
            out, out3d = logits, logits3d
        else:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            out3d = as_rows3d(out)
        backward = token_backward_triton if params.backend == "triton" else token_backward_torch
        with torch.no_grad():
            backward(logits3d, flat_targets, RowStats(m, log_S, H), g_logp, g_H, params, out3d)
        if in_place and params.backend == "triton":
            # The kernel wrote through a raw pointer: tell autograd, so that any other node that
            # saved these logits fails its version check instead of reading the gradient as logits.
            # (The torch path writes with copy_, which bumps the version itself.)
            torch.autograd.graph.increment_version(logits)
        return out, None, None


# ---------------------------------------------------------------- public functionals
def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = True,
    inplace_backward: bool = False,
    backend: str = "auto",
    validate="auto",
):
    """Per-token log-prob of ``targets`` and entropy of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` fp32, bf16 or fp16 (fp64 on the CPU path), any strides.
        targets: ``[...]`` integer ids in ``[0, V)``, or ``ignore_index``.
        temperature: ``tau > 0``; the op sees ``logits / tau``.
        ignore_index: positions with this target give 0 for both outputs and get zero gradient.
        return_entropy: when False the second output is ``None`` (the kernel is the same).
        inplace_backward: write ``d loss / d logits`` into the logits' own buffer in
            backward, saving one ``[..., V]`` allocation. This *destroys the logits*: the
            write bumps their autograd version, so another node that saved them raises
            autograd's "modified by an inplace operation" error instead of reading the
            gradient. Refused (``ValueError``) for a leaf that requires grad and for logits
            whose elements may overlap in memory (``expand``-ed or overlapping strides).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch on CPU; ``ENTROPY_OPS_BACKEND``
            overrides), ``"triton"`` or ``"torch"``.
        validate: the checks that read tensor data (targets in range, a finite logit in
            every kept row, ``logits / temperature`` within fp32), which synchronize with
            the host on CUDA. ``True``: always; ``False``: never; ``"auto"`` (default): on
            CPU tensors only. Without them a bad target (outside ``[0, V)`` and not
            ``ignore_index``) is never read: its row gives NaN outputs and a NaN gradient,
            as does a kept row with no finite logit. Shape, dtype and device checks always run.

    Returns:
        ``(logp, entropy)``, fp32 ``[...]``: ``logp = s_y - logsumexp(s)``,
        ``entropy = logsumexp(s) - sum_i softmax(s)_i s_i`` with ``s = logits / tau``.
        Gradient: ``dz_i = (g_logp (1[i=y] - p_i) - g_H p_i (log p_i + H)) / tau``.

    Raises ``ValueError`` (with the value checks on) for a target out of range, a non-ignored
    row with no finite logit, or a ``temperature`` that makes the scaled logits overflow fp32.
    """
    check_float_tensor("logits", logits)
    temperature = check_temperature(temperature)
    check_values = value_checks_enabled(validate, logits.device)
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, logits.device, validate=check_values)
    resolved = resolve_backend(backend, logits.device)
    if resolved == "triton" and logits.dtype == torch.float64:
        raise TypeError("logits must be fp32, bf16 or fp16 on the Triton backend, got torch.float64")
    if inplace_backward:
        check_inplace_logits(logits)
    params = TokenOpParams(temperature, ignore_index, resolved, bool(inplace_backward), check_values)
    logp, H = TokenLogprobsEntropy.apply(logits, targets, params)
    return logp, (H if return_entropy else None)


def check_inplace_logits(logits: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient into ``logits``: they must be a non-leaf (or not
    require grad) and their elements must not share memory (else rows would overwrite each other)."""
    if logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_backward=True would overwrite a leaf tensor that requires grad (its .grad would "
                         "alias its data); pass the output of the lm_head (a non-leaf) or inplace_backward=False")
    if may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose elements do not overlap in memory, got shape "
            f"{tuple(logits.shape)} with strides {logits.stride()} (an expand()-ed or overlapping view); "
            "pass logits.contiguous() or inplace_backward=False"
        )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-token log-prob only; same kernels and arguments as :func:`token_logprobs_and_entropy`."""
    return token_logprobs_and_entropy(logits, targets, return_entropy=False, **kwargs)[0]


def token_entropy(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-token entropy of ``softmax(logits / temperature)``, ``[...]`` fp32; same kernels as
    :func:`token_logprobs_and_entropy` (accepts its keyword arguments except ``ignore_index``)."""
    check_float_tensor("logits", logits)
    if "ignore_index" in kwargs:
        raise TypeError("token_entropy() takes no ignore_index: every position has an entropy")
    targets = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return token_logprobs_and_entropy(logits, targets, **kwargs)[1]
