"""Op 1: per-token log-prob and entropy from ``[N, V]`` logits.

``logp = log_softmax(z)[y]``, ``H = -sum_i p_i log p_i`` (fp32), backward with
upstream ``(g_logp, g_H)`` writes ``dz`` ``[N, V]``. Memory-bound: forward reads
the logits once, backward reads them once and writes ``dz`` once, so the work is
``N*V*elem`` bytes forward and ``3*N*V*elem`` forward + backward.

Implementations:

- ``ours``: ``entropy_ops.token_logprobs_and_entropy`` (Triton on CUDA, the chunked
  PyTorch path on CPU); ``ours-inplace``: the same with ``inplace_backward=True``
  (``dz`` overwrites the logits buffer; later calls run on recycled values).
- ``naive``: fp32 upcast, full ``log_softmax``, gather, ``-(p * log p).sum()``.
- ``torch-compile``: ``torch.compile`` of ``naive``.
- ``liger-ce``: Liger-Kernel cross-entropy, ``reduction="none"``; log-prob only
  (``logp = -loss``). Its forward writes the gradient into the logits when they
  require grad.
- ``flash-attn-ce``: flash-attn's Triton cross-entropy (verl's CUDA log-prob path); log-prob only.
- ``trl``: TRL's ``selective_log_softmax`` + ``entropy_from_logits`` (two passes; on CUDA
  each dispatches to TRL's own fused Triton kernel, on CPU to chunked PyTorch).
- ``trl-fused``: ``trl.kernels.selective_log_softmax_and_entropy``, one fused Triton pass (CUDA).
- ``verl``: verl's ``logprobs_from_logits`` + ``entropy_from_logits_with_chunking`` when verl
  imports; otherwise (as here: verl needs ray and tensordict) ``verl-math``, our
  re-implementation of their documented math: log-prob ``z_y - logsumexp(z)`` one row
  at a time (fp32; bf16 rows through ``log_softmax``), entropy ``logsumexp(z) -
  sum softmax(z) z`` on fp32 chunks of 2048 rows.
"""
from __future__ import annotations

import torch

from . import Impl, Out, compiled, plain, probe_import, randn, random_targets

GRAD_INPUTS = ("logits",)
# Standard deviation of the synthetic logits: a spread like a trained LM head's
# (the top token holds a few percent of the mass at V=32k), not a flat softmax.
LOGIT_STD = 3.0


def make_inputs(shape, dtype, device, requires_grad, gen):
    """``logits [N, V]`` in ``dtype``, ``targets [N]``, upstream grads ``g_logp, g_H [N]`` fp32."""
    n, v = shape.n_tokens, shape.vocab
    logits = randn((n, v), dtype, device, gen, LOGIT_STD).requires_grad_(requires_grad)
    return {
        "logits": logits,
        "targets": random_targets(n, v, device, gen),
        "g_logp": randn((n,), torch.float32, device, gen),
        "g_H": randn((n,), torch.float32, device, gen),
    }


def work(shape, dtype, mode):
    """Bytes the op must move: the logits once forward; + read again and write ``dz`` backward."""
    elem = torch.empty((), dtype=dtype).element_size()
    passes = 1 if mode == "fwd" else 3
    return "bytes", passes * shape.n_tokens * shape.vocab * elem


# ---------------------------------------------------------------- ours
def _ours(inplace: bool):
    def fn(inp, train):
        from entropy_ops import token_logprobs_and_entropy

        logits = inp["logits"]
        if inplace and logits.requires_grad:
            # In training the logits are the lm_head's output, a non-leaf; the op refuses to overwrite a
            # leaf that requires grad. A view of the leaf is a non-leaf over the same memory (no copy).
            logits = logits.view_as(logits)
        logp, H = token_logprobs_and_entropy(logits, inp["targets"], inplace_backward=inplace)
        return Out(logp=logp, entropy=H)

    return fn


# ---------------------------------------------------------------- naive and compiled
def naive(logits: torch.Tensor, targets: torch.Tensor):
    """fp32 upcast, full log-softmax, gather, and the entropy from the full softmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


def _naive_fn(core):
    def fn(inp, train):
        logp, H = core(inp["logits"], inp["targets"])
        return Out(logp=logp, entropy=H)

    return fn


def _compiled_build(device):
    return _naive_fn(compiled(naive)(device))


# ---------------------------------------------------------------- peers
def _liger_ce(inp, train):
    from liger_kernel.transformers.functional import liger_cross_entropy

    return Out(logp=-liger_cross_entropy(inp["logits"], inp["targets"], reduction="none"))


def _flash_ce(inp, train):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    losses, _ = cross_entropy_loss(inp["logits"], inp["targets"])
    return Out(logp=-losses)


def _trl(inp, train):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = inp["logits"]
    return Out(logp=selective_log_softmax(logits, inp["targets"]), entropy=entropy_from_logits(logits))


def _trl_fused(inp, train):
    from trl.kernels import selective_log_softmax_and_entropy

    logp, H = selective_log_softmax_and_entropy(inp["logits"], inp["targets"])
    return Out(logp=logp, entropy=H)


def _verl_available() -> bool:
    return probe_import("verl.utils.torch_functional", "logprobs_from_logits",
                        "entropy_from_logits_with_chunking")() is None


def verl_math_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """verl's documented log-prob math, re-implemented: ``z_y - logsumexp(z)`` row by row
    for fp32 (one row's temporaries at a time), ``log_softmax`` row by row for 16-bit."""
    if logits.dtype in (torch.float32, torch.float64):
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    return torch.stack([torch.log_softmax(row, dim=-1)[t] for row, t in zip(logits, targets)])


def verl_math_entropy(logits: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """verl's documented chunked entropy math, re-implemented: per fp32 chunk of rows,
    ``logsumexp(z) - sum(softmax(z) * z)``."""
    parts = []
    for chunk in logits.split(chunk_rows, dim=0):
        z = chunk.float()
        parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.cat(parts)


def _verl_variant(device) -> str:
    if _verl_available():
        return "verl.utils.torch_functional (installed)"
    return "verl-math: re-implemented here from verl's documented math (verl does not import: " + \
        str(probe_import("verl.utils.torch_functional")()) + ")"


def _verl(inp, train):
    logits, targets = inp["logits"], inp["targets"]
    if _verl_available():
        from verl.utils.torch_functional import entropy_from_logits_with_chunking, logprobs_from_logits

        return Out(logp=logprobs_from_logits(logits, targets), entropy=entropy_from_logits_with_chunking(logits))
    return Out(logp=verl_math_logprobs(logits, targets), entropy=verl_math_entropy(logits))


IMPLS = (
    Impl("ours", "logits", "logp+entropy", "entropy_ops.token_logprobs_and_entropy (Triton on CUDA, chunked torch on CPU)",
         plain(_ours(False)), probe_import("entropy_ops", "token_logprobs_and_entropy"), ours=True),
    Impl("ours-inplace", "logits", "logp+entropy", "ours with inplace_backward=True (dz overwrites the logits)",
         plain(_ours(True)), probe_import("entropy_ops", "token_logprobs_and_entropy"), ours=True,
         modes=("fwd_bwd",)),
    Impl("naive", "logits", "logp+entropy", "fp32 upcast, full log_softmax + softmax entropy",
         plain(_naive_fn(naive)), reference=True),
    Impl("torch-compile", "logits", "logp+entropy", "torch.compile(naive), static shapes",
         _compiled_build, opt_in_on=("cpu",)),
    Impl("liger-ce", "logits", "logp", "Liger-Kernel cross_entropy, reduction='none' (log-prob only)",
         plain(_liger_ce), probe_import("liger_kernel.transformers.functional", "liger_cross_entropy"),
         needs_cuda=True),
    Impl("flash-attn-ce", "logits", "logp", "flash-attn Triton cross_entropy_loss (log-prob only)",
         plain(_flash_ce), probe_import("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss"),
         needs_cuda=True),
    Impl("trl", "logits", "logp+entropy",
         "TRL selective_log_softmax + entropy_from_logits (2 passes; CUDA: TRL's Triton kernel, CPU: chunked torch)",
         plain(_trl), probe_import("trl.trainer.utils", "selective_log_softmax", "entropy_from_logits")),
    Impl("trl-fused", "logits", "logp+entropy", "trl.kernels.selective_log_softmax_and_entropy (one Triton pass)",
         plain(_trl_fused), probe_import("trl.kernels", "selective_log_softmax_and_entropy"), needs_cuda=True),
    Impl("verl", "logits", "logp+entropy",
         "verl logprobs_from_logits + entropy_from_logits_with_chunking if verl imports, else verl-math: "
         "our re-implementation of their documented math (row-wise logsumexp; 2048-row fp32 chunks)",
         plain(_verl), variant=_verl_variant),
)
