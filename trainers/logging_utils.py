"""Metrics: one JSON line per step (and per evaluation), a short stdout line, and the end-of-run plot.

``metrics.jsonl`` is only ever appended to. A resumed run first appends a
``{"kind": "resume", "step": s}`` row: rows logged before it with a step after
``s`` (logged after the checkpoint it resumed from) are kept in the file but
superseded, and :func:`read_metrics` leaves them out.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

# What the stdout line shows (key -> label), when present; the JSONL file has everything. Not the loss:
# on-policy (one pass per batch) the clipped surrogate's value is ~0 whatever is learned (its gradient is not).
LINE_KEYS = {"reward/mean": "reward", "correct_frac": "acc", "entropy": "entropy",
             "completion_length/mean": "len", "loss/clip_frac_low": "clip_low", "loss/clip_frac_high": "clip_high",
             "loss/kl_ref": "kl", "grad_norm": "grad_norm", "time/step_s": "s/step"}
EVAL_KEYS = {"eval/greedy_correct": "greedy_acc", "eval/sampled_correct": "sampled_acc",
             "eval/sampled_reward": "sampled_reward", "eval/entropy": "entropy"}


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated on ``device`` and the process's peak resident set size, in MiB."""
    out = {}
    if device.type == "cuda":
        out["memory/peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out["memory/peak_rss_mib"] = rss / (2**20 if sys.platform == "darwin" else 2**10)
    return out


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    """Appends one JSON object per call to ``path`` (``{"step": ..., "kind": "train"|"eval", ...}``)."""

    def __init__(self, path: str, *, append: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not append and os.path.exists(path):
            raise FileExistsError(f"{path} exists: metrics are appended to it, never truncated")
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def log(self, step: int, kind: str, metrics: dict) -> None:
        row = {"step": step, "kind": kind, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_line(step: int, metrics: dict, keys: dict = LINE_KEYS) -> str:
    """``step 12  reward=0.41  entropy=0.52 ...``: the chosen metrics, 4 significant digits."""
    parts = [f"step {step}"]
    for key, label in keys.items():
        if key in metrics:
            v = _plain(metrics[key])
            parts.append(f"{label}={v:.4g}" if isinstance(v, float) else f"{label}={v}")
    return "  ".join(parts)


def eval_label(key: str) -> str:
    """The console label of an evaluation key: ``eval/greedy_correct/carry78`` -> ``greedy_acc/carry78``.

    The same labels as the held-out lines (:data:`EVAL_KEYS`); a ``/<slice>`` suffix is kept.
    """
    for full, label in EVAL_KEYS.items():
        if key == full or key.startswith(full + "/"):
            return label + key[len(full):]
    return key.removeprefix("eval/")


def format_eval(metrics: dict) -> str:
    """``greedy_acc=0.45  sampled_acc=0.36  greedy_acc/carry78=0.1 ...``: the held-out accuracies, overall and per slice."""
    return "  ".join(f"{eval_label(k)}={v:.4g}" for k, v in metrics.items()
                     if k.startswith("eval/") and "correct" in k and isinstance(v, (int, float)))


def read_metrics(path: str, *, raw: bool = False) -> list[dict]:
    """The rows of a ``metrics.jsonl``; unless ``raw``, without those a later resume superseded."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if raw:
        return rows
    out: list[dict] = []
    for row in rows:
        if row.get("kind") == "resume":
            out = [r for r in out if r["step"] <= row["step"]]
        out.append(row)
    return out


def plot_metrics(jsonl_path: str, png_path: str, title: str | None = None) -> str:
    """Reward (training mean, held-out greedy and sampled) and entropy over steps, as a PNG titled ``title``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(jsonl_path)
    train = [r for r in rows if r["kind"] == "train" and "entropy" in r]  # not steps that dynamic sampling skipped
    evals = [r for r in rows if r["kind"] == "eval"]
    fig = Figure(figsize=(8, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax_r, ax_h = fig.subplots(2, 1, sharex=True)
    if title:
        fig.suptitle(title, fontsize=10)
    if train:
        steps = [r["step"] for r in train]
        ax_r.plot(steps, [r["reward/mean"] for r in train], color="tab:blue", alpha=0.35, lw=1,
                  label="train reward (batch mean)")
        ax_r.plot(steps, _smooth([r["reward/mean"] for r in train]), color="tab:blue", lw=2,
                  label="train reward (moving avg)")
        ax_h.plot(steps, [r["entropy"] for r in train], color="tab:red", lw=1, label="rollout entropy (nats/token)")
    for key, color, label in (("eval/greedy_correct", "tab:green", "held-out greedy accuracy"),
                              ("eval/sampled_correct", "tab:orange", "held-out sampled accuracy")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax_r.plot(*zip(*pts), "o-", color=color, label=label)
    pts = [(r["step"], r["eval/entropy"]) for r in evals if "eval/entropy" in r]
    if pts:
        ax_h.plot(*zip(*pts), "o--", color="tab:purple", label="held-out entropy")
    ax_r.set_ylabel("reward / accuracy")
    ax_r.legend(loc="best", fontsize=8)
    ax_r.grid(alpha=0.3)
    ax_h.set_ylabel("entropy")
    ax_h.set_xlabel("step")
    ax_h.legend(loc="best", fontsize=8)
    ax_h.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False
