"""Start-up checks of a bundle run's settings: a wrong value fails at once, naming the setting, before any work.

The config evaluates these in ``initialize``; everything here only reads the values the config already holds.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["bf16_autocast_supported", "check_training_settings", "find_resume_checkpoint", "require_file"]

logger = logging.getLogger(__name__)

SWIN_SIDE = 224  # every Swin-Unet stage's token grid must divide by its 7-token window: sides are multiples of 224


def _fail(name: str, value, rule: str) -> None:
    raise ValueError(f"config value {name}={value!r} is invalid: {rule}")


def check_training_settings(
    spatial_size: Sequence[int],
    labeled_fraction: float,
    labeled_batch_size: int,
    unlabeled_batch_size: int,
    num_classes: int,
    class_names: Sequence[str],
    in_channels: int,
    total_iterations: int,
    val_interval: int,
    weights: Mapping[str, float],
    uses_swin_unet: bool = True,
    labeled_count: int | None = None,
    max_train_images: int | None = None,
) -> bool:
    """Validate the training config's main values; raise ValueError naming the first bad one. Returns True."""
    if len(spatial_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in spatial_size):
        _fail("spatial_size", spatial_size, "two positive integers [width, height]")
    side = SWIN_SIDE if uses_swin_unet else 32
    if any(s % side for s in spatial_size):
        _fail("spatial_size", spatial_size, f"each side must be a multiple of {side} for the networks used")
    if not 0.0 < float(labeled_fraction) <= 1.0:
        _fail("labeled_fraction", labeled_fraction, "a fraction in (0, 1]")
    for name, value in (("labeled_count", labeled_count), ("max_train_images", max_train_images)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            _fail(name, value, "a whole number >= 1, or null")
    if labeled_count is not None and int(labeled_count) < int(labeled_batch_size):
        _fail("labeled_count", labeled_count, f"at least the labelled batch ({labeled_batch_size})")
    if int(labeled_batch_size) < 1:
        _fail("labeled_batch_size", labeled_batch_size, "at least 1")
    for name, value in weights.items():
        if not isinstance(value, (int, float)) or value < 0:
            _fail(name, value, "a number >= 0 (0 switches the term off)")
    if int(unlabeled_batch_size) < 0:
        _fail("unlabeled_batch_size", unlabeled_batch_size, ">= 0")
    if weights.get("ict_weight", 0) > 0 and (unlabeled_batch_size < 2 or unlabeled_batch_size % 2):
        _fail("unlabeled_batch_size", unlabeled_batch_size, "ICT mixes two halves: use an even number >= 2 or ict_weight=0")
    if int(num_classes) < 2:
        _fail("num_classes", num_classes, "at least 2 (background + one structure)")
    if len(class_names) != num_classes:
        _fail("class_names", list(class_names), f"one name per class ({num_classes})")
    if in_channels not in (1, 3):
        _fail("in_channels", in_channels, "1 or 3")
    if int(total_iterations) < 1:
        _fail("total_iterations", total_iterations, "at least 1")
    if not 1 <= int(val_interval) <= int(total_iterations):
        _fail("val_interval", val_interval, f"between 1 and total_iterations ({total_iterations})")
    return True


# optional per-item numbers: an item without one gets NaN (unknown) so that items of one list batch together
OPTIONAL_NUMBERS = {"pixel_size_mm": [math.nan, math.nan], "hc_mm": math.nan, "ac_mm": math.nan}


def load_datalist(path: str, num_classes: int) -> dict:
    """The prepared datalist, checked against the config's class count (a 3-class data set needs num_classes=3).

    Where some items of a list carry an optional number (pixel size, reference HC/AC) and others do not, the others
    get NaN, which every consumer reads as unknown: a batch of mixed items then collates.
    """
    with open(path) as f:
        datalist = json.load(f)
    for key, items in datalist.items():
        if key == "meta" or not isinstance(items, list):
            continue
        for name, unknown in OPTIONAL_NUMBERS.items():
            if any(name in i for i in items):
                for item in items:
                    item.setdefault(name, unknown)
    found = int(datalist.get("meta", {}).get("num_classes", 2))
    if found > int(num_classes):
        _fail("num_classes", num_classes, f"{path} holds labels of {found} classes (background included): set "
              f"--num_classes {found} and --class_names with {found} names")
    return datalist


def find_resume_checkpoint(checkpoint_dir: str) -> str:
    """The newest ``resume_*.pt`` in ``checkpoint_dir``; a clear error when there is none to resume from."""
    found = sorted(Path(checkpoint_dir).glob("resume_*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"resume=true but {checkpoint_dir} holds no resume_*.pt checkpoint; train once without --resume first"
        )
    logger.info(f"resuming from {found[-1]}")
    return str(found[-1])


def require_file(path: str, what: str) -> str:
    """Fail with the path and what the file is for when it does not exist."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


def bf16_autocast_supported(device) -> bool:
    """True where bf16 autocast runs natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
