"""Command line for the data side of the bundle.

    python -m scripts.data prepare --dataset_dir D --prepared_dir P [--labeled_fraction 0.25 --seed 0 --layout acouslic]
    python -m scripts.data phantom --dataset_dir D [--num_subjects 200 --image_size "[800,540]" --seed 0]
    python -m scripts.data montage --dataset_dir D --output_png docs/phantom_examples.png

``prepare`` writes the same split configs/train.json makes at start-up (same defaults), so a training run with the
same options reuses it. It never writes a phantom into a folder you name: only the bundle's own phantom folders
(data/phantom, data/phantom_benchmark) get one when empty, as in train.json; ``phantom`` writes one on purpose.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .datalist import prepare_dataset
from .hc18 import TRAINING_DIR_NAME
from .phantom import PHANTOM_FOLDERS, PHANTOM_SUBJECTS, generate_phantom, save_phantom_montage

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LABELED_FRACTION = 0.25  # configs/train.json's labeled_fraction (tests/test_cli.py keeps them equal)


def bundle_phantom(dataset_dir) -> str | None:
    """The phantom name ("demo", "benchmark") when ``dataset_dir`` is one of the bundle's own phantom folders."""
    resolved = Path(dataset_dir).expanduser().resolve()
    for name, folder in PHANTOM_FOLDERS.items():
        if resolved == (BUNDLE_ROOT / "data" / folder).resolve():
            return name
    return None


def phantom(
    dataset_dir: str, num_subjects: int = 200, repeat_fraction: float = 0.2, image_size=(800, 540), seed: int = 0
) -> str:
    """Write a synthetic HC18-like training set into DATASET_DIR/training_set (+ CSV, phantom.json); prints it."""
    return str(
        generate_phantom(
            dataset_dir,
            num_subjects=num_subjects,
            repeat_fraction=repeat_fraction,
            image_size=tuple(image_size),
            seed=seed,
        )
    )


def prepare(
    dataset_dir: str,
    prepared_dir: str,
    labeled_fraction: float = DEFAULT_LABELED_FRACTION,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    labeled_count: int | None = None,
    max_train_images: int | None = None,
    layout: str | None = None,
    pixel_size_mm: float | None = None,
    acouslic_labels: str = "binary",
    acouslic_unlabeled_per_volume: int = 24,
) -> str:
    """Write PREPARED_DIR/datalist.json (and HC18's filled masks, extracted frames) from DATASET_DIR; prints its path.

    DATASET_DIR must exist and hold a supported layout; the bundle's own data/phantom folder is the one exception
    (an empty or missing one gets the demo phantom, as in train.json).
    LABELED_COUNT: label exactly this many training images (the paper's protocol) instead of LABELED_FRACTION;
    MAX_TRAIN_IMAGES: cap the training pool (whole subjects), e.g. 500 for HC18's 25-of-500 split.
    LAYOUT: hc18, acouslic, fugc, psfhs, generic or dicom (None detects it); PIXEL_SIZE_MM: for folder-layout PNG/JPG
    images; ACOUSLIC_LABELS: binary (any non-zero is the abdomen) or keep (1 optimal, 2 suboptimal: num_classes 3);
    ACOUSLIC_UNLABELED_PER_VOLUME: frames without abdomen sampled per volume into the unlabelled pool.
    """
    own_phantom = bundle_phantom(dataset_dir)
    return prepare_dataset(
        dataset_dir,
        prepared_dir,
        labeled_fraction=labeled_fraction,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        labeled_count=labeled_count,
        max_train_images=max_train_images,
        generate_phantom_if_empty=own_phantom is not None,
        phantom_subjects=PHANTOM_SUBJECTS[own_phantom or "demo"],
        layout=layout,
        pixel_size_mm=pixel_size_mm,
        acouslic_labels=acouslic_labels,
        acouslic_unlabeled_per_volume=acouslic_unlabeled_per_volume,
    )


def montage(dataset_dir: str, output_png: str, count: int = 8) -> str:
    """Save a grid of COUNT images of an HC18-layout data set with their annotation outlines in red."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset_dir does not exist: {dataset_dir}")
    training_dir = dataset_dir / TRAINING_DIR_NAME if (dataset_dir / TRAINING_DIR_NAME).is_dir() else dataset_dir
    return str(save_phantom_montage(training_dir, output_png, count=count))


if __name__ == "__main__":
    from scripts.utils.cli import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main({"prepare": prepare, "phantom": phantom, "montage": montage}, __doc__, prog="python -m scripts.data")
