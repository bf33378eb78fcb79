"""GTPO and GRPO-S: entropy-weighted reward shaping (Tan et al., arXiv 2508.04349).

Notation, per group of ``G`` responses to one prompt: ``O+`` the correct
responses (``batch.correct``), ``O-`` the incorrect ones, ``r_i`` the scalar
reward, ``H_{i,t}`` the entropy of the *rollout* policy at position ``t`` of
response ``i`` (``batch.old_entropy``: no gradient, from the pass that gave
``logp_old``). ``O+_t`` / ``O-_t`` are the responses of ``O+`` / ``O-`` that still
have a valid token at ``t``; ``d_t = |O+_t|``, ``h_t = |O-_t|``.

GTPO token rewards (paper Eq. 3 and 5)::

    r+_{i,t} =  a1 r_i + a2 d_t  w+_{i,t},   w+_{i,t} = (H_{i,t} + eps)     / sum_{k in O+_t} (H_{k,t} + eps)
    r-_{j,t} = -a1     - a2 h_t  w-_{j,t},   w-_{j,t} = 1 / (H_{j,t} + eps) / sum_{k in O-_t} 1 / (H_{k,t} + eps)

High-entropy tokens of correct answers earn the larger share of the bonus;
*low*-entropy tokens of wrong answers (confident mistakes) take the larger
share of the penalty. The paper writes ``H / (sum H + eps)``; adding ``eps``
to every entropy instead (a difference of ``O(eps / H)``) makes the shares sum
to exactly 1, so that:

- **Conservation** (paper Prop. 2.2): at every position
  ``sum_{O+_t} r+ = a1 sum_{O+_t} r_i + a2 d_t`` and ``sum_{O-_t} r- = -(a1 + a2) h_t``.
  With ``a1 + a2 = 1`` and binary rewards (``r_i = 1`` on ``O+``) the token
  rewards at each position add up to ``d_t - h_t``, the sum of the sequence
  rewards (+1 / -1) of the responses alive there: entropy only redistributes it.
- **Zero entropy** is well defined: positive shares fall back to uniform when
  every ``H`` at the position is 0; a zero-entropy wrong token takes (nearly)
  the whole penalty share, bounded by ``a2 h_t``.
- **One response alive** at a position: its share is 1 (bonus ``a2`` or penalty ``a2``).
- **A group with no correct (or no incorrect) response** has no ``O+`` (``O-``)
  tokens; the other set is shaped as usual. Entropies are clamped at 0 (an
  fp32 kernel may return ``-1e-7`` for a one-hot row).

GTPO advantages (paper Eq. 6): the ``O+`` token rewards and the ``O-`` token
rewards are standardized *separately*, ``(r - mean) / (std + eps)`` over the
valid tokens of that set (Bessel-corrected ``std``; a set of one token gets 0),
either over the whole batch (``scope="batch"``, the default, as a public verl
fork does) or per group (``scope="group"``); each token takes its own set's
value (the "sum" of the two standardized terms, one of which is zero).
Consequence worth knowing: each set's advantages have mean 0, so the push
between correct and incorrect answers comes only from reward differences
*within* a set (``a1 r_i`` when rewards differ among correct answers) and from
the entropy shaping; ``test_gtpo.py`` pins this property.

GRPO-S (sequence level) uses the mean token entropy ``Hbar_i`` of each
response and the set sizes ``n = |O+|``, ``m = |O-|`` of the group::

    r+_i =  b1 r_i + b2 n w+_i,   r-_j = -b1 - b2 m w-_j      (shares of Hbar, 1/Hbar as above)
    A_i  = (r_i' - mean_g) / (std_g + eps)                      group-normalized, broadcast to tokens

i.e. exactly GTPO's shaping applied to one "position" per response; both use
:func:`shaped_rewards`. Training objective for both (paper): the DAPO token-mean
clipped loss (``eps_low 0.2``, ``eps_high 0.28``, no KL), ``loss_preset = "dapo"``.
"""
from __future__ import annotations

import torch

from ..advantages import grpo_advantages
from ._checks import check_group_size, check_mask, check_number, check_rows, check_tokens, work_dtype
from .base import Algorithm, RolloutBatch

SCOPES = ("batch", "group")


def _check_inputs(rewards, correct, entropy, mask, group_size) -> int:
    check_mask(mask)
    n_rows = mask.shape[0]
    check_rows("rewards", rewards, n_rows)
    check_rows("correct", correct, n_rows, dtype_kind="bool")
    check_tokens("entropy", entropy, mask)
    return check_group_size(group_size, n_rows)


def shaped_rewards(r: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, H: torch.Tensor,
                   a1: float, a2: float, eps: float) -> torch.Tensor:
    """Entropy-shaped rewards on a ``[n, G, L]`` view; shares are taken over dim 1 (the group).

    ``r`` ``[n, G, 1]`` rewards; ``pos`` / ``neg`` ``[n, G, L]`` bool: the response is
    correct / incorrect *and* alive at that slot; ``H`` ``[n, G, L]`` entropies >= 0.
    Returns ``a1 r + a2 d w+`` on ``pos``, ``-a1 - a2 h w-`` on ``neg``, 0 elsewhere.
    """
    tiny = torch.finfo(H.dtype).tiny  # only guards 0/0 where the set is empty (then the share is unused)
    d = pos.sum(dim=1, keepdim=True).to(H.dtype)
    h = neg.sum(dim=1, keepdim=True).to(H.dtype)
    w_pos = torch.where(pos, H + eps, 0.0)
    w_neg = torch.where(neg, 1.0 / (H + eps), 0.0)
    share_pos = w_pos / w_pos.sum(dim=1, keepdim=True).clamp_min(tiny)
    share_neg = w_neg / w_neg.sum(dim=1, keepdim=True).clamp_min(tiny)
    r_pos = a1 * r + a2 * d * share_pos
    r_neg = -a1 - a2 * h * share_neg
    return torch.where(pos, r_pos, torch.where(neg, r_neg, 0.0))


def gtpo_token_rewards(rewards: torch.Tensor, correct: torch.Tensor, entropy: torch.Tensor,
                       mask: torch.Tensor, group_size: int, *, a1: float = 1.0, a2: float = 0.1,
                       eps: float = 1e-6) -> torch.Tensor:
    """GTPO token rewards ``[B, T]`` (fp32, fp64 for fp64 inputs), 0 at masked positions.

    Args:
        rewards: ``[B]`` scalar rewards ``r_i`` (used for correct responses).
        correct: ``[B]`` bool, ``O+`` membership.
        entropy: ``[B, T]`` rollout-policy entropies ``H_{i,t}``.
        mask: ``[B, T]`` bool, valid completion tokens.
        group_size: ``G``; rows are grouped contiguously by prompt.
        a1, a2: outcome weight and entropy-bonus weight (paper: 1 and 0.1).
        eps: added to every entropy (``> 0``); see the module docstring.
    """
    G = _check_inputs(rewards, correct, entropy, mask, group_size)
    a1 = check_number("a1", a1)
    a2 = check_number("a2", a2)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    B, T = mask.shape
    dtype = work_dtype(rewards, entropy)
    alive = mask.view(-1, G, T)
    ok = correct.view(-1, G, 1)
    out = shaped_rewards(
        rewards.to(dtype).view(-1, G, 1), ok & alive, ~ok & alive,
        entropy.to(dtype).clamp_min(0.0).view(-1, G, T), a1, a2, eps,
    )
    return out.view(B, T)


def _standardize(x: torch.Tensor, sel: torch.Tensor, eps: float) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the selected entries of each row of ``[S, N]``; 0 elsewhere."""
    count = sel.sum(dim=-1, keepdim=True).to(x.dtype)
    mean = torch.where(sel, x, 0.0).sum(dim=-1, keepdim=True) / count.clamp_min(1.0)
    dev = torch.where(sel, x - mean, 0.0)
    var = dev.square().sum(dim=-1, keepdim=True) / (count - 1.0).clamp_min(1.0)
    return dev / (var.sqrt() + eps)


def gtpo_advantages(rewards: torch.Tensor, correct: torch.Tensor, entropy: torch.Tensor,
                    mask: torch.Tensor, group_size: int, *, a1: float = 1.0, a2: float = 0.1,
                    eps: float = 1e-6, scope: str = "batch") -> torch.Tensor:
    """GTPO per-token advantages ``[B, T]``: :func:`gtpo_token_rewards`, then the ``O+`` and
    ``O-`` tokens standardized separately over the batch (``scope="batch"``) or per group
    (``scope="group"``), each token taking its own set's value; 0 at masked positions."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    token_r = gtpo_token_rewards(rewards, correct, entropy, mask, group_size, a1=a1, a2=a2, eps=eps)
    B, T = mask.shape
    rows = 1 if scope == "batch" else B // group_size
    pos = (correct.unsqueeze(1) & mask).view(rows, -1)
    neg = (~correct.unsqueeze(1) & mask).view(rows, -1)
    x = token_r.view(rows, -1)
    adv = _standardize(x, pos, eps) + _standardize(x, neg, eps)
    return adv.view(B, T)


def grpo_s_rewards(rewards: torch.Tensor, correct: torch.Tensor, entropy: torch.Tensor,
                   mask: torch.Tensor, group_size: int, *, b1: float = 1.0, b2: float = 0.1,
                   eps: float = 1e-6) -> torch.Tensor:
    """GRPO-S shaped sequence rewards ``[B]`` from the mean token entropy of each response.

    ``Hbar_i = sum_t H_{i,t} m_{i,t} / max(sum_t m_{i,t}, 1)`` (an empty response has
    ``Hbar = 0``); then the GTPO shaping with one slot per response and the set sizes
    ``n = |O+|``, ``m = |O-|`` of the group (every response counts, empty or not).
    """
    G = _check_inputs(rewards, correct, entropy, mask, group_size)
    b1 = check_number("b1", b1)
    b2 = check_number("b2", b2)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    dtype = work_dtype(rewards, entropy)
    H = torch.where(mask, entropy.to(dtype).clamp_min(0.0), 0.0)
    h_bar = H.sum(dim=1) / mask.sum(dim=1).clamp_min(1).to(dtype)
    ok = correct.view(-1, G, 1)
    out = shaped_rewards(rewards.to(dtype).view(-1, G, 1), ok, ~ok, h_bar.view(-1, G, 1), b1, b2, eps)
    return out.view(-1)


def grpo_s_advantages(rewards: torch.Tensor, correct: torch.Tensor, entropy: torch.Tensor,
                      mask: torch.Tensor, group_size: int, *, b1: float = 1.0, b2: float = 0.1,
                      eps: float = 1e-6) -> torch.Tensor:
    """GRPO-S advantages ``[B]`` fp32: :func:`grpo_s_rewards` normalized per group, ``(r - mean) / (std + eps)``
    (``entropy_ops.trainers.advantages.grpo_advantages``; needs ``group_size >= 2``)."""
    shaped = grpo_s_rewards(rewards, correct, entropy, mask, group_size, b1=b1, b2=b2, eps=eps)
    return grpo_advantages(shaped, group_size, eps=eps)


class GTPO(Algorithm):
    """GTPO: per-token entropy-shaped advantages ``[B, T]`` (:func:`gtpo_advantages`).

    Options: ``a1`` (1.0), ``a2`` (0.1), ``eps`` (1e-6), ``scope`` ("batch" | "group").
    """

    name = "gtpo"
    loss_preset = "dapo"

    def __init__(self, *, a1: float = 1.0, a2: float = 0.1, eps: float = 1e-6, scope: str = "batch",
                 **unknown) -> None:
        super().__init__(**unknown)
        self.a1 = check_number("a1", a1)
        self.a2 = check_number("a2", a2)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.scope = scope

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return gtpo_advantages(batch.rewards, batch.correct, batch.old_entropy, batch.completion_mask,
                               batch.group_size, a1=self.a1, a2=self.a2, eps=self.eps, scope=self.scope)


class GRPOS(Algorithm):
    """GRPO-S: sequence-level entropy-shaped, group-normalized advantages ``[B]`` (:func:`grpo_s_advantages`).

    Options: ``b1`` (1.0), ``b2`` (0.1), ``eps`` (1e-6).
    """

    name = "grpo-s"
    loss_preset = "dapo"

    def __init__(self, *, b1: float = 1.0, b2: float = 0.1, eps: float = 1e-6, **unknown) -> None:
        super().__init__(**unknown)
        self.b1 = check_number("b1", b1)
        self.b2 = check_number("b2", b2)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return grpo_s_advantages(batch.rewards, batch.correct, batch.old_entropy, batch.completion_mask,
                                 batch.group_size, b1=self.b1, b2=self.b2, eps=self.eps)
