"""Method comparison runner: train and evaluate every method at several labelled fractions and seeds, then tabulate.

    python -m scripts.experiments.compare run --output_dir runs/compare --methods "['supervised','full']" \
        --fractions "[0.05, 0.1]" --seeds "[0, 1, 2]" --overrides "{'total_iterations': 240}"
    python -m scripts.experiments.compare table --output_dir runs/compare

Each (method, fraction, seed) trains with ``configs/train.json`` + ``configs/methods/<method>.json`` in its own
folder, then ``evaluate.json`` scores its UNeXt on the test list of that fraction and seed. A run whose
``result.json`` exists is not recomputed, so an interrupted comparison resumes where it stopped. The
fully supervised upper bound does not depend on the fraction: it runs once per seed and is reported as 100 %. The table
(``results.csv``, ``results.md``) gives mean ± sample standard deviation over seeds; ``dice_by_method.png`` and
``validation_dice.png`` draw the results.

``--workers N`` runs N trainings at once (each with cpu_count // N threads): worth it on a GPU, whose small-batch
runs are bound by Python and kernel launches, not on a small CPU. The data splits are prepared once up front so
that concurrent runs never write the same files.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.utils.files import write_atomic, write_json_atomic

__all__ = ["run_all", "summarise", "mean_std", "write_table"]

logger = logging.getLogger(__name__)

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
METRICS = ("dice", "hd95_mm", "asd_mm", "hd95_px", "asd_px", "hd95_medpy_grid_px", "asd_medpy_grid_px")
FULLY_SUPERVISED = "fully_supervised"
# every configs/methods/*.json, in the order the table lists them: baselines, then the method's ablations, then it
METHODS = (
    "supervised",
    "supervised_same_batch",
    "fully_supervised",
    "mean_teacher",
    "ict_unext",
    "cps_two_unext",
    "cross_teaching",
    "no_cps",
    "no_ict",
    "no_divergence",
    "full",
)


def label_tag(labels: float | str) -> str:
    """A labelled share as it appears in names: ``frac0.05`` for a fraction, ``n25`` for a count (given as "n25")."""
    return labels if isinstance(labels, str) else f"frac{labels:g}"


def label_text(labels: float | str) -> str:
    """A labelled share as the tables show it: ``5%`` or ``25 images``."""
    return f"{labels[1:]} images" if isinstance(labels, str) else f"{labels:.0%}"


def _label_key(labels: float | str) -> tuple:
    return (1, int(labels[1:])) if isinstance(labels, str) else (0, float(labels))


def label_overrides(labels: float | str) -> dict:
    """The config values of a labelled share: a fraction, or an exact count ("n25": ``labeled_count`` 25)."""
    if isinstance(labels, str):
        if not (labels.startswith("n") and labels[1:].isdigit()):
            raise ValueError(f"a labelled count is written n<images>, e.g. n25; got {labels!r}")
        return {"labeled_count": int(labels[1:])}
    return {"labeled_fraction": float(labels)}


def run_name(method: str, fraction: float | str, seed: int) -> str:
    return f"{method}__{label_tag(fraction)}__seed{seed}"


def _bundle(config_files: Sequence[Path], overrides: dict, log: Path, threads: int | None = None) -> None:
    """One ``python -m monai.bundle run`` in a subprocess, its output appended to ``log``; fails with the log's name."""
    files = "[" + ",".join(f"'{f}'" for f in config_files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        cmd += [f"--{key}", repr(value) if not isinstance(value, str) else value]
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        done = subprocess.run(cmd, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[3:6]} failed (exit {done.returncode}): see {log}")


def prepared_dir(output_dir: Path, fraction: float, seed: int) -> Path:
    """The split of one (fraction, seed), shared by every method so that all see the same images."""
    return output_dir / f"prepared_{label_tag(fraction)}_seed{seed}"


def prepare_splits(output_dir: Path, keys: Sequence[tuple[float, int]], dataset_dir: str, overrides: dict) -> None:
    """Write each (fraction, seed) datalist (and the phantom, if due) before any training starts."""
    from scripts.data import prepare_dataset

    phantom = {k: overrides[k] for k in ("phantom_subjects", "phantom_image_size") if k in overrides}
    split = {k: overrides[k] for k in ("max_train_images",) if k in overrides}
    for fraction, seed in keys:
        prepare_dataset(
            dataset_dir,
            prepared_dir(output_dir, fraction, seed),
            seed=seed,
            **label_overrides(fraction),
            generate_phantom_if_empty=bool(overrides.get("generate_phantom_if_empty", False)),
            **phantom,
            **split,
        )


def train_and_evaluate(
    run_dir: Path,
    method: str,
    fraction: float,
    seed: int,
    dataset_dir: str,
    overrides: dict,
    threads: int | None = None,
    recipe: str | None = None,
) -> dict:
    """Train one method, evaluate it on the test list; returns the evaluation's mean metrics and its wall time.

    ``recipe``: a config merged between train.json and the method's file (e.g. ``configs/paper_recipe.json``).
    """
    configs = BUNDLE_ROOT / "configs"
    common = {
        "bundle_root": str(run_dir),
        "dataset_dir": dataset_dir,
        "seed": seed,
        "prepared_dir": str(prepared_dir(run_dir.parent, fraction, seed)),
        **overrides,
    }
    common.update(label_overrides(fraction))
    train = [
        configs / "train.json",
        *([Path(recipe).resolve()] if recipe else []),
        configs / "methods" / f"{method}.json",
    ]
    start = time.perf_counter()
    _bundle(train, common, run_dir / "log.txt", threads)
    _bundle([*train, configs / "evaluate.json"], common, run_dir / "log.txt", threads)
    summary = json.loads((run_dir / "eval" / "test" / "metrics.json").read_text())
    return {
        "mean": summary["mean"],
        "n_images": summary["n_images"],
        "n_empty_predictions": summary["n_empty_predictions"],
        "wall_s": time.perf_counter() - start,
    }


def run_all(
    output_dir: str,
    methods: Sequence[str],
    fractions: Sequence[float | str],
    seeds: Sequence[int],
    dataset_dir: str | None = None,
    overrides: dict | None = None,
    runner: Callable[..., dict] = train_and_evaluate,
    workers: int = 1,
    threads: int | None = None,
    recipe: str | None = None,
) -> list[dict]:
    """Every (method, fraction, seed) not yet finished, ``workers`` at a time; returns all results (earlier ones too).

    ``fractions``: labelled fractions (0.05) or exact labelled counts written ``"n25"`` (the paper's protocol).
    ``threads``: CPU threads per run (default: all cores for one worker, an equal share for several).
    """
    if recipe and not Path(recipe).is_file():
        raise FileNotFoundError(f"recipe config {recipe} not found")
    out = Path(output_dir).resolve()
    dataset_dir = dataset_dir or str(out / "data" / "phantom")
    overrides = dict(overrides or {})
    if "dataset_dir" not in overrides and dataset_dir == str(out / "data" / "phantom"):
        overrides["generate_phantom_if_empty"] = True
    # the upper bound uses every label whatever the fraction: one run per seed, reported as 100 %
    jobs = list(
        dict.fromkeys((m, 1.0 if m == FULLY_SUPERVISED else f, s) for f in fractions for m in methods for s in seeds)
    )
    todo = [job for job in jobs if not (out / run_name(*job) / "result.json").is_file()]
    logger.info(f"{len(jobs)} runs, {len(jobs) - len(todo)} done earlier, {len(todo)} to do with {workers} worker(s)")
    if workers > 1 and runner is train_and_evaluate:
        prepare_splits(out, list(dict.fromkeys((f, s) for _, f, s in todo)), dataset_dir, overrides)
    threads = threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)

    def one(numbered: tuple[int, tuple[str, float, int]]) -> None:
        i, (method, fraction, seed) = numbered
        run_dir = out / run_name(method, fraction, seed)
        logger.info(f"[{i}/{len(todo)}] {run_dir.name}: training and evaluating")
        run_dir.mkdir(parents=True, exist_ok=True)
        kwargs = {k: v for k, v in (("threads", threads), ("recipe", recipe)) if v}
        result = runner(run_dir, method, fraction, seed, dataset_dir, overrides, **kwargs)
        result.update(method=method, fraction=fraction, seed=seed)
        write_json_atomic(run_dir / "result.json", result)
        logger.info(f"[{i}/{len(todo)}] {run_dir.name}: Dice {result['mean']['dice']:.3f} in {result['wall_s']:.0f} s")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, enumerate(todo, 1)))  # list() re-raises the first failure
    return [json.loads((out / run_name(*job) / "result.json").read_text()) for job in jobs]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: Sequence[dict]) -> list[dict]:
    """One row per (method, fraction): n seeds and mean/std of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        label = r["fraction"] if isinstance(r["fraction"], str) else float(r["fraction"])
        groups.setdefault((r["method"], label), []).append(r)
    rows = []
    order = lambda kv: (
        _label_key(kv[0][1]),
        METHODS.index(kv[0][0]) if kv[0][0] in METHODS else len(METHODS),
        kv[0][0],
    )  # noqa: E731
    for (method, fraction), runs in sorted(groups.items(), key=order):
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
    lines = [
        "| method | labelled | seeds | Dice | HD95 (mm) | ASD (mm) | HD95 (px) | ASD (px) | HD95 medpy (grid px) "
        "| ASD medpy (grid px) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = []
        for metric, digits in zip(METRICS, (3, 2, 2, 1, 1, 2, 2)):
            mean = row.get(f"{metric}_mean")
            cells.append("n/a" if mean is None else f"{mean:.{digits}f} ± {row[f'{metric}_std']:.{digits}f}")
        lines.append(
            f"| {row['method']} | {label_text(row['fraction'])} | {row['seeds']} | " + " | ".join(cells) + " |"
        )
    write_atomic(out / "results.md", lambda f: f.write("\n".join(lines) + "\n"))


def plot(results: Sequence[dict], rows: Sequence[dict], output_dir: str | Path) -> None:
    """dice_by_method.png (mean ± std per method and fraction) and validation_dice.png (curves of seed runs)."""
    import csv

    from matplotlib.figure import Figure

    out = Path(output_dir)
    fractions = sorted({r["fraction"] for r in rows}, key=_label_key)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig = Figure(figsize=(max(6, 1.2 * len(methods)), 4), dpi=110)
    ax = fig.subplots()
    width = 0.8 / max(1, len(fractions))
    for j, fraction in enumerate(fractions):
        sel = {r["method"]: r for r in rows if r["fraction"] == fraction}
        xs = [i + j * width for i, m in enumerate(methods) if m in sel]
        ax.bar(
            xs,
            [sel[m]["dice_mean"] for m in methods if m in sel],
            width,
            yerr=[sel[m]["dice_std"] for m in methods if m in sel],
            capsize=3,
            label=f"{label_text(fraction)} labelled",
        )
    ax.set_xticks([i + width * (len(fractions) - 1) / 2 for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set(ylabel="test Dice (mean ± std over seeds)", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    write_atomic(out / "dice_by_method.png", lambda f: fig.savefig(f, format="png"), binary=True)

    # validation Dice over iterations, mean over seeds, one panel per labelled fraction
    fig = Figure(figsize=(6 * len(fractions), 4), dpi=110)
    axes = fig.subplots(1, len(fractions), squeeze=False)[0]
    for ax, fraction in zip(axes, fractions):
        for colour, method in enumerate(methods):
            curves = []
            for r in results:
                curve = out / run_name(method, r["fraction"], r["seed"]) / "eval" / "validation.csv"
                if r["method"] == method and r["fraction"] == fraction and curve.is_file():
                    with open(curve) as f:
                        curves.append({int(p["iteration"]): float(p["val_mean_dice"]) for p in csv.DictReader(f)})
            if curves:
                its = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(
                    its,
                    [statistics.fmean(c[i] for c in curves) for i in its],
                    color=f"C{colour % 10}",
                    linestyle="-" if colour < 10 else "--",
                    label=f"{method} ({len(curves)} seeds)",
                )
        ax.set(
            title=f"{label_text(fraction)} labelled",
            xlabel="iteration",
            ylabel="validation Dice (mean over seeds)",
            ylim=(0, 1),
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(out / "validation_dice.png", lambda f: fig.savefig(f, format="png"), binary=True)


PAIRED_METRICS = ("dice", "hd95_medpy_grid_px", "asd_medpy_grid_px", "hd95_mm", "asd_mm")


def paired_differences(
    results: Sequence[dict], method: str, baseline: str, metrics: Sequence[str] = PAIRED_METRICS
) -> list[dict]:
    """Per (labelled share, seed) present for both: ``method`` minus ``baseline`` of each metric's test mean; the
    seeds share their split and schedule, so these differences are paired."""
    by_key = {(r["method"], str(r["fraction"]), r["seed"]): r for r in results}
    rows = []
    for (m, labels, seed), r in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        other = by_key.get((baseline, labels, seed))
        if m != method or other is None:
            continue
        rows.append(
            {
                "labels": r["fraction"],
                "seed": seed,
                **{
                    k: r["mean"][k] - other["mean"][k]
                    for k in metrics
                    if r["mean"].get(k) is not None and other["mean"].get(k) is not None
                },
            }
        )
    return rows


def write_paired(results: Sequence[dict], output_dir: str | Path, pairs: Sequence[Sequence[str]]) -> None:
    """paired.md: per-seed differences (method - baseline) of the test means, and their mean ± std over seeds."""
    lines = []
    for method, baseline in pairs:
        rows = paired_differences(results, method, baseline)
        if not rows:
            continue
        lines += [
            f"**{method} − {baseline}** (test means, per seed; negative distances are better)",
            "",
            "| labelled | seed | " + " | ".join(PAIRED_METRICS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in PAIRED_METRICS) + " |",
        ]
        for row in rows:
            cells = [
                "n/a" if k not in row else f"{row[k]:+.3f}" if k == "dice" else f"{row[k]:+.2f}" for k in PAIRED_METRICS
            ]
            lines.append(f"| {label_text(row['labels'])} | {row['seed']} | " + " | ".join(cells) + " |")
        summary = []
        for k in PAIRED_METRICS:
            values = [row[k] for row in rows if k in row]
            if not values:
                summary.append("n/a")
                continue
            mean, std = mean_std(values)
            summary.append(f"{mean:+.3f} ± {std:.3f}" if k == "dice" else f"{mean:+.2f} ± {std:.2f}")
        lines += [f"| mean ± std | {len(rows)} seeds | " + " | ".join(summary) + " |", ""]
    write_atomic(Path(output_dir) / "paired.md", lambda f: f.write("\n".join(lines) + "\n"))


class CompareCLI:
    """``python -m scripts.experiments.compare run`` and ``table``."""

    def run(
        self,
        output_dir: str = "runs/compare",
        methods: Sequence[str] = METHODS,
        fractions: Sequence[float] = (0.05, 0.1),
        seeds: Sequence[int] = (0, 1, 2),
        dataset_dir: str | None = None,
        overrides: dict | None = None,
        workers: int = 1,
        threads: int | None = None,
        recipe: str | None = None,
    ) -> None:
        """Train and evaluate every (method, fraction, seed) not done yet, then write the table and plots.

        OUTPUT_DIR: one folder per run, the splits and the tables; METHODS: names of configs/methods/*.json;
        FRACTIONS: labelled fractions, or exact labelled counts written "n25"; SEEDS: one run per seed;
        DATASET_DIR: the data (default: a phantom in OUTPUT_DIR/data/phantom); OVERRIDES: train.json values for
        every run, e.g. "{'total_iterations': 240}"; WORKERS: runs trained at once; THREADS: CPU threads per run;
        RECIPE: a config merged between train.json and the method's file (configs/paper_recipe.json).
        """
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        results = run_all(
            output_dir,
            methods,
            fractions,
            seeds,
            dataset_dir,
            overrides,
            workers=workers,
            threads=threads,
            recipe=recipe,
        )
        self.table(output_dir, results)

    def table(
        self, output_dir: str = "runs/compare", results: list[dict] | None = None, paired: Sequence[Sequence[str]] = ()
    ) -> None:
        """Rebuild results.csv / results.md and the plots from the finished runs in ``output_dir``; ``paired``:
        (method, baseline) pairs whose per-seed differences go to paired.md, e.g. "[['full','supervised']]"."""
        out = Path(output_dir)
        results = results or [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
        rows = summarise(results)
        write_table(rows, out)
        plot(results, rows, out)
        print((out / "results.md").read_text())
        if paired:
            write_paired(results, out, paired)
            print((out / "paired.md").read_text())


if __name__ == "__main__":
    from scripts.utils.cli import main

    cli = CompareCLI()
    main({"run": cli.run, "table": cli.table}, __doc__, prog="python -m scripts.experiments.compare")
