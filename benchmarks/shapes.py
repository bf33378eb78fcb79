"""Named shape presets: the problem sizes of real models and of users' bug reports.

A :class:`Shape` is one problem size: ``N`` tokens, vocabulary ``V``, hidden size
``D`` (used by the hidden-state op and the policy loss; the logits op ignores
it) and an optional final-logit soft-cap. A preset is a named tuple of shapes;
``--shapes`` takes preset names or explicit sizes ``NxV`` / ``NxVxD``.

Model dimensions (``D``, ``V``) come from the models' published configs as
carried by ``transformers`` (``hidden_size``, ``vocab_size``,
``final_logit_softcapping``):

- ``qwen2.5-7b``: D=3584, V=152064 (the padded embedding size).
- ``llama3-8b``: D=4096, V=128256.
- ``gemma3``: Gemma 3 12B, D=3840, V=262208, **no** soft-cap: Gemma 3 dropped Gemma 2's
  final-logit soft-capping (``Gemma3TextConfig.final_logit_softcapping`` is ``None``).
- ``gemma2-9b``: D=3584, V=256000, soft-cap 30 (Gemma 2's ``final_logit_softcapping``),
  the case that exercises the soft-cap path, and CCE's paper model family.
- ``liger-hopper``: D=4096, V=131072, N=8192: the shape of Liger-Kernel's README figure
  for its Hopper kernel (50.22 ms vs 165.63 ms for verl's torch fallback), see TARGETS.md.

- ``headline``: the logits op's target cells, N=32768 at V=32000, 152064 and 262144 (issue 13), the
  152064 one with D=3584 (Qwen2.5-7B: the hidden-state example of TARGETS.md, 8NDV floor 179 ms).

User-report shapes (TARGETS.md, "Shapes users hit"):

- ``verl-qwen32b``: N=32768, V=151936 as reported, D=5120 (Qwen2.5-32B).
- ``slime-248k``: N=11600 ("11.6k-token micro-batches"), V=248320 (the report says "~248k";
  we round to a multiple of 128), D=4096 (not given in the report; our choice).
- ``skyrl-65k``: N=65536, V=128256 (the report's "128k vocab"), D=4096 (our choice).

Sweeps: ``logits-sweep`` (V in {32000, 128256, 152064, 262144} x N in {1024, 4096,
16384, 65536}) and ``linear-sweep`` (D in {2048, 4096, 8192} x the same V x N in
{1024, 4096, 16384}). ``cpu-small`` is the CPU mode's default; ``tiny`` is for the
smoke test.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Token counts of the model presets' curves ("time and memory vs tokens").
MODEL_TOKENS = (1024, 4096, 16384, 65536)


@dataclass(frozen=True)
class Shape:
    """One problem size. ``hidden`` is ``D`` (None: the shape is for the logits op only)."""

    n_tokens: int
    vocab: int
    hidden: int | None = None
    softcap: float | None = None
    preset: str = "custom"

    @property
    def label(self) -> str:
        parts = [f"N={self.n_tokens}", f"V={self.vocab}"]
        if self.hidden is not None:
            parts.append(f"D={self.hidden}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap:g}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return {"preset": self.preset, "n_tokens": self.n_tokens, "vocab": self.vocab,
                "hidden": self.hidden, "softcap": self.softcap, "label": self.label}


def _model(preset: str, hidden: int, vocab: int, softcap: float | None = None, tokens=MODEL_TOKENS):
    return tuple(Shape(n, vocab, hidden, softcap, preset) for n in tokens)


def _sweep(preset: str, hiddens, vocabs, tokens):
    return tuple(Shape(n, v, d, None, preset) for d in hiddens for v in vocabs for n in tokens)


SWEEP_VOCABS = (32000, 128256, 152064, 262144)

PRESETS: dict[str, tuple[Shape, ...]] = {
    "qwen2.5-7b": _model("qwen2.5-7b", 3584, 152064),
    "llama3-8b": _model("llama3-8b", 4096, 128256),
    "gemma3": _model("gemma3", 3840, 262208),
    "gemma2-9b": _model("gemma2-9b", 3584, 256000, softcap=30.0),
    "liger-hopper": (Shape(8192, 131072, 4096, None, "liger-hopper"),),
    "headline": (Shape(32768, 32000, None, None, "headline"), Shape(32768, 152064, 3584, None, "headline"),
                 Shape(32768, 262144, None, None, "headline")),
    "verl-qwen32b": (Shape(32768, 151936, 5120, None, "verl-qwen32b"),),
    "slime-248k": (Shape(11600, 248320, 4096, None, "slime-248k"),),
    "skyrl-65k": (Shape(65536, 128256, 4096, None, "skyrl-65k"),),
    "logits-sweep": _sweep("logits-sweep", (4096,), SWEEP_VOCABS, (1024, 4096, 16384, 65536)),
    "linear-sweep": _sweep("linear-sweep", (2048, 4096, 8192), SWEEP_VOCABS, (1024, 4096, 16384)),
    # CPU mode: the TARGETS.md CPU shape (N=4096, V=32000) plus a quarter of it; a small
    # hidden-state shape (8*N*D*V = 67 GFLOP fwd+bwd, about a second on 2 cores).
    "cpu-small": (Shape(1024, 32000, 256, None, "cpu-small"), Shape(4096, 32000, None, None, "cpu-small")),
    "tiny": (Shape(64, 500, 32, None, "tiny"), Shape(128, 500, 32, None, "tiny")),
}

DEFAULT_PRESETS = {
    "cpu": ("cpu-small",),
    "cuda": ("llama3-8b", "qwen2.5-7b", "liger-hopper"),
}

_CUSTOM = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")


def parse_shapes(spec: str) -> tuple[Shape, ...]:
    """Comma-separated preset names and/or explicit ``NxV`` or ``NxVxD`` sizes."""
    shapes: list[Shape] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in PRESETS:
            shapes.extend(PRESETS[item])
            continue
        match = _CUSTOM.match(item)
        if match is None:
            raise ValueError(f"--shapes: {item!r} is neither a preset ({', '.join(PRESETS)}) nor NxV / NxVxD")
        n, v, d = (int(g) if g else None for g in match.groups())
        if n <= 0 or v <= 0 or (d is not None and d <= 0):
            raise ValueError(f"--shapes: sizes must be positive, got {item!r}")
        shapes.append(Shape(n, v, d, None, "custom"))
    if not shapes:
        raise ValueError("--shapes: no shape given")
    return tuple(shapes)


def shapes_for_op(shapes: tuple[Shape, ...], op: str) -> tuple[Shape, ...]:
    """The shapes an op runs: the logits op drops ``D`` (and de-duplicates); the others need ``D``."""
    if op == "logits":
        seen, out = set(), []
        for s in shapes:
            key = (s.n_tokens, s.vocab, s.preset)  # soft-capping happens before the logits op
            if key not in seen:
                seen.add(key)
                out.append(Shape(s.n_tokens, s.vocab, None, None, s.preset))
        return tuple(out)
    return tuple(s for s in shapes if s.hidden is not None)
