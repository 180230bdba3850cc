"""The comparison runner: mean ± std over seeds, and a re-run that skips finished runs."""

import csv
import statistics

import numpy as np
import pytest

from scripts.experiments.compare import mean_std, run_all, summarise, write_table


def fake_runner(calls):
    def runner(run_dir, method, fraction, seed, dataset_dir, overrides, **options):
        calls.append((method, fraction, seed))
        dice = {"supervised": 0.6, "full": 0.7, "fully_supervised": 0.0}[method] + 0.01 * seed + fraction
        return {
            "mean": {"dice": dice, "hd95_mm": 10.0 - seed, "asd_mm": 2.0, "hd95_px": 40.0, "asd_px": 8.0 + seed},
            "n_images": 5,
            "n_empty_predictions": 0,
            "wall_s": 1.0,
        }

    return runner


def test_mean_std_is_sample_std():
    values = [0.81, 0.86, 0.79, 0.90]
    mean, std = mean_std(values)
    assert mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_table_rows_and_files(tmp_path):
    calls = []
    results = run_all(str(tmp_path), ["supervised", "full"], [0.05, 0.1], [0, 1, 2], runner=fake_runner(calls))
    rows = summarise(results)
    assert len(rows) == 4 and all(r["seeds"] == 3 for r in rows)
    full10 = next(r for r in rows if r["method"] == "full" and r["fraction"] == 0.1)
    expected = [0.7 + 0.01 * s + 0.1 for s in range(3)]
    assert full10["dice_mean"] == pytest.approx(statistics.mean(expected))
    assert full10["dice_std"] == pytest.approx(np.std(expected, ddof=1))
    assert full10["hd95_mm_std"] == pytest.approx(1.0)
    write_table(rows, tmp_path)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["dice_mean"]) == pytest.approx(rows[0]["dice_mean"])
    md = (tmp_path / "results.md").read_text()
    assert f"| full | 10% | 3 | {statistics.mean(expected):.3f} ± {np.std(expected, ddof=1):.3f} |" in md


def test_rerun_skips_finished_runs(tmp_path):
    calls = []
    run_all(str(tmp_path), ["supervised"], [0.05], [0, 1], runner=fake_runner(calls))
    assert len(calls) == 2
    (tmp_path / "supervised__frac0.05__seed1" / "result.json").unlink()  # as if seed 1 had been interrupted
    results = run_all(str(tmp_path), ["supervised", "full"], [0.05], [0, 1], runner=fake_runner(calls))
    assert calls[2:] == [("supervised", 0.05, 1), ("full", 0.05, 0), ("full", 0.05, 1)]
    assert len(results) == 4
    run_all(str(tmp_path), ["supervised", "full"], [0.05], [0, 1], runner=fake_runner(calls))
    assert len(calls) == 5  # nothing recomputed


def test_upper_bound_runs_once_per_seed(tmp_path):
    calls = []
    results = run_all(str(tmp_path), ["supervised", "fully_supervised"], [0.05, 0.1], [0, 1], runner=fake_runner(calls))
    assert sorted(c for c in calls if c[0] == "fully_supervised") == [
        ("fully_supervised", 1.0, 0),
        ("fully_supervised", 1.0, 1),
    ]
    assert len(calls) == 6 and len(results) == 6
    rows = summarise(results)
    assert [(r["method"], r["fraction"]) for r in rows] == [
        ("supervised", 0.05),
        ("supervised", 0.1),
        ("fully_supervised", 1.0),
    ]


def test_parallel_workers_run_each_job_once(tmp_path):
    calls = []
    results = run_all(str(tmp_path), ["supervised", "full"], [0.05, 0.1], [0, 1], runner=fake_runner(calls), workers=3)
    assert sorted(calls) == sorted((m, f, s) for m in ("supervised", "full") for f in (0.05, 0.1) for s in (0, 1))
    # results come back in job order whatever order the workers finished in
    assert [(r["method"], r["fraction"], r["seed"]) for r in results] == [
        (m, f, s) for f in (0.05, 0.1) for m in ("supervised", "full") for s in (0, 1)
    ]
    run_all(str(tmp_path), ["supervised", "full"], [0.05, 0.1], [0, 1], runner=fake_runner(calls), workers=3)
    assert len(calls) == 8


def test_missing_recipe_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        run_all(str(tmp_path), ["supervised"], [0.05], [0], recipe=str(tmp_path / "nope.json"))


def test_table_lists_methods_in_the_documented_order():
    results = [
        {"method": m, "fraction": 0.05, "seed": 0, "mean": {"dice": 0.5}} for m in ("full", "supervised", "no_ict")
    ]
    assert [r["method"] for r in summarise(results)] == ["supervised", "no_ict", "full"]


def test_paired_differences_pair_seeds_and_labelled_counts(tmp_path):
    from scripts.experiments.compare import paired_differences, run_name, write_paired

    def result(method, seed, dice, hd):
        return {
            "method": method,
            "fraction": "n25",
            "seed": seed,
            "mean": {"dice": dice, "hd95_medpy_grid_px": hd, "asd_medpy_grid_px": 1.0, "hd95_mm": None},
        }

    results = [
        result("full", 0, 0.80, 10.0),
        result("supervised", 0, 0.75, 14.0),
        result("full", 1, 0.70, 12.0),
        result("supervised", 1, 0.72, 11.0),
        result("full", 2, 0.9, 1.0),
    ]
    rows = paired_differences(results, "full", "supervised")
    assert [r["seed"] for r in rows] == [0, 1]  # seed 2 has no baseline run
    assert rows[0]["dice"] == pytest.approx(0.05) and rows[1]["dice"] == pytest.approx(-0.02)
    assert rows[0]["hd95_medpy_grid_px"] == pytest.approx(-4.0) and "hd95_mm" not in rows[0]
    write_paired(results, tmp_path, [("full", "supervised")])
    text = (tmp_path / "paired.md").read_text()
    assert "| 25 images | 0 | +0.050 |" in text and "+0.015 ± 0.049" in text
    assert run_name("full", "n25", 0) == "full__n25__seed0"
    # a labelled fraction is shown as a share (it was once shown as a count: ".25 images")
    write_paired([{**r, "fraction": 0.25} for r in results], tmp_path, [("full", "supervised")])
    assert "| 25% | 0 | +0.050 |" in (tmp_path / "paired.md").read_text()
