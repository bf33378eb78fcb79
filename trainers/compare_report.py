"""The report of ``entropy-ops compare``: statistics over seeds, the tables, the mechanism checks, the plot.

For each algorithm and each metric ``m`` of the final held-out evaluation
(greedy accuracy, mean-of-k sampled accuracy, the planted slice, ...), with
``m_s`` its value for seed ``s`` and ``b_s`` the base model's (seed ``s``'s
0-step run) and ``g_s`` the baseline algorithm's (GRPO)::

    mean +/- t_{0.975, n-1} * sd / sqrt(n)                over the n seeds (Student t interval)
    gain  d_s = m_s - b_s,  paired: mean(d) +/- t sd(d) / sqrt(n)
    vs GRPO   e_s = m_s - g_s, paired the same way

A difference "exceeds its interval" when the interval excludes 0. Seeds are the
unit of replication (each seed is a whole training run); the held-out problems
are the same for every run.
"""
from __future__ import annotations

import json
import math
import os

from .logging_utils import read_metrics

# Two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (beyond: 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
EVAL_METRICS = ("eval/greedy_correct", "eval/sampled_correct", "eval/greedy_correct/rest",
                "eval/greedy_correct/carry78", "eval/sampled_correct/carry78", "eval/greedy_planted/carry78",
                "eval/entropy", "eval/completion_length")
SHORT = {"eval/greedy_correct": "greedy", "eval/sampled_correct": "sampled", "eval/greedy_correct/rest": "greedy (rest)",
         "eval/greedy_correct/carry78": "slice greedy", "eval/sampled_correct/carry78": "slice sampled",
         "eval/greedy_planted/carry78": "slice planted answer", "eval/entropy": "entropy",
         "eval/completion_length": "length"}
# Training-log keys averaged over steps as each algorithm's mechanism check.
MECHANISM_KEYS = {
    "gtpo": ("gtpo/neg_adv_correct_frac", "gtpo/neg_adv_correct_frac_unguarded", "gtpo/guard_frac",
             "gtpo/pos_adv_wrong_frac", "gtpo/weight_pos_std", "gtpo/weight_neg_std"),
    "grpo-s": ("grpo_s/sequence_objective", "grpo_s/neg_adv_correct_frac", "loss/seq_clip_frac", "loss/seq_ratio_max"),
    "seed-grpo": ("seed/se_mean", "seed/factor_signal_mean", "seed/factor_signal_p10", "seed/factor_signal_p90",
                  "seed/factor_signal_min", "seed/factor_signal_max"),
    "em-ft": ("loss/entropy",),
    "em-rl": ("loss/kl_ref",),
}


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_ci(values: list[float]) -> dict:
    """``{"mean", "half", "n", "values"}``: the mean and the half-width of its 95% t interval (0 for n = 1)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "half": None, "n": 0, "values": []}
    m = sum(values) / n
    if n == 1:
        return {"mean": m, "half": None, "n": 1, "values": list(values)}
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return {"mean": m, "half": t975(n - 1) * sd / math.sqrt(n), "n": n, "values": list(values)}


def excludes_zero(stat: dict) -> bool | None:
    if stat["mean"] is None or stat["half"] is None:
        return None
    return abs(stat["mean"]) > stat["half"]


def final_eval(rdir: str) -> dict | None:
    """The last evaluation of a run (None when it has none)."""
    path = os.path.join(rdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    evals = [r for r in read_metrics(path) if r["kind"] == "eval"]
    return evals[-1] if evals else None


def train_rows(rdir: str) -> list[dict]:
    path = os.path.join(rdir, "metrics.jsonl")
    return [r for r in read_metrics(path) if r["kind"] == "train"] if os.path.isfile(path) else []


def mechanism(algo: str, rows: list[dict]) -> dict:
    """Step-averaged mechanism-check values of one run; for the fractions that must stay 0 also their
    maximum over steps, for SEED-GRPO's factor its minimum and maximum over steps."""
    out = {}
    for key in MECHANISM_KEYS.get(algo, ()):
        values = [float(r[key]) for r in rows if key in r]
        if not values:
            continue
        out[key] = sum(values) / len(values)
        if key.endswith("_frac") or key.endswith("_unguarded"):
            out[key + " (max over steps)"] = max(values)
        if key in ("seed/factor_signal_min", "seed/factor_signal_p10"):
            out[key + " (min over steps)"] = min(values)
        if key in ("seed/factor_signal_max", "seed/factor_signal_p90"):
            out[key + " (max over steps)"] = max(values)
    return out


def collect(output_dir: str, algos, seeds, baseline: str) -> dict:
    """Per algorithm: per-seed final metrics, their mean/CI, paired gains and differences to the baseline."""
    from .compare import BASE, run_dir

    base = {s: final_eval(run_dir(output_dir, BASE, s)) for s in seeds}
    finals = {a: {s: final_eval(run_dir(output_dir, a, s)) for s in seeds} for a in algos}
    result = {"base": {}, "algos": {}}
    for key in EVAL_METRICS:
        result["base"][key] = mean_ci([float(base[s][key]) for s in seeds if base[s] and key in base[s]])
    for algo in algos:
        entry = {"seeds_done": [s for s in seeds if finals[algo][s]], "metrics": {}, "gain": {}, "vs_baseline": {},
                 "mechanism": {}}
        for key in EVAL_METRICS:
            have = [s for s in seeds if finals[algo][s] and key in finals[algo][s]]
            entry["metrics"][key] = mean_ci([float(finals[algo][s][key]) for s in have])
            paired = [s for s in have if base[s] and key in base[s]]
            entry["gain"][key] = mean_ci([float(finals[algo][s][key]) - float(base[s][key]) for s in paired])
            if algo != baseline and baseline in finals:
                paired = [s for s in have if finals[baseline][s] and key in finals[baseline][s]]
                entry["vs_baseline"][key] = mean_ci(
                    [float(finals[algo][s][key]) - float(finals[baseline][s][key]) for s in paired])
        per_seed = [mechanism(algo, train_rows(run_dir(output_dir, algo, s))) for s in entry["seeds_done"]]
        keys = sorted({k for m in per_seed for k in m})
        for k in keys:
            values = [m[k] for m in per_seed if k in m]
            if "(max over steps)" in k:
                entry["mechanism"][k] = max(values)
            elif "(min over steps)" in k:
                entry["mechanism"][k] = min(values)
            else:
                entry["mechanism"][k] = sum(values) / len(values)
        result["algos"][algo] = entry
    return result


def _pm(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    if stat["half"] is None:
        return f"{stat['mean'] * scale:.{digits}f}"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['half'] * scale:.{digits}f}"


def _diff(stat: dict) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    text = _pm(stat)
    if not text.startswith("-"):
        text = "+" + text
    return f"**{text}**" if excludes_zero(stat) else text


def markdown(result: dict, meta: dict, baseline: str) -> str:
    """The comparison tables (accuracies in percent)."""
    base = result["base"]
    n = max((len(e["seeds_done"]) for e in result["algos"].values()), default=0)
    lines = [f"Held-out accuracy in % after training: mean ± 95% interval over seeds (n = {n}); "
             f"paired differences per seed (bold: the interval excludes 0).", "",
             "| method | greedy | sampled (mean of k) | gain greedy | gain sampled | "
             f"greedy vs {baseline} | sampled vs {baseline} | seeds |",
             "|---|---|---|---|---|---|---|---|",
             f"| base model | {_pm(base['eval/greedy_correct'])} | {_pm(base['eval/sampled_correct'])} | | | | | "
             f"{base['eval/greedy_correct']['n']} |"]
    for algo, e in result["algos"].items():
        m, g, v = e["metrics"], e["gain"], e["vs_baseline"]
        lines.append(f"| {algo} | {_pm(m['eval/greedy_correct'])} | {_pm(m['eval/sampled_correct'])} | "
                     f"{_diff(g['eval/greedy_correct'])} | {_diff(g['eval/sampled_correct'])} | "
                     f"{_diff(v.get('eval/greedy_correct'))} | {_diff(v.get('eval/sampled_correct'))} | "
                     f"{len(e['seeds_done'])} |")
    lines += ["", "The planted slice (2 operands with units digits 7 and 8; the warm-up taught a dropped carry) "
              "and the rest of the held-out set, in %:", "",
              "| method | slice greedy | slice sampled | slice: planted wrong answer (greedy) | "
              "gain slice greedy | rest greedy | gain rest greedy | entropy (nats/token) |",
              "|---|---|---|---|---|---|---|---|",
              f"| base model | {_pm(base['eval/greedy_correct/carry78'])} | {_pm(base['eval/sampled_correct/carry78'])} | "
              f"{_pm(base['eval/greedy_planted/carry78'])} | | {_pm(base['eval/greedy_correct/rest'])} | | "
              f"{_pm(base['eval/entropy'], 1, 3)} |"]
    for algo, e in result["algos"].items():
        m, g = e["metrics"], e["gain"]
        lines.append(f"| {algo} | {_pm(m['eval/greedy_correct/carry78'])} | {_pm(m['eval/sampled_correct/carry78'])} | "
                     f"{_pm(m['eval/greedy_planted/carry78'])} | {_diff(g['eval/greedy_correct/carry78'])} | "
                     f"{_pm(m['eval/greedy_correct/rest'])} | {_diff(g['eval/greedy_correct/rest'])} | "
                     f"{_pm(m['eval/entropy'], 1, 3)} |")
    lines += ["", "Mechanism checks (training-log values, averaged over steps and seeds; extremes over all steps):", ""]
    for algo, e in result["algos"].items():
        if e["mechanism"]:
            items = ", ".join(f"`{k}` {v:.4g}" for k, v in e["mechanism"].items())
            lines.append(f"- **{algo}**: {items}")
    if meta.get("command"):
        lines += ["", f"Command: `{meta['command']}`"]
    if meta.get("wall_s"):
        lines.append(f"Wall time of the whole comparison: {meta['wall_s'] / 60:.1f} min ({meta.get('jobs')} jobs).")
    return "\n".join(lines) + "\n"


def _accuracy_panel(ax, result: dict, algos, series) -> None:
    """Per method, mean and 95% interval bar of each ``(key, color, dx, label)``; the base model's interval as a band."""
    base = result["base"]
    for key, color, dx, label in series:
        b = base[key]
        if b["mean"] is not None:
            half = b["half"] or 0.0
            ax.axhspan(100 * (b["mean"] - half), 100 * (b["mean"] + half), color=color, alpha=0.12)
            ax.axhline(100 * b["mean"], color=color, lw=0.8, ls="--")
        xs, ys, es = [], [], []
        for i, algo in enumerate(algos):
            st = result["algos"][algo]["metrics"][key]
            if st["mean"] is None:
                continue
            xs.append(i + dx)
            ys.append(100 * st["mean"])
            es.append(100 * (st["half"] or 0.0))
            ax.plot([i + dx] * len(st["values"]), [100 * v for v in st["values"]], ".", color=color, alpha=0.35)
        ax.errorbar(xs, ys, yerr=es, fmt="o", color=color, capsize=4, label=f"{label} (dashed, band: base model)")
    ax.set_xticks(range(len(algos)), algos, rotation=30)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="best", fontsize=8)


def plot(output_dir: str, result: dict, algos, seeds, png_path: str, window: int = 10) -> str:
    """Left: final held-out greedy and sampled accuracy per method; right: greedy accuracy on the planted
    slice and on the rest. Means over seeds with 95% interval bars, seeds as dots, the base model's
    interval as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_acc, ax_slice = fig.subplots(1, 2)
    _accuracy_panel(ax_acc, result, algos, (("eval/greedy_correct", "C0", -0.15, "greedy"),
                                            ("eval/sampled_correct", "C1", 0.15, "sampled (mean of k)")))
    ax_acc.set_ylabel("held-out accuracy after training (%)")
    ax_acc.set_title("all held-out problems", fontsize=10)
    _accuracy_panel(ax_slice, result, algos, (("eval/greedy_correct/carry78", "C2", -0.15, "planted slice, greedy"),
                                              ("eval/greedy_correct/rest", "C4", 0.15, "rest, greedy")))
    ax_slice.set_ylabel("held-out greedy accuracy after training (%)")
    ax_slice.set_title("planted dropped-carry slice vs the rest", fontsize=10)
    n = max((len(e["seeds_done"]) for e in result["algos"].values()), default=0)
    fig.suptitle(f"entropy-ops compare: {n} seeds per method, 95% intervals over seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path)
    return png_path


def report(output_dir: str, algos, seeds, *, walls: dict | None = None, meta: dict | None = None,
           baseline: str = "grpo", window: int = 10) -> dict:
    """Write ``comparison.{json,md,png}`` in ``output_dir``; returns the collected statistics."""
    meta = meta or {}
    result = collect(output_dir, algos, seeds, baseline)
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result, meta, baseline))
    with open(os.path.join(output_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "runs": walls or {}, "result": result}, f, indent=1)
    plot(output_dir, result, algos, seeds, os.path.join(output_dir, "comparison.png"), window=window)
    return result
