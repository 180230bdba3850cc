"""MONAI Label 0.8.5 serves the bundle: its BundleInferTask gives the bundle's own mask for a 2D PNG, and its
BundleTrainTask trains on datastore labels plus the bundle's unlabelled pool.

MONAI Label runs in its own cached venv (scripts/tools/monailabel_venv.py; the first build takes minutes), driven
through scripts/deployment/monailabel_app.py exactly as the ``monaibundle`` sample app builds the tasks.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from scripts.data import prepare_dataset
from scripts.deployment.monailabel_app import EXPORT_MARKER, export
from scripts.networks import UNeXt
from scripts.tools.monailabel_venv import (
    REQUIREMENTS,
    TORCH_INDEX,
    build_venv,
    ensure_venv,
    installed_torch,
    torch_install_steps,
    venv_path,
)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "scripts" / "deployment" / "monailabel_app.py"
PHANTOM = {"phantom_subjects": 14, "phantom_image_size": [320, 224], "labeled_fraction": 0.3}


def run(cmd, cwd=ROOT, timeout=1800):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}")
    return done


def app_result(done) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("result: ")]
    assert lines, f"no result line:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1][len("result: ") :])


@pytest.fixture(scope="module")
def monailabel_python():
    return ensure_venv()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A 14-subject phantom (320 x 224) and its split: the labelled images feed the datastore, the rest the pool."""
    root = tmp_path_factory.mktemp("phantom")
    datalist_file = prepare_dataset(
        root / "phantom",
        root / "prepared",
        labeled_fraction=PHANTOM["labeled_fraction"],
        phantom_subjects=PHANTOM["phantom_subjects"],
        phantom_image_size=PHANTOM["phantom_image_size"],
        progress=False,
    )
    return root, json.loads(Path(datalist_file).read_text())


def half_foreground_unext(image: str) -> dict:
    """A seeded random UNeXt whose foreground bias is shifted so that half of ``image``'s 224 grid is foreground.

    A random network predicts one class everywhere; a mask with both classes and an irregular boundary makes the
    comparison sensitive to transposes, flips and resizing.
    """
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    x = parser.get_parsed_content("preprocessing")({"image": image})["image"][None]
    torch.manual_seed(0)
    net = UNeXt(3, 2).eval()
    with torch.no_grad():
        logits = net(x)
        net.final.bias[1] -= torch.median(logits[0, 1] - logits[0, 0])
    return net.state_dict()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_export_merges_the_monailabel_override_and_keeps_a_trained_model(tmp_path):
    out = tmp_path / "fetal_us"
    first = tmp_path / "first.pt"
    torch.save({"w": torch.zeros(1)}, first)
    export(str(out), model=str(first), train_overrides={"val_interval": 3, "train#trainer#max_epochs": 5})
    post = json.loads((out / "configs" / "inference.json").read_text())["postprocessing"]["transforms"]
    assert [t["_target_"] for t in post][-3:] == ["SaveImaged", "SqueezeDimd", "CastToTyped"]
    train = json.loads((out / "configs" / "train.json").read_text())
    assert train["val_interval"] == 3 and train["train"]["trainer"]["max_epochs"] == 5
    assert train["train"]["trainer"]["max_iterations"] is None  # MONAI Label's max_epochs alone sizes its runs
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt"]
    assert (out / "scripts" / "networks" / "unext.py").is_file() and not list(out.rglob("__pycache__"))
    # a model MONAI Label trained in the copy survives a re-export that names none
    torch.save({"w": torch.ones(1)}, out / "models" / "model.pt")
    export(str(out))
    assert torch.load(out / "models" / "model.pt")["w"].item() == 1.0
    # a folder that is not an export is never overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export(str(other))
    assert (out / EXPORT_MARKER).is_file()


def test_the_venvs_torch_is_this_environments_version_and_build():
    assert torch_install_steps("2.13.0") == [["torch==2.13.0"]]  # a public build: pip's own index
    # a local build: pip's configured sources (a wheel on disk), else PyTorch's index of exactly that build
    assert torch_install_steps("2.13.0+cpu") == [
        ["torch==2.13.0+cpu"],
        ["torch==2.13.0+cpu", "--index-url", "https://download.pytorch.org/whl/cpu"],
    ]
    assert torch_install_steps("2.13.0+cu128")[-1][-1] == TORCH_INDEX.format(build="cu128")
    pinned = [line for line in REQUIREMENTS.read_text().splitlines() if line.startswith("torch==")]
    assert pinned == [f"torch=={installed_torch().partition('+')[0]}"]  # the same version, without a local label
    # the build is part of the cache key: a CUDA environment never reuses a CPU venv
    assert venv_path(REQUIREMENTS, torch_version="2.13.0+cpu") != venv_path(REQUIREMENTS, torch_version="2.13.0")


def test_a_list_for_another_torch_or_with_a_local_pin_is_refused_before_any_work(tmp_path):
    for pin, message in (
        ("torch==2.13.0+cpu", "local build that public indexes do not serve"),
        ("torch==2.12.0", "pins torch==2.12.0 but this environment has torch 2.13.0"),
    ):
        req = tmp_path / "requirements.txt"
        req.write_text(f"{pin}\nmonailabel==0.8.5\n")
        with pytest.raises(ValueError, match=message):
            build_venv(tmp_path / "cache" / "venv", req, torch_version="2.13.0")
        assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_venv_cache_key_and_a_failed_build_leaves_no_venv(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("torch==0.0.1\n")
    target = venv_path(req, tmp_path / "cache", torch_version="0.0.1")
    assert target.name.startswith("monailabel-0.8.5-") and target != venv_path(ROOT / "requirements-monailabel.txt")
    with pytest.raises(RuntimeError, match="install torch==0.0.1 first"):
        build_venv(target, req, torch_version="0.0.1")
    # nothing that could be taken for a venv: only the failed build's log, which the error names
    assert not target.exists() and [p.suffix for p in target.parent.iterdir()] == [".log"]


@pytest.mark.slow
def test_bundle_infer_task_returns_the_bundles_own_mask(monailabel_python, phantom, tmp_path):
    _, datalist = phantom
    image = datalist["test"][0]["image"]
    width, height = Image.open(image).size
    assert (width, height) == tuple(PHANTOM["phantom_image_size"])
    model = tmp_path / "model.pt"
    torch.save(half_foreground_unext(image), model)
    bundle = tmp_path / "app" / "model" / "fetal_us"
    export(str(bundle), model=str(model))

    out = tmp_path / "bundle_out"
    run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--bundle_root",
            tmp_path,
            "--ckpt_dir",
            bundle / "models",
            "--input_dir",
            image,
            "--output_dir",
            out,
        ]
    )
    expected = np.asarray(Image.open(out / (Path(image).stem + "_mask.png")))
    assert 0.2 < expected.mean() < 0.8  # both classes, so the comparison below can fail

    done = run([monailabel_python, APP, "infer", "--bundle", bundle, "--image", image, "--output", tmp_path / "ml.png"])
    result = app_result(done)
    assert result["labels"] == {"fetal head": 1} and result["dimension"] == 2
    assert result["model_choices"] == ["model.pt"]
    mask = Image.open(tmp_path / "ml.png")
    assert mask.size == (width, height) and mask.mode in ("L", "P")
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 1}
    assert np.array_equal(values, expected), f"MONAI Label's mask differs: Dice {dice(values == 1, expected == 1):.4f}"


@pytest.mark.slow
def test_bundle_train_task_trains_on_datastore_labels_and_the_unlabelled_pool(monailabel_python, phantom, tmp_path):
    root, datalist = phantom
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    labeled = datalist["labeled"] + datalist["validation"]
    for item in labeled:
        name = Path(item["image"]).name
        (studies / name).write_bytes(Path(item["image"]).read_bytes())
        (studies / "labels" / "final" / name).write_bytes(Path(item["label"]).read_bytes())
    bundle = tmp_path / "app" / "model" / "fetal_us"
    export(
        str(bundle),
        train_overrides={
            "dataset_dir": str(root / "phantom"),
            "prepared_dir": str(root / "prepared"),
            **PHANTOM,
            "total_iterations": 2,
            "val_interval": 1,
            "labeled_batch_size": 2,
            "unlabeled_batch_size": 2,
        },
    )
    (bundle / "models" / "model.pt").unlink(missing_ok=True)  # train from scratch, whatever the repository holds

    done = run(
        [
            monailabel_python,
            APP,
            "train",
            "--bundle",
            bundle,
            "--studies",
            studies,
            "--max_epochs",
            2,
            "--val_split",
            0.2,
        ]
    )
    result = app_result(done)
    assert result["model_written"] and result["datastore_labeled"] == len(labeled) >= 5
    assert result["unlabeled_pool"] == len(datalist["unlabeled"]) > 0
    log = done.stdout + done.stderr
    # MONAI Label splits the datastore's 5 labels 4 / 1 (val_split 0.2) and hands both lists to the bundle
    assert "Total Records for Training: 4" in log and "Total Records for Validation: 1" in log
    # CPS is computed on unlabelled rows only: its logged value proves the pool took part in every iteration
    assert log.count("cps_a: ") >= 2 and "val_mean_dice" in log
    UNeXt(3, 2).load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    assert sorted(p.name for p in (bundle / "models").glob("*.pt")) == ["model.pt"]
