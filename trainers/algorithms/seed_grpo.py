"""SEED-GRPO: semantic-entropy-modulated group advantages (Chen et al., arXiv 2505.12346).

For each prompt, the ``G`` sampled answers are clustered into meaning classes
``C_1..C_K`` (two answers share a class when an equivalence function says they
mean the same); the semantic entropy of the group measures how much the model
disagrees with itself, and scales the group's advantages down::

    p(C_k)  = sum_{o in C_k} exp(l_o) / sum_{o} exp(l_o)      likelihood-weighted (default)
            = |C_k| / G                                       count-based (``weighting="count"``)
    l_o     = mean_t logp_old(o_t)  (length-normalized, default)  or  sum_t logp_old(o_t)
    SE      = -sum_k p(C_k) log p(C_k)                        plug-in estimator (``estimator="plugin"``, default)
            = -(1/K) sum_k log p(C_k)                         Monte-Carlo estimator of Kuhn et al. (``"monte-carlo"``)
    SE_max  = log G
    x       = min(alpha * SE / SE_max, 1)
    A_i     = r_i - mean_g r            (paper: no std division)  or  (r_i - mean_g r) / (std_g r + eps)
    A_hat_i = A_i * f(x)
    f(x)    = 1 - x ("linear", default) | exp(-x) ("exp") | (1 - x)^gamma ("focal") | 1 / (1 + x) ("inverse")

Why the plug-in estimator is the default: it is bounded, ``0 <= SE <= log K <= log G``,
so ``x`` stays in ``[0, alpha]`` and ``f`` in a known range. The Monte-Carlo form
averages ``-log p`` over the classes found, so a rare class with ``p = 1e-3``
alone contributes ``6.9 / K`` nats: it can exceed ``log G`` (hence the clamp of
``x`` at 1) and reacts to one unlikely sample as strongly as to a real split.

``alpha`` default 1.0: the factor then spans its whole range, ``f = 1`` for a
group that agrees on one answer and ``1 - SE / log G`` otherwise. The paper's
reported ``alpha = 0.02`` keeps ``f`` in ``[0.98, 1]`` (on the embedded task
SEED-GRPO was then Dr.GRPO to 2%). Measured on the embedded task (40 steps of
8 x 8 rollouts, seed 100, ``docs/algorithms.md``): with ``alpha = 1`` the semantic
entropy averaged 1.2 nats (``log 8 = 2.08``) and the factor of the groups that
carry signal had, averaged over steps, p10 0.19, median 0.43, p90 0.70.
:meth:`SeedGRPO.step_metrics` logs the semantic entropy and the factor's
distribution every step.

Other defaults follow docs/math.md section 5: ``f = linear``, no std division,
length-normalized log-probs, likelihood weighting. ``exp(l_o)`` is normalized
with a softmax over the group (max subtracted), so summed log-probs of long
answers cannot underflow. Groups need ``G >= 2`` (the group advantages come from
``entropy_ops.trainers.advantages.grpo_advantages``). The paper trains with
the Dr.GRPO loss: ``loss_preset = "dr_grpo"``.

Clustering (:func:`cluster_answers`) is greedy and deterministic: each answer
joins the class of the first earlier class representative it is equivalent
to, else starts a class; ``None`` (no extractable answer) is always a class of
its own. The default equivalence for math (:func:`math_equivalence`) is the
correctness reward's own test (``rewards.answers_match``): equal normalized
strings, equal decimals, or ``math_verify`` equivalence.
Any ``(a: str, b: str) -> bool`` works; for free-text answers, a
bidirectional-entailment test with an NLI model (not shipped) looks like::

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained("microsoft/deberta-large-mnli")
    nli = AutoModelForSequenceClassification.from_pretrained("microsoft/deberta-large-mnli")
    entail = nli.config.label2id["ENTAILMENT"]

    def entails(a, b):
        logits = nli(**tok(a, b, return_tensors="pt")).logits
        return int(logits.argmax(-1)) == entail

    def nli_equivalent(a, b):           # same meaning = each entails the other
        return entails(a, b) and entails(b, a)

    SeedGRPO(equivalence=nli_equivalent)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..advantages import grpo_advantages
from ..rewards import answers_match
from ._checks import check_group_size, check_mask, check_number, check_rows, check_tokens
from .base import Algorithm, RolloutBatch

MODULATIONS = ("linear", "exp", "focal", "inverse")
ESTIMATORS = ("plugin", "monte-carlo")
WEIGHTINGS = ("likelihood", "count")
Equivalence = Callable[[str, str], bool]


def math_equivalence(a: str, b: str) -> bool:
    """Same final answer: ``entropy_ops.trainers.rewards.answers_match`` (normalized strings, exact
    decimals, then ``math_verify`` equivalence), the test the correctness reward uses."""
    return answers_match(b, a)


def exact_equivalence(a: str, b: str) -> bool:
    """Equal after stripping surrounding whitespace."""
    return a.strip() == b.strip()


def cluster_answers(answers: Sequence[str | None], equivalent: Equivalence) -> list[int]:
    """Class index per answer (``0..K-1`` in order of first appearance); ``None`` is a class of its own."""
    representatives: list[str | None] = []
    classes = []
    for answer in answers:
        label = None
        if answer is not None:
            for k, rep in enumerate(representatives):
                if rep is not None and equivalent(rep, answer):
                    label = k
                    break
        if label is None:
            label = len(representatives)
            representatives.append(answer)
        classes.append(label)
    return classes


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor, *, length_normalized: bool = True):
    """``sum_t logp m`` per row, divided by ``max(sum_t m, 1)`` when ``length_normalized``;
    ``[B]`` fp32 (fp64 for fp64 input)."""
    dtype = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    total = torch.where(mask, logprobs.to(dtype), 0.0).sum(dim=1)
    if length_normalized:
        total = total / mask.sum(dim=1).clamp_min(1).to(dtype)
    return total


def semantic_entropy(class_ids: torch.Tensor, group_size: int, seq_logprobs: torch.Tensor | None = None,
                     *, estimator: str = "plugin"):
    """Semantic entropy per group, ``[n]`` (fp64 for count weighting or fp64 log-probs).

    ``class_ids`` ``[B]`` int64, the class of each answer within its group (``0..G-1``);
    ``seq_logprobs`` ``[B]`` the ``l_o`` of each answer for likelihood weighting, or
    ``None`` for count-based class probabilities. ``estimator``: ``"plugin"``
    (``-sum_k p log p``) or ``"monte-carlo"`` (``-(1/K) sum_k log p``, K classes found).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    G = group_size
    ids = class_ids.view(-1, G)
    if seq_logprobs is None:
        weights = torch.full(ids.shape, 1.0 / G, dtype=torch.float64, device=ids.device)
    else:
        weights = torch.softmax(seq_logprobs.view(-1, G), dim=1)  # exp(l_o) / sum exp(l), in log space
    probs = torch.zeros_like(weights).scatter_add_(1, ids, weights)  # p(C_k), K <= G slots per group
    if estimator == "plugin":
        return -torch.special.xlogy(probs, probs).sum(dim=1)
    found = torch.zeros(probs.shape, dtype=torch.bool, device=ids.device).scatter_(1, ids, True)
    neg_log = torch.where(found, -torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), 0.0)
    return neg_log.sum(dim=1) / found.sum(dim=1)


def modulation_factor(se: torch.Tensor, group_size: int, *, alpha: float, modulation: str,
                      gamma: float = 2.0) -> torch.Tensor:
    """``f(min(alpha * SE / log G, 1))`` per group; 1 for ``G = 1``."""
    if group_size == 1:
        return torch.ones_like(se)
    x = (alpha * se / math.log(group_size)).clamp(max=1.0)
    if modulation == "linear":
        return 1.0 - x
    if modulation == "exp":
        return torch.exp(-x)
    if modulation == "focal":
        return (1.0 - x) ** gamma
    return 1.0 / (1.0 + x)


def _check_options(alpha, modulation, weighting, eps, estimator="plugin", gamma=2.0) -> tuple[float, float]:
    if modulation not in MODULATIONS:
        raise ValueError(f"modulation must be one of {MODULATIONS}, got {modulation!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_number("gamma", gamma, low=0.0, low_open=True)
    # x = min(alpha * SE / SE_max, 1) >= 0, so every f stays in [0, 1] for any alpha >= 0
    alpha = check_number("alpha", alpha, low=0.0)
    eps = check_number("eps", eps, low=0.0, low_open=True)
    return alpha, eps


def seed_grpo_advantages(rewards: torch.Tensor, class_ids: torch.Tensor, logprobs: torch.Tensor,
                         mask: torch.Tensor, group_size: int, *, alpha: float = 1.0,
                         modulation: str = "linear", scale_by_std: bool = False,
                         weighting: str = "likelihood", length_normalized: bool = True,
                         eps: float = 1e-6, estimator: str = "plugin", gamma: float = 2.0,
                         return_factor: bool = False):
    """SEED-GRPO advantages ``[B]`` fp32; see the module docstring.

    Args:
        rewards: ``[B]`` scalar rewards.
        class_ids: ``[B]`` integer class of each answer within its group (:func:`cluster_answers`).
        logprobs: ``[B, T]`` rollout-policy token log-probs (``batch.old_logprobs``).
        mask: ``[B, T]`` bool valid completion tokens.
        group_size: ``G >= 2``.
        alpha: modulation strength, ``x = min(alpha * SE / log G, 1)``.
        modulation: ``"linear"`` (``1 - x``), ``"exp"`` (``exp(-x)``), ``"focal"`` (``(1 - x)^gamma``)
            or ``"inverse"`` (``1 / (1 + x)``).
        scale_by_std: divide the centered rewards by the group std (+ eps); the paper does not.
        weighting: ``"likelihood"`` or ``"count"`` class probabilities.
        length_normalized: ``l_o`` is the mean (True) or the sum (False) of the token log-probs.
        estimator: ``"plugin"`` or ``"monte-carlo"`` (:func:`semantic_entropy`).
        gamma: exponent of the focal ``f``.
        return_factor: also return ``(SE, factor)`` per group, ``[n]`` each.
    """
    check_mask(mask)
    n_rows = mask.shape[0]
    check_rows("rewards", rewards, n_rows)
    check_tokens("logprobs", logprobs, mask)
    G = check_group_size(group_size, n_rows)
    if not isinstance(class_ids, torch.Tensor) or class_ids.dtype != torch.int64 or class_ids.shape != (n_rows,):
        got = f"{class_ids.dtype} {tuple(class_ids.shape)}" if isinstance(class_ids, torch.Tensor) else type(class_ids)
        raise TypeError(f"class_ids must be an int64 tensor of shape ({n_rows},), got {got}")
    if bool(((class_ids < 0) | (class_ids >= G)).any()):
        raise ValueError(f"class_ids must lie in [0, {G}) (a class index within the group)")
    alpha, eps = _check_options(alpha, modulation, weighting, eps, estimator, gamma)
    seq = sequence_logprobs(logprobs, mask, length_normalized=length_normalized) if weighting == "likelihood" else None
    se = semantic_entropy(class_ids.to(mask.device), G, seq, estimator=estimator)
    factor = modulation_factor(se, G, alpha=alpha, modulation=modulation, gamma=gamma).to(torch.float32)
    adv = grpo_advantages(rewards, G, scale=scale_by_std, eps=eps)
    out = (adv.view(-1, G) * factor.unsqueeze(1)).view(-1)
    return (out, se, factor) if return_factor else out


class SeedGRPO(Algorithm):
    """SEED-GRPO: group advantages ``[B]`` scaled by each group's semantic entropy.

    Options: ``alpha`` (1.0), ``modulation`` ("linear" | "exp" | "focal" | "inverse"), ``gamma``
    (2.0, focal), ``estimator`` ("plugin" | "monte-carlo"), ``scale_by_std`` (False), ``weighting``
    ("likelihood" | "count"), ``length_normalized`` (True), ``eps`` (1e-6), ``equivalence``:
    ``"math"`` (default, :func:`math_equivalence`), ``"exact"``, or any callable
    ``(a: str, b: str) -> bool``. Reads ``batch.answers`` (one per row).
    """

    name = "seed-grpo"
    loss_preset = "dr_grpo"

    def __init__(self, *, alpha: float = 1.0, modulation: str = "linear", scale_by_std: bool = False,
                 weighting: str = "likelihood", length_normalized: bool = True, eps: float = 1e-6,
                 equivalence: str | Equivalence = "math", estimator: str = "plugin", gamma: float = 2.0,
                 **unknown) -> None:
        super().__init__(**unknown)
        self.alpha, self.eps = _check_options(alpha, modulation, weighting, eps, estimator, gamma)
        self.modulation, self.weighting, self.estimator, self.gamma = modulation, weighting, estimator, float(gamma)
        self.scale_by_std, self.length_normalized = bool(scale_by_std), bool(length_normalized)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        if equivalence == "math":
            self.equivalence: Equivalence = math_equivalence
        elif equivalence == "exact":
            self.equivalence = exact_equivalence
        elif callable(equivalence):
            self.equivalence = equivalence
        else:
            raise ValueError(f"equivalence must be 'math', 'exact' or a callable (a, b) -> bool, got {equivalence!r}")

    def class_ids(self, answers: Sequence[str | None], group_size: int, device) -> torch.Tensor:
        """Cluster each group's answers; ``[B]`` int64 class index within the group."""
        ids = []
        for start in range(0, len(answers), group_size):
            ids.extend(cluster_answers(answers[start:start + group_size], self.equivalence))
        return torch.tensor(ids, dtype=torch.int64, device=device)

    def advantages(self, batch: RolloutBatch) -> torch.Tensor:
        n_rows = batch.completion_mask.shape[0]
        if len(batch.answers) != n_rows:
            raise ValueError(f"batch.answers must hold one extracted answer (or None) per row ({n_rows}), "
                             f"got {len(batch.answers)}")
        check_group_size(batch.group_size, n_rows)
        ids = self.class_ids(batch.answers, batch.group_size, batch.completion_mask.device)
        adv, se, factor = seed_grpo_advantages(
            batch.rewards, ids, batch.old_logprobs, batch.completion_mask, batch.group_size,
            alpha=self.alpha, modulation=self.modulation, scale_by_std=self.scale_by_std,
            weighting=self.weighting, length_normalized=self.length_normalized, eps=self.eps,
            estimator=self.estimator, gamma=self.gamma, return_factor=True,
        )
        signal = (batch.rewards.view(-1, batch.group_size) != batch.rewards.view(-1, batch.group_size)[:, :1]).any(1)
        self._last = (se.detach().cpu(), factor.detach().cpu(), signal.cpu())
        return adv

    def step_metrics(self, batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Semantic entropy and the factor's distribution (all groups, and the groups with signal)."""
        if self._last is None:
            return {}
        se, factor, signal = self._last
        out = {"seed/se_mean": float(se.mean()), "seed/factor_mean": float(factor.mean()),
               "seed/factor_min": float(factor.min()), "seed/factor_max": float(factor.max())}
        f = factor[signal]
        if f.numel():
            q = torch.quantile(f.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
            out.update({"seed/factor_signal_mean": float(f.mean()), "seed/factor_signal_p10": float(q[0]),
                        "seed/factor_signal_p50": float(q[1]), "seed/factor_signal_p90": float(q[2]),
                        "seed/factor_signal_min": float(f.min()), "seed/factor_signal_max": float(f.max())})
        return out
