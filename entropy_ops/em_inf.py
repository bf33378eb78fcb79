"""EM-INF: inference-time entropy minimization of one decoding step's logits (Agarwal et al., arXiv 2505.15134).

At each decoding step the model is frozen and the step's logits ``z`` ``[B, V]``
become free parameters, optimized by a few Adam steps per row::

    minimize_z  max(H(softmax(z)), delta) + kl_weight * KL(softmax(z_0) || softmax(z))
    dH/dz_i  = -p_i (log p_i + H)          (the fused op's backward, see token_ops)
    dKL/dz_i =  p_i - p0_i                 (p0 = softmax(z_0), the original distribution)

    Adam (beta1, beta2, eps), k = 1, 2, ...:
    m <- beta1 m + (1 - beta1) g,  v <- beta2 v + (1 - beta2) g^2
    z <- z - lr (m / (1 - beta1^k)) / (sqrt(v / (1 - beta2^k)) + eps)

Per-row early stop: before each step a row whose entropy is already below
``delta`` stops for good (``max(H, delta)`` has no gradient there); a row that
starts below ``delta`` is returned unchanged. Rows never interact (the loss is
a sum of per-row terms, Adam is element-wise, and a row's step count is the
global one until it stops), so a batched call equals one call per row, padding
rows of a batched ``generate`` included.

The argmax never changes. Why it holds: the top token has ``log p_max >= -H``
(``H = -sum p log p >= -log p_max``), so its entropy gradient is ``<= 0`` and
its logit never decreases. Gradient descent moves ``z_i`` up by
``lr phi(p_i)``, ``phi(p) = p (log p + H)``; ``phi`` falls from 0 then rises
on ``(0, 1]``, so ``phi(p_i) <= max(0, phi(p_max)) = phi(p_max)`` for every
``p_i <= p_max``: no gap to the top token ever shrinks. Adam's first step is
``lr g / (|g| + eps)``, about ``lr sign(g)``: the top token rises by about
``lr``, the most any token can. Later Adam steps divide each coordinate by its
own gradient history, and the KL term pulls every ``p_i`` back toward ``p0_i``,
so a runner-up could in principle gain on the top token (it never did in the
tests); the implementation therefore *enforces* the
invariant: a step that would move a row's argmax (``torch.argmax`` of the
original logits, first index on ties) is not taken and the row stops there.

The entropy and its gradient come from :func:`entropy_ops.token_entropy` (fused
op, fp32). ``-inf`` logits (tokens masked by an earlier processor) have
``p = 0``, zero gradient and stay ``-inf``. Defaults are the public code's
(``n_steps 5``, ``lr 0.1``, ``delta 0.3``, ``kl_weight 0.001``); the paper's
evaluation script uses 3 steps and ``kl_weight 0.05``, and reports 3-15 steps
and ``delta`` 0.1-0.5. The adjusted logits then go through the usual
processors and sampling (temperature, top-p) as before.

:func:`adaptive_temperature` is the paper's baseline: per row, bisection on
``tau`` in ``[0.01, 1]`` so that ``H(softmax(z / tau)) = max(alpha H0, delta)``.

``EMInfLogitsProcessor`` and ``AdaptiveTemperatureLogitsProcessor`` subclass
``transformers.LogitsProcessor`` for ``model.generate(..., logits_processor=[...])``;
they are built on first access so that importing this module does not import
``transformers`` (an optional dependency).
"""
from __future__ import annotations

import functools
import math

import torch

from ._validation import check_float_tensor
from .token_ops import token_entropy

_PROCESSOR_NAMES = ("EMInfLogitsProcessor", "AdaptiveTemperatureLogitsProcessor")


def _check_real(name: str, value, *, low: float | None = None, low_open: bool = False,
                high: float | None = None, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    bad |= low is not None and (value < low or (low_open and value == low))
    bad |= high is not None and (value > high or (high_open and value == high))
    if bad:
        lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {lo or '(-inf, '}{hi}, got {value}")
    return value


def _check_steps(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_logits(logits) -> None:
    check_float_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, V], got {tuple(logits.shape)}")


def _em_inf_options(n_steps, lr, delta, kl_weight, betas, adam_eps) -> dict:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return dict(
        n_steps=_check_steps("n_steps", n_steps, 0),
        lr=_check_real("lr", lr, low=0.0, low_open=True),
        delta=_check_real("delta", delta, low=0.0),
        kl_weight=_check_real("kl_weight", kl_weight, low=0.0),
        betas=(_check_real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
               _check_real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)),
        adam_eps=_check_real("adam_eps", adam_eps, low=0.0, low_open=True),
    )


def _adaptive_options(alpha, delta, tau_min, tau_max, n_iter) -> dict:
    tau_min = _check_real("tau_min", tau_min, low=0.0, low_open=True)
    return dict(
        alpha=_check_real("alpha", alpha, low=0.0, high=1.0),
        delta=_check_real("delta", delta, low=0.0),
        tau_min=tau_min,
        tau_max=_check_real("tau_max", tau_max, low=tau_min, low_open=True),
        n_iter=_check_steps("n_iter", n_iter, 1),
    )


def _entropy_with_graph(z: torch.Tensor, backend: str):
    """``(H, sum(H), leaf)``: ``H(softmax(z))`` ``[B]`` from the fused op, with the graph of
    ``sum(H)`` back to ``leaf``, a fresh leaf copy of ``z``."""
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad():
        H = token_entropy(leaf, backend=backend)
        total = H.sum()
    return H.detach(), total, leaf


def em_inf(logits: torch.Tensor, *, n_steps: int = 5, lr: float = 0.1, delta: float = 0.3,
           kl_weight: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
           backend: str = "auto", return_steps: bool = False):
    """Lower each row's entropy with at most ``n_steps`` Adam steps on the logits; see the module docstring.

    Args:
        logits: ``[B, V]`` one decoding step's logits (fp32, bf16, fp16), any device; ``-inf`` allowed.
        n_steps: at most this many Adam steps per row (``0`` returns the logits as fp32).
        lr: Adam learning rate.
        delta: entropy floor (nats); a row stops once its entropy is below it.
        kl_weight: weight of ``KL(p_orig || p)`` (``0`` switches it off, saving a softmax per step).
        betas, adam_eps: Adam's hyper-parameters (``torch.optim.Adam`` semantics, no weight decay).
        backend: forwarded to :func:`entropy_ops.token_entropy`.
        return_steps: also return the int64 ``[B]`` number of steps each row took.

    Returns fp32 ``[B, V]`` adjusted logits (rows that took no step equal ``logits.float()``),
    and the step counts with ``return_steps``. Works under ``torch.no_grad()`` and
    ``torch.inference_mode()`` (as inside ``generate``); never touches ``logits``.
    One host sync per step (the early exit once every row has stopped).
    """
    _check_logits(logits)
    opt = _em_inf_options(n_steps, lr, delta, kl_weight, betas, adam_eps)
    beta1, beta2 = opt["betas"]
    with torch.inference_mode(False), torch.no_grad():
        z0 = logits.detach().to(torch.float32, copy=True)  # a normal tensor even from an inference tensor
        B = z0.shape[0]
        steps = torch.zeros(B, dtype=torch.int64, device=z0.device)
        z, active = z0, torch.ones(B, dtype=torch.bool, device=z0.device)
        top = z0.argmax(dim=-1)
        m = v = p0 = None
        for k in range(1, opt["n_steps"] + 1):
            H, total, leaf = _entropy_with_graph(z, backend)
            active = active & (H >= opt["delta"])
            if not bool(active.any()):
                break
            (g,) = torch.autograd.grad(total, leaf)
            if opt["kl_weight"] > 0.0:
                if p0 is None:
                    p0 = torch.softmax(z0, dim=-1)
                g.add_(torch.softmax(z, dim=-1).sub_(p0), alpha=opt["kl_weight"])
            if m is None:
                m, v = torch.zeros_like(z0), torch.zeros_like(z0)
            # Adam, in place. The moments of a row that stops are never read again, so they
            # may keep updating; only `z` must stay frozen (the `where` below).
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            denom = (v / (1.0 - beta2 ** k)).sqrt_().add_(opt["adam_eps"])
            z_new = torch.addcdiv(z, m, denom, value=-opt["lr"] / (1.0 - beta1 ** k))  # -inf + 0 stays -inf
            active = active & (z_new.argmax(dim=-1) == top)  # enforce the argmax invariant
            z = torch.where(active.unsqueeze(1), z_new, z)
            steps += active
    return (z, steps) if return_steps else z


def adaptive_temperature(logits: torch.Tensor, alpha: float, delta: float, *, tau_min: float = 0.01,
                         tau_max: float = 1.0, n_iter: int = 20, backend: str = "auto",
                         return_temperature: bool = False):
    """Scale each row by ``1 / tau`` with ``H(softmax(z / tau)) ~= max(alpha * H(softmax(z)), delta)``.

    ``H`` rises with ``tau``, so ``n_iter`` bisection steps on ``[tau_min, tau_max]`` find ``tau``
    within ``(tau_max - tau_min) / 2^n_iter`` and keep ``H(z / tau) <= target``. A row already at or
    below its target keeps ``tau = 1`` (unchanged); one whose target is out of reach gets ``tau_min``.
    Entropies come from :func:`entropy_ops.token_entropy`.

    Returns fp32 ``[B, V]`` ``z / tau`` (``-inf`` stays ``-inf``), and ``tau`` ``[B]`` with
    ``return_temperature``.
    """
    _check_logits(logits)
    opt = _adaptive_options(alpha, delta, tau_min, tau_max, n_iter)
    with torch.inference_mode(False), torch.no_grad():
        z = logits.detach().to(torch.float32, copy=True)
        H0 = token_entropy(z, backend=backend)
        target = torch.clamp_min(opt["alpha"] * H0, opt["delta"])
        lo = torch.full_like(H0, opt["tau_min"])
        hi = torch.full_like(H0, opt["tau_max"])
        for _ in range(opt["n_iter"]):
            mid = (lo + hi) * 0.5
            too_hot = token_entropy(z / mid.unsqueeze(1), backend=backend) > target
            hi = torch.where(too_hot, mid, hi)
            lo = torch.where(too_hot, lo, mid)
        tau = torch.where(H0 <= target, torch.ones_like(lo), lo)
        out = torch.where((tau == 1.0).unsqueeze(1), z, z / tau.unsqueeze(1))
    return (out, tau) if return_temperature else out


@functools.cache
def _processor_classes() -> dict[str, type]:
    from transformers import LogitsProcessor

    class EMInfLogitsProcessor(LogitsProcessor):
        """``generate`` logits processor applying :func:`em_inf` to each step's scores.

        ``generate`` runs custom processors after its built-in ones (repetition penalty, bad
        words: ``-inf`` scores are fine) and before the sampling warpers (temperature, top-k,
        top-p), the order EM-INF needs. Greedy decoding is unchanged (fp32 scores).
        """

        def __init__(self, *, n_steps: int = 5, lr: float = 0.1, delta: float = 0.3, kl_weight: float = 0.001,
                     betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8, backend: str = "auto"):
            self.options = _em_inf_options(n_steps, lr, delta, kl_weight, betas, adam_eps)
            self.backend = backend

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return em_inf(scores, backend=self.backend, **self.options).to(scores.dtype)

    class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
        """``generate`` logits processor applying :func:`adaptive_temperature` to each step's scores."""

        def __init__(self, alpha: float, delta: float, *, tau_min: float = 0.01, tau_max: float = 1.0,
                     n_iter: int = 20, backend: str = "auto"):
            self.options = _adaptive_options(alpha, delta, tau_min, tau_max, n_iter)
            self.backend = backend

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return adaptive_temperature(scores, backend=self.backend, **self.options).to(scores.dtype)

    classes = {"EMInfLogitsProcessor": EMInfLogitsProcessor,
               "AdaptiveTemperatureLogitsProcessor": AdaptiveTemperatureLogitsProcessor}
    for name, cls in classes.items():  # importable / picklable as entropy_ops.em_inf.<name>
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


def __getattr__(name: str):
    if name in _PROCESSOR_NAMES:
        return _processor_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def generate_with_em_inf(model, tokenizer, prompts, *, n_steps: int = 5, lr: float = 0.1, delta: float = 0.3,
                         kl_weight: float = 0.001, backend: str = "auto", **generate_kwargs) -> list[str]:
    """Generate completions for ``prompts`` (a list of strings) with EM-INF on every step.

    Left-pads the batch (decoder-only models), runs ``model.generate(..., logits_processor=
    [EMInfLogitsProcessor(...)], **generate_kwargs)`` and decodes the new tokens only.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str")
    prompts = list(prompts)
    if len(prompts) > 1 and tokenizer.pad_token is None:
        raise ValueError("tokenizer has no pad token, needed to batch prompts; set tokenizer.pad_token "
                         "(for example to the eos token)")
    processor = _processor_classes()["EMInfLogitsProcessor"](
        n_steps=n_steps, lr=lr, delta=delta, kl_weight=kl_weight, backend=backend)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    out = model.generate(**enc, logits_processor=[processor], **generate_kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
