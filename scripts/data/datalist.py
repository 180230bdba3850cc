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
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from scripts.utils.files import IMAGE_SUFFIXES, write_atomic, write_json_atomic

from .acouslic import CSV_PATH as ACOUSLIC_CSV
from .acouslic import IMAGES_DIR as ACOUSLIC_IMAGES
from .acouslic import MASKS_DIR as ACOUSLIC_MASKS
from .acouslic import extract_acouslic, is_acouslic
from .dicom import find_dicoms, iter_dicoms, list_dicom_layout
from .generic import LAYOUTS, detect_folder_layout, list_folder_layout
from .hc18 import (
    IMAGE_PATTERN,
    TRAINING_CSV_NAME,
    TRAINING_DIR_NAME,
    find_training_csv,
    list_hc18,
    list_hc18_test,
    load_hc18_mask,
)
from .phantom import PHANTOM_MARKER_NAME, generate_phantom

__all__ = ["DATALIST_VERSION", "split_subjects", "find_hc18_training_dir", "prepare_dataset"]

logger = logging.getLogger(__name__)

DATALIST_VERSION = 1
DATALIST_NAME = "datalist.json"
LABELS_DIR_NAME = "labels"
FRAMES_DIR_NAME = "frames"
EXTRACTED_LAYOUTS = ("acouslic", "dicom")
ALL_LAYOUTS = ("hc18", "acouslic", *LAYOUTS, "dicom")
LAYOUT_HELP = (
    f"HC18's {TRAINING_DIR_NAME}/ (NNN_HC.png + NNN_HC_Annotation.png) with {TRAINING_CSV_NAME} beside or "
    "inside it, or that folder itself; ACOUSLIC-AI's images/stacked_fetal_ultrasound/*.mha; images/ "
    "[+ labels/] (generic); train/labeled_data/images (FUGC); image_mha/ + label_mha/ (PSFHS); or DICOM "
    "files [+ labels/]"
)
SPLIT_KEYS = ("labeled", "unlabeled", "validation", "test")


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def split_subjects(
    items, labeled_fraction=0.05, val_fraction=0.1, test_fraction=0.2, seed=0, labeled_count=None, max_train_images=None
) -> dict:
    """Split items (dicts with a "subject" key) into labeled / unlabeled / validation / test, whole subjects each.

    Subjects are shuffled with `seed`; test and validation take round(fraction x subjects) subjects (at least 1
    each); the rest is the training pool. ``max_train_images`` caps the pool: whole subjects in shuffled order, each
    taken while the pool stays within the cap (the others are left out of every list). Of the pool, labeled takes
    ``labeled_count`` images exactly (the paper's protocol: HC18's 25 or 50 of a 500-image training list), or else
    round(labeled_fraction x pool images) images (at least one subject), chosen by whole subjects in shuffled order,
    skipping those that would overshoot; unlabeled takes the rest of the pool. Item order within a list follows the
    input order.
    """
    for name, value in (
        ("labeled_fraction", labeled_fraction),
        ("val_fraction", val_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, found {value}")
    for name, value in (("labeled_count", labeled_count), ("max_train_images", max_train_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number >= 1 (or None), found {value!r}")
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
    if max_train_images is not None:
        pool = _whole_subjects(pool, by_subject, max_train_images)
        if not pool:
            raise ValueError(f"max_train_images={max_train_images} admits no whole training subject")
    pool_images = sum(len(by_subject[s]) for s in pool)
    if labeled_count is not None:
        if labeled_count > pool_images:
            raise ValueError(f"labeled_count={labeled_count} exceeds the {pool_images} images of the training pool")
        labeled = _whole_subjects(pool, by_subject, labeled_count)
        found = sum(len(by_subject[s]) for s in labeled)
        if found != labeled_count:
            raise ValueError(
                f"labeled_count={labeled_count} cannot be met with whole subjects (closest: {found} "
                "images); choose another count or seed"
            )
    else:
        labeled = _whole_subjects(pool, by_subject, _round_half_up(labeled_fraction * pool_images)) or [pool[0]]
    groups = {
        "labeled": set(labeled),
        "unlabeled": set(pool) - set(labeled),
        "validation": set(validation),
        "test": set(test),
    }
    return {key: [item for item in items if str(item["subject"]) in groups[key]] for key in SPLIT_KEYS}


def _whole_subjects(order: list[str], by_subject: dict[str, list], target: int) -> list[str]:
    """Subjects in ``order``, each taken while their images stay within ``target`` (skipping those that overshoot)."""
    chosen, count = [], 0
    for subject in order:
        if count == target:
            break
        if count + len(by_subject[subject]) <= target:
            chosen.append(subject)
            count += len(by_subject[subject])
    return chosen


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
    test_items = list_hc18_test(training_dir)  # the challenge's test_set/: images and pixel sizes, no annotations
    datalist_path = prepared_dir / DATALIST_NAME
    inputs = (
        [csv_path]
        + [Path(i[k]) for i in items for k in ("image", "annotation")]
        + [Path(i["image"]) for i in test_items]
    )
    fingerprint = _fingerprint({**params, "training_dir": str(training_dir), "prepared_dir": str(prepared_dir)}, inputs)
    if _reusable(datalist_path, fingerprint):
        logger.info("datalist is up to date: %s", datalist_path)
        return str(datalist_path)

    split = _split(items, params)
    labels_dir = prepared_dir / LABELS_DIR_NAME
    labels_dir.mkdir(parents=True, exist_ok=True)
    to_fill = [item for key in ("labeled", "validation", "test") for item in split[key]]
    mask_of = {}
    for item in tqdm(to_fill, desc="filling HC18 outlines", unit="mask", disable=not progress):
        mask_path = labels_dir / f"{Path(item['image']).stem}_mask.png"
        _write_mask(Path(item["annotation"]), mask_path)
        mask_of[item["image"]] = str(mask_path.resolve())
    entries = {}
    for key in SPLIT_KEYS:
        entries[key] = []
        for item in split[key]:
            entry = {"image": item["image"]}
            if key != "unlabeled":
                entry["label"] = mask_of[item["image"]]
            entry["pixel_size_mm"] = [item["pixel_size_mm"], item["pixel_size_mm"]]  # HC18 pixels are square
            entry["subject"] = item["subject"]
            if item["hc_mm"] is not None:
                entry["hc_mm"] = item["hc_mm"]
            entries[key].append(entry)
    return _write_split("hc18", entries, [], 2, datalist_path, params, fingerprint, dataset_dir, test_items)


def _split(labelled: list[dict], params: dict) -> dict:
    return split_subjects(
        labelled,
        params["labeled_fraction"],
        params["val_fraction"],
        params["test_fraction"],
        params["seed"],
        params["labeled_count"],
        params["max_train_images"],
    )


def _write_split(
    layout: str,
    split: dict,
    extra: list[dict],
    num_classes: int,
    datalist_path: Path,
    params: dict,
    fingerprint: str,
    source: Path,
    predict: list[dict] | None = None,
) -> str:
    """Write the datalist of a subject split (:func:`split_subjects`); ``extra`` (unlabelled-only items) joins the
    unlabelled pool unless its subject is in validation or test. The split's unlabelled items lose their labels."""
    held_out = {str(i["subject"]) for key in ("validation", "test") for i in split[key]}
    datalist = {key: list(split[key]) for key in SPLIT_KEYS}
    datalist["unlabeled"] = [
        {k: v for k, v in i.items() if k not in ("label", "hc_mm", "ac_mm")} for i in split["unlabeled"]
    ] + [i for i in extra if str(i["subject"]) not in held_out]
    if predict:
        datalist["predict"] = predict
    counts = {key: len(datalist[key]) for key in (*SPLIT_KEYS, "predict") if key in datalist}
    counts["subjects"] = {key: len({str(i["subject"]) for i in datalist[key]}) for key in SPLIT_KEYS}
    datalist["meta"] = {
        "layout": layout,
        **{
            k: params[k]
            for k in ("labeled_fraction", "labeled_count", "max_train_images", "val_fraction", "test_fraction", "seed")
        },
        "num_classes": num_classes,
        "source": str(source),
        "counts": counts,
        "fingerprint": fingerprint,
        "version": DATALIST_VERSION,
    }
    write_json_atomic(datalist_path, datalist)
    logger.info(
        "datalist %s (%s layout, %d classes): %d labeled, %d unlabeled, %d validation, %d test images%s",
        datalist_path,
        layout,
        num_classes,
        counts["labeled"],
        counts["unlabeled"],
        counts["validation"],
        counts["test"],
        f", {counts['predict']} to predict" if predict else "",
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
    return _write_split(
        layout, _split(labelled, params), extra, num_classes, datalist_path, params, fingerprint, dataset_dir
    )


def _prepare_extracted(
    layout: str, dataset_dir: Path, prepared_dir: Path, params: dict, options: dict, progress: bool
) -> str:
    """Datalist of a layout whose frames are extracted to PNGs first (ACOUSLIC-AI stacks, DICOM)."""
    frames_dir = prepared_dir / FRAMES_DIR_NAME
    if layout == "acouslic":
        sources = sorted((dataset_dir / ACOUSLIC_IMAGES).glob("*.mha")) + sorted(
            (dataset_dir / ACOUSLIC_MASKS).glob("*.mha")
        )
        sources += [dataset_dir / ACOUSLIC_CSV] if (dataset_dir / ACOUSLIC_CSV).is_file() else []
    else:  # the DICOM files and their masks: a mask added or changed later makes a new datalist
        labels_dir = dataset_dir / LABELS_DIR_NAME
        dicoms = find_dicoms(dataset_dir, exclude=[labels_dir])
        sources = dicoms + (sorted(labels_dir.glob("*.png")) if labels_dir.is_dir() else [])
    fingerprint = _fingerprint({**params, **options, "prepared_dir": str(prepared_dir)}, sources)
    datalist_path = prepared_dir / DATALIST_NAME
    if _reusable(datalist_path, fingerprint):
        logger.info("datalist is up to date: %s", datalist_path)
        return str(datalist_path)
    if layout == "acouslic":
        labelled, extra, num_classes = extract_acouslic(
            dataset_dir,
            frames_dir / "acouslic" / options["acouslic_labels"],
            labels=options["acouslic_labels"],
            unlabeled_per_volume=options["acouslic_unlabeled_per_volume"],
            progress=progress,
        )
    else:
        labelled, extra, num_classes = list_dicom_layout(dataset_dir, frames_dir / "dicom", labels_dir, dicoms)
    if len(labelled) < 3:
        raise ValueError(
            f"{dataset_dir}: {len(labelled)} labelled frame(s); at least 3 are needed "
            "(training, validation, test)"
            + ("" if layout == "acouslic" else f" (masks go in {dataset_dir / 'labels'}/<frame name>.png)")
        )
    return _write_split(
        layout, _split(labelled, params), extra, num_classes, datalist_path, params, fingerprint, dataset_dir
    )


def _detect_layout(dataset_dir: Path) -> str | None:
    if find_hc18_training_dir(dataset_dir) is not None:
        return "hc18"
    if is_acouslic(dataset_dir):
        return "acouslic"
    folder = detect_folder_layout(dataset_dir)
    if folder is not None:
        return folder
    return "dicom" if any(True for _ in iter_dicoms(dataset_dir)) else None


def prepare_dataset(
    dataset_dir,
    prepared_dir,
    labeled_fraction=0.05,
    seed=0,
    val_fraction=0.1,
    test_fraction=0.2,
    labeled_count=None,
    max_train_images=None,
    generate_phantom_if_empty=True,
    phantom_subjects=200,
    phantom_image_size=(800, 540),
    phantom_seed=0,
    progress=True,
    layout=None,
    pixel_size_mm=None,
    acouslic_labels="binary",
    acouslic_unlabeled_per_volume=24,
) -> str:
    """Make `<prepared_dir>/datalist.json` (and masks or extracted frames under `prepared_dir`) from `dataset_dir`.

    Layouts (``layout`` None detects them in this order): ``hc18`` (`training_set/` + its CSV beside or inside it,
    or the training_set folder itself; a `test_set/` beside it becomes the datalist's ``predict`` list),
    ``acouslic`` (ACOUSLIC-AI stacks, :mod:`scripts.data.acouslic`; ``acouslic_labels`` "binary" or "keep",
    ``acouslic_unlabeled_per_volume`` empty frames sampled per volume), the folder layouts of
    :mod:`scripts.data.generic` (``fugc``, ``psfhs``, ``generic`` `images/` + `labels/`; ``pixel_size_mm`` for
    PNG/JPG images, which carry none), and ``dicom`` (DICOM files at any depth, masks in `labels/`,
    :func:`scripts.data.dicom.list_dicom_layout`).
    The split (:func:`split_subjects`): ``labeled_count`` labelled images (else ``labeled_fraction`` of the pool),
    from a training pool of at most ``max_train_images`` images (None: every image not in validation or test).
    A missing or empty `dataset_dir` gets a synthetic HC18-like phantom when `generate_phantom_if_empty`.
    Re-runs with the same inputs and parameters reuse the datalist (and extracted frames). Nothing in `dataset_dir`
    is modified (except writing the phantom into an empty one). Returns the datalist path.
    Distributed (torchrun): rank 0 prepares while the other ranks wait, then they reuse its datalist.
    """
    args = dict(
        dataset_dir=dataset_dir,
        prepared_dir=prepared_dir,
        labeled_fraction=labeled_fraction,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        labeled_count=labeled_count,
        max_train_images=max_train_images,
        generate_phantom_if_empty=generate_phantom_if_empty,
        phantom_subjects=phantom_subjects,
        phantom_image_size=phantom_image_size,
        phantom_seed=phantom_seed,
        progress=progress,
        layout=layout,
        pixel_size_mm=pixel_size_mm,
        acouslic_labels=acouslic_labels,
        acouslic_unlabeled_per_volume=acouslic_unlabeled_per_volume,
    )
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return _prepare_dataset(**args)
    if dist.get_rank() == 0:
        try:
            return _prepare_dataset(**args)
        finally:  # the others go on (and meet the same error, if any) once rank 0 is done
            dist.barrier()
    dist.barrier()
    return _prepare_dataset(**{**args, "progress": False})


def _prepare_dataset(
    dataset_dir,
    prepared_dir,
    labeled_fraction,
    seed,
    val_fraction,
    test_fraction,
    labeled_count,
    max_train_images,
    generate_phantom_if_empty,
    phantom_subjects,
    phantom_image_size,
    phantom_seed,
    progress,
    layout,
    pixel_size_mm,
    acouslic_labels,
    acouslic_unlabeled_per_volume,
) -> str:
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
    if layout is not None and layout not in ALL_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected {', '.join(ALL_LAYOUTS)} or None to detect it")
    layout = layout or _detect_layout(dataset_dir)
    training_dir = find_hc18_training_dir(dataset_dir) if layout in (None, "hc18") else None
    if layout in (None, "hc18") and training_dir is None and not _holds_images(dataset_dir):
        if not generate_phantom_if_empty:
            raise ValueError(
                f"cannot recognise the dataset layout in {dataset_dir}: it holds no images ({LAYOUT_HELP})"
            )
        logger.info("%s holds no images: generating a %d-subject phantom there", dataset_dir, phantom_subjects)
        training_dir = generate_phantom(
            dataset_dir,
            num_subjects=phantom_subjects,
            image_size=phantom_image_size,
            seed=phantom_seed,
            progress=progress,
        )
        layout = "hc18"
    if layout is None or (layout == "hc18" and training_dir is None):
        raise ValueError(f"cannot recognise the dataset layout in {dataset_dir}: expected {LAYOUT_HELP}")
    prepared_dir.mkdir(parents=True, exist_ok=True)
    params = {
        "layout": layout,
        "labeled_fraction": float(labeled_fraction),
        "val_fraction": float(val_fraction),
        "test_fraction": float(test_fraction),
        "seed": int(seed),
        "version": DATALIST_VERSION,
        "labeled_count": None if labeled_count is None else int(labeled_count),
        "max_train_images": None if max_train_images is None else int(max_train_images),
    }
    if layout == "hc18":
        return _prepare_hc18(training_dir, dataset_dir, prepared_dir, params, progress)
    if layout in EXTRACTED_LAYOUTS:
        options = (
            {"acouslic_labels": acouslic_labels, "acouslic_unlabeled_per_volume": int(acouslic_unlabeled_per_volume)}
            if layout == "acouslic"
            else {}
        )
        return _prepare_extracted(layout, dataset_dir, prepared_dir, params, options, progress)
    return _prepare_folder(layout, dataset_dir, prepared_dir, params, pixel_size_mm)
