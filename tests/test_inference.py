"""Inference helpers: pixel sizes for the input listing, ellipse measurements, the HC18 submission, overlays."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.biometry import ellipse_circumference
from scripts.inference import MeasurementWriter, ellipse_points_px, list_images, overlay_rgb


def ellipse_mask(shape, cx, cy, a, b):
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def write_pngs(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((40, 60), np.uint8)).save(folder / name)


def test_pixel_sizes_from_an_hc18_test_csv_beside_the_folder(tmp_path):
    write_pngs(tmp_path / "test_set", ["000_HC.png", "001_HC.png", "001_HC_Annotation.png"])
    (tmp_path / "test_set_pixel_size.csv").write_text("filename,pixel size(mm)\n000_HC.png,0.12\n")
    items = list_images(str(tmp_path / "test_set"))
    assert [i["image"].rsplit("/", 1)[1] for i in items] == ["000_HC.png", "001_HC.png"]  # annotation skipped
    assert items[0]["pixel_size_mm"] == [0.12, 0.12] and "pixel_size_mm" not in items[1]
    # a default for the rest; a bad default or an explicit CSV with a wrong header is named
    assert list_images(str(tmp_path / "test_set"), pixel_size_mm=0.3)[1]["pixel_size_mm"] == [0.3, 0.3]
    with pytest.raises(ValueError, match=r"pixel_size_mm must be a positive number or two .* got -1"):
        list_images(str(tmp_path / "test_set"), pixel_size_mm=-1)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,size\n000_HC.png,0.1\n")
    with pytest.raises(ValueError, match="bad.csv: unexpected CSV header"):
        list_images(str(tmp_path / "test_set"), pixel_size_csv=str(bad))


def test_measurements_in_mm_and_the_hc18_submission(tmp_path):
    writer = MeasurementWriter(str(tmp_path), hc18_submission=True)
    # (1, X, Y) index masks as inference.json produces them, with different pixel sizes
    cases = [("000_HC.png", (120.0, 80.0, 40.0, 25.0), [0.1, 0.1]), ("001_HC.png", (90.0, 70.0, 30.0, 30.0), [0.25, 0.25])]
    for name, (cx, cy, a, b), size in cases:
        pred = torch.from_numpy(ellipse_mask((240, 160), cx, cy, a, b)[None].astype(np.float32))
        row, fit = writer.measure(pred, size, name)
        writer.rows.append(row)
        assert row["unit"] == "mm" and row["circumference"] == pytest.approx(
            ellipse_circumference(a * size[0], b * size[0]), rel=0.01)
        assert row["center_x"] == pytest.approx(cx * size[0], abs=0.05)
    writer.write()
    with open(tmp_path / "hc18_submission.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "filename,center_x_mm,center_y_mm,semi_axes_a_mm,semi_axes_b_mm,angle_rad"
    first = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert first["filename"] == "000_HC.png" and float(first["semi_axes_a_mm"]) == pytest.approx(4.0, rel=0.01)
    rows = json.loads((tmp_path / "measurements.json").read_text())
    assert [r["filename"] for r in rows] == ["000_HC.png", "001_HC.png"]
    with open(tmp_path / "measurements.csv") as f:
        assert list(csv.DictReader(f))[1]["unit"] == "mm"


def test_without_pixel_size_measurements_are_in_pixels_and_no_submission(tmp_path):
    writer = MeasurementWriter(str(tmp_path), hc18_submission=True)
    row, _ = writer.measure(torch.from_numpy(ellipse_mask((100, 100), 50, 50, 20, 20)[None].astype(np.float32)),
                            None, "scan.png")
    assert row["unit"] == "px" and row["circumference"] == pytest.approx(2 * math.pi * 20, rel=0.02)
    writer.rows.append(row)
    with pytest.raises(ValueError, match="pixel size; none for scan.png"):
        writer.write()
    assert (tmp_path / "measurements.csv").is_file()  # the measurements themselves are still written


def test_overlay_draws_the_fitted_ellipse():
    mask = ellipse_mask((200, 120), 100, 60, 70, 40)
    writer = MeasurementWriter("unused")
    _, fit = writer.measure(torch.from_numpy(mask[None].astype(np.float32)), [0.2, 0.4], "x.png")
    points = ellipse_points_px(fit, (0.2, 0.4))
    assert np.abs(points[:, 0] - 100).max() == pytest.approx(70, abs=1.0)  # back in pixels, anisotropy undone
    rgb = overlay_rgb(torch.zeros(1, 200, 120), torch.from_numpy(mask[None].astype(np.float32)), ellipse=points)
    assert rgb.shape == (120, 200, 3)
    yellow = (rgb[..., 0] == 255) & (rgb[..., 1] == 220) & (rgb[..., 2] == 0)
    assert yellow[60, 30] or yellow[60, 31] or yellow[60, 29]  # the left end of the major axis, (x=30, y=60)
