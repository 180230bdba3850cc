"""``monai.bundle run --tracking mlflow`` (MONAI's own experiment tracking) records a training the bundle's way.

A two-iteration training tracked into a local SQLite store (MLflow 3 no longer accepts a ``file://`` folder store,
and MONAI's MLFlowHandler refuses one) is read back through the MLflow client: the run's parameters, every loss
term of every iteration, and the validation metrics, which must equal those the bundle wrote to validation.csv.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--phantom_subjects",
    "12",
    "--phantom_image_size",
    "[256, 192]",
    "--spatial_size",
    "[224, 224]",
    "--labeled_fraction",
    "0.3",
    "--labeled_batch_size",
    "2",
    "--unlabeled_batch_size",
    "2",
    "--total_iterations",
    "2",
    "--val_interval",
    "1",
]
LOSS_TERMS = ("loss", "sup_a", "sup_b", "cps_a", "cps_b", "ict", "kl", "mig", "divergence", "w_cps", "w_div")
VALIDATION = ("val_mean_dice", "val_hd95_px", "val_asd_px")


@pytest.mark.slow
def test_tracking_mlflow_logs_parameters_loss_terms_and_validation_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        str(tmp_path),
        *TINY,
        "--tracking",
        "mlflow",
        "--tracking_uri",
        uri,
        "--experiment_name",
        "fetal_us_test",
        "--run_name",
        "two_iterations",
    ]
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fetal_us_test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "two_iterations" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["max_epochs"] == "2" and params["epoch_length"] == "1"  # MONAI's own
    assert params["labeled_fraction"] == "0.3" and params["total_iterations"] == "2"  # the bundle's tracking_params
    config = json.loads((ROOT / "configs" / "train.json").read_text())
    assert params["cps_weight"] == str(config["cps_weight"]) and params["spatial_size"] == "[224, 224]"

    for key in LOSS_TERMS:  # every term of every iteration, not the total alone
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert all(m.value > 0 for m in loss)

    with open(tmp_path / "eval" / "validation.csv") as f:
        written = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in written] == [1, 2]
    for key in VALIDATION:  # logged once per validation, the same values as the bundle's own table
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in written], rel=1e-6, nan_ok=True)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
