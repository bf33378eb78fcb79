"""Per-token terms of TRL 1.16's ``GRPOTrainer`` loss that entropy-ops' clipped policy loss does not cover.

Each function is a pure tensor function of per-token log-probs (and constants), written from the
formula TRL's ``GRPOTrainer._compute_loss`` computes (TRL 1.16, ``trl/trainer/grpo_trainer.py``) and
from the paper it cites; the tests compare each against TRL's own code. Notation, per response
``i`` and completion position ``t``: ``logp`` the policy log-prob (differentiable), ``old`` the
log-prob of the policy that produced the batch, ``m`` the 0/1 loss mask (completion mask times
tool mask), ``L_i = sum_t m_it``, ``A`` the advantage (``[B, 1]`` per response or ``[B, T]`` per
token), ``w = exp(log_w)`` the importance ratio (token level: ``log_w_it = logp_it - old_it``;
sequence level: ``log_w_i = sum_t m_it (logp_it - old_it) / max(L_i, 1)``), ``sg`` stop-gradient.
Shapes broadcast as in TRL: a ``[B, 1]`` factor applies to every token of its response.

The clipped surrogate of ``loss_type`` grpo / bnpo / dr_grpo / dapo / luspo is not here: it is
:func:`entropy_ops.policy_loss_from_logprobs` (see ``trl_compute``).
"""
from __future__ import annotations

import math

import torch

# TRL's loss_type -> how its per-token loss is summed (see trl_aggregation_weights).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Loss types whose sum is divided by TRL's generation-batch token count instead of by the
# gradient-accumulation steps.
GLOBAL_TOKEN_NORMALIZED = ("cispo", "dapo", "vespo")
_VESPO_LOG_FLOOR = math.log(1e-8)  # VESPO's lower clamp of log-ratios (TRL's value)


def cispo_token_loss(logp, coef, advantages, cap):
    """CISPO (MiniMax-M1, arXiv 2506.13585): ``l_it = -sg(min(w, cap)) A logp_it``.

    ``coef`` is ``w`` (token ``[B, T]`` or sequence ``[B, 1]``), ``cap`` TRL's ``epsilon_high``
    (an upper bound on the raw ratio, not ``1 + eps``). REINFORCE with a truncated, detached
    importance weight: ``d l / d logp_it = -min(w, cap) A``.
    """
    return -coef.clamp(max=cap).detach() * advantages * logp


def sapo_token_loss(coef, advantages, temperature_pos, temperature_neg):
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a sigmoid gate instead of the clip.

    ``l_it = -(4 / tau) sigmoid(tau (w - 1)) A`` with ``tau = temperature_pos`` where ``A > 0`` and
    ``temperature_neg`` otherwise. At ``w = 1`` the gradient equals the unclipped ratio's
    (``d l / d logp = -4 s (1 - s) w A``, ``s = sigmoid(tau (w - 1))``, ``= -w A`` at ``w = 1``)
    and it decays smoothly as ``w`` leaves 1.
    """
    tau = torch.where(advantages > 0, temperature_pos, temperature_neg)
    return -torch.sigmoid(tau * (coef - 1.0)) * 4.0 / tau * advantages


@torch.no_grad()
def vespo_gamma_weights(log_ratio, mask, advantages, importance_sampling_ratio=None, *, k_pos=2.0, lambda_pos=3.0,
                        k_neg=3.0, lambda_neg=2.0):
    """VESPO's detached sequence weight ``phi_i`` (TRL ``loss_type="vespo"``), shape of ``advantages[:, :1]``
    broadcast with ``advantages`` (``[B, 1]`` or ``[B, T]``).

    ``log_ratio`` ``[B, T]`` = ``logp - old``. With ``f = log(1e-8)``::

        s_i   = sum_t m_it clamp(log_ratio_it, -20, 20)
                + sum_t clamp(log r_it, f, 20)          (r = vLLM IS ratio [B, T], when given)
        lw_i  = clamp(s_i, f, 20),  w_i = exp(lw_i)     (a sequence *sum*, not a mean)
        phi   = exp(lam + k lw - lam w)                 (= e^lam w^k e^{-lam w}; phi(1) = 1)

    ``(k, lam) = (k_pos, lambda_pos)`` where ``A >= 0`` else ``(k_neg, lambda_neg)``, ``lam``
    floored at 1e-4; a non-finite ``phi`` counts as 0. The loss is ``l_it = -phi A logp_it``
    (:func:`vespo_token_loss`), so ``phi`` only scales the REINFORCE gradient.
    """
    seq = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        seq = seq + torch.log(importance_sampling_ratio).clamp(_VESPO_LOG_FLOOR, 20.0).sum(-1, keepdim=True)
    log_w = seq.clamp(_VESPO_LOG_FLOOR, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_token_loss(logp, phi, advantages):
    """VESPO's per-token loss ``l_it = -phi_i A logp_it`` (``phi`` from :func:`vespo_gamma_weights`, detached)."""
    return -phi * advantages * logp


@torch.no_grad()
def off_policy_sequence_mask(advantages, logp, sampling_logp, mask, threshold):
    """The off-policy sequence mask (DeepSeek-V3.2 report; TRL ``off_policy_mask_threshold``), 0/1 in ``mask``'s dtype.

    ``d_it = nan_to_num(sampling_it - sg(logp_it))`` (a token the sampler could not score adds 0),
    ``kl_i = sum_t m_it d_it / max(L_i, 1)``; keep response ``i`` where ``A >= 0`` or
    ``kl_i <= threshold``. ``sampling_logp`` is the sampler's log-prob (vLLM's), or ``old`` when
    there is none. Shape follows ``advantages`` (``[B, 1]`` or ``[B, T]``).
    """
    d = torch.nan_to_num(sampling_logp - logp.detach(), nan=0.0)
    kl = (d * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (kl <= threshold)).to(mask.dtype)


def trl_aggregation_weights(loss_type, mask, *, max_completion_length=None, global_normalizer=None):
    """Weights ``W`` ``[B, T]`` (0 where ``m = 0``) with TRL's loss before gradient accumulation = ``sum(W * l)``.

    ``B`` = all rows of the micro-batch, empty ones included; ``N = sum m``::

        grpo, sapo           m_it / (max(L_i, 1) B)          mean over responses of the token mean
        bnpo                 m_it / max(N, 1)                token mean of the micro-batch
        dr_grpo              m_it / (B max_completion_length)
        luspo                m_it / B                        mean over responses of the token sum
        cispo, dapo, vespo   m_it / global_normalizer        TRL's generation-batch token count per
                                                             process and accumulation step

    TRL divides all but the last row by the gradient-accumulation steps in training (caller).
    """
    m = mask.to(torch.float32)
    rows = m.shape[0]
    if loss_type in ("grpo", "sapo"):
        return m / (m.sum(-1, keepdim=True).clamp(min=1.0) * rows)
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (rows * max_completion_length)
    if loss_type == "luspo":
        return m / rows
    if loss_type in GLOBAL_TOKEN_NORMALIZED:
        return m / global_normalizer
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def entropy_bonus(entropy, mask, entropy_mask=None):
    """TRL's entropy bonus term (before its coefficient and the accumulation divisor): the token mean of ``H``
    over the tokens the policy term acts on, ``sum(H e) / max(sum e, 1)`` with ``e = m`` (times the entropy
    mask when ``top_entropy_quantile < 1``), independent of ``loss_type``. The loss subtracts
    ``entropy_coef`` times it.
    """
    effective = mask if entropy_mask is None else mask * entropy_mask
    return (entropy * effective).sum() / effective.sum().clamp(min=1.0)
