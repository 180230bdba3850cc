"""The demo model shipped in models/model.pt: a plain UNeXt state_dict that a fresh clone runs inference with, no
training first, and whose metadata states its measured phantom figures."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from scripts.data.phantom import generate_phantom
from scripts.networks import UNeXt

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "model.pt"


def test_shipped_model_is_a_plain_unext_state_dict_with_its_figures_in_the_metadata():
    state = torch.load(MODEL, map_location="cpu", weights_only=True)
    net = UNeXt(3, 2)
    net.load_state_dict(state)  # strict: every key, every shape
    assert sum(p.numel() for p in net.parameters()) == 1_471_938  # 1.47 M, as test_networks counts it
    assert MODEL.stat().st_size < 8 * 1024**2
    metrics = json.loads((ROOT / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert 0.0 < metrics["val_mean_dice"] <= 1.0 and 0.0 < metrics["test_mean_dice"] <= 1.0


def test_a_fresh_clone_runs_inference_with_the_shipped_model(tmp_path):
    images = generate_phantom(tmp_path / "phantom", num_subjects=3, image_size=(400, 272), progress=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in sorted(images.glob("*_HC.png")):
        (inputs / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            str(inputs),
            "--output_dir",
            str(out),
            "--pixel_size_mm",
            "0.2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.stem for p in inputs.glob("*.png"))
    for name in names:
        mask = np.asarray(Image.open(out / f"{name}_mask.png"))
        assert mask.shape == (272, 400) and set(np.unique(mask)) <= {0, 1}
        assert (out / f"{name}_overlay.png").is_file()
    with open(out / "measurements.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["filename"]).stem for r in rows) == names
    assert all(r["unit"] == "mm" for r in rows)
