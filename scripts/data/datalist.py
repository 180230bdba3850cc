"""Subject-grouped split of a data set into the bundle's one datalist format, and the start-up entry point.

Datalist JSON (every data layout produces this)::

    {"labeled": [...], "unlabeled": [...], "validation": [...], "test": [...],
     "meta": {"layout": "hc18", "labeled_fraction": 0.05, "seed": 0, "num_classes": 2, "source": "<dataset dir>",
              "counts": {...}, "fingerprint": "<sha256 of parameters and input files>", ...}}

Items: {"image": abs path, "label": abs path of a FILLED uint8 mask PNG (0/1), "pixel_size_mm": [x, y],
"subject": "012", "hc_mm": 180.1}; unlabelled items carry neither label nor hc_mm. pixel_size_mm is in MONAI
spatial order (x = image width axis, y = height axis).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..files import IMAGE_SUFFIXES, write_atomic, write_json_atomic
from .generic import LAYOUTS, detect_folder_layout, list_folder_layout
from .hc18 import TRAINING_CSV_NAME, TRAINING_DIR_NAME, IMAGE_PATTERN, find_training_csv, list_hc18, load_hc18_mask
from .phantom import PHANTOM_MARKER_NAME, generate_phantom

__all__ = ["DATALIST_VERSION", "split_subjects", "find_hc18_training_dir", "prepare_dataset"]

logger = logging.getLogger(__name__)

DATALIST_VERSION = 1
DATALIST_NAME = "datalist.json"
LABELS_DIR_NAME = "labels"
SPLIT_KEYS = ("labeled", "unlabeled", "validation", "test")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def split_subjects(items, labeled_fraction=0.05, val_fraction=0.1, test_fraction=0.2, seed=0) -> dict:
    """Split items (dicts with a "subject" key) into labeled / unlabeled / validation / test, whole subjects each.

    Subjects are shuffled with `seed`; test and validation take round(fraction x subjects) subjects (at least 1
    each); the rest is the training pool, of which labeled takes round(labeled_fraction x pool images) images
    (at least one subject), chosen by whole subjects, and unlabeled the rest. Item order within a list follows
    the input order.
    """
    for name, value in (("labeled_fraction", labeled_fraction), ("val_fraction", val_fraction),
                        ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, found {value}")
    by_subject: dict[str, list] = {}
    for item in items:
        by_subject.setdefault(str(item["subject"]), []).append(item)
    subjects = sorted(by_subject)
    if len(subjects) < 3:
        raise ValueError(f"need at least 3 subjects to split into training, validation and test; found {len(subjects)}")
    order = [subjects[i] for i in np.random.default_rng(seed).permutation(len(subjects))]
    n_test = max(1, _round_half_up(test_fraction * len(subjects)))
    n_val = max(1, _round_half_up(val_fraction * len(subjects)))
    if n_test + n_val >= len(subjects):
        raise ValueError(
            f"{len(subjects)} subjects leave no training pool after {n_test} test and {n_val} validation subjects; "
            "lower test_fraction / val_fraction"
        )
    test, validation, pool = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    target = _round_half_up(labeled_fraction * sum(len(by_subject[s]) for s in pool))
    labeled, count = [], 0
    for subject in pool:  # whole subjects, in shuffled order, skipping those that would overshoot the target
        if count + len(by_subject[subject]) <= target:
            labeled.append(subject)
            count += len(by_subject[subject])
        if count == target:
            break
    if not labeled:
        labeled = [pool[0]]
    groups = {"labeled": set(labeled), "unlabeled": set(pool) - set(labeled), "validation": set(validation),
              "test": set(test)}
    return {key: [item for item in items if str(item["subject"]) in groups[key]] for key in SPLIT_KEYS}


def find_hc18_training_dir(dataset_dir) -> Path | None:
    """HC18 training folder of `dataset_dir`: its `training_set/`, or itself when it holds NNN_HC.png and the CSV."""
    dataset_dir = Path(dataset_dir)
    if (dataset_dir / TRAINING_DIR_NAME).is_dir():
        return dataset_dir / TRAINING_DIR_NAME
    if find_training_csv(dataset_dir) is not None and any(IMAGE_PATTERN.match(p.name) for p in dataset_dir.iterdir()):
        return dataset_dir
    return None


def _holds_images(folder: Path) -> bool:
    for _root, _dirs, files in os.walk(folder):
        if any(name.lower().endswith(IMAGE_SUFFIXES) for name in files):
            return True
    return False


def _fingerprint(params: dict, files) -> str:
    """sha256 over the parameters and (path, size, mtime) of every input file."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in sorted(str(p) for p in files):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _reusable(datalist_path: Path, fingerprint: str) -> bool:
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, ValueError):
        return False
    if datalist.get("meta", {}).get("fingerprint") != fingerprint:
        return False
    items = [item for split in SPLIT_KEYS for item in datalist.get(split, [])]
    return all(Path(item[key]).is_file() for item in items for key in ("image", "label") if key in item)


def _write_mask(annotation: Path, mask_path: Path) -> None:
    """Filled uint8 {0, 1} mask of an HC18 outline, written once (kept while newer than its annotation)."""
    if mask_path.is_file() and mask_path.stat().st_mtime_ns >= annotation.stat().st_mtime_ns:
        return
    mask = load_hc18_mask(annotation)
    write_atomic(mask_path, lambda f: Image.fromarray(mask).save(f, format="PNG"), binary=True)


def _prepare_hc18(training_dir: Path, dataset_dir: Path, prepared_dir: Path, params: dict, progress: bool) -> str:
    csv_path = find_training_csv(training_dir)
    items = list_hc18(training_dir, csv_path)  # checks images, annotations and CSV rows against each other
    if not items:
        raise ValueError(f"{training_dir}: no NNN_HC.png images listed")
    datalist_path = prepared_dir / DATALIST_NAME
    inputs = [csv_path] + [Path(i[k]) for i in items for k in ("image", "annotation")]
    fingerprint = _fingerprint({**params, "training_dir": str(training_dir), "prepared_dir": str(prepared_dir)}, inputs)
    if _reusable(datalist_path, fingerprint):
        logger.info("datalist is up to date: %s", datalist_path)
        return str(datalist_path)

    split = split_subjects(items, params["labeled_fraction"], params["val_fraction"], params["test_fraction"],
                           params["seed"])
    labels_dir = prepared_dir / LABELS_DIR_NAME
    labels_dir.mkdir(parents=True, exist_ok=True)
    to_fill = [item for key in ("labeled", "validation", "test") for item in split[key]]
    datalist = {key: [] for key in SPLIT_KEYS}
    mask_of = {}
    for item in tqdm(to_fill, desc="filling HC18 outlines", unit="mask", disable=not progress):
        mask_path = labels_dir / f"{Path(item['image']).stem}_mask.png"
        _write_mask(Path(item["annotation"]), mask_path)
        mask_of[item["image"]] = str(mask_path.resolve())
    for key in SPLIT_KEYS:
        for item in split[key]:
            entry = {"image": item["image"]}
            if key != "unlabeled":
                entry["label"] = mask_of[item["image"]]
            entry["pixel_size_mm"] = [item["pixel_size_mm"], item["pixel_size_mm"]]  # HC18 pixels are square
            entry["subject"] = item["subject"]
            if key != "unlabeled" and item["hc_mm"] is not None:
                entry["hc_mm"] = item["hc_mm"]
            datalist[key].append(entry)
    counts = {key: len(datalist[key]) for key in SPLIT_KEYS}
    counts["subjects"] = {key: len({i["subject"] for i in datalist[key]}) for key in SPLIT_KEYS}
    datalist["meta"] = {
        "layout": "hc18",
        "labeled_fraction": params["labeled_fraction"],
        "val_fraction": params["val_fraction"],
        "test_fraction": params["test_fraction"],
        "seed": params["seed"],
        "num_classes": 2,
        "source": str(dataset_dir.resolve()),
        "counts": counts,
        "fingerprint": fingerprint,
        "version": DATALIST_VERSION,
    }
    write_json_atomic(datalist_path, datalist)
    logger.info(
        "datalist %s: %d labeled, %d unlabeled, %d validation, %d test images",
        datalist_path, counts["labeled"], counts["unlabeled"], counts["validation"], counts["test"],
    )
    return str(datalist_path)


def _prepare_folder(layout: str, dataset_dir: Path, prepared_dir: Path, params: dict, pixel_size_mm) -> str:
    """Datalist of an image/label folder layout (scripts.data.generic): labels are used as they are."""
    labelled, extra, num_classes = list_folder_layout(dataset_dir, layout, pixel_size_mm)
    datalist_path = prepared_dir / DATALIST_NAME
    inputs = [Path(i[k]) for i in labelled + extra for k in ("image", "label") if k in i]
    fingerprint = _fingerprint({**params, "pixel_size_mm": pixel_size_mm, "prepared_dir": str(prepared_dir)}, inputs)
    if _reusable(datalist_path, fingerprint):
        logger.info("datalist is up to date: %s", datalist_path)
        return str(datalist_path)
    split = split_subjects(labelled, params["labeled_fraction"], params["val_fraction"], params["test_fraction"],
                           params["seed"])
    datalist = {key: list(split[key]) for key in SPLIT_KEYS}
    datalist["unlabeled"] = [{k: v for k, v in i.items() if k != "label"} for i in split["unlabeled"]] + extra
    counts = {key: len(datalist[key]) for key in SPLIT_KEYS}
    datalist["meta"] = {**{k: params[k] for k in ("layout", "labeled_fraction", "val_fraction", "test_fraction", "seed")},
                        "num_classes": num_classes, "source": str(dataset_dir), "counts": counts,
                        "fingerprint": fingerprint, "version": DATALIST_VERSION}
    write_json_atomic(datalist_path, datalist)
    logger.info("datalist %s (%s layout, %d classes): %d labeled, %d unlabeled, %d validation, %d test images",
                datalist_path, layout, num_classes, counts["labeled"], counts["unlabeled"], counts["validation"],
                counts["test"])
    return str(datalist_path)


def prepare_dataset(dataset_dir, prepared_dir, labeled_fraction=0.05, seed=0, val_fraction=0.1, test_fraction=0.2,
                    generate_phantom_if_empty=True, phantom_subjects=200, phantom_image_size=(800, 540),
                    phantom_seed=0, progress=True, layout=None, pixel_size_mm=None) -> str:
    """Make `<prepared_dir>/datalist.json` (and filled masks in `<prepared_dir>/labels/`) from `dataset_dir`.

    Recognised layouts (``layout`` None detects them in this order): ``hc18`` (`training_set/` + its CSV beside or
    inside it, or the training_set folder itself), then the folder layouts of :mod:`scripts.data.generic`:
    ``fugc``, ``psfhs``, ``generic`` (`images/` + `labels/`). ``pixel_size_mm`` is the pixel size of folder-layout
    images whose format carries none (PNG, JPG).
    A missing or image-free `dataset_dir` gets a synthetic HC18-like phantom when `generate_phantom_if_empty`.
    Re-runs with the same inputs and parameters reuse the datalist. Nothing in `dataset_dir` is modified
    (except writing the phantom into an empty one). Returns the datalist path.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    prepared_dir = Path(prepared_dir).expanduser().resolve()
    if not dataset_dir.exists():
        if not generate_phantom_if_empty:
            raise FileNotFoundError(
                f"dataset_dir does not exist: {dataset_dir} (leave dataset_dir at its default to train on the phantom)"
            )
        dataset_dir.mkdir(parents=True)
    elif not dataset_dir.is_dir():
        raise NotADirectoryError(f"dataset_dir is not a folder: {dataset_dir}")
    dataset_dir = dataset_dir.resolve()

    marker = dataset_dir / PHANTOM_MARKER_NAME
    if marker.is_file() and generate_phantom_if_empty:  # a phantom written here earlier: finish it if interrupted
        phantom_params = json.loads(marker.read_text())["params"]
        generate_phantom(dataset_dir, **phantom_params, progress=progress)
    if layout is not None and layout != "hc18" and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected hc18, {', '.join(LAYOUTS)} or None to detect it")
    folder_layout = layout if layout in LAYOUTS else None
    training_dir = find_hc18_training_dir(dataset_dir) if layout in (None, "hc18") else None
    if layout is None and training_dir is None:
        folder_layout = detect_folder_layout(dataset_dir)
    if folder_layout is not None:
        prepared_dir.mkdir(parents=True, exist_ok=True)
        params = {"layout": folder_layout, "labeled_fraction": float(labeled_fraction),
                  "val_fraction": float(val_fraction), "test_fraction": float(test_fraction), "seed": int(seed),
                  "version": DATALIST_VERSION}
        return _prepare_folder(folder_layout, dataset_dir, prepared_dir, params, pixel_size_mm)
    if training_dir is None and not _holds_images(dataset_dir):
        if not generate_phantom_if_empty:
            raise ValueError(
                f"cannot recognise the dataset layout in {dataset_dir}: it holds no images (expected HC18's "
                f"{TRAINING_DIR_NAME}/ with NNN_HC.png, NNN_HC_Annotation.png and {TRAINING_CSV_NAME})"
            )
        logger.info("%s holds no images: generating a %d-subject phantom there", dataset_dir, phantom_subjects)
        training_dir = generate_phantom(dataset_dir, num_subjects=phantom_subjects, image_size=phantom_image_size,
                                        seed=phantom_seed, progress=progress)
    if training_dir is None:
        raise ValueError(
            f"cannot recognise the dataset layout in {dataset_dir}: expected HC18's {TRAINING_DIR_NAME}/ folder "
            f"(NNN_HC.png + NNN_HC_Annotation.png) with {TRAINING_CSV_NAME} beside or inside it, "
            "or that folder itself; or images/ [+ labels/] (generic), train/labeled_data/images (FUGC), "
            "image_mha/ + label_mha/ (PSFHS)"
        )
    prepared_dir.mkdir(parents=True, exist_ok=True)
    params = {"layout": "hc18", "labeled_fraction": float(labeled_fraction), "val_fraction": float(val_fraction),
              "test_fraction": float(test_fraction), "seed": int(seed), "version": DATALIST_VERSION}
    return _prepare_hc18(training_dir, dataset_dir, prepared_dir, params, progress)
