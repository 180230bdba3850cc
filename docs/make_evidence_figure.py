"""docs/evidence.png: the evidence recipe's test Dice per method and seed, and what the full method's networks did.

    python docs/make_evidence_figure.py \
        --groups "{'': 'docs/benchmark/evidence', 'SimMIM start': 'docs/benchmark/evidence_ssl'}" \
        --out docs/evidence.png

Reads each run's ``result.json`` and ``diagnostics.csv`` (a run folder of ``scripts.experiments.compare``, or its
committed copy under docs/benchmark/): left, each run's test
Dice (dots) and the mean over seeds (bar) per method; middle, the validation Dice of the UNeXt, the Swin-Unet and
its EMA teacher over the iterations (mean over the full method's seeds); right, the Dice of each network's hard
pseudo-labels on unlabelled images against their hidden masks, and the ramped weights.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import fire
from matplotlib.figure import Figure

ORDER = ("supervised", "supervised_same_batch", "no_divergence", "full")


def _runs(folder: Path) -> list[tuple[Path, dict]]:
    return [(p.parent, json.loads(p.read_text())) for p in sorted(folder.glob("*/result.json"))]


def _curves(run_dirs: list[Path], keys: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    tables = []
    for run in run_dirs:
        path = next((p for p in (run / "diagnostics.csv", run / "eval" / "diagnostics.csv") if p.is_file()), None)
        if path is not None:
            with open(path) as f:
                tables.append({int(r["iteration"]): r for r in csv.DictReader(f)})
    out = {}
    if not tables:
        return out
    its = sorted(set.intersection(*(set(t) for t in tables)))
    for key in keys:
        values = [[float(t[i][key]) for t in tables if t[i].get(key) not in (None, "")] for i in its]
        if all(values):
            out[key] = (its, [statistics.fmean(v) for v in values])
    return out


def main(groups: dict, out: str = "docs/evidence.png") -> str:
    fig = Figure(figsize=(15, 4.2), dpi=110)
    left, middle, right = fig.subplots(1, 3)
    labels, x = [], 0
    full_dirs = []
    for group, folder in groups.items():
        runs = _runs(Path(folder))
        methods = sorted({r["method"] for _, r in runs}, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
        for method in methods:
            dice = [r["mean"]["dice"] for _, r in runs if r["method"] == method]
            left.bar(x, statistics.fmean(dice), color="C0" if method != "full" else "C3", alpha=0.5)
            left.scatter([x] * len(dice), dice, color="k", s=12, zorder=3)
            labels.append(f"{method}\n{group}".strip() + f"\n({len(dice)} seeds)")
            if method == "full" and not group:
                full_dirs = [d for d, r in runs if r["method"] == "full"]
            x += 1
    left.set_xticks(range(len(labels)), labels, fontsize=7)
    left.set(ylabel="test Dice (UNeXt)", title="test Dice: seeds (dots) and mean (bar)")
    lows = [p.get_height() for p in left.patches]
    left.set_ylim(max(0.0, min(lows) - 0.15) if lows else 0, 1)
    curves = _curves(
        full_dirs,
        (
            "val_dice_a",
            "val_dice_b",
            "val_dice_teacher",
            "pseudo_dice_a",
            "pseudo_dice_b",
            "pseudo_dice_teacher",
            "w_cps",
            "w_ict",
            "w_div",
        ),
    )
    names = {
        "val_dice_a": "UNeXt",
        "val_dice_b": "Swin-Unet",
        "val_dice_teacher": "EMA teacher",
        "pseudo_dice_a": "UNeXt pseudo-labels",
        "pseudo_dice_b": "Swin-Unet pseudo-labels",
        "pseudo_dice_teacher": "teacher pseudo-labels",
    }
    for key, (its, values) in curves.items():
        if key.startswith("val_"):
            middle.plot(its, values, marker=".", label=names[key])
        elif key.startswith("pseudo_"):
            right.plot(its, values, marker=".", label=names[key])
    weights = right.twinx()
    for key in ("w_cps", "w_ict", "w_div"):
        if key in curves:
            weights.plot(*curves[key], linestyle=":", label=key)
    weights.set(ylabel="ramped weight", ylim=(0, 1.05))
    middle.set(
        xlabel="iteration",
        ylabel="validation Dice (mean over seeds)",
        ylim=(0, 1),
        title="full method: the three networks",
    )
    right.set(
        xlabel="iteration",
        ylabel="Dice against the hidden masks",
        ylim=(0, 1),
        title="full method: pseudo-labels on unlabelled images",
    )
    for ax in (middle, right, weights):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if ax is not weights else "lower center")
    fig.tight_layout()
    fig.savefig(out)
    return out


if __name__ == "__main__":
    fire.Fire(main)
