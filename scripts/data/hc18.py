"""Reader for the HC18 fetal head circumference data set (Grand Challenge, CC BY 4.0).

Layout of the download, as unpacked::

    <dataset_dir>/training_set/NNN_HC.png, NNN_HC_Annotation.png, NNN_2HC.png, ...
    <dataset_dir>/training_set_pixel_size_and_HC.csv   (also accepted inside training_set/)
    <dataset_dir>/test_set/NNN_HC.png and <dataset_dir>/test_set_pixel_size.csv

Annotations are one-pixel ellipse OUTLINES (0/255), not filled masks; `fill_outline` turns them into masks.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from scripts.evaluation.biometry import ellipse_circumference

__all__ = [
    "TRAINING_DIR_NAME",
    "TRAINING_CSV_NAME",
    "TRAINING_CSV_HEADER",
    "TEST_CSV_NAME",
    "TEST_CSV_HEADER",
    "ellipse_circumference",
    "read_hc18_csv",
    "fill_outline",
    "load_hc18_mask",
    "find_training_csv",
    "list_hc18",
    "list_hc18_test",
    "subject_of",
]

TRAINING_DIR_NAME = "training_set"
TRAINING_CSV_NAME = "training_set_pixel_size_and_HC.csv"
TRAINING_CSV_HEADER = ("filename", "pixel size(mm)", "head circumference (mm)")
TEST_CSV_NAME = "test_set_pixel_size.csv"
TEST_CSV_HEADER = ("filename", "pixel size(mm)")
TEST_DIR_NAME = "test_set"

IMAGE_PATTERN = re.compile(r"^(?P<subject>\d+)_(?P<repeat>\d*)HC\.png$")
ANNOTATION_SUFFIX = "_Annotation.png"


def subject_of(filename: str) -> str:
    """Subject id of an HC18 file: its leading digits (`012_2HC.png` -> `012`)."""
    match = re.match(r"^(\d+)", Path(filename).name)
    if match is None:
        raise ValueError(f"{filename}: HC18 file names start with the subject number (e.g. 012_HC.png)")
    return match.group(1)


def read_hc18_csv(csv_path) -> dict[str, dict]:
    """Read an HC18 CSV into {filename: {"pixel_size_mm": float, "hc_mm": float | None}}.

    Accepts the training header `filename,pixel size(mm),head circumference (mm)` and the test header
    `filename,pixel size(mm)` (then hc_mm is None).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"HC18 CSV not found: {csv_path}")
    rows: dict[str, dict] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = tuple(field.strip() for field in next(reader, []))
        if header not in (TRAINING_CSV_HEADER, TEST_CSV_HEADER):
            raise ValueError(
                f"{csv_path}: unexpected CSV header.\n  expected: {','.join(TRAINING_CSV_HEADER)}\n"
                f"        or: {','.join(TEST_CSV_HEADER)}\n     found: {','.join(header)}"
            )
        for line_number, row in enumerate(reader, start=2):
            if not row or all(not field.strip() for field in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{csv_path}, line {line_number}: expected {len(header)} fields, found {len(row)}")
            name = row[0].strip()
            try:
                values = [float(field) for field in row[1:]]
            except ValueError:
                raise ValueError(f"{csv_path}, line {line_number}: cannot parse a number in {row!r}") from None
            if not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"{csv_path}, line {line_number}: sizes must be positive numbers, found {row!r}")
            if name in rows:
                raise ValueError(f"{csv_path}, line {line_number}: {name} is listed twice")
            rows[name] = {"pixel_size_mm": values[0], "hc_mm": values[1] if len(values) > 1 else None}
    return rows


def fill_outline(annotation: np.ndarray) -> np.ndarray:
    """Fill a closed one-pixel outline (nonzero = outline) into a uint8 {0, 1} mask that includes the outline.

    Raises ValueError when the outline is empty or encloses nothing (an open curve); callers add the file name.
    """
    outline = np.asarray(annotation)
    if outline.ndim == 3:  # RGB(A) annotation: any channel drawn counts
        outline = outline.max(axis=-1)
    if outline.ndim != 2:
        raise ValueError(f"an annotation must be a 2D image, found shape {outline.shape}")
    outline = outline > 0
    if not outline.any():
        raise ValueError("the annotation is empty (no outline pixels)")
    filled = ndimage.binary_fill_holes(outline)
    if filled.sum() == outline.sum():
        raise ValueError("the annotation outline is not closed: filling it encloses nothing")
    return filled.astype(np.uint8)


def load_hc18_mask(annotation_path) -> np.ndarray:
    """Read an HC18 `_Annotation.png` outline and return the filled uint8 {0, 1} mask."""
    annotation_path = Path(annotation_path)
    try:
        with Image.open(annotation_path) as image:
            outline = np.asarray(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"{annotation_path}: cannot read the annotation image ({error})") from None
    try:
        return fill_outline(outline)
    except ValueError as error:
        raise ValueError(f"{annotation_path}: {error}") from None


def find_training_csv(training_dir) -> Path | None:
    """The training CSV inside `training_dir` or next to it (where the HC18 download puts it), else None."""
    training_dir = Path(training_dir)
    for candidate in (training_dir / TRAINING_CSV_NAME, training_dir.parent / TRAINING_CSV_NAME):
        if candidate.is_file():
            return candidate
    return None


def list_hc18(training_dir, csv_path=None) -> list[dict]:
    """List an HC18 training folder as dicts {image, annotation, subject, pixel_size_mm, hc_mm}, sorted by name.

    Every image needs its `_Annotation.png` and a CSV row, and every CSV row needs its image.
    """
    training_dir = Path(training_dir)
    if not training_dir.is_dir():
        raise FileNotFoundError(f"HC18 training folder not found: {training_dir}")
    csv_path = Path(csv_path) if csv_path is not None else find_training_csv(training_dir)
    if csv_path is None:
        raise FileNotFoundError(
            f"{training_dir}: no {TRAINING_CSV_NAME} inside this folder or next to it "
            f"(the HC18 download puts it beside {TRAINING_DIR_NAME}/)"
        )
    rows = read_hc18_csv(csv_path)
    images = sorted(p for p in training_dir.iterdir() if IMAGE_PATTERN.match(p.name))
    image_names = {p.name for p in images}
    missing = sorted(name for name in rows if name not in image_names)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"{csv_path} lists {len(missing)} image(s) missing from {training_dir}: {shown}")
    items = []
    for image in images:
        annotation = image.with_name(image.stem + ANNOTATION_SUFFIX)
        if not annotation.is_file():
            raise ValueError(f"{image}: its annotation {annotation.name} is missing")
        row = rows.get(image.name)
        if row is None:
            raise ValueError(f"{image}: no row for it in {csv_path}")
        items.append(
            {
                "image": str(image.resolve()),
                "annotation": str(annotation.resolve()),
                "subject": IMAGE_PATTERN.match(image.name).group("subject"),
                "pixel_size_mm": row["pixel_size_mm"],
                "hc_mm": row["hc_mm"],
            }
        )
    return items


def list_hc18_test(training_dir) -> list[dict]:
    """The challenge's ``test_set/`` beside ``training_dir`` as ``{image, subject[, pixel_size_mm]}`` items (no
    annotations exist); [] when there is none. Pixel sizes come from ``test_set_pixel_size.csv`` beside or inside it.
    """
    test_dir = Path(training_dir).parent / TEST_DIR_NAME
    if not test_dir.is_dir():
        return []
    csv_path = next((c for c in (test_dir.parent / TEST_CSV_NAME, test_dir / TEST_CSV_NAME) if c.is_file()), None)
    rows = read_hc18_csv(csv_path) if csv_path is not None else {}
    if csv_path is None:
        logging.getLogger(__name__).warning(
            "%s: no %s beside or inside it: test predictions will be in pixels", test_dir, TEST_CSV_NAME
        )
    images = sorted(p for p in test_dir.iterdir() if IMAGE_PATTERN.match(p.name))
    if csv_path is not None:
        missing = sorted(set(rows) - {p.name for p in images})
        if missing:
            raise ValueError(
                f"{csv_path} lists {len(missing)} image(s) missing from {test_dir}: {', '.join(missing[:5])}"
            )
        unlisted = [p.name for p in images if p.name not in rows]
        if unlisted:
            raise ValueError(f"{test_dir / unlisted[0]}: no row for it in {csv_path}")
    items = []
    for image in images:
        item = {"image": str(image.resolve()), "subject": subject_of(image.name)}
        if image.name in rows:
            item["pixel_size_mm"] = [rows[image.name]["pixel_size_mm"]] * 2
        items.append(item)
    return items
