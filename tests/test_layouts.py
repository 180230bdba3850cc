"""Folder layouts (generic images/labels, FUGC, PSFHS): miniature copies -> prepare -> train 2 iterations -> eval."""

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
        bundle_root=str(tmp),
        dataset_dir=str(dataset),
        prepared_dir=str(tmp / "prepared"),
        output_dir=str(tmp / "eval"),
        ckpt_dir=str(tmp / "models"),
        spatial_size=[64, 64],
        labeled_fraction=0.5,
        labeled_batch_size=1,
        unlabeled_batch_size=0,
        total_iterations=2,
        val_interval=2,
        amp=False,
        num_classes=num_classes,
        class_names=class_names,
        dataset_pixel_size_mm=pixel_size,
    )
    files = [str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "methods" / "supervised.json")]
    for extra in ([], [str(ROOT / "configs" / "evaluate.json")]):
        workflow = ConfigWorkflow(
            config_file=files + extra,
            meta_file=str(ROOT / "configs" / "metadata.json"),
            workflow_type="train",
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    return json.loads((tmp / "eval" / "test" / "metrics.json").read_text())


def test_generic_png_layout_three_classes(tmp_path):
    data = tmp_path / "data"
    make_png_layout(data, "images", "labels", n_labelled=8, n_unlabelled=3, classes=3)
    for i in range(8, 11):  # images without a label join the unlabelled pool
        assert not (data / "labels" / f"{i:04d}.png").exists()
    datalist = json.loads(
        Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5, pixel_size_mm=0.2)).read_text()
    )
    assert datalist["meta"]["layout"] == "generic" and datalist["meta"]["num_classes"] == 3
    assert (
        len(datalist["test"]) + len(datalist["validation"]) + len(datalist["labeled"]) + len(datalist["unlabeled"])
        == 11
    )
    assert all("label" not in i for i in datalist["unlabeled"]) and all(
        i["pixel_size_mm"] == [0.2, 0.2] for i in datalist["test"]
    )
    summary = train_and_evaluate(data, tmp_path, 3, ["background", "disc", "square"], pixel_size=0.2)
    assert summary["n_images"] == len(datalist["test"]) and summary["n_images_with_pixel_size"] == summary["n_images"]
    assert "dice_disc" in summary["per_image"][0] and "dice_square" in summary["per_image"][0]


def test_fugc_layout(tmp_path):
    data = tmp_path / "fugc"
    make_png_layout(
        data,
        "train/labeled_data/images",
        "train/labeled_data/labels",
        n_labelled=6,
        n_unlabelled=4,
        unlabelled_dir="train/unlabeled_data/images",
        classes=3,
    )
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
    with pytest.raises(
        ValueError, match=r"0001\.png: label size \(96, 65\) differs from its image 0001\.png \(96, 64\)"
    ):
        prepare_dataset(data, tmp_path / "p")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(data / "labels" / "0009.png")
    with pytest.raises(ValueError, match="1 label\\(s\\) without an image.*0009"):
        prepare_dataset(data, tmp_path / "p")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        prepare_dataset(data, tmp_path / "p", layout="nope")
    other = tmp_path / "other"
    (other / "scans").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(other / "scans" / "a.png")
    with pytest.raises(
        ValueError, match="cannot recognise the dataset layout.*images/ \\[\\+ labels/\\] \\(generic\\)"
    ):
        prepare_dataset(other, tmp_path / "p2", generate_phantom_if_empty=False)


def test_psfhs_mask_of_another_size_is_named(tmp_path):
    itk = pytest.importorskip("itk")
    data = tmp_path / "psfhs"
    make_psfhs(data, 4)
    itk.imwrite(itk.image_from_array(np.zeros((H, W + 3), np.uint8)), str(data / "label_mha" / "00002.mha"))
    with pytest.raises(
        ValueError, match=r"00002\.mha: label size \(99, 64\) differs from its image 00002\.mha \(96, 64\)"
    ):
        prepare_dataset(data, tmp_path / "p")


def test_mixed_items_batch_together(tmp_path):
    """Items with and without a pixel size or reference circumference get NaN (unknown), so a batch collates."""
    import math

    from monai.data import list_data_collate

    from scripts.method.settings import load_datalist

    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps(
            {
                "test": [{"image": "a", "pixel_size_mm": [0.2, 0.2], "ac_mm": 80.0}, {"image": "b"}],
                "labeled": [{"image": "c"}],
                "meta": {"num_classes": 2},
            }
        )
    )
    datalist = load_datalist(str(path), 2)
    assert math.isnan(datalist["test"][1]["ac_mm"]) and all(math.isnan(v) for v in datalist["test"][1]["pixel_size_mm"])
    assert "hc_mm" not in datalist["test"][0] and datalist["labeled"] == [{"image": "c"}]
    batch = list_data_collate(datalist["test"])
    assert batch["ac_mm"].shape == (2,)


def test_too_many_classes_for_the_config(tmp_path):
    from scripts.method.settings import load_datalist

    data = tmp_path / "d"
    make_png_layout(data, "images", "labels", n_labelled=4, classes=3)
    path = prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5)
    with pytest.raises(ValueError, match="holds labels of 3 classes .*--num_classes 3"):
        load_datalist(path, 2)


# ACOUSLIC-AI: miniature stacks in the download's layout (x, y, frames) = (96, 64, 12): 6 sweeps of 2 frames
ACOUSLIC_FRAMES = 12


def make_acouslic(root, volumes, seed=0, compressed=()):
    """Stacks with an abdomen (value 1 optimal on one frame, 2 suboptimal on two) in some frames; returns
    {uuid: (labelled frames, optimal frames)}; subjects from the circumferences CSV (two uuids share subject s0)."""
    itk = pytest.importorskip("itk")
    rng = np.random.default_rng(seed)
    (root / "images/stacked_fetal_ultrasound").mkdir(parents=True)
    (root / "masks/stacked_fetal_abdomen").mkdir(parents=True)
    (root / "circumferences").mkdir(parents=True)
    truth, rows = {}, ["uuid,subject_id," + ",".join(f"sweep_{i}_ac_mm" for i in range(1, 7))]
    for v in range(volumes):
        uuid = f"{v:02d}aa-uuid"
        image = rng.integers(0, 60, (ACOUSLIC_FRAMES, H, W)).astype(np.uint8)
        mask = np.zeros_like(image)
        optimal, suboptimal = (
            2 * (v % 6) + 1,
            [(2 * (v % 6) + 4) % ACOUSLIC_FRAMES, (2 * (v % 6) + 5) % ACOUSLIC_FRAMES],
        )
        for frame, value in [(optimal, 1)] + [(f, 2) for f in suboptimal]:
            _, disc = blob_image_and_label(rng, 2)
            mask[frame][disc > 0] = value
            image[frame][disc > 0] = 200
        for name, array in (("images/stacked_fetal_ultrasound", image), ("masks/stacked_fetal_abdomen", mask)):
            volume = itk.image_from_array(array)
            volume.SetSpacing((0.28, 0.28, 1.0))
            itk.imwrite(volume, str(root / name / f"{uuid}.mha"), compression=v in compressed)
        truth[uuid] = (sorted([optimal, *suboptimal]), [optimal])
        rows.append(f"{uuid},s{max(0, v - 1)}," + ",".join(f"{100 + 10 * v + s}.5" for s in range(6)))
    (root / "circumferences/fetal_abdominal_circumferences_per_sweep.csv").write_text("\n".join(rows) + "\n")
    return truth


def test_acouslic_stacks_prepare_train_evaluate(tmp_path):
    data = tmp_path / "acouslic"
    truth = make_acouslic(data, 6, compressed=(0,))  # one compressed stack: read whole, the others streamed
    path = prepare_dataset(data, tmp_path / "prepared", labeled_fraction=0.5, acouslic_unlabeled_per_volume=3)
    datalist = json.loads(Path(path).read_text())
    assert datalist["meta"]["layout"] == "acouslic" and datalist["meta"]["num_classes"] == 2
    labelled = [i for k in ("labeled", "validation", "test") for i in datalist[k]]
    from_pool = [
        i
        for i in datalist["unlabeled"]
        if (i["volume"], i["frame"]) in {(u, f) for u, (frames, _) in truth.items() for f in frames}
    ]
    assert len(labelled) + len(from_pool) == 6 * 3  # every non-empty frame is a labelled candidate
    subjects = {k: {i["subject"] for i in datalist[k]} for k in ("labeled", "validation", "test")}
    assert not (subjects["test"] & subjects["labeled"]) and not (subjects["validation"] & subjects["test"])
    held_out = subjects["test"] | subjects["validation"]
    assert all(i["subject"] not in held_out for i in datalist["unlabeled"])  # empty frames follow their subject
    for item in labelled:
        frames, optimal = truth[item["volume"]]
        assert item["frame"] in frames and item["pixel_size_mm"] == pytest.approx([0.28, 0.28])
        assert item["sweep"] == item["frame"] // 2 + 1
        label = np.asarray(Image.open(item["label"]))
        image = np.asarray(Image.open(item["image"]))
        assert label.shape == image.shape == (H, W) and set(np.unique(label)) == {0, 1}  # binarised
        assert np.all(image[label > 0] == 200)  # the image frame is the mask's frame
        v = int(item["volume"][:2])
        if item["frame"] in optimal:
            assert item["ac_mm"] == pytest.approx(100 + 10 * v + item["sweep"] - 1 + 0.5)
        else:
            assert "ac_mm" not in item
    empty = [i for i in datalist["unlabeled"] if i["frame"] not in truth[i["volume"]][0]]
    assert empty and all(np.asarray(Image.open(i["image"])).max() < 60 for i in empty)
    summary = train_and_evaluate(data, tmp_path, 2, ["background", "abdomen"])
    assert summary["n_images"] == len(datalist["test"]) and summary["n_images_with_pixel_size"] == summary["n_images"]
    refs = [r["circumference_ref_mm"] for r in summary["per_image"]]
    assert any(r is not None and r % 1 == pytest.approx(0.5) for r in refs)  # the CSV's AC where the frame is optimal


def test_acouslic_frames_are_extracted_once_and_labels_can_be_kept(tmp_path, monkeypatch):
    from scripts.data import acouslic

    data = tmp_path / "acouslic"
    make_acouslic(data, 5)
    prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5, acouslic_unlabeled_per_volume=2)
    monkeypatch.setattr(acouslic, "StackReader", None)  # a second preparation must not open a volume
    again = json.loads(
        Path(
            prepare_dataset(data, tmp_path / "p", labeled_fraction=0.3, seed=1, acouslic_unlabeled_per_volume=2)
        ).read_text()
    )
    assert again["meta"]["labeled_fraction"] == 0.3
    monkeypatch.undo()
    kept = json.loads(
        Path(prepare_dataset(data, tmp_path / "p", acouslic_labels="keep", acouslic_unlabeled_per_volume=2)).read_text()
    )
    assert kept["meta"]["num_classes"] == 3
    values = set()
    for item in kept["test"] + kept["validation"] + kept["labeled"]:
        values |= set(np.unique(np.asarray(Image.open(item["label"]))).tolist())
    assert values == {0, 1, 2}


def test_acouslic_bad_input_is_named(tmp_path):
    itk = pytest.importorskip("itk")
    data = tmp_path / "acouslic"
    make_acouslic(data, 4)
    csv_path = data / "circumferences/fetal_abdominal_circumferences_per_sweep.csv"
    good = csv_path.read_text()
    csv_path.write_text(good.replace("subject_id", "subject"))
    with pytest.raises(ValueError, match=r"fetal_abdominal_circumferences_per_sweep\.csv: unexpected CSV header"):
        prepare_dataset(data, tmp_path / "p")
    csv_path.write_text(good)
    itk.imwrite(
        itk.image_from_array(np.zeros((ACOUSLIC_FRAMES, H, W + 2), np.uint8)),
        str(data / "masks/stacked_fetal_abdomen/02aa-uuid.mha"),
    )
    with pytest.raises(
        ValueError,
        match=r"02aa-uuid\.mha: mask shape \(98, 64, 12\) \(x, y, frames\) differs from "
        r"its image 02aa-uuid\.mha \(96, 64, 12\)",
    ):
        prepare_dataset(data, tmp_path / "p")


def test_dicom_folder_layout_prepare_train_evaluate(tmp_path):
    """DICOM files in per-series folders (same file names: no collision), masks in labels/, a real cine unlabelled."""
    import shutil

    from pydicom.data import get_testdata_file

    from scripts.clinical.dicom_objects import phantom_ultrasound_dicom

    data, rng = tmp_path / "pacs_export", np.random.default_rng(3)
    (data / "labels").mkdir(parents=True)
    for i in range(6):
        image, label = blob_image_and_label(rng, 2)
        phantom_ultrasound_dicom(image, 0.25 + 0.01 * i, data / f"series{i}" / "IM0001.dcm", patient_id=f"P{i // 2}")
        Image.fromarray(label).save(data / "labels" / f"series{i}__IM0001.png")
    shutil.copy(get_testdata_file("examples_ybr_color.dcm"), data / "cine.dcm")  # 30 frames, no masks
    datalist = json.loads(
        Path(
            prepare_dataset(data, tmp_path / "p", labeled_fraction=0.5, val_fraction=0.2, test_fraction=0.3)
        ).read_text()
    )
    assert datalist["meta"]["layout"] == "dicom" and datalist["meta"]["num_classes"] == 2
    labelled = [i for k in ("labeled", "validation", "test") for i in datalist[k]]
    assert len(labelled) + sum("series" in i["image"] for i in datalist["unlabeled"]) == 6
    assert {i["subject"] for i in labelled} <= {"P0", "P1", "P2"}
    assert all(
        i["pixel_size_mm"] == pytest.approx([0.25 + 0.01 * int(i["source"].split("series")[1][0])] * 2)
        for i in labelled
    )
    cine = [i for i in datalist["unlabeled"] if i["source"].endswith("cine.dcm")]
    assert sorted(i["frame"] for i in cine) == list(range(30)) and cine[0]["pixel_size_mm"] == pytest.approx(
        [0.51] * 2, abs=1e-3
    )
    summary = train_and_evaluate(data, tmp_path, 2, ["background", "disc"])
    assert summary["n_images"] == len(datalist["test"]) and summary["n_images_with_pixel_size"] == summary["n_images"]


def test_hc18_test_set_becomes_the_predict_list(tmp_path):
    from scripts.data.phantom import generate_phantom

    generate_phantom(tmp_path / "hc18", num_subjects=12, image_size=(96, 64), seed=0, progress=False)
    test_dir = tmp_path / "hc18" / "test_set"
    test_dir.mkdir()
    rows = ["filename,pixel size(mm)"]
    for n in range(3):
        Image.fromarray(np.full((64, 96), 50 * n, np.uint8)).save(test_dir / f"{n:03d}_HC.png")
        rows.append(f"{n:03d}_HC.png,0.{n + 1}")
    (tmp_path / "hc18" / "test_set_pixel_size.csv").write_text("\n".join(rows) + "\n")
    datalist = json.loads(Path(prepare_dataset(tmp_path / "hc18", tmp_path / "p", progress=False)).read_text())
    assert [Path(i["image"]).name for i in datalist["predict"]] == ["000_HC.png", "001_HC.png", "002_HC.png"]
    assert [i["pixel_size_mm"] for i in datalist["predict"]] == [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]]
    assert datalist["meta"]["counts"]["predict"] == 3 and "label" not in datalist["predict"][0]
    (test_dir / "003_HC.png").write_bytes((test_dir / "000_HC.png").read_bytes())
    with pytest.raises(ValueError, match=r"003_HC\.png: no row for it in .*test_set_pixel_size\.csv"):
        prepare_dataset(tmp_path / "hc18", tmp_path / "p", progress=False)


def test_dicom_layout_sees_new_masks(tmp_path):
    """The datalist is reused only while the DICOM files AND their masks are unchanged: a mask added later counts."""
    from scripts.clinical.dicom_objects import phantom_ultrasound_dicom

    data, rng = tmp_path / "export", np.random.default_rng(5)
    (data / "labels").mkdir(parents=True)
    labels = {}
    for i in range(5):
        image, labels[i] = blob_image_and_label(rng, 2)
        phantom_ultrasound_dicom(image, 0.3, data / f"s{i}.dcm", patient_id=f"P{i}")
    for i in range(4):
        Image.fromarray(labels[i]).save(data / "labels" / f"s{i}.png")
    first = json.loads(Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=1.0)).read_text())
    assert sum(len(first[k]) for k in ("labeled", "validation", "test")) == 4
    Image.fromarray(labels[4]).save(data / "labels" / "s4.png")
    second = json.loads(Path(prepare_dataset(data, tmp_path / "p", labeled_fraction=1.0)).read_text())
    assert sum(len(second[k]) for k in ("labeled", "validation", "test")) == 5
