"""Inference: the input listing (pixel sizes), ellipse measurements, the HC18 submission, overlays, and the batched
pipeline of configs/inference.json (masks as documented, one bad file skipped and named)."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.deployment.inference import (
    FAILED,
    MeasurementWriter,
    collate_frames,
    display_size,
    ellipse_points_px,
    list_images,
    overlay_rgb,
    source_frames,
)
from scripts.evaluation.biometry import ellipse_circumference, fit_ellipse
from scripts.networks import UNeXt

ROOT = Path(__file__).resolve().parents[1]


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
    cases = [
        ("000_HC.png", (120.0, 80.0, 40.0, 25.0), [0.1, 0.1]),
        ("001_HC.png", (90.0, 70.0, 30.0, 30.0), [0.25, 0.25]),
    ]
    for name, (cx, cy, a, b), size in cases:
        pred = torch.from_numpy(ellipse_mask((240, 160), cx, cy, a, b)[None].astype(np.float32))
        row, fit = writer.measure(pred, size, name)
        writer.rows.append(row)
        assert row["unit"] == "mm" and row["circumference"] == pytest.approx(
            ellipse_circumference(a * size[0], b * size[0]), rel=0.01
        )
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
    row, _ = writer.measure(
        torch.from_numpy(ellipse_mask((100, 100), 50, 50, 20, 20)[None].astype(np.float32)), None, "scan.png"
    )
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


def test_overlay_is_drawn_at_a_size_for_looking_at():
    mask = ellipse_mask((800, 540), 400, 270, 200, 150)
    rgb = overlay_rgb(
        torch.zeros(1, 800, 540),
        torch.from_numpy(mask[None].astype(np.float32)),
        max_size=512,
        ellipse=np.array([[400.0, 120.0]]),
        flags=["touches_image_border"],
    )
    assert rgb.shape == (346, 512, 3) and display_size(260, 150, 512) == (260, 150)  # small images stay as they are
    yellow = (rgb[..., 0] == 255) & (rgb[..., 1] == 220) & (rgb[..., 2] == 0)
    assert yellow[round(120 * 346 / 540), 256]  # the ellipse point scaled with the picture
    corner = rgb[:20, :150].astype(int)
    assert ((corner[..., 0] > 150) & (corner[..., 1] < corner[..., 0] // 2)).sum() > 20  # the flag, written in red


def test_collate_batches_the_network_input_and_keeps_the_rest_per_frame():
    from monai.data import MetaTensor

    frame = lambda w, h, **extra: {"image": MetaTensor(torch.rand(3, 8, 8)), "original": torch.rand(1, w, h), **extra}
    batch = collate_frames(
        [
            [frame(20, 10, pixel_size_mm=[0.1, 0.1])],
            [{FAILED: {"file": "bad.dcm", "reason": "not a readable DICOM file"}}],
            [frame(30, 12, source="cine.dcm", frame=0), frame(30, 12, source="cine.dcm", frame=1)],
        ]
    )
    assert batch["image"].shape == (3, 3, 8, 8)
    extras = batch["per_frame_extras"]
    assert [tuple(e["original"].shape) for e in extras] == [(1, 20, 10), (1, 30, 12), (1, 30, 12)]
    assert extras[0]["pixel_size_mm"] == [0.1, 0.1] and extras[2]["frame"] == 1 and "frame" not in extras[0]
    assert batch["failed_files"] == [{"file": "bad.dcm", "reason": "not a readable DICOM file"}]
    assert batch["file_count"] == 3
    only_failures = collate_frames([[{FAILED: {"file": "x.png", "reason": "r"}}]])
    assert "image" not in only_failures and only_failures["per_frame_extras"] == []


def half_foreground_unext(image: torch.Tensor) -> UNeXt:
    """A seeded random UNeXt whose foreground bias makes half of ``image``'s 224 grid foreground: masks with both
    classes and ragged boundaries, so that a transposed, flipped or shifted mask cannot pass as equal."""
    torch.manual_seed(0)
    net = UNeXt(3, 2).eval()
    with torch.no_grad():
        logits = net(image[None])
        net.final.bias[1] -= torch.median(logits[0, 1] - logits[0, 0])
    return net


def inference_inputs(folder: Path) -> None:
    """Images of different sizes and kinds: grey and RGB PNG, a non-square JPEG, a palette DICOM."""
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    smooth = lambda shape: (np.clip(ndimage_smooth(rng.random(shape)), 0, 1) * 255).astype(np.uint8)  # noqa: E731
    Image.fromarray(smooth((150, 260))).save(folder / "a_grey.png")
    Image.fromarray(np.stack([smooth((300, 420))] * 3, -1)).save(folder / "b_rgb.png")
    Image.fromarray(smooth((120, 90))).save(folder / "c_small.jpg", quality=95)
    shutil.copy(get_testdata_file("examples_palette.dcm"), folder / "d_palette.dcm")


def ndimage_smooth(x):
    from scipy import ndimage

    y = ndimage.gaussian_filter(x, 6)
    return (y - y.min()) / (y.max() - y.min())


def run_inference(tmp_path: Path, net: UNeXt, out: str, **overrides):
    from monai.bundle import ConfigWorkflow

    (tmp_path / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(ROOT / "configs" / "inference.json"),
        workflow_type="infer",
        meta_file=str(ROOT / "configs" / "metadata.json"),
        bundle_root=str(ROOT),
        ckpt_dir=str(tmp_path / "models"),
        input_dir=str(tmp_path / "in"),
        output_dir=str(tmp_path / out),
        device=torch.device("cpu"),
        progress=False,
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    return workflow


def test_batched_pipeline_writes_the_documented_masks_and_measurements(tmp_path):
    """Masks are argmax(resize_back(softmax(UNeXt(preprocessed image)))) at each input's own size, computed here
    with torch directly on the config's preprocessing; with the cleaning switched on, the largest component of the
    head with its holes filled (scipy). Batches of 3 over 4 files of 4 sizes, decoded by 2 DataLoader workers.

    The expected logits come from the same batches as the pipeline's: a convolution's last bits may depend on the
    batch size (1e-7 here), which could flip a pixel whose two class probabilities tie to that precision."""
    from monai.bundle import ConfigParser
    from scipy import ndimage

    inference_inputs(tmp_path / "in")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.get_parsed_content("imports")
    preprocessing = parser.get_parsed_content("preprocessing")
    frames = [f for item in list_images(str(tmp_path / "in")) for f in source_frames(item, str(tmp_path / "frames"))]
    inputs = [preprocessing(dict(f)) for f in frames]
    net = half_foreground_unext(inputs[1]["image"].as_tensor())
    expected = {}
    with torch.no_grad():
        for start in range(0, len(inputs), 3):
            chunk = inputs[start : start + 3]
            logits = net(torch.stack([d["image"].as_tensor() for d in chunk]))
            for d, lg in zip(chunk, logits):
                size = tuple(d["original"].shape[1:])  # (W, H): MONAI's array axes
                prob = torch.nn.functional.interpolate(
                    torch.softmax(lg, 0)[None], size=size, mode="bilinear", align_corners=False
                )[0]
                name = Path(d["original"].meta["filename_or_obj"]).name
                expected[name] = torch.argmax(prob, 0).numpy().T.astype(np.uint8)  # (H, W) as the PNG holds it
    assert sorted(expected) == ["a_grey.png", "b_rgb.png", "c_small.jpg", "d_palette.png"]
    assert all(0.02 < m.mean() < 0.98 for m in expected.values())  # both classes, so the comparison can fail

    run_inference(tmp_path, net, "raw", batch_size=3, num_workers=2, keep_largest_component=False, fill_holes=False)
    with open(tmp_path / "raw" / "measurements.csv") as f:
        rows = {r["filename"]: r for r in csv.DictReader(f)}
    for name, mask in expected.items():
        written = np.asarray(Image.open(tmp_path / "raw" / f"{Path(name).stem}_mask.png"))
        assert np.array_equal(written, mask), f"{name}: {int((written != mask).sum())} pixels differ"
        fit = fit_ellipse(mask.T > 0, None if name != "d_palette.png" else [0.2623, 0.2623])
        assert float(rows[name]["semi_axes_a"]) == pytest.approx(fit["semi_axes_a_mm"], rel=1e-3)
        assert Image.open(tmp_path / "raw" / f"{Path(name).stem}_overlay.png").size == display_size(
            mask.shape[1], mask.shape[0], 512
        )
    assert rows["d_palette.png"]["unit"] == "mm" and rows["a_grey.png"]["unit"] == "px"

    run_inference(tmp_path, net, "clean", batch_size=3, num_workers=0, save_overlays=False)
    assert not list((tmp_path / "clean").glob("*_overlay.png"))
    for name, mask in expected.items():
        labels, count = ndimage.label(mask == 1, structure=np.ones((3, 3)))
        largest = labels == 1 + int(np.argmax(ndimage.sum(mask == 1, labels, range(1, count + 1))))
        clean = ndimage.binary_fill_holes(largest, structure=np.ones((3, 3))).astype(np.uint8)  # as MONAI: 8-connected
        written = np.asarray(Image.open(tmp_path / "clean" / f"{Path(name).stem}_mask.png"))
        assert np.array_equal(written, clean), f"{name}: {int((written != clean).sum())} pixels differ"


@pytest.mark.slow
def test_one_bad_file_is_named_and_skipped_and_the_exit_status_says_so(tmp_path):
    """3 good files (PNG, JPEG, DICOM) and 1 bad DICOM: masks for every good file, the bad one named, exit 1."""
    inference_inputs(tmp_path / "in")
    (tmp_path / "in" / "b_rgb.png").unlink()
    (tmp_path / "in" / "e_broken.dcm").write_bytes(b"DICM but not really a DICOM file")
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    torch.save(UNeXt(3, 2).state_dict(), tmp_path / "models" / "model.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--input_dir",
            str(tmp_path / "in"),
            "--output_dir",
            str(tmp_path / "out"),
            "--ckpt_dir",
            str(tmp_path / "models"),
            "--batch_size",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert f"{tmp_path / 'in' / 'e_broken.dcm'}: skipped: not a readable DICOM file" in log
    assert "1 input file(s) could not be processed" in done.stderr and "Traceback" not in done.stderr
    assert "inference: 3 images from 3 files in" in log and "images/s" in log  # the timing summary
    for stem in ("a_grey", "c_small", "d_palette"):
        assert all((tmp_path / "out" / f"{stem}_{kind}.png").is_file() for kind in ("mask", "overlay"))
    with open(tmp_path / "out" / "measurements.csv") as f:
        assert [r["filename"] for r in csv.DictReader(f)] == ["a_grey.png", "c_small.jpg", "d_palette.png"]
