"""Op 2: per-token log-prob and entropy from hidden states and the lm-head weight.

``z = h @ W^T`` (``h [N, D]``, ``W [V, D]``, optional soft-cap ``c tanh(z / c)``),
then the logits op's ``logp`` and ``H``; backward gives ``dh`` and ``dW``.
Matmul-bound: ``2*N*D*V`` FLOPs forward; forward + backward recomputes the
logits and runs the ``dh`` and ``dW`` matmuls, ``8*N*D*V`` (TARGETS.md).

Implementations:

- ``ours``: ``entropy_ops.linear_ops.linear_logprobs_and_entropy``.
- ``naive``: ``h @ W^T`` in the input dtype, fp32 upcast, then the naive logits op
  (holds ``[N, V]`` logits, their fp32 copy and the log-softmax).
- ``torch-compile``: ``torch.compile`` of ``naive``.
- ``liger-flce``: Liger-Kernel fused linear cross-entropy; log-prob only. Forward
  mode uses ``reduction="none"``; fwd+bwd uses ``reduction="sum"`` because its
  backward takes only a scalar upstream gradient (it computes the gradients during
  the forward).
- ``liger-scaled-ce``: ``liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction``
  with ``return_entropy=True``: Liger's Hopper (sm90) CuTe kernel, elsewhere (CPU
  included) Liger's chunked PyTorch fallback adapted from verl's FusedLinearForPPO.
  No soft-cap.
- ``cce``: Cut Cross-Entropy ``linear_cross_entropy(reduction="none")``; log-prob
  only; its default gradient filtering (``filter_eps="high"``) is on.
- ``trl-chunked``: ``trl.kernels.ChunkedLogProbFunction`` with the entropy output and
  TRL's default vocab chunk (32768): cuBLAS tiles folded by a Triton kernel on CUDA,
  by PyTorch on CPU.
"""
from __future__ import annotations

import math

import torch

from . import Impl, Out, compiled, plain, probe_import, randn, random_targets
from .logits import LOGIT_STD
from .logits import naive as naive_from_logits

GRAD_INPUTS = ("hidden", "weight")
TRL_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16


def make_inputs(shape, dtype, device, requires_grad, gen):
    """``hidden [N, D]`` ~ N(0, 1), ``weight [V, D]`` scaled so the logits have std ``LOGIT_STD``."""
    n, v, d = shape.n_tokens, shape.vocab, shape.hidden
    return {
        "hidden": randn((n, d), dtype, device, gen).requires_grad_(requires_grad),
        "weight": randn((v, d), dtype, device, gen, LOGIT_STD / math.sqrt(d)).requires_grad_(requires_grad),
        "targets": random_targets(n, v, device, gen),
        "g_logp": randn((n,), torch.float32, device, gen),
        "g_H": randn((n,), torch.float32, device, gen),
        "softcap": shape.softcap,
    }


def work(shape, dtype, mode):
    """Matmul FLOPs: ``2 N D V`` forward, ``8 N D V`` forward + backward."""
    factor = 2 if mode == "fwd" else 8
    return "flops", factor * shape.n_tokens * shape.hidden * shape.vocab


def no_softcap(shape, dtype) -> str | None:
    return "no logit soft-cap support" if shape.softcap is not None else None


# ---------------------------------------------------------------- ours
def _ours(inp, train):
    from entropy_ops.linear_ops import linear_logprobs_and_entropy

    logp, H = linear_logprobs_and_entropy(inp["hidden"], inp["weight"], inp["targets"],
                                          logit_softcap=inp["softcap"], return_entropy=True)
    return Out(logp=logp, entropy=H)


# ---------------------------------------------------------------- naive and compiled
def naive(hidden, weight, targets, softcap: float | None):
    """Materialize ``h @ W^T``, upcast, optional soft-cap, then the naive logits op."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return naive_from_logits(logits, targets)


def _naive_fn(core):
    def fn(inp, train):
        logp, H = core(inp["hidden"], inp["weight"], inp["targets"], inp["softcap"])
        return Out(logp=logp, entropy=H)

    return fn


def _compiled_build(device):
    return _naive_fn(compiled(naive)(device))


# ---------------------------------------------------------------- peers
def _liger_flce(inp, train):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    reduction = "sum" if train else "none"
    nll = liger_fused_linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"],
                                           reduction=reduction, softcap=inp["softcap"])
    return Out(loss=nll) if train else Out(logp=-nll)


def _liger_scaled(inp, train):
    from liger_kernel.ops import LigerFusedLinearScaledCrossEntropyFunction as Fn

    nll, H = Fn.apply(inp["hidden"], inp["weight"], inp["targets"], 1.0, -100, 1, True)
    return Out(logp=-nll, entropy=H)


def _liger_scaled_variant(device) -> str:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and torch.version.hip is None:
        return "sm90 CuTe DSL kernel"
    return "chunked PyTorch fallback (Liger's adaptation of verl's FusedLinearForPPO)"


def _cce(inp, train):
    from cut_cross_entropy import linear_cross_entropy

    nll = linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"], reduction="none",
                               softcap=inp["softcap"])
    return Out(logp=-nll)


def _trl_chunked(inp, train):
    from trl.kernels import ChunkedLogProbFunction

    logp, H, *_ = ChunkedLogProbFunction.apply(inp["hidden"], inp["weight"], None, inp["targets"], 1.0,
                                               TRL_CHUNK, inp["softcap"], 1.0, ("entropy",))
    return Out(logp=logp, entropy=H)


def _trl_variant(device) -> str:
    return "cuBLAS tiles + Triton fold" if device.type == "cuda" else "torch matmul tiles + torch fold (CPU)"


IMPLS = (
    Impl("ours", "linear", "logp+entropy", "entropy_ops.linear_ops.linear_logprobs_and_entropy",
         plain(_ours), probe_import("entropy_ops.linear_ops", "linear_logprobs_and_entropy"), ours=True),
    Impl("naive", "linear", "logp+entropy", "h @ W^T, fp32 upcast, full log_softmax + softmax entropy",
         plain(_naive_fn(naive)), reference=True),
    Impl("torch-compile", "linear", "logp+entropy", "torch.compile(naive), static shapes",
         _compiled_build, opt_in_on=("cpu",)),
    Impl("liger-flce", "linear", "logp",
         "Liger fused linear cross-entropy (log-prob only; fwd+bwd via reduction='sum', its backward is scalar-only)",
         plain(_liger_flce), probe_import("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
         needs_cuda=True),
    Impl("liger-scaled-ce", "linear", "logp+entropy",
         "Liger fused linear scaled CE with return_entropy (sm90: CuTe kernel; else torch fallback from verl)",
         plain(_liger_scaled), probe_import("liger_kernel.ops", "LigerFusedLinearScaledCrossEntropyFunction"),
         variant=_liger_scaled_variant, supports=no_softcap),
    Impl("cce", "linear", "logp", "Cut Cross-Entropy linear_cross_entropy, reduction='none' (log-prob only)",
         plain(_cce), probe_import("cut_cross_entropy", "linear_cross_entropy"), needs_cuda=True),
    Impl("trl-chunked", "linear", "logp+entropy",
         f"trl.kernels.ChunkedLogProbFunction, outputs=('entropy',), vocab chunk {TRL_CHUNK}",
         plain(_trl_chunked), probe_import("trl.kernels", "ChunkedLogProbFunction"), variant=_trl_variant),
)
