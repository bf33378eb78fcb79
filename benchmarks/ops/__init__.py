"""The benchmarked ops and, for each, the implementations compared side by side.

Each op module (``logits``, ``linear``, ``policy``) exposes:

- ``IMPLS``: a tuple of :class:`Impl` (ours first, then the naive PyTorch form, its
  ``torch.compile``, then the peers);
- ``make_inputs(shape, dtype, device, requires_grad, seed) -> dict`` of tensors;
- ``GRAD_INPUTS``: the names of the inputs that get gradients in ``fwd_bwd`` mode;
- ``work(shape, dtype, mode) -> (kind, amount)``: ``("bytes", B)`` for the
  memory-bound logits op, ``("flops", F)`` for the matmul-bound ones; the floor
  of a cell is that amount over the device's measured copy bandwidth or matmul rate.

An implementation's function takes ``(inputs, train)`` and returns an :class:`Out`.
With ``train=False`` it runs under ``torch.no_grad()`` on inputs that do not require
grad (a forward-only pass, as for the old-policy log-probs); with ``train=True`` the
harness back-propagates ``Out.loss`` if set, else ``g_logp`` into ``Out.logp`` and
``g_H`` into ``Out.entropy`` (whichever are present), with ``torch.autograd.grad``
so nothing accumulates into ``.grad``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

OP_NAMES = ("logits", "linear", "policy")


@dataclass
class Out:
    """What one call returned: per-token fp32 ``logp``/``entropy`` and/or a scalar ``loss``."""

    logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    loss: torch.Tensor | None = None


@dataclass(frozen=True)
class Impl:
    """One implementation of one op.

    ``build(device)`` returns the function ``fn(inputs, train) -> Out`` (called once
    per run, so a compiled function is reused across shapes). ``probe()`` returns
    ``None`` when the implementation can run, else the reason it cannot (a missing
    package, a module of ours not written yet). ``computes`` says which quantities it
    produces: a peer that cannot compute the entropy is compared on what it computes.
    ``opt_in_on`` lists the devices where it runs only when named in ``--impls``;
    ``modes`` the modes it has (``ours-inplace`` differs from ``ours`` only backward);
    ``variant(device)`` names the code path a peer takes there (a GPU kernel or a fallback);
    ``supports(shape, dtype)`` gives the reason a cell is out of its scope (e.g. no soft-cap).
    """

    name: str
    op: str
    computes: str
    note: str
    build: Callable[[torch.device], Callable]
    probe: Callable[[], str | None] = lambda: None
    needs_cuda: bool = False
    opt_in_on: tuple[str, ...] = ()
    ours: bool = False
    reference: bool = False  # the naive form: other impls' outputs are compared to it
    modes: tuple[str, ...] = ("fwd", "fwd_bwd")
    variant: Callable[[torch.device], str] | None = None
    supports: Callable[..., str | None] = lambda shape, dtype: None  # reason a (shape, dtype) is out of scope

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why this implementation cannot run on ``device`` (``None``: it can)."""
        if self.needs_cuda and device.type != "cuda":
            return "needs CUDA (Triton GPU kernels; no CPU path)"
        return self.probe()


def probe_import(module: str, *names: str) -> Callable[[], str | None]:
    """A ``probe`` that imports ``module`` lazily and checks that it has ``names``."""

    def probe() -> str | None:
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken dependency raising anything else
            return f"cannot import {module}: {type(exc).__name__}: {exc}"
        missing = [n for n in names if not hasattr(mod, n)]
        return f"{module} has no {', '.join(missing)}" if missing else None

    return probe


# Graphs one compiled function may hold: every (shape, dtype, grad mode) of a run is a
# new graph, and past dynamo's default limit (8) it would silently run eagerly.
COMPILE_GRAPH_LIMIT = 1024


def compiled(fn: Callable) -> Callable[[torch.device], Callable]:
    """``build`` for the ``torch.compile`` form of a naive function (static shapes: one
    graph per shape, as a training job with fixed micro-batch shapes would see).

    Raises dynamo's recompile limits (:func:`raise_recompile_limits`) so that no cell
    falls back to eager execution under the ``torch-compile`` name.
    """

    def build(device: torch.device) -> Callable:
        raise_recompile_limits()
        return torch.compile(fn, dynamic=False)

    return build


def raise_recompile_limits() -> None:
    """Let dynamo hold ``COMPILE_GRAPH_LIMIT`` graphs per function in this benchmark process."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILE_GRAPH_LIMIT)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, COMPILE_GRAPH_LIMIT)


def plain(fn: Callable) -> Callable[[torch.device], Callable]:
    """``build`` for a function that needs no set-up."""
    return lambda device: fn


def get_op(name: str):
    """The op module ``benchmarks.ops.<name>``."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; choose from {OP_NAMES}")
    return importlib.import_module(f"{__name__}.{name}")


def random_targets(n: int, vocab: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """``[n]`` int64 token ids, uniform in ``[0, vocab)``; every row is valid (no ``ignore_index``)."""
    return torch.randint(0, vocab, (n,), generator=gen, device="cpu").to(device)


def randn(shape, dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Gaussian tensor made on ``device`` in ``dtype`` (no fp32 staging copy of a large tensor).

    ``gen`` lives on the CPU; it seeds a device generator so that every implementation
    of a cell sees the same inputs.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(shape, dtype=dtype, device=device)
    out.normal_(0.0, scale, generator=dev_gen)
    return out
