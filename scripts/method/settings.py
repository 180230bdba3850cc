"""Start-up checks of a bundle run's settings: a wrong value fails at once, naming the setting, before any work.

The config evaluates these in ``initialize``; everything here only reads the values the config already holds, except
:func:`keep_freed_memory`, which sets how this process's malloc keeps memory.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scripts.networks.swin_unet import swin_size_multiple
from scripts.networks.unext import UNEXT_STRIDE

__all__ = [
    "bf16_autocast_supported",
    "check_training_settings",
    "find_resume_checkpoint",
    "keep_freed_memory",
    "require_file",
]

logger = logging.getLogger(__name__)


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
    side = swin_size_multiple() if uses_swin_unet else UNEXT_STRIDE  # the published configurations' multiples
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
        _fail(
            "unlabeled_batch_size",
            unlabeled_batch_size,
            "ICT mixes two halves: use an even number >= 2 or ict_weight=0",
        )
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
        _fail(
            "num_classes",
            num_classes,
            f"{path} holds labels of {found} classes (background included): set "
            f"--num_classes {found} and --class_names with {found} names",
        )
    return datalist


def find_resume_checkpoint(checkpoint_dir: str) -> str:
    """The newest intact ``resume_*.pt`` in ``checkpoint_dir`` (by the epoch in its name, else its time).

    A damaged file (cut short by a kill, corrupted) is skipped with a warning naming it, and the one before it is
    taken; a clear error when none is left to resume from.
    """
    from scripts.utils.checkpoints import checkpoint_damage, checkpoint_epoch

    found = sorted(
        Path(checkpoint_dir).glob("resume_*.pt"),
        key=lambda p: (checkpoint_epoch(p) or -1, p.stat().st_mtime),
        reverse=True,
    )
    if not found:
        raise FileNotFoundError(
            f"resume=true but {checkpoint_dir} holds no resume_*.pt checkpoint; train once without --resume first"
        )
    for path in found:
        damage = checkpoint_damage(path)
        if damage is None:
            logger.info(f"resuming from {path}")
            return str(path)
        logger.warning(f"skipping damaged checkpoint {path}: {damage}; trying the one before it")
    raise FileNotFoundError(
        f"resume=true but every checkpoint in {checkpoint_dir} is damaged ({', '.join(p.name for p in found)}); "
        "train again without --resume"
    )


def require_file(path: str, what: str) -> str:
    """Fail with the path and what the file is for when it does not exist."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: {what}")
    return path


#: glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap and keep freed memory for reuse; True if it was set.

    By default glibc maps each block of 32 MiB or more fresh from the kernel and unmaps it when freed; training
    activations that size (the Swin-Unet's first stage holds 34 MiB per 7 images at 448 px) are then faulted in page
    by page in every iteration, which costs kernel time at every batch and image size. ``mallopt(M_MMAP_MAX, 0)``
    serves large blocks from the heap as well and ``mallopt(M_TRIM_THRESHOLD, -1)`` stops returning its free top to
    the kernel, so a steady training loop reuses the same pages: resident memory stays at its peak instead of
    shrinking between iterations. Only this process is affected; it is a no-op (with a log line) without glibc.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        logger.info("malloc settings left as they are: not a glibc system")
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.info("malloc settings left as they are: mallopt not found")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    logger.info(
        "glibc malloc: large blocks from the heap, freed memory kept for reuse"
        if done
        else "glibc malloc: mallopt refused the settings; left as they are"
    )
    return done


def bf16_autocast_supported(device) -> bool:
    """True where bf16 autocast runs natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
