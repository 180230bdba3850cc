"""Command line for the data side of the bundle.

    python -m scripts.data phantom --dataset_dir D [--num_subjects 200 --image_size "[800,540]" --seed 0]
    python -m scripts.data prepare --dataset_dir D --prepared_dir P [--labeled_fraction 0.1 --seed 1 --layout acouslic]
    python -m scripts.data montage --dataset_dir D --output_png docs/phantom_examples.png
"""

from __future__ import annotations

import logging
from pathlib import Path

import fire

from .datalist import prepare_dataset
from .hc18 import TRAINING_DIR_NAME
from .phantom import generate_phantom, save_phantom_montage


def phantom(dataset_dir, num_subjects=200, repeat_fraction=0.2, image_size=(800, 540), seed=0):
    """Write a synthetic HC18-like training set into DATASET_DIR/training_set (+ CSV, phantom.json)."""
    return str(generate_phantom(dataset_dir, num_subjects=num_subjects, repeat_fraction=repeat_fraction,
                                image_size=tuple(image_size), seed=seed))


def prepare(dataset_dir, prepared_dir, labeled_fraction=0.05, seed=0, val_fraction=0.1, test_fraction=0.2,
            labeled_count=None, max_train_images=None, generate_phantom_if_empty=True, phantom_subjects=200, layout=None, pixel_size_mm=None,
            acouslic_labels="binary", acouslic_unlabeled_per_volume=24):
    """Write PREPARED_DIR/datalist.json (and HC18's filled masks, extracted frames) from DATASET_DIR; prints its path.

    LABELED_COUNT: label exactly this many training images (the paper's protocol) instead of LABELED_FRACTION;
    MAX_TRAIN_IMAGES: cap the training pool (whole subjects), e.g. 500 for HC18's 25-of-500 split.
    LAYOUT: hc18, acouslic, fugc, psfhs, generic or dicom (None detects it); PIXEL_SIZE_MM: for folder-layout PNG/JPG
    images; ACOUSLIC_LABELS: binary (any non-zero is the abdomen) or keep (1 optimal, 2 suboptimal: num_classes 3);
    ACOUSLIC_UNLABELED_PER_VOLUME: frames without abdomen sampled per volume into the unlabelled pool.
    """
    return prepare_dataset(dataset_dir, prepared_dir, labeled_fraction=labeled_fraction, seed=seed,
                           val_fraction=val_fraction, test_fraction=test_fraction, labeled_count=labeled_count,
                           max_train_images=max_train_images, generate_phantom_if_empty=generate_phantom_if_empty, phantom_subjects=phantom_subjects,
                           layout=layout, pixel_size_mm=pixel_size_mm, acouslic_labels=acouslic_labels,
                           acouslic_unlabeled_per_volume=acouslic_unlabeled_per_volume)


def montage(dataset_dir, output_png, count=8):
    """Save a grid of COUNT images of an HC18-layout data set with their annotation outlines in red."""
    dataset_dir = Path(dataset_dir)
    training_dir = dataset_dir / TRAINING_DIR_NAME if (dataset_dir / TRAINING_DIR_NAME).is_dir() else dataset_dir
    return str(save_phantom_montage(training_dir, output_png, count=count))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    fire.Fire({"phantom": phantom, "prepare": prepare, "montage": montage})
