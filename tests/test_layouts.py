"""Folder layouts (generic images/labels, FUGC, PSFHS): miniature copies -> prepare -> train 2 iterations -> evaluate."""

import json
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from scripts.data import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
W, H = 96, 64  # image width and height (PIL order)


def blob_image_and_label(rng, classes):
    """A grey image with a bright disc (class 1) and, for 3 classes, a darker square (class 2); (H, W) arrays."""
    y, x = np.mgrid[:H, :W]
    cx, cy = rng.integers(30, 60), rng.integers(20, 40)
    label = (((x - cx) ** 2 + (y - cy) ** 2) <= 12**2).astype(np.uint8)
    if classes == 3:
        label[5:15, 5:20] = 2
    image = (40 + 150 * (label == 1) + 80 * (label == 2) + rng.normal(0, 10, (H, W))).clip(0, 255).astype(np.uint8)
    return image, label


def make_png_layout(root, image_dir, label_dir, n_labelled, n_unlabelled=0, unlabelled_dir=None, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    for d in filter(None, (image_dir, label_dir, unlabelled_dir)):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n_labelled + n_unlabelled):
        image, label = blob_image_and_label(rng, classes)
        labelled = i < n_labelled
        folder = image_dir if labelled or unlabelled_dir is None else unlabelled_dir
        Image.fromarray(image).save(root / folder / f"{i:04d}.png")
        if labelled:
            Image.fromarray(label).save(root / label_dir / f"{i:04d}.png")


def make_psfhs(root, n, seed=0, spacing=(0.3, 0.3)):
    import itk

    rng = np.random.default_rng(seed)
    (root / "image_mha").mkdir(parents=True)
    (root / "label_mha").mkdir(parents=True)
    for i in range(n):
        image, label = blob_image_and_label(rng, 3)
        # 3-channel float32: this itk build wraps no Image<Vector<UC,3>,2>, so MONAI's ITKReader cannot read
        # 3-channel uint8 .mha (a known limitation, see docs/README.md)
        rgb = itk.image_from_array(np.repeat(image[..., None], 3, axis=2).astype(np.float32), is_vector=True)
        rgb.SetSpacing(spacing)
        itk.imwrite(rgb, str(root / "image_mha" / f"{i:05d}.mha"))
        lab = itk.image_from_array(np.ascontiguousarray(label))
        lab.SetSpacing(spacing)
        itk.imwrite(lab, str(root / "label_mha" / f"{i:05d}.mha"))


def train_and_evaluate(dataset, tmp, num_classes, class_names, pixel_size=None):
    overrides = dict(
        bundle_root=str(tmp), dataset_dir=str(dataset), prepared_dir=str(tmp / "prepared"), output_dir=str(tmp / "eval"),
        ckpt_dir=str(tmp / "models"), spatial_size=[64, 64], labeled_fraction=0.5, labeled_batch_size=1,
        unlabeled_batch_size=0, total_iterations=2, val_interval=2, amp=False, num_classes=num_classes,
        class_names=class_names, dataset_pixel_size_mm=pixel_size,
    )
    files = [str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "methods" / "supervised.json")]
    for extra in ([], [str(ROOT / "configs" / "evaluate.json")]):
        workflow = ConfigWorkflow(config_file=files + extra, meta_file=str(ROOT / "configs" / "metadata.json"),
                                  workflow_type="train", **overrides)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    return json.loads((tmp / "eval" / "test" / "metrics.json").read_text())


def test_generic_png_layout_three_classes(tmp_path):
    data = tmp_path / "data"
    make_png_layout(data, "images", "labels", n_labelled=8, n_unlabelled=3, classes=3)
    for i in range(8, 11):  # images without a label join the unlabelled pool
        assert not (data / "labels" / f"{i:04d}.png").exists()
    datalist = json.loads(Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5, pixel_size_mm=0.2)).read_text())
    assert datalist["meta"]["layout"] == "generic" and datalist["meta"]["num_classes"] == 3
    assert len(datalist["test"]) + len(datalist["validation"]) + len(datalist["labeled"]) + len(datalist["unlabeled"]) == 11
    assert all("label" not in i for i in datalist["unlabeled"]) and all(i["pixel_size_mm"] == [0.2, 0.2] for i in datalist["test"])
    summary = train_and_evaluate(data, tmp_path, 3, ["background", "disc", "square"], pixel_size=0.2)
    assert summary["n_images"] == len(datalist["test"]) and summary["n_images_with_pixel_size"] == summary["n_images"]
    assert "dice_disc" in summary["per_image"][0] and "dice_square" in summary["per_image"][0]


def test_fugc_layout(tmp_path):
    data = tmp_path / "fugc"
    make_png_layout(data, "train/labeled_data/images", "train/labeled_data/labels", n_labelled=6, n_unlabelled=4,
                    unlabelled_dir="train/unlabeled_data/images", classes=3)
    datalist = json.loads(Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5)).read_text())
    assert datalist["meta"]["layout"] == "fugc" and datalist["meta"]["num_classes"] == 3
    assert sum(i["subject"].startswith("unlabelled/") for i in datalist["unlabeled"]) == 4
    assert "pixel_size_mm" not in datalist["test"][0]  # PNG carries no pixel size: distances in pixels only
    summary = train_and_evaluate(data, tmp_path, 3, ["background", "anterior lip", "posterior lip"])
    assert summary["n_images"] == len(datalist["test"]) and summary["n_images_with_pixel_size"] == 0


def test_psfhs_mha_layout_reads_spacing(tmp_path):
    pytest.importorskip("itk")
    data = tmp_path / "psfhs"
    make_psfhs(data, 6)
    datalist = json.loads(Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5)).read_text())
    assert datalist["meta"]["layout"] == "psfhs" and datalist["meta"]["num_classes"] == 3
    assert datalist["test"][0]["pixel_size_mm"] == pytest.approx([0.3, 0.3])
    summary = train_and_evaluate(data, tmp_path, 3, ["background", "symphysis", "head"])
    assert summary["n_images"] == len(datalist["test"]) and summary["mean"]["hd95_mm"] is not None


def test_folder_layout_errors_name_the_file(tmp_path):
    data = tmp_path / "d"
    make_png_layout(data, "images", "labels", n_labelled=4)
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(data / "labels" / "0001.png")  # a 0/255 mask
    with pytest.raises(ValueError, match=r"0001\.png: label values \[255\] look like an intensity mask"):
        prepare_dataset(data, tmp_path / "p")
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(data / "labels" / "0001.png")
    with pytest.raises(ValueError, match=r"0001\.png: label size \(96, 65\) differs from its image 0001\.png \(96, 64\)"):
        prepare_dataset(data, tmp_path / "p")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(data / "labels" / "0009.png")
    with pytest.raises(ValueError, match="1 label\\(s\\) without an image.*0009"):
        prepare_dataset(data, tmp_path / "p")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        prepare_dataset(data, tmp_path / "p", layout="nope")
    other = tmp_path / "other"
    (other / "scans").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(other / "scans" / "a.png")
    with pytest.raises(ValueError, match="cannot recognise the dataset layout.*images/ \\[\\+ labels/\\] \\(generic\\)"):
        prepare_dataset(other, tmp_path / "p2", generate_phantom_if_empty=False)


def test_psfhs_mask_of_another_size_is_named(tmp_path):
    itk = pytest.importorskip("itk")
    data = tmp_path / "psfhs"
    make_psfhs(data, 4)
    itk.imwrite(itk.image_from_array(np.zeros((H, W + 3), np.uint8)), str(data / "label_mha" / "00002.mha"))
    with pytest.raises(ValueError, match=r"00002\.mha: label size \(99, 64\) differs from its image 00002\.mha \(96, 64\)"):
        prepare_dataset(data, tmp_path / "p")


def test_too_many_classes_for_the_config(tmp_path):
    from scripts.settings import load_datalist

    data = tmp_path / "d"
    make_png_layout(data, "images", "labels", n_labelled=4, classes=3)
    path = prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5)
    with pytest.raises(ValueError, match="holds labels of 3 classes .*--num_classes 3"):
        load_datalist(path, 2)
