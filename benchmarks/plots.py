"""PNG plots of a results file: time and peak memory vs tokens, one line per implementation.

One figure per (op, vocab, hidden size, dtype): the top row is the median time,
the bottom row the peak extra memory, one column per mode; both axes are log
scale. Cells that ran out of memory are listed in the legend ("oom at N>=...");
unavailable and failed cells are left out.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _figure_key(cell: dict) -> tuple:
    s = cell["shape"]
    return (cell["op"], s["vocab"], s["hidden"], s["softcap"], cell["dtype"])


def _file_name(key: tuple) -> str:
    op, vocab, hidden, softcap, dtype = key
    parts = [op, f"V{vocab}"]
    if hidden is not None:
        parts.append(f"D{hidden}")
    if softcap is not None:
        parts.append(f"cap{softcap:g}")
    parts.append(dtype)
    return "_".join(parts) + ".png"


def draw_all(results: dict, out_dir: Path) -> list[Path]:
    """Draw every figure into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = defaultdict(list)
    for cell in results["cells"]:
        figures[_figure_key(cell)].append(cell)
    written = []
    device = results["environment"].get("device_name", "?")
    palette = plt.get_cmap("tab10").colors
    # One colour per implementation name across every figure of the run.
    names = list(dict.fromkeys(i["name"] for i in results["impls"]))
    colours = {name: palette[k % len(palette)] for k, name in enumerate(names)}
    for key, cells in sorted(figures.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        modes = [m for m in ("fwd", "fwd_bwd") if any(c["mode"] == m for c in cells)]
        if not any(c["status"] == "ok" for c in cells):
            continue
        fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes), 8), squeeze=False)
        for col, mode in enumerate(modes):
            lines = defaultdict(list)
            oom = defaultdict(list)
            for c in cells:
                if c["mode"] != mode:
                    continue
                if c["status"] == "ok":
                    lines[c["impl"]].append((c["shape"]["n_tokens"], c["time_ms"], c["peak_mem_bytes"]))
                elif c["status"] == "oom":
                    oom[c["impl"]].append(c["shape"]["n_tokens"])
            for impl in sorted(set(lines) | set(oom), key=lambda name: (not name.startswith("ours"), name)):
                pts = sorted(lines.get(impl, []))
                label = impl + (f" (oom at N>={min(oom[impl])})" if oom.get(impl) else "")
                style = dict(marker="o", color=colours.get(impl), linewidth=2.5 if impl.startswith("ours") else 1.2,
                             linestyle="--" if impl == "ours-inplace" else "-")
                xs = [p[0] for p in pts]
                axes[0][col].plot(xs, [p[1] for p in pts], label=label, **style)
                axes[1][col].plot(xs, [max(p[2], 1) / 2**20 for p in pts], label=label, **style)
            axes[0][col].set_title(f"{mode}: median time")
            axes[1][col].set_title(f"{mode}: peak extra memory")
            axes[0][col].set_ylabel("ms")
            axes[1][col].set_ylabel("MiB")
            for row in (0, 1):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens N")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        op, vocab, hidden, softcap, dtype = key
        title = f"{op} op, V={vocab}" + (f", D={hidden}" if hidden else "") + \
            (f", softcap={softcap:g}" if softcap else "") + f", {dtype} on {device}"
        fig.suptitle(title)
        fig.tight_layout()
        path = Path(out_dir) / _file_name(key)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
