"""Tests of the data side: HC18 phantom, HC18 reader, subject-grouped split and datalist preparation."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import draw, measure

from scripts.data.datalist import prepare_dataset, split_subjects
from scripts.data.hc18 import fill_outline, list_hc18, load_hc18_mask, read_hc18_csv
from scripts.data.phantom import ellipse_mask, ellipse_outline, generate_phantom

HC18_HEADER = "filename,pixel size(mm),head circumference (mm)"
PHANTOM = dict(num_subjects=12, repeat_fraction=0.5, image_size=(256, 192), seed=3, progress=False)


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    dataset_dir = tmp_path_factory.mktemp("phantom")
    generate_phantom(dataset_dir, **PHANTOM)
    return dataset_dir


def _csv_rows(dataset_dir: Path) -> list[list[str]]:
    with open(dataset_dir / "training_set_pixel_size_and_HC.csv", newline="") as handle:
        return list(csv.reader(handle))


def _snapshot(folder: Path) -> dict:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


# --------------------------------------------------------------------------------------------------------------------
# phantom
# --------------------------------------------------------------------------------------------------------------------
def test_phantom_writes_the_hc18_layout(phantom_dir):
    training = phantom_dir / "training_set"
    with open(phantom_dir / "training_set_pixel_size_and_HC.csv") as handle:
        assert handle.readline().rstrip("\n") == HC18_HEADER
    rows = _csv_rows(phantom_dir)[1:]
    images = sorted(p.name for p in training.glob("*.png") if not p.name.endswith("_Annotation.png"))
    annotations = sorted(p.name for p in training.glob("*_Annotation.png"))
    assert all(re.fullmatch(r"\d{3}_(2|3)?HC\.png", name) for name in images)
    assert annotations == sorted(name[: -len(".png")] + "_Annotation.png" for name in images)
    assert sorted(row[0] for row in rows) == images
    assert "000_HC.png" in images and any(re.fullmatch(r"\d{3}_2HC\.png", name) for name in images)
    assert len({name[:3] for name in images}) == PHANTOM["num_subjects"]
    for row in rows:
        assert 0.049 <= float(row[1]) and float(row[2]) > 0 and re.fullmatch(r"\d+\.\d+", row[1])
    with Image.open(training / images[0]) as image:
        assert image.mode == "L" and image.size == PHANTOM["image_size"]


def test_phantom_annotations_are_one_pixel_closed_outlines(phantom_dir):
    training = phantom_dir / "training_set"
    for name, pixel_size, hc in _csv_rows(phantom_dir)[1:]:
        outline = np.asarray(Image.open(training / name.replace(".png", "_Annotation.png")))
        assert outline.shape == PHANTOM["image_size"][::-1] and outline.dtype == np.uint8
        assert set(np.unique(outline)) == {0, 255}
        on = outline > 0
        # one pixel wide: no 2x2 block entirely on the line
        assert not (on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]).any(), name
        perimeter_px = float(hc) / float(pixel_size)
        area = ndimage.binary_fill_holes(on).sum()
        assert 0.8 * perimeter_px < on.sum() < 1.2 * perimeter_px, name
        assert on.sum() < 0.2 * area, name


def test_phantom_hc_matches_the_annotation(phantom_dir):
    """CSV HC vs an independent estimate: moments of the filled outline give the axes, Ramanujan gives HC."""
    training = phantom_dir / "training_set"
    for name, pixel_size, hc in _csv_rows(phantom_dir)[1:]:
        outline = np.asarray(Image.open(training / name.replace(".png", "_Annotation.png"))) > 0
        region = measure.regionprops(ndimage.binary_fill_holes(outline).astype(np.uint8))[0]
        a, b = region.axis_major_length / 2, region.axis_minor_length / 2
        h = ((a - b) / (a + b)) ** 2
        estimate = math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h))) * float(pixel_size)
        assert estimate == pytest.approx(float(hc), rel=0.01), name


def test_phantom_is_idempotent_resumable_and_reproducible(phantom_dir, tmp_path):
    before = _snapshot(phantom_dir)
    generate_phantom(phantom_dir, **PHANTOM)
    assert _snapshot(phantom_dir) == before  # nothing rewritten: same bytes and mtimes

    copy = tmp_path / "copy"
    generate_phantom(copy, **PHANTOM)
    assert {k: v[1] for k, v in _snapshot(copy).items()} == {k: v[1] for k, v in before.items()}

    # an interrupted run (marker not complete, one image missing) is finished without touching the rest
    marker = json.loads((copy / "phantom.json").read_text())
    (copy / "phantom.json").write_text(json.dumps({**marker, "complete": False}))
    (copy / "training_set" / "001_HC.png").unlink()
    kept = _snapshot(copy / "training_set")
    generate_phantom(copy, **PHANTOM)
    after = _snapshot(copy / "training_set")
    assert after[Path("001_HC.png")][1] == before[Path("training_set/001_HC.png")][1]
    assert all(after[k] == v for k, v in kept.items())


def test_phantom_refuses_to_overwrite_foreign_images(tmp_path):
    (tmp_path / "training_set").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "training_set" / "000_HC.png")
    with pytest.raises(ValueError, match="did not write"):
        generate_phantom(tmp_path, **PHANTOM)


@pytest.mark.parametrize("angle", [0.0, 0.3, 1.1, 2.5])
def test_ellipse_outline_fills_back_to_the_analytic_ellipse(angle):
    shape, center, axes = (120, 160), (81.3, 57.6), (52.7, 38.2)
    outline = ellipse_outline(shape, center, axes, angle)
    filled = fill_outline(outline)
    assert np.array_equal(filled.astype(bool), ellipse_mask(shape, center, axes, angle))
    assert filled.sum() == pytest.approx(math.pi * axes[0] * axes[1], rel=0.01)


# --------------------------------------------------------------------------------------------------------------------
# HC18 reader
# --------------------------------------------------------------------------------------------------------------------
def test_fill_outline_of_hand_drawn_shapes():
    square = np.zeros((50, 50), np.uint8)
    rr, cc = draw.polygon_perimeter([10, 10, 29, 29], [10, 29, 29, 10], shape=square.shape)
    square[rr, cc] = 255
    filled = fill_outline(square)
    assert filled.dtype == np.uint8 and set(np.unique(filled)) == {0, 1}
    assert filled.sum() == 20 * 20 and filled[10:30, 10:30].all()

    circle = np.zeros((64, 64), np.uint8)
    circle[draw.circle_perimeter(32, 32, 20)] = 255
    assert fill_outline(circle).sum() == pytest.approx(math.pi * 20**2, rel=0.05)

    arc = np.zeros((64, 64), np.uint8)
    rr, cc = draw.circle_perimeter(32, 32, 20)
    arc[rr[cc > 30], cc[cc > 30]] = 255  # half a circle: open
    with pytest.raises(ValueError, match="not closed"):
        fill_outline(arc)
    with pytest.raises(ValueError, match="empty"):
        fill_outline(np.zeros((8, 8), np.uint8))


def test_read_hc18_csv_headers_and_errors(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text(f"{HC18_HEADER}\n001_HC.png,0.12,180.5\n")
    assert read_hc18_csv(train) == {"001_HC.png": {"pixel_size_mm": 0.12, "hc_mm": 180.5}}
    test = tmp_path / "test.csv"
    test.write_text("filename,pixel size(mm)\n000_HC.png,0.2\n")
    assert read_hc18_csv(test) == {"000_HC.png": {"pixel_size_mm": 0.2, "hc_mm": None}}

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,pixel_size\n001_HC.png,0.12\n")
    with pytest.raises(ValueError, match=r"wrong\.csv.*header") as error:
        read_hc18_csv(wrong)
    assert "name,pixel_size" in str(error.value) and HC18_HEADER in str(error.value)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{HC18_HEADER}\n001_HC.png,0.12,180.5\n002_HC.png,abc,170\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3"):
        read_hc18_csv(bad)


def test_list_hc18_groups_subjects_and_names_missing_files(phantom_dir, tmp_path):
    items = list_hc18(phantom_dir / "training_set")
    assert len(items) == len(_csv_rows(phantom_dir)) - 1
    for item in items:
        assert Path(item["image"]).name.startswith(item["subject"] + "_") and len(item["subject"]) == 3
        assert Path(item["annotation"]).is_file() and item["pixel_size_mm"] > 0 and item["hc_mm"] > 0

    broken = tmp_path / "broken"
    shutil.copytree(phantom_dir, broken)
    (broken / "training_set" / "002_HC_Annotation.png").unlink()
    with pytest.raises(ValueError, match=r"002_HC\.png.*annotation"):
        list_hc18(broken / "training_set")
    (broken / "training_set" / "002_HC.png").unlink()
    with pytest.raises(ValueError, match=r"missing.*002_HC\.png"):
        list_hc18(broken / "training_set")


def test_load_hc18_mask_names_the_file(tmp_path):
    path = tmp_path / "007_HC_Annotation.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    with pytest.raises(ValueError, match="007_HC_Annotation.png"):
        load_hc18_mask(path)


# --------------------------------------------------------------------------------------------------------------------
# split and datalist
# --------------------------------------------------------------------------------------------------------------------
def _items(num_subjects=60, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": f"{s:03d}_{r}", "subject": f"{s:03d}"}
        for s in range(num_subjects)
        for r in range(1 + int(rng.random() < 0.25))
    ]


def test_split_subjects_groups_covers_and_is_seeded():
    items = _items()
    split = split_subjects(items, labeled_fraction=0.1, val_fraction=0.1, test_fraction=0.2, seed=0)
    subjects = {key: {i["subject"] for i in value} for key, value in split.items()}
    keys = list(split)
    assert keys == ["labeled", "unlabeled", "validation", "test"]
    for i, first in enumerate(keys):
        for second in keys[i + 1 :]:
            assert not subjects[first] & subjects[second], (first, second)
    assert sorted(i["image"] for v in split.values() for i in v) == sorted(i["image"] for i in items)
    assert len(subjects["test"]) == 12 and len(subjects["validation"]) == 6  # round(0.2 * 60), round(0.1 * 60)
    pool = len(split["labeled"]) + len(split["unlabeled"])
    assert len(split["labeled"]) == round(0.1 * pool)
    assert split_subjects(items, 0.1, seed=0) == split_subjects(items, 0.1, seed=0)
    assert split_subjects(items, 0.1, seed=0)["test"] != split_subjects(items, 0.1, seed=1)["test"]


def test_split_subjects_keeps_at_least_one_of_each():
    split = split_subjects(_items(num_subjects=5), labeled_fraction=0.0, val_fraction=0.0, test_fraction=0.0)
    assert all(len({i["subject"] for i in split[k]}) >= 1 for k in ("labeled", "validation", "test"))
    with pytest.raises(ValueError, match="at least 3 subjects"):
        split_subjects(_items(num_subjects=2))


def test_prepare_dataset_writes_filled_masks_and_datalist(phantom_dir, tmp_path):
    source_before = _snapshot(phantom_dir)
    prepared = tmp_path / "prepared"
    path = prepare_dataset(phantom_dir, prepared, labeled_fraction=0.3, seed=0, progress=False)
    assert Path(path) == prepared / "datalist.json"
    datalist = json.loads(Path(path).read_text())
    meta = datalist["meta"]
    assert meta["layout"] == "hc18" and meta["num_classes"] == 2 and meta["seed"] == 0
    assert meta["labeled_fraction"] == 0.3 and meta["source"] == str(phantom_dir.resolve())
    assert {k: meta["counts"][k] for k in ("labeled", "unlabeled", "validation", "test")} == {
        k: len(datalist[k]) for k in ("labeled", "unlabeled", "validation", "test")
    }
    rows = {r[0]: r for r in _csv_rows(phantom_dir)[1:]}
    assert sum(len(datalist[k]) for k in ("labeled", "unlabeled", "validation", "test")) == len(rows)
    for key in ("labeled", "validation", "test"):
        for item in datalist[key]:
            image = Path(item["image"])
            assert image.is_absolute() and Path(item["label"]).is_absolute()
            assert item["pixel_size_mm"] == [float(rows[image.name][1])] * 2
            assert item["hc_mm"] == float(rows[image.name][2]) and item["subject"] == image.name[:3]
            mask = np.asarray(Image.open(item["label"]))
            outline = np.asarray(Image.open(image.with_name(image.stem + "_Annotation.png"))) > 0
            assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
            assert mask.shape == outline.shape
            assert np.array_equal(mask.astype(bool), ndimage.binary_fill_holes(outline))
    for item in datalist["unlabeled"]:
        assert set(item) == {"image", "pixel_size_mm", "subject"}
    assert _snapshot(phantom_dir) == source_before  # the user's data set is untouched

    # re-run: reused as is; another seed: rewritten
    stamp = Path(path).stat().st_mtime_ns
    assert prepare_dataset(phantom_dir, prepared, labeled_fraction=0.3, seed=0, progress=False) == path
    assert Path(path).stat().st_mtime_ns == stamp
    prepare_dataset(phantom_dir, prepared, labeled_fraction=0.3, seed=1, progress=False)
    assert json.loads(Path(path).read_text())["meta"]["seed"] == 1


def test_prepare_dataset_accepts_the_training_folder_itself(phantom_dir, tmp_path):
    path = prepare_dataset(
        phantom_dir / "training_set", tmp_path / "p", generate_phantom_if_empty=False, progress=False
    )
    assert json.loads(Path(path).read_text())["meta"]["counts"]["test"] > 0


def test_prepare_dataset_layout_errors(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        prepare_dataset(missing, tmp_path / "p", generate_phantom_if_empty=False)
    odd = tmp_path / "odd"
    (odd / "scans").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(odd / "scans" / "patient1.png")
    for generate in (False, True):
        with pytest.raises(ValueError, match="cannot recognise the dataset layout"):
            prepare_dataset(odd, tmp_path / "p", generate_phantom_if_empty=generate)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="cannot recognise the dataset layout"):
        prepare_dataset(empty, tmp_path / "p", generate_phantom_if_empty=False)


def test_prepare_dataset_generates_a_phantom_when_empty(tmp_path):
    dataset = tmp_path / "new_dataset"
    path = prepare_dataset(
        dataset, tmp_path / "prepared", phantom_subjects=6, phantom_image_size=(128, 96), progress=False
    )
    assert (dataset / "training_set" / "000_HC.png").is_file() and (dataset / "phantom.json").is_file()
    datalist = json.loads(Path(path).read_text())
    assert datalist["meta"]["counts"]["labeled"] >= 1 and len({i["subject"] for i in datalist["test"]}) == 1


def test_split_subjects_labeled_count_is_exact_and_never_splits_a_subject():
    items = _items(num_subjects=120)
    for count in (1, 7, 25):
        split = split_subjects(items, labeled_count=count, seed=3)
        assert len(split["labeled"]) == count
        labelled = {i["subject"] for i in split["labeled"]}
        others = {i["subject"] for k in ("unlabeled", "validation", "test") for i in split[k]}
        assert not labelled & others
    with pytest.raises(ValueError, match="exceeds"):
        split_subjects(items, labeled_count=10_000)
    with pytest.raises(ValueError, match="whole number"):
        split_subjects(items, labeled_count=0)


def test_split_subjects_caps_the_training_pool_by_whole_subjects():
    items = _items(num_subjects=120)
    full = split_subjects(items, labeled_count=5, seed=1)
    capped = split_subjects(items, labeled_count=5, max_train_images=40, seed=1)
    assert len(capped["labeled"]) == 5
    assert len(capped["labeled"]) + len(capped["unlabeled"]) == 40  # single- and two-image subjects fill it exactly
    assert capped["validation"] == full["validation"] and capped["test"] == full["test"]
    pool = {i["subject"] for k in ("labeled", "unlabeled") for i in capped[k]}
    assert pool <= {i["subject"] for k in ("labeled", "unlabeled") for i in full[k]}


def test_prepare_dataset_labeled_count_reaches_the_datalist(phantom_dir, tmp_path):
    path = prepare_dataset(phantom_dir, tmp_path / "p", labeled_count=3, seed=0, progress=False)
    datalist = json.loads(Path(path).read_text())
    assert len(datalist["labeled"]) == 3 and datalist["meta"]["labeled_count"] == 3
