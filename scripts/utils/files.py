"""File helpers every part of the bundle shares: atomic writes and the image file names it recognises."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["IMAGE_SUFFIXES", "image_stem", "write_atomic", "write_json_atomic"]

# image files the readers take (MONAI's PIL, ITK, NIfTI and DICOM readers); the longest suffix first
IMAGE_SUFFIXES = (".nii.gz", ".jpeg", ".tiff", ".nrrd", ".png", ".jpg", ".bmp", ".tif", ".nii", ".mha", ".mhd", ".dcm")


def image_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``scan.nii.gz`` -> ``scan``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def write_atomic(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then ``os.replace`` it into place.

    A failure while writing leaves any previous ``path`` untouched and removes the temporary file. The file gets the
    usual mode (0666 minus the umask), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have given it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """JSON through :func:`write_atomic`."""
    write_atomic(path, lambda f: json.dump(data, f, indent=2))
