"""Method comparison runner: train and evaluate every method at several labelled fractions and seeds, then tabulate.

    python -m scripts.compare run --output_dir runs/compare --methods "['supervised','full']" \
        --fractions "[0.05, 0.1]" --seeds "[0, 1, 2]" --overrides "{'total_iterations': 240}"
    python -m scripts.compare table --output_dir runs/compare

Each (method, fraction, seed) trains with ``configs/train.json`` + ``configs/methods/<method>.json`` in its own
folder, then ``evaluate.json`` scores its UNeXt on the test list of that fraction and seed. A run whose
``result.json`` exists is not recomputed, so an interrupted comparison resumes where it stopped. The
fully supervised upper bound does not depend on the fraction: it runs once per seed and is reported as 100 %. The table
(``results.csv``, ``results.md``) gives mean ± sample standard deviation over seeds; ``dice_by_method.png`` and
``validation_dice.png`` draw the results.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire

from scripts.files import write_atomic, write_json_atomic

__all__ = ["run_all", "summarise", "mean_std", "write_table"]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("dice", "hd95_mm", "asd_mm", "hd95_px", "asd_px")
FULLY_SUPERVISED = "fully_supervised"


def run_name(method: str, fraction: float, seed: int) -> str:
    return f"{method}__frac{fraction:g}__seed{seed}"


def _bundle(config_files: Sequence[Path], overrides: dict, log: Path) -> None:
    """One ``python -m monai.bundle run`` in a subprocess, its output appended to ``log``; fails with the log's name."""
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[3:6]} failed (exit {done.returncode}): see {log}")


def train_and_evaluate(run_dir: Path, method: str, fraction: float, seed: int, dataset_dir: str,
                       overrides: dict) -> dict:
    """Train one method, evaluate it on the test list; returns the evaluation's mean metrics and its wall time."""
    configs = BUNDLE_ROOT / "configs"
    common = {"bundle_root": str(run_dir), "dataset_dir": dataset_dir, "seed": seed,
              "prepared_dir": str(run_dir.parent / f"prepared_frac{fraction:g}_seed{seed}"), **overrides}
    common["labeled_fraction"] = fraction
    start = time.perf_counter()
    _bundle([configs / "train.json", configs / "methods" / f"{method}.json"], common, run_dir / "log.txt")
    _bundle([configs / "train.json", configs / "methods" / f"{method}.json", configs / "evaluate.json"], common,
            run_dir / "log.txt")
    summary = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    return {"mean": summary["mean"], "n_images": summary["n_images"],
            "n_empty_predictions": summary["n_empty_predictions"], "wall_s": time.perf_counter() - start}


def run_all(output_dir: str, methods: Sequence[str], fractions: Sequence[float], seeds: Sequence[int],
            dataset_dir: str | None = None, overrides: dict | None = None,
            runner: Callable[..., dict] = train_and_evaluate) -> list[dict]:
    """Every (method, fraction, seed) not yet finished; returns all results (finished earlier ones included)."""
    out = Path(output_dir).resolve()
    dataset_dir = dataset_dir or str(out / "data" / "phantom")
    overrides = dict(overrides or {})
    if "dataset_dir" not in overrides and dataset_dir == str(out / "data" / "phantom"):
        overrides["generate_phantom_if_empty"] = True
    results = []
    # the upper bound uses every label whatever the fraction: one run per seed, reported as 100 %
    jobs = list(dict.fromkeys((m, 1.0 if m == FULLY_SUPERVISED else f, s) for f in fractions for m in methods
                              for s in seeds))
    for i, (method, fraction, seed) in enumerate(jobs, 1):
        run_dir = out / run_name(method, fraction, seed)
        result_file = run_dir / "result.json"
        if result_file.is_file():
            logger.info(f"[{i}/{len(jobs)}] {run_dir.name}: done earlier, skipped")
        else:
            logger.info(f"[{i}/{len(jobs)}] {run_dir.name}: training and evaluating")
            run_dir.mkdir(parents=True, exist_ok=True)
            result = runner(run_dir, method, fraction, seed, dataset_dir, overrides)
            result.update(method=method, fraction=fraction, seed=seed)
            write_json_atomic(result_file, result)
        results.append(json.loads(result_file.read_text()))
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: Sequence[dict]) -> list[dict]:
    """One row per (method, fraction): n seeds and mean/std of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], float(r["fraction"])), []).append(r)
    rows = []
    for (method, fraction), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"method": method, "fraction": fraction, "seeds": len(runs)}
        for metric in METRICS:
            values = [r["mean"][metric] for r in runs if r["mean"].get(metric) is not None]
            if values:
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean_std(values)
        rows.append(row)
    return rows


def write_table(rows: Sequence[dict], output_dir: str | Path) -> None:
    """results.csv (every number) and results.md (mean ± std, Dice to 3 decimals, distances to 2)."""
    out = Path(output_dir)
    fields = ["method", "fraction", "seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]

    def write_csv(f):
        f.write(",".join(fields) + "\n")
        for row in rows:
            f.write(",".join("" if row.get(k) is None else str(row.get(k, "")) for k in fields) + "\n")

    write_atomic(out / "results.csv", write_csv)
    lines = ["| method | labelled | seeds | Dice | HD95 (mm) | ASD (mm) | HD95 (px) | ASD (px) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = []
        for metric, digits in zip(METRICS, (3, 2, 2, 1, 1)):
            mean = row.get(f"{metric}_mean")
            cells.append("n/a" if mean is None else f"{mean:.{digits}f} ± {row[f'{metric}_std']:.{digits}f}")
        lines.append(f"| {row['method']} | {row['fraction']:.0%} | {row['seeds']} | " + " | ".join(cells) + " |")
    write_atomic(out / "results.md", lambda f: f.write("\n".join(lines) + "\n"))


def plot(results: Sequence[dict], rows: Sequence[dict], output_dir: str | Path) -> None:
    """dice_by_method.png (mean ± std per method and fraction) and validation_dice.png (curves of seed runs)."""
    import csv

    from matplotlib.figure import Figure

    out = Path(output_dir)
    fractions = sorted({r["fraction"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(max(6, 1.2 * len(methods)), 4), dpi=110)
    ax = fig.subplots()
    width = 0.8 / max(1, len(fractions))
    for j, fraction in enumerate(fractions):
        sel = {r["method"]: r for r in rows if r["fraction"] == fraction}
        xs = [i + j * width for i, m in enumerate(methods) if m in sel]
        ax.bar(xs, [sel[m]["dice_mean"] for m in methods if m in sel], width,
               yerr=[sel[m]["dice_std"] for m in methods if m in sel], capsize=3, label=f"{fraction:.0%} labelled")
    ax.set_xticks([i + width * (len(fractions) - 1) / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set(ylabel="test Dice (mean ± std over seeds)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    write_atomic(out / "dice_by_method.png", lambda f: fig.savefig(f, format="png"), binary=True)

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    for colour, method in enumerate(methods):
        for r in results:
            curve = out / run_name(method, r["fraction"], r["seed"]) / "eval" / "validation.csv"
            if r["method"] != method or not curve.is_file():
                continue
            with open(curve) as f:
                points = list(csv.DictReader(f))
            ax.plot([int(p["iteration"]) for p in points], [float(p["val_mean_dice"]) for p in points],
                    color=f"C{colour}", alpha=0.6, label=f"{method}" if r["seed"] == min(x["seed"] for x in results) else None)
    ax.set(xlabel="iteration", ylabel="validation Dice", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(out / "validation_dice.png", lambda f: fig.savefig(f, format="png"), binary=True)


class CompareCLI:
    def run(self, output_dir: str = "runs/compare", methods: Sequence[str] = ("supervised", "fully_supervised", "full"),
            fractions: Sequence[float] = (0.05, 0.1), seeds: Sequence[int] = (0, 1, 2), dataset_dir: str | None = None,
            overrides: dict | None = None) -> None:
        """Train and evaluate every (method, fraction, seed) not done yet, then write the table and plots."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        results = run_all(output_dir, methods, fractions, seeds, dataset_dir, overrides)
        self.table(output_dir, results)

    def table(self, output_dir: str = "runs/compare", results: list[dict] | None = None) -> None:
        """Rebuild results.csv / results.md and the plots from the finished runs in ``output_dir``."""
        out = Path(output_dir)
        results = results or [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
        rows = summarise(results)
        write_table(rows, out)
        plot(results, rows, out)
        print((out / "results.md").read_text())


if __name__ == "__main__":
    fire.Fire(CompareCLI)
