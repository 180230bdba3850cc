"""Draw docs/inference_overlays.png: what ``configs/inference.json`` writes for six phantom test images.

The six are spread over the evaluation's Dice distribution (its minimum, 10th, 25th, 50th, 75th and 90th
percentile image in ``eval/test/metrics.json``), so the figure shows typical results and failures alike. They are
copied to a temporary folder and run through the real command with ``<ckpt_dir>/model.pt`` (the bundle's
``models/``); each panel is the overlay PNG it wrote (mask, fitted ellipse, quality flags in red), titled with the
image's Dice and HC error.

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"   # eval/test/ first
    python docs/make_overlays_figure.py --output docs/inference_overlays.png
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fire
import matplotlib
import numpy as np
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (0, 10, 25, 50, 75, 90)


def pick(rows: list[dict]) -> list[dict]:
    """The rows at :data:`PERCENTILES` of Dice (each row once)."""
    ordered = sorted(rows, key=lambda r: r["dice"])
    picked = []
    for q in PERCENTILES:
        row = ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]
        if row not in picked:
            picked.append(row)
    return picked


def main(
    metrics: str = str(ROOT / "eval" / "test" / "metrics.json"),
    pixel_size_csv: str = str(ROOT / "data" / "phantom" / "training_set_pixel_size_and_HC.csv"),
    ckpt_dir: str = str(ROOT / "models"),
    output: str = str(ROOT / "docs" / "inference_overlays.png"),
) -> None:
    rows = pick(json.loads(Path(metrics).read_text())["per_image"])
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        for row in rows:
            shutil.copy(row["filename"], inputs / Path(row["filename"]).name)
        subprocess.run(
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
                "--pixel_size_csv",
                pixel_size_csv,
                "--ckpt_dir",
                ckpt_dir,
            ],
            cwd=ROOT,
            check=True,
        )
        measured = {Path(m["filename"]).stem: m for m in json.loads((out / "measurements.json").read_text())}
        fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
        for ax, row in zip(axes.flat, rows):
            stem = Path(row["filename"]).stem
            ax.imshow(np.asarray(Image.open(out / f"{stem}_overlay.png")))
            error = row.get("circumference_abs_error_mm")
            flags = measured.get(stem, {}).get("flags") or "no flags"
            ax.set_title(
                f"{stem}: Dice {row['dice']:.2f}, HC error {'-' if error is None else f'{error:.1f} mm'}\n{flags}",
                fontsize=9,
            )
            ax.axis("off")
        for ax in list(axes.flat)[len(rows) :]:
            ax.axis("off")
        fig.suptitle(
            "configs/inference.json with models/model.pt on phantom test images (Dice percentiles 0, 10, 25, "
            "50, 75, 90): mask, fitted ellipse, flags",
            fontsize=10,
        )
        fig.tight_layout()
        fig.savefig(output, dpi=90)
    print(f"wrote {output}")


if __name__ == "__main__":
    fire.Fire(main)
