"""Op 3: the full policy-loss step from hidden states (GRPO preset).

``hidden [B, T, D]`` and ``W [V, D]`` give per-token ``logp`` (and ``H``); the loss
is GRPO's clipped surrogate (``eps_low = eps_high = 0.2``, no KL) with per-response
token means averaged over responses, against fixed old log-probs and per-response
advantages; backward gives ``dh`` and ``dW``. The vocab work is the hidden-state
op's (``2*N*D*V`` FLOPs forward, ``8*N*D*V`` forward + backward) and the rest is
O(N), so the target is to stay within 5% of the hidden-state op alone.

``B x T``: ``T = 1024`` when ``N`` is a multiple of it (Liger's GRPO benchmark uses
T=1024), else one response of ``N`` tokens. Every token is valid.

Implementations:

- ``ours``: ``entropy_ops.policy_loss.policy_loss(config="grpo")`` on the hidden-state path
  (loss and metrics, entropy mean included).
- ``naive``: the naive hidden-state op, then the loss in PyTorch (plus the mean entropy).
- ``torch-compile``: ``torch.compile`` of ``naive``.
- ``liger-grpo``: ``LigerFusedLinearGRPOLoss(loss_type="grpo", beta=0, use_ref_model=False)``
  (chunked PyTorch, one response per chunk; ``compiled=True``, its default, on CUDA and
  ``False`` on CPU, where compiling costs minutes). Loss and clip metrics, no entropy.
"""
from __future__ import annotations

import math

import torch

from . import Impl, Out, compiled, plain, probe_import, raise_recompile_limits, randn, random_targets
from .linear import LOGIT_STD, no_softcap
from .linear import naive as naive_linear

GRAD_INPUTS = ("hidden", "weight")
SEQ_LEN = 1024
EPS_LOW = EPS_HIGH = 0.2  # the "grpo" preset of entropy_ops.policy_loss and Liger's defaults


def batch_shape(n_tokens: int) -> tuple[int, int]:
    """``(B, T)`` for ``N`` tokens (see the module docstring)."""
    if n_tokens >= SEQ_LEN and n_tokens % SEQ_LEN == 0:
        return n_tokens // SEQ_LEN, SEQ_LEN
    return 1, n_tokens


def make_inputs(shape, dtype, device, requires_grad, gen):
    """Hidden states, weight, targets, an all-true mask, advantages ``[B]`` and old log-probs ``[B, T]``
    near ``-log V`` (ratios around 1, so both clip branches occur)."""
    (b, t), v, d = batch_shape(shape.n_tokens), shape.vocab, shape.hidden
    return {
        "hidden": randn((b, t, d), dtype, device, gen).requires_grad_(requires_grad),
        "weight": randn((v, d), dtype, device, gen, LOGIT_STD / math.sqrt(d)).requires_grad_(requires_grad),
        "targets": random_targets(b * t, v, device, gen).view(b, t),
        "mask": torch.ones((b, t), dtype=torch.bool, device=device),
        "advantages": randn((b,), torch.float32, device, gen),
        "old_logprobs": randn((b, t), torch.float32, device, gen, 0.5) - (math.log(v) + LOGIT_STD**2 / 2),
        "softcap": shape.softcap,
    }


def work(shape, dtype, mode):
    """The hidden-state op's matmul FLOPs (the loss itself is O(N))."""
    b, t = batch_shape(shape.n_tokens)
    factor = 2 if mode == "fwd" else 8
    return "flops", factor * b * t * shape.hidden * shape.vocab


# ---------------------------------------------------------------- ours
def _probe_ours() -> str | None:
    """The policy loss needs its own module and, on the hidden-state path, the linear op."""
    return (probe_import("entropy_ops.policy_loss", "policy_loss")()
            or probe_import("entropy_ops.linear_ops", "linear_logprobs_and_entropy")())


def _ours(inp, train):
    from entropy_ops.policy_loss import policy_loss

    loss, metrics = policy_loss(targets=inp["targets"], mask=inp["mask"], advantages=inp["advantages"],
                                hidden=inp["hidden"], weight=inp["weight"], old_logprobs=inp["old_logprobs"],
                                config="grpo", logit_softcap=inp["softcap"])
    return Out(loss=loss)


# ---------------------------------------------------------------- naive and compiled
def naive(hidden, weight, targets, mask, advantages, old_logprobs, softcap: float | None):
    """GRPO loss on top of the naive hidden-state op; returns ``(loss, mean entropy)``."""
    b, t, d = hidden.shape
    logp, H = naive_linear(hidden.reshape(b * t, d), weight, targets.reshape(-1), softcap)
    logp, H = logp.view(b, t), H.view(b, t)
    m = mask.float()
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages.unsqueeze(-1)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - EPS_LOW, 1.0 + EPS_HIGH))
    loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    return loss, (H.detach() * m).sum() / m.sum().clamp(min=1.0)


def _naive_fn(core):
    def fn(inp, train):
        loss, _ = core(inp["hidden"], inp["weight"], inp["targets"], inp["mask"], inp["advantages"],
                       inp["old_logprobs"], inp["softcap"])
        return Out(loss=loss)

    return fn


def _compiled_build(device):
    return _naive_fn(compiled(naive)(device))


# ---------------------------------------------------------------- peers
def _liger_build(device):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    if device.type == "cuda":
        raise_recompile_limits()  # Liger compiles its per-chunk function: one graph per shape
    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="grpo", epsilon_low=EPS_LOW,
                                      epsilon_high=EPS_HIGH, compiled=device.type == "cuda")

    def fn(inp, train):
        loss, _metrics = module(inp["hidden"], inp["weight"], inp["targets"], inp["mask"].float(),
                                inp["advantages"], old_per_token_logps=inp["old_logprobs"])
        return Out(loss=loss)

    return fn


def _liger_variant(device) -> str:
    return "compiled=True (torch.compile)" if device.type == "cuda" else "compiled=False (eager chunked torch)"


IMPLS = (
    Impl("ours", "policy", "loss+metrics+entropy", "entropy_ops.policy_loss.policy_loss(config='grpo'), hidden path",
         plain(_ours), _probe_ours, ours=True),
    Impl("naive", "policy", "loss+entropy", "naive hidden-state op + GRPO loss in PyTorch",
         plain(_naive_fn(naive)), reference=True),
    Impl("torch-compile", "policy", "loss+entropy", "torch.compile(naive), static shapes",
         _compiled_build, opt_in_on=("cpu",)),
    Impl("liger-grpo", "policy", "loss+metrics",
         "LigerFusedLinearGRPOLoss(loss_type='grpo', beta=0): chunked torch, no entropy",
         _liger_build, probe_import("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss"),
         variant=_liger_variant, supports=no_softcap),
)
