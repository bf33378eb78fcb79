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

GTPO advantages: the token rewards of ``O+`` and ``O-`` are standardized
**jointly**, over the valid tokens of both sets::

    A_{i,t} = (r_{i,t} - mean) / max(std, std_floor)        mean, std over the valid tokens of O+ and O-

per group (``scope="group"``, default) or over the batch (``scope="batch"``);
``std`` is Bessel-corrected, ``std_floor = 1e-3`` keeps rounding noise from
being blown up. With binary rewards every correct token has ``r+ >= a1`` and
every wrong token ``r- <= -a1``, so the outcome sets the sign of (nearly) every
advantage and the entropy shaping orders tokens within a set. Two details:

- A group whose responses are all correct or all wrong has no outcome signal
  (its token rewards differ only by the entropy shares): its advantages are 0,
  as GRPO's are and as the paper's DAPO baseline drops such groups.
- The joint mean is ``(a1 + a2)(N+ - N-) / N`` over the tokens; it exceeds
  ``a1`` (so a low-entropy correct token could fall below it) only when the
  wrong answers hold fewer than ``a2 / (2 a1 + a2)`` of the tokens (1 in 21
  with the defaults). ``sign_guard=True`` (default) clamps such rare tokens at
  0 (correct: ``A >= 0``; wrong: ``A <= 0``); :meth:`GTPO.step_metrics` logs how
  many tokens it touched and the fraction of correct-answer tokens that were
  negative before it.

``normalization="separate"`` is the *literal reading of the paper's Eq. 6*,
kept only as an opt-in: ``O+`` and ``O-`` each standardized on their own. With
0/1 rewards the ``a1 r_i`` term is then the same for every token of a set and
cancels, so correctness no longer sets any advantage's sign (each set has mean
0); on the embedded task that form collapsed training.

GRPO-S (sequence level) uses the mean token entropy ``Hbar_i`` of each
response and the set sizes ``n = |O+|``, ``m = |O-|`` of the group::

    r+_i =  b1 r_i + b2 n w+_i,   r-_j = -b1 - b2 m w-_j      (shares of Hbar, 1/Hbar as above)
    A_i  = (r_i' - mean_g) / (std_g + eps)                      group-normalized, broadcast to tokens

i.e. GTPO's shaping applied to one "position" per response; both use
:func:`shaped_rewards`. Groups with one outcome only get 0, the std is floored.

Objectives: GTPO trains with the DAPO token-mean clipped loss (``eps_low 0.2``,
``eps_high 0.28``, no KL; ``loss_preset = "dapo"``). GRPO-S trains, by default,
with its **sequence-level** objective (:func:`grpo_s_sequence_loss`): the ratio
of response ``i`` is the arithmetic mean of its token ratios, clipped per
response, and the clipped terms are averaged over responses::

    w_i = (1/|o_i|) sum_t exp(logp_{i,t} - logp_old_{i,t})
    L   = -(1/n) sum_i min(w_i A_i, clip(w_i, 1 - eps_low, 1 + eps_high) A_i)
    dL/dlogp_{i,t} = -(1/n) A_i exp(logp_{i,t} - logp_old_{i,t}) / |o_i|   where the unclipped term is the min, else 0

(``n`` responses with at least one valid token; not GSPO's geometric mean).
``objective="token"`` trains GRPO-S with the DAPO token-level loss instead.
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


NORMALIZATIONS = ("joint", "separate")


def _standardize(x: torch.Tensor, sel: torch.Tensor, std_floor: float) -> torch.Tensor:
    """``(x - mean) / max(std, std_floor)`` over the selected entries of each row of ``[S, N]``; 0 elsewhere."""
    count = sel.sum(dim=-1, keepdim=True).to(x.dtype)
    mean = torch.where(sel, x, 0.0).sum(dim=-1, keepdim=True) / count.clamp_min(1.0)
    dev = torch.where(sel, x - mean, 0.0)
    var = dev.square().sum(dim=-1, keepdim=True) / (count - 1.0).clamp_min(1.0)
    return dev / var.sqrt().clamp_min(std_floor)


def mixed_groups(correct: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` bool: the row's group has both correct and incorrect responses."""
    ok = correct.view(-1, group_size)
    return (ok.any(1) & ~ok.all(1)).repeat_interleave(group_size)


def gtpo_advantages(rewards: torch.Tensor, correct: torch.Tensor, entropy: torch.Tensor,
                    mask: torch.Tensor, group_size: int, *, a1: float = 1.0, a2: float = 0.1,
                    eps: float = 1e-6, scope: str = "group", normalization: str = "joint",
                    std_floor: float = 1e-3, sign_guard: bool = True) -> torch.Tensor:
    """GTPO per-token advantages ``[B, T]`` (0 at masked positions and in one-outcome groups).

    :func:`gtpo_token_rewards`, then ``normalization="joint"`` (default): one standardization over the
    valid tokens of ``O+`` and ``O-`` together, per group (``scope="group"``) or over the batch
    (``scope="batch"``), ``std`` floored at ``std_floor``; ``sign_guard`` then clamps correct tokens
    at ``>= 0`` and wrong tokens at ``<= 0`` (see the module docstring).
    ``normalization="separate"``: the literal Eq. 6 reading, each set standardized on its own.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    std_floor = check_number("std_floor", std_floor, low=0.0, low_open=True)
    token_r = gtpo_token_rewards(rewards, correct, entropy, mask, group_size, a1=a1, a2=a2, eps=eps)
    B, T = mask.shape
    rows = 1 if scope == "batch" else B // group_size
    live = mask & mixed_groups(correct, group_size).unsqueeze(1)
    pos = correct.unsqueeze(1) & live
    neg = ~correct.unsqueeze(1) & live
    x = token_r.view(rows, -1)
    if normalization == "joint":
        adv = _standardize(x, live.view(rows, -1), std_floor).view(B, T)
        if sign_guard:
            adv = torch.where(pos, adv.clamp_min(0.0), torch.where(neg, adv.clamp_max(0.0), adv))
    else:
        adv = (_standardize(x, pos.view(rows, -1), std_floor) + _standardize(x, neg.view(rows, -1), std_floor))
        adv = adv.view(B, T)
    return adv


def entropy_weight_spread(correct: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor,
                          group_size: int, eps: float = 1e-6) -> dict[str, float]:
    """Spread of GTPO's entropy weights ``d_t w+`` (correct tokens) and ``h_t w-`` (wrong tokens) in
    mixed groups: 1 everywhere when every response at a position has the same entropy."""
    B, T = mask.shape
    G = group_size
    live = (mask & mixed_groups(correct, G).unsqueeze(1)).view(-1, G, T)
    ok = correct.view(-1, G, 1)
    H = entropy.float().clamp_min(0.0).view(-1, G, T)
    out = {}
    for name, sel, w in (("pos", ok & live, H + eps), ("neg", ~ok & live, 1.0 / (H + eps))):
        w = torch.where(sel, w, 0.0)
        scaled = w / w.sum(1, keepdim=True).clamp_min(1e-30) * sel.sum(1, keepdim=True)
        values = scaled[sel]
        if values.numel() > 1:
            out[f"gtpo/weight_{name}_std"] = float(values.std())
            out[f"gtpo/weight_{name}_max"] = float(values.max())
    return out


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
                      eps: float = 1e-6, std_floor: float = 1e-3) -> torch.Tensor:
    """GRPO-S advantages ``[B]`` fp32: :func:`grpo_s_rewards` standardized jointly over each group,
    ``(r - mean_g) / max(std_g, std_floor)``; 0 in groups with one outcome only."""
    std_floor = check_number("std_floor", std_floor, low=0.0, low_open=True)
    shaped = grpo_s_rewards(rewards, correct, entropy, mask, group_size, b1=b1, b2=b2, eps=eps)
    r = shaped.view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True).clamp_min(std_floor)
    return torch.where(mixed_groups(correct, group_size), adv.reshape(-1), 0.0).float()


def grpo_s_sequence_loss(logp: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, *, eps_low: float = 0.2, eps_high: float = 0.28):
    """GRPO-S's sequence-level clipped objective of one micro-batch (module docstring).

    Args:
        logp: ``[b, T]`` policy log-probs with gradient; ``old_logprobs`` ``[b, T]`` rollout log-probs.
        advantages: ``[b]`` (one per response; a ``[b, T]`` tensor must be constant per row).
        mask: ``[b, T]`` bool valid tokens; rows with none are left out of the mean.

    Returns ``(loss, metrics)``: the 0-dim loss (mean over responses) and detached diagnostics
    (``seq_ratio_mean``, ``seq_ratio_max``, ``seq_clip_frac``).
    """
    check_mask(mask)
    check_tokens("logp", logp, mask)
    check_tokens("old_logprobs", old_logprobs, mask)
    if advantages.dim() == 2:
        advantages = advantages[:, 0]
    check_rows("advantages", advantages, mask.shape[0])
    lengths = mask.sum(1)
    rows = lengths > 0
    log_ratio = torch.where(mask, logp - old_logprobs.to(logp.dtype), 0.0).clamp(max=20.0)
    w = torch.where(mask, torch.exp(log_ratio), 0.0).sum(1) / lengths.clamp_min(1).to(logp.dtype)
    A = advantages.to(logp.dtype)
    surrogate = torch.minimum(w * A, w.clamp(1.0 - eps_low, 1.0 + eps_high) * A)
    n = rows.sum().clamp_min(1).to(logp.dtype)
    loss = -torch.where(rows, surrogate, 0.0).sum() / n
    wd = w.detach()[rows]
    clipped = ((wd < 1.0 - eps_low) & (A.detach()[rows] < 0)) | ((wd > 1.0 + eps_high) & (A.detach()[rows] > 0))
    metrics = {"seq_ratio_mean": wd.mean() if wd.numel() else torch.tensor(1.0),
               "seq_ratio_max": wd.max() if wd.numel() else torch.tensor(1.0),
               "seq_clip_frac": clipped.float().mean() if wd.numel() else torch.tensor(0.0)}
    return loss, metrics


class GTPO(Algorithm):
    """GTPO: per-token entropy-shaped advantages ``[B, T]`` (:func:`gtpo_advantages`), DAPO loss.

    Options: ``a1`` (1.0), ``a2`` (0.1), ``eps`` (1e-6), ``scope`` ("group" | "batch"),
    ``normalization`` ("joint" | "separate": the literal Eq. 6 reading), ``std_floor`` (1e-3),
    ``sign_guard`` (True).
    """

    name = "gtpo"
    loss_preset = "dapo"

    def __init__(self, *, a1: float = 1.0, a2: float = 0.1, eps: float = 1e-6, scope: str = "group",
                 normalization: str = "joint", std_floor: float = 1e-3, sign_guard: bool = True,
                 **unknown) -> None:
        super().__init__(**unknown)
        self.a1 = check_number("a1", a1)
        self.a2 = check_number("a2", a2)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        self.std_floor = check_number("std_floor", std_floor, low=0.0, low_open=True)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if not isinstance(sign_guard, bool):
            raise TypeError(f"sign_guard must be true or false, got {sign_guard!r}")
        self.scope, self.normalization, self.sign_guard = scope, normalization, sign_guard

    def _advantages(self, batch: RolloutBatch, sign_guard: bool) -> torch.Tensor:
        return gtpo_advantages(batch.rewards, batch.correct, batch.old_entropy, batch.completion_mask,
                               batch.group_size, a1=self.a1, a2=self.a2, eps=self.eps, scope=self.scope,
                               normalization=self.normalization, std_floor=self.std_floor, sign_guard=sign_guard)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return self._advantages(batch, self.sign_guard)

    def step_metrics(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        """The mechanism check: fraction of correct-answer tokens with a negative advantage (after
        and before the sign guard), of wrong-answer tokens with a positive one, the entropy-weight spread."""
        mask = batch.completion_mask
        pos = batch.correct.unsqueeze(1) & mask
        neg = ~batch.correct.unsqueeze(1) & mask
        out = {"gtpo/neg_adv_correct_frac": _frac(advantages < 0, pos),
               "gtpo/pos_adv_wrong_frac": _frac(advantages > 0, neg)}
        if self.normalization == "joint" and self.sign_guard:
            raw = self._advantages(batch, False)
            out["gtpo/neg_adv_correct_frac_unguarded"] = _frac(raw < 0, pos)
            out["gtpo/guard_frac"] = _frac(raw != advantages, mask)
        out.update(entropy_weight_spread(batch.correct, batch.old_entropy, mask, batch.group_size, self.eps))
        return out


def _frac(flags: torch.Tensor, sel: torch.Tensor) -> float:
    n = int(sel.sum())
    return float((flags & sel).sum()) / n if n else 0.0


OBJECTIVES = ("sequence", "token")


class GRPOS(Algorithm):
    """GRPO-S: sequence-level entropy-shaped advantages ``[B]`` (:func:`grpo_s_advantages`).

    Options: ``b1`` (1.0), ``b2`` (0.1), ``eps`` (1e-6), ``std_floor`` (1e-3), ``objective``
    ("sequence": :func:`grpo_s_sequence_loss`, default; "token": the DAPO token-level loss),
    ``eps_low`` (0.2) / ``eps_high`` (0.28) of the sequence objective.
    """

    name = "grpo-s"
    loss_preset = "dapo"
    loss_aggregation = "sequence"

    def __init__(self, *, b1: float = 1.0, b2: float = 0.1, eps: float = 1e-6, std_floor: float = 1e-3,
                 objective: str = "sequence", eps_low: float = 0.2, eps_high: float = 0.28, **unknown) -> None:
        super().__init__(**unknown)
        self.b1 = check_number("b1", b1)
        self.b2 = check_number("b2", b2)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        self.std_floor = check_number("std_floor", std_floor, low=0.0, low_open=True)
        self.eps_low = check_number("eps_low", eps_low, low=0.0, high=1.0)
        self.eps_high = check_number("eps_high", eps_high, low=0.0)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.objective = objective

    @property
    def has_custom_loss(self) -> bool:
        return self.objective == "sequence"

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        return grpo_s_advantages(batch.rewards, batch.correct, batch.old_entropy, batch.completion_mask,
                                 batch.group_size, b1=self.b1, b2=self.b2, eps=self.eps, std_floor=self.std_floor)

    def step_metrics(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        return {"grpo_s/sequence_objective": float(self.objective == "sequence"),
                "grpo_s/neg_adv_correct_frac": _frac((advantages < 0).unsqueeze(1), batch.correct.unsqueeze(1))}

    def loss(self, logp, entropy, mask, ref_logprobs=None, *, advantages=None, old_logprobs=None):
        if advantages is None or old_logprobs is None:
            raise ValueError("the GRPO-S sequence objective needs advantages and old_logprobs")
        return grpo_s_sequence_loss(logp, old_logprobs, advantages, mask, eps_low=self.eps_low,
                                    eps_high=self.eps_high)
