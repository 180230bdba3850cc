"""The bundle as users run it: metadata, the MONAI bundle commands, train -> resume -> evaluate -> infer end to end
(export: tests/test_export.py runs the documented commands on the shipped model)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import verify_metadata, verify_net_in_out
from PIL import Image

from scripts.networks import UNeXt

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "data" / "meta_schema_20240725.json"  # MONAI bundle metadata schema, committed copy
TINY = ["--phantom_subjects", "14", "--phantom_image_size", "[320, 224]", "--labeled_fraction", "0.3"]


def bundle(*args, check=True):
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def test_top_level_metadata_is_the_configs_file():
    top = ROOT / "metadata.json"
    assert (
        top.resolve() == (ROOT / "configs" / "metadata.json").resolve()
        or top.read_bytes() == (ROOT / "configs" / "metadata.json").read_bytes()
    )


def test_metadata_matches_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    assert set(meta["network_data_format"]["inputs"]) == {"image"}
    assert set(meta["network_data_format"]["outputs"]) == {"pred"}
    # MONAI's own check, the function `python -m monai.bundle verify_metadata` calls (in process: a subprocess would
    # spend its 10 s importing monai); it raises on a mismatch
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    # what `python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file
    # configs/inference.json` runs: the network's output for the metadata's input shape; raises on a mismatch
    verify_net_in_out(
        "network_def",
        meta_file=str(ROOT / "configs" / "metadata.json"),
        config_file=str(ROOT / "configs" / "inference.json"),
    )


@pytest.mark.slow
def test_train_resume_evaluate_infer(tmp_path):
    root = str(tmp_path)
    # 1. train from nothing: the phantom is generated, 4 iterations, validation every 2
    out = bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        root,
        *TINY,
        "--total_iterations",
        "4",
        "--val_interval",
        "2",
    )
    log = out.stdout + out.stderr
    assert "val_mean_dice" in log and "val_hd95_px" in log and "val_asd_px" in log
    assert (tmp_path / "data" / "phantom" / "training_set_pixel_size_and_HC.csv").exists()
    model = tmp_path / "models" / "model.pt"
    net = UNeXt(3, 2)
    net.load_state_dict(torch.load(model, weights_only=True))  # a plain state_dict of the deployed UNeXt
    resume = sorted((tmp_path / "eval" / "checkpoints").glob("resume_*.pt"))
    assert [p.name for p in resume] == ["resume_checkpoint_epoch=1.pt", "resume_checkpoint_epoch=2.pt"]  # n_saved 2
    state = torch.load(resume[-1], weights_only=True)
    assert {
        "unext",
        "network_b",
        "teacher",
        "optimizer_a",
        "optimizer_b",
        "trainer",
        "data_order",
        "random_generators",
    } <= set(state)
    assert state["trainer"]["iteration"] == 4

    # 2. resume to 6 iterations: the run starts at iteration 5
    out = bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        root,
        *TINY,
        "--total_iterations",
        "6",
        "--val_interval",
        "2",
        "--resume",
        "True",
    )
    log = out.stdout + out.stderr
    assert "resuming from" in log and "Epoch: 3/3" in log and "Epoch: 1/3" not in log

    # 3. evaluate the test list at the original geometry, in pixels and mm
    bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--bundle_root", root, *TINY)
    datalist = json.loads((tmp_path / "data" / "prepared" / "datalist.json").read_text())
    with open(tmp_path / "eval" / "test" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(datalist["test"]) > 0
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0 and float(row["hd95_mm"]) >= 0.0
    summary = json.loads((tmp_path / "eval" / "test" / "metrics.json").read_text())
    assert summary["n_images"] == len(rows)
    # the reference HC is the CSV's value carried by each test item; the predicted one comes from the fitted ellipse
    hc = {Path(item["image"]).name: item["hc_mm"] for item in datalist["test"]}
    for row in rows:
        assert float(row["circumference_ref_mm"]) == pytest.approx(hc[Path(row["filename"]).name], rel=1e-6)
        if row["circumference_mm"]:
            assert float(row["circumference_abs_error_mm"]) == pytest.approx(
                abs(float(row["circumference_mm"]) - float(row["circumference_ref_mm"])), rel=1e-6
            )

    # 4. inference on a folder: a non-square grey PNG and an RGB JPEG; masks at each input's own size
    images = tmp_path / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 260), dtype=np.uint8)).save(images / "scan_a.png")
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(images / "scan_b.jpg")
    # NIfTI through MONAI's reader: array axes are (x, y), so the mask PNG is 100 wide and 70 high
    nib.save(nib.Nifti1Image(rng.integers(0, 255, (100, 70)).astype(np.uint8), np.eye(4)), images / "scan_c.nii.gz")
    out_dir = tmp_path / "pred"
    bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        root,
        "--input_dir",
        str(images),
        "--output_dir",
        str(out_dir),
        "--pixel_size_mm",
        "0.2",
    )
    with open(out_dir / "measurements.csv") as f:
        measured = list(csv.DictReader(f))
    assert [m["filename"] for m in measured] == ["scan_a.png", "scan_b.jpg", "scan_c.nii.gz"]
    assert all(m["unit"] == "mm" and float(m["pixel_size_x_mm"]) == 0.2 for m in measured)
    for stem, size in (("scan_a", (260, 150)), ("scan_b", (90, 120)), ("scan_c", (100, 70))):
        mask = Image.open(out_dir / f"{stem}_mask.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 1}
        assert Image.open(out_dir / f"{stem}_overlay.png").size == size

    # 4b. DICOM in: the five real ultrasound files pydicom ships; one mask per frame at the frame's size, in mm
    #     where the US regions give the pixel size
    from pydicom.data import get_testdata_file

    dicoms = tmp_path / "dicom"
    dicoms.mkdir()
    frames = {
        "examples_rgb_color": (1, 320, 240),
        "examples_palette": (1, 800, 350),
        "examples_jpeg2k": (1, 640, 480),
        "examples_ybr_color": (30, 320, 240),
        "ExplVR_BigEnd": (1, 80, 60),
    }
    for name in frames:
        (dicoms / f"{name}.dcm").write_bytes(Path(get_testdata_file(f"{name}.dcm")).read_bytes())
    dicom_out = tmp_path / "dicom_pred"
    bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        root,
        "--input_dir",
        str(dicoms),
        "--output_dir",
        str(dicom_out),
    )
    for name, (count, width, height) in frames.items():
        stems = [name] if count == 1 else [f"{name}_f{i:03d}" for i in range(count)]
        for stem in stems:
            assert Image.open(dicom_out / f"{stem}_mask.png").size == (width, height), stem
    with open(dicom_out / "measurements.csv") as f:
        units = {m["filename"]: (m["unit"], m["pixel_size_x_mm"]) for m in csv.DictReader(f)}
    assert len(units) == 34 and units["examples_palette.png"][0] == "mm"
    assert float(units["examples_palette.png"][1]) == pytest.approx(0.2623, rel=1e-3)
    assert units["examples_rgb_color.png"][0] == "px"


@pytest.mark.slow
def test_missing_dataset_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / "HC18_typo"
    out = bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        str(tmp_path),
        "--dataset_dir",
        str(missing),
        check=False,
    )
    assert out.returncode != 0
    assert f"dataset_dir does not exist: {missing}" in out.stderr
    assert not missing.exists()  # no phantom is generated into a path the user typed


def test_paper_recipe_override_resolves(tmp_path):
    """The paper's recipe is one override file: 448 px, 5 % labels, 400 x labelled iterations, batch 1 + 4."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "paper_recipe.json")])
    parser.update({"bundle_root": str(tmp_path), "phantom_subjects": 30, "phantom_image_size": [320, 224]})
    parser.get_parsed_content("imports")
    labeled = len(parser.get_parsed_content("datalist")["labeled"])
    assert parser.get_parsed_content("spatial_size") == [448, 448]
    assert parser.get_parsed_content("total_iterations") == 400 * labeled
    assert parser.get_parsed_content("train#trainer#max_iterations") == 400 * labeled  # exactly, not rounded
    assert (
        parser.get_parsed_content("labeled_batch_size") == 1 and parser.get_parsed_content("unlabeled_batch_size") == 4
    )
    assert parser.get_parsed_content("learning_rate") == 0.001 and parser.get_parsed_content("amp") is False
    assert parser.get_parsed_content("best_model_after_iteration") == 200 * labeled
    # the ramp-up spans the whole run, as in the authors' schedule: r * L = 400 * labelled / batch
    assert parser.get_parsed_content("rampup_iterations") == 400 * labeled
    assert parser.get_parsed_content("settings_check") is True


@pytest.mark.slow
def test_inference_without_a_trained_model_is_one_clear_error(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(images / "scan.png")
    out = bundle(
        "run",
        "--config_file",
        "configs/inference.json",
        "--bundle_root",
        str(tmp_path),
        "--input_dir",
        str(images),
        check=False,
    )
    assert out.returncode != 0
    assert f"{tmp_path}/models/model.pt not found: the trained model" in out.stderr


@pytest.mark.slow
def test_a_misspelled_option_fails_before_any_file_is_written(tmp_path):
    out = bundle(
        "run",
        "--config_file",
        "configs/train.json",
        "--bundle_root",
        str(tmp_path),
        *TINY,
        "--labelled_fraction",
        "0.3",
        "--train#trainer#max_epoch",
        "2",
        check=False,
    )
    assert out.returncode == 2
    assert "unknown option --labelled_fraction for configs/train.json: did you mean --labeled_fraction" in out.stderr
    assert "did you mean --train#trainer#max_epochs" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no phantom, no datalist, no checkpoint


@pytest.mark.slow
def test_bundle_run_help_lists_the_configs_options_and_runs_nothing(tmp_path):
    out = bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(tmp_path), "--help")
    assert "--dataset_dir" in out.stdout and "--pixel_size_mm" in out.stdout and "--input_dir" in out.stdout
    assert list(tmp_path.iterdir()) == []
