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

from ..files import write_atomic, write_json_atomic

__all__ = ["dicom_pixel_size", "export_frames", "find_dicoms", "frame_stem", "is_dicom", "iter_dicoms", "list_dicom_layout",
           "read_ultrasound_dicom"]

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


def frame_stem(stem: str, index: int, frames: int) -> str:
    """Name of one exported frame: the file's stem for a single frame, ``<stem>_fNNN`` for a cine's frames."""
    return stem if frames == 1 else f"{stem}_f{index:03d}"


def export_frames(path, frames_dir, stem: str | None = None) -> list[dict]:
    """Write each frame of a DICOM file as ``<stem>[_fNNN].png`` in ``frames_dir`` (``stem``: the file's by default);
    returns items ``{"image": png, "source": dcm, "frame": i[, "pixel_size_mm": [sx, sy]]}``."""
    path, frames_dir = Path(path), Path(frames_dir)
    stem = stem or path.stem
    frames, size, info = read_ultrasound_dicom(path)
    if size is None:
        logger.warning("%s: no physical pixel size (no US region in cm, no PixelSpacing): measurements in pixels", path)
    items = []
    for i, frame in enumerate(frames):
        name = frame_stem(stem, i, len(frames)) + ".png"
        picture = Image.fromarray(frame)
        write_atomic(frames_dir / name, lambda f, p=picture: p.save(f, format="PNG", compress_level=1), binary=True)
        item = {"image": str((frames_dir / name).resolve()), "source": str(path), "frame": i}
        if size is not None:
            item["pixel_size_mm"] = [size[0], size[1]]
        items.append(item)
    return items


def iter_dicoms(root, exclude=()):
    """DICOM files under ``root`` (any depth; ``.dcm`` or the ``DICM`` marker), skipping ``exclude`` folders."""
    root = Path(root)
    if root.is_file():
        yield from [root] if is_dicom(root) else []
        return
    excluded = [Path(e).resolve() for e in exclude]
    for path in root.rglob("*"):
        if path.is_file() and not any(path.resolve().is_relative_to(e) for e in excluded) and is_dicom(path):
            yield path


def find_dicoms(root, exclude=()) -> list[Path]:
    """:func:`iter_dicoms`, sorted."""
    return sorted(iter_dicoms(root, exclude))


def _subject(ds, fallback: str) -> str:
    for key in ("PatientID", "StudyInstanceUID"):
        value = str(getattr(ds, key, "") or "").strip()
        if value:
            return value
    return fallback


def list_dicom_layout(root, frames_dir, labels_dir=None, files=None) -> tuple[list[dict], list[dict], int]:
    """(labelled items, unlabelled items, number of classes) of a DICOM file or folder (any depth) for training.

    Each frame becomes an item (a cine yields one per frame), exported once as ``frames_dir/<name>.png`` where the
    name is the file's path below ``root`` with ``/`` as ``__`` and without ``.dcm`` (plus ``_fNNN`` for a cine's
    frames), so files of the same name in different series folders never collide. A frame whose mask
    ``labels_dir/<name>.png`` exists is labelled (class indices, the frame's size), the rest are unlabelled. The
    subject is the PatientID (else StudyInstanceUID, else the file), so a patient's scans stay in one split; the
    pixel size comes from the US regions or PixelSpacing.
    """
    import json

    import pydicom

    from .generic import check_label

    root, frames_dir = Path(root), Path(frames_dir)
    labels_dir = Path(labels_dir) if labels_dir is not None else (root / "labels" if root.is_dir() else None)
    if files is None:  # the caller may have listed them already
        files = find_dicoms(root, exclude=[labels_dir] if labels_dir is not None else [])
    if not files:
        raise ValueError(f"{root}: no DICOM files (.dcm or files with the DICM marker)")
    labelled, unlabelled, max_class = [], [], 0
    for path in files:
        relative = path.relative_to(root) if root.is_dir() else Path(path.name)
        stem = "__".join(relative.with_suffix("").parts) if path.suffix.lower() == ".dcm" else "__".join(relative.parts)
        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as error:  # pydicom raises several types for a broken file
            raise ValueError(f"{path}: not a readable DICOM file ({error})") from None
        stamp = [path.stat().st_size, path.stat().st_mtime_ns]
        index_path = frames_dir / f"{stem}.index.json"
        cached = json.loads(index_path.read_text()) if index_path.is_file() else None
        if cached and cached.get("source") == stamp and all(Path(i["image"]).is_file() for i in cached["items"]):
            items = cached["items"]
        else:
            items = export_frames(path, frames_dir, stem)
            write_json_atomic(index_path, {"source": stamp, "items": items})
        subject = _subject(header, stem)
        for item in items:
            entry = {"image": item["image"], "subject": subject, "source": str(path.resolve()), "frame": item["frame"]}
            if "pixel_size_mm" in item:
                entry["pixel_size_mm"] = item["pixel_size_mm"]
            label = labels_dir / (Path(item["image"]).stem + ".png") if labels_dir is not None else None
            if label is not None and label.is_file():
                with Image.open(item["image"]) as picture:
                    size = picture.size
                max_class = max(max_class, check_label(label, Path(item["image"]), size))
                entry["label"] = str(label.resolve())
                labelled.append(entry)
            else:
                unlabelled.append(entry)
    return labelled, unlabelled, max(2, max_class + 1)
