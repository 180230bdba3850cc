"""Ultrasound DICOM in: frames as 8-bit arrays and the physical pixel size (REFERENCE §2).

Single- and multi-frame (cine) files; MONOCHROME1/2, RGB, YBR (pydicom 3 already returns RGB: no second
conversion), PALETTE COLOR (the LUT applied), JPEG baseline and JPEG 2000 through the pylibjpeg plugins. The pixel
size comes from SequenceOfUltrasoundRegions (PhysicalDeltaX/Y, cm -> mm) where a region is in cm, else from
PixelSpacing, else it is unknown and said so. :func:`export_frames` writes each frame as a PNG for the inference
pipeline, with the pixel size carried in the item.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import write_atomic

__all__ = ["dicom_pixel_size", "export_frames", "is_dicom", "read_ultrasound_dicom"]

logger = logging.getLogger(__name__)

CM = 3  # PhysicalUnitsX/YDirection code for centimetres


def is_dicom(path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble's ``DICM`` marker."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def dicom_pixel_size(ds) -> tuple[tuple[float, float] | None, str]:
    """((sx, sy) in mm or None, where it came from) from the US regions, else PixelSpacing."""
    for region in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        units = (getattr(region, "PhysicalUnitsXDirection", None), getattr(region, "PhysicalUnitsYDirection", None))
        dx, dy = getattr(region, "PhysicalDeltaX", None), getattr(region, "PhysicalDeltaY", None)
        if units == (CM, CM) and dx and dy:
            return (abs(float(dx)) * 10.0, abs(float(dy)) * 10.0), "SequenceOfUltrasoundRegions"
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
        return (float(spacing[1]), float(spacing[0])), "PixelSpacing"  # DICOM gives (row, column) = (y, x)
    return None, "unknown"


def _to_uint8(frames: np.ndarray, bits: int) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype == np.uint16 and frames.max(initial=0) > 255 and bits <= 8:
        return (frames >> 8).astype(np.uint8)  # 16-bit palette LUT output
    lo, hi = float(frames.min()), float(frames.max())
    return np.zeros(frames.shape, np.uint8) if hi <= lo else ((frames - lo) / (hi - lo) * 255).round().astype(np.uint8)


def read_ultrasound_dicom(path) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """(frames (F, H, W) or (F, H, W, 3) uint8, pixel size (sx, sy) mm or None, info) of one DICOM file.

    Raises ValueError naming the file when it is not DICOM, holds no image, or its compression has no decoder.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError) as error:
        raise ValueError(f"{path}: not a readable DICOM file ({error})") from None
    if "PixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        raise ValueError(f"{path}: the DICOM holds no image ({getattr(sop, 'name', sop) or 'no SOP class'})")
    syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in getattr(ds, "file_meta", {}) else None
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises several types when no plugin can decode the syntax
        name = getattr(syntax, "name", syntax)
        raise ValueError(
            f"{path}: cannot decode its pixel data ({name}): {error}. JPEG and JPEG 2000 need the pylibjpeg plugins "
            "(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg)"
        ) from None
    photometric = str(ds.PhotometricInterpretation)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    elif photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    frames_count = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = pixels.shape[-1] == 3 and pixels.ndim in (3, 4) and photometric not in ("MONOCHROME1", "MONOCHROME2")
    if frames_count == 1 and pixels.ndim == (3 if colour else 2):
        pixels = pixels[None]
    frames = _to_uint8(np.asarray(pixels), int(getattr(ds, "BitsStored", 8)))
    size, source = dicom_pixel_size(ds)
    info = {"frames": frames.shape[0], "photometric": photometric, "transfer_syntax": str(getattr(syntax, "name", syntax)),
            "pixel_size_source": source, "modality": str(getattr(ds, "Modality", ""))}
    return frames, size, info


def export_frames(path, frames_dir) -> list[dict]:
    """Write each frame of a DICOM file as ``<stem>[_fNNN].png`` in ``frames_dir``; returns inference items
    ``{"image": png, "source": dcm, "frame": i[, "pixel_size_mm": [sx, sy]]}``."""
    path, frames_dir = Path(path), Path(frames_dir)
    frames, size, info = read_ultrasound_dicom(path)
    if size is None:
        logger.warning("%s: no physical pixel size (no US region in cm, no PixelSpacing): measurements in pixels", path)
    items = []
    for i, frame in enumerate(frames):
        name = f"{path.stem}.png" if len(frames) == 1 else f"{path.stem}_f{i:03d}.png"
        picture = Image.fromarray(frame)
        write_atomic(frames_dir / name, lambda f, p=picture: p.save(f, format="PNG", compress_level=1), binary=True)
        item = {"image": str((frames_dir / name).resolve()), "source": str(path), "frame": i}
        if size is not None:
            item["pixel_size_mm"] = [size[0], size[1]]
        items.append(item)
    return items
