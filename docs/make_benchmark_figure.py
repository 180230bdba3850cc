"""Draw docs/benchmark.png from finished comparison runs (scripts.experiments.compare output folders).

    python docs/make_benchmark_figure.py --out docs/benchmark.png \
        --groups "{'CPU, demo schedule': 'runs/compare_cpu', 'H100, demo schedule': 'runs/gpu/grid', \
                   'CPU, ramp over the run': 'runs/compare_cpu_ramp'}" \
        --paper runs/gpu/paper

Left: test Dice (mean ± std over seeds, dots for single seeds) of every method at 5 % labels, one colour per group.
Right: validation Dice over iterations of the runs in ``--paper`` (the paper's recipe).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import fire
from matplotlib.figure import Figure

from scripts.experiments.compare import METHODS


def _results(folder: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*/result.json"))]


def main(out: str, groups: dict, paper: str | None = None, fraction: float = 0.05) -> None:
    fig = Figure(figsize=(13, 4.6), dpi=110)
    ax, ax_paper = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.7, 1]})
    per_group = {name: _results(folder) for name, folder in groups.items()}
    methods = [m for m in METHODS if any(r["method"] == m for rs in per_group.values() for r in rs)]
    width = 0.8 / max(1, len(per_group))
    for j, (name, results) in enumerate(per_group.items()):
        for i, method in enumerate(methods):
            wanted = 1.0 if method == "fully_supervised" else fraction
            dice = [r["mean"]["dice"] for r in results if r["method"] == method and float(r["fraction"]) == wanted]
            if not dice:
                continue
            x = i + (j - (len(per_group) - 1) / 2) * width
            std = statistics.stdev(dice) if len(dice) > 1 else 0.0
            ax.bar(
                x,
                statistics.fmean(dice),
                width,
                yerr=std,
                capsize=2,
                color=f"C{j}",
                label=name
                if i == min(k for k, m in enumerate(methods) if any(r["method"] == m for r in results))
                else None,
            )
            ax.scatter([x] * len(dice), dice, s=6, color="black", zorder=3)
    ax.set_xticks(range(len(methods)), [m.replace("_", " ") for m in methods], rotation=30, ha="right")
    ax.set(
        ylabel="test Dice (bars: mean ± std over seeds)",
        ylim=(0.5, 1.0),
        title=f"phantom test list, {fraction:.0%} labels (fully supervised: 100 %)",
    )
    ax.legend(fontsize=8, loc="upper right")

    if paper:
        for colour, method in enumerate(("supervised", "full")):
            for run in sorted(Path(paper).glob(f"{method}__*")):
                curve = run / "eval" / "validation.csv"
                if curve.is_file():
                    with open(curve) as f:
                        points = list(csv.DictReader(f))
                    label = method.replace("_", " ") + ("" if (run / "result.json").is_file() else " (stopped early)")
                    ax_paper.plot(
                        [int(p["iteration"]) for p in points],
                        [float(p["val_mean_dice"]) for p in points],
                        color=f"C{colour + 3}",
                        label=label,
                    )
        ax_paper.set(
            xlabel="iteration",
            ylabel="validation Dice",
            ylim=(0, 1),
            title="paper's recipe (448 px, 5 %, batch 1 + 4), H100",
        )
        ax_paper.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(main)
