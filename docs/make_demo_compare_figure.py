"""docs/demo_compare_paired.png: the demo schedule's full method against same-batch supervised-only, seed by seed.

    python docs/make_demo_compare_figure.py --out docs/demo_compare_paired.png --folders \
        "{'5 % labels (8 images)': 'docs/benchmark/demo_compare_cpu',
          '25 % labels (42 images)': 'docs/benchmark/demo_compare_25_cpu'}"

Reads each run's ``result.json`` (a ``scripts.experiments.compare`` output folder, or its committed copy under
docs/benchmark/). One panel per folder: each seed's test Dice of the baseline and of the method joined by a line
(the seeds share their split and schedule, so each line is one paired comparison), and the means as bars.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import fire
from matplotlib.figure import Figure


def draw(folders: dict[str, str], out: str, method: str = "full", baseline: str = "supervised_same_batch") -> None:
    figure = Figure(figsize=(4.2 * len(folders), 3.6), layout="constrained")
    axes = figure.subplots(1, len(folders), sharey=True, squeeze=False)[0]
    for ax, (title, folder) in zip(axes, folders.items()):
        dice = {}
        for path in sorted(Path(folder).glob("*/result.json")):
            run = json.loads(path.read_text())
            dice.setdefault(run["seed"], {})[run["method"]] = run["mean"]["dice"]
        paired = {seed: d for seed, d in dice.items() if method in d and baseline in d}
        if not paired:
            raise ValueError(f"{folder}: no seed has both a {method} and a {baseline} run")
        for name, x in ((baseline, 0), (method, 1)):
            ax.bar(x, statistics.fmean(d[name] for d in paired.values()), width=0.6, color="0.85")
        lines = []
        for seed, d in sorted(paired.items()):
            gain = d[method] - d[baseline]
            ax.plot([0, 1], [d[baseline], d[method]], marker="o", color="tab:green" if gain > 0 else "tab:red")
            lines.append(f"seed {seed}: {gain:+.3f}")
        text = f"{method} − baseline\n" + "\n".join(lines)
        ax.text(0.03, 0.03, text, transform=ax.transAxes, va="bottom", fontsize=8)
        ax.set_xticks([0, 1], [baseline.replace("_", " "), method])
        ax.set_xlim(-0.5, 1.5)
        ax.set_title(title)
    axes[0].set_ylabel("test Dice of the UNeXt")
    axes[0].set_ylim(0.5, 0.9)
    figure.suptitle("demo schedule (140 iterations, terms at 0.1): same split per seed")
    figure.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(draw)
