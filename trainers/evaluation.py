"""Held-out evaluation: greedy accuracy, and accuracy / reward / entropy of sampled completions.

The sampled completions use the training sampling settings (temperature,
top-p, top-k) and a fixed seed under a forked RNG: every evaluation of a run
draws the same random numbers (comparisons across steps are not blurred by
sampling noise) and training's random stream is left untouched.

Rows with a ``slice`` field (the addition task's planted slice) also get
``eval/greedy_correct/<slice>`` and ``eval/sampled_correct/<slice>`` (and
``.../rest`` for the rows outside any slice); rows with a ``planted_answer``
add ``eval/greedy_planted/<slice>``: the fraction of greedy answers that are
exactly the planted mistake.
"""
from __future__ import annotations

import time

import torch


def evaluate(trainer, rows: list[dict]) -> dict:
    """Metrics ``eval/*`` of ``trainer``'s policy on ``rows`` (``{prompt, answer, ...}``)."""
    cfg = trainer.config
    if not rows:
        return {}
    t0 = time.perf_counter()
    k = cfg.eval_samples
    # prompts per generate call: at least a rollout batch's rows, and 256 rows (per-step overhead of
    # generate dominates for small models; one rollout batch's memory is what training needs anyway)
    chunk = max(1, max(cfg.num_prompts * cfg.group_size, 256) // k)
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    greedy_ok, sampled_ok, sampled_reward, ent_sum, tok_sum = [], [], [], 0.0, 0
    greedy_planted = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 1)
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            prompts = [r["prompt"] for r in part]
            answers = [r.get("answer") for r in part]
            if all(a is not None for a in answers):
                greedy = trainer.engine.generate(prompts, num_samples=1, max_new_tokens=cfg.max_new_tokens, greedy=True)
                greedy_ok += trainer.correctness(greedy.prompts, greedy.completions, answer=answers)
                greedy_planted += [float(bool(r.get("planted_answer"))
                                         and trainer.correctness.extract(c) == r["planted_answer"])
                                   for r, c in zip(part, greedy.completions)]
            sampled = trainer.engine.generate(prompts, num_samples=k, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
            fields = {key: [r.get(key) for r in part for _ in range(k)] for key in part[0] if key != "prompt"}
            total, components = trainer.reward_fn(sampled.prompts, sampled.completions,
                                                  completion_lengths=sampled.completion_lengths.tolist(), **fields)
            sampled_reward += total
            if "answer" in fields:
                sampled_ok += trainer.correctness(sampled.prompts, sampled.completions, answer=fields["answer"])
            _, H = trainer.score(trainer.model, sampled)
            ent_sum += float(H.sum())
            tok_sum += int(sampled.completion_mask.sum())
    out = {"eval/sampled_reward": _mean(sampled_reward), "eval/entropy": ent_sum / max(tok_sum, 1),
           "eval/completion_length": tok_sum / (len(rows) * k), "eval/num_prompts": len(rows)}
    if greedy_ok:
        out["eval/greedy_correct"] = _mean(greedy_ok)
    if sampled_ok:
        out["eval/sampled_correct"] = _mean(sampled_ok)
    out.update(slice_metrics(rows, greedy_ok, sampled_ok, greedy_planted, k))
    out["eval/time_s"] = time.perf_counter() - t0
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def slice_metrics(rows: list[dict], greedy_ok: list[float], sampled_ok: list[float], greedy_planted: list[float],
                  k: int) -> dict:
    """Accuracies per ``slice`` value of the rows (``rest``: rows with an empty slice), planted-answer rates."""
    names = sorted({r.get("slice") or "" for r in rows})
    if names == [""] or "slice" not in rows[0]:
        return {}
    out = {}
    for name in names:
        idx = [i for i, r in enumerate(rows) if (r.get("slice") or "") == name]
        label = name or "rest"
        if greedy_ok:
            out[f"eval/greedy_correct/{label}"] = _mean([greedy_ok[i] for i in idx])
        if sampled_ok:
            out[f"eval/sampled_correct/{label}"] = _mean([sampled_ok[i * k + j] for i in idx for j in range(k)])
        if name and greedy_planted:
            out[f"eval/greedy_planted/{label}"] = _mean([greedy_planted[i] for i in idx])
    return out
