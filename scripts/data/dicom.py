"""Ultrasound DICOM in: frames as 8-bit arrays and the physical pixel size.

Single- and multi-frame (cine) files; MONOCHROME1/2, RGB, YBR (pydicom 3 already returns RGB: no second
conversion), PALETTE COLOR (the LUT applied), JPEG baseline and JPEG 2000 through the pylibjpeg plugins. The pixel
size comes from SequenceOfUltrasoundRegions (US Region Calibration module, DICOM PS3.3 C.8.5.5: PhysicalDeltaX/Y,
cm -> mm) where a region is in cm, else from PixelSpacing, else it is unknown and said so. :func:`export_frames`
writes each frame as a PNG for the inference pipeline, with the pixel size carried in the item.

Before anything is decoded the header is checked against itself and against the pixel data (Image Pixel module,
PS3.3 C.7.6.3; Multi-frame module, C.7.6.6; encapsulation, PS3.5 A.4): a file whose header and pixels disagree
(a wrong Rows, Columns, SamplesPerPixel, NumberOfFrames or PhotometricInterpretation, a truncation), a palette
image without its table or an implausible pixel size ends in one ValueError naming the file and the problem, never
in frames that pydicom would guess.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.utils.files import write_atomic, write_json_atomic

__all__ = [
    "PIXEL_SIZE_RANGE_MM",
    "dicom_pixel_size",
    "export_frames",
    "find_dicoms",
    "frame_stem",
    "is_dicom",
    "iter_dicoms",
    "list_dicom_layout",
    "read_ultrasound_dicom",
]

logger = logging.getLogger(__name__)

CM = 3  # PhysicalUnitsX/YDirection code for centimetres
PIXEL_SIZE_RANGE_MM = (0.001, 10.0)  # a plausible physical pixel size; outside it the header is wrong


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


def _plausible_pixel_size(sx: float, sy: float, where: str, name: str) -> tuple[float, float]:
    lo, hi = PIXEL_SIZE_RANGE_MM
    if not all(math.isfinite(v) and lo <= v <= hi for v in (sx, sy)):
        raise ValueError(
            f"{name}: implausible physical pixel size {sx:g} x {sy:g} mm from {where}: an ultrasound "
            f"pixel is {lo:g}-{hi:g} mm"
        )
    return sx, sy


def _number(value, keyword: str, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {keyword} {value!r} is not a number") from None


def dicom_pixel_size(ds, name: str = "DICOM") -> tuple[tuple[float, float] | None, str]:
    """((sx, sy) in mm or None, where it came from) from the US regions, else PixelSpacing.

    The first ultrasound region in cm with non-zero deltas is used (PhysicalDeltaX/Y, cm -> mm). ValueError naming
    ``name`` when the size is implausible (outside PIXEL_SIZE_RANGE_MM, not finite) or PixelSpacing does not hold
    two numbers: a wrong pixel size would turn into a wrong circumference in mm without a word.
    """
    for region in getattr(ds, "SequenceOfUltrasoundRegions", None) or []:
        units = (getattr(region, "PhysicalUnitsXDirection", None), getattr(region, "PhysicalUnitsYDirection", None))
        dx, dy = getattr(region, "PhysicalDeltaX", None), getattr(region, "PhysicalDeltaY", None)
        if units == (CM, CM) and dx and dy:
            dx, dy = _number(dx, "PhysicalDeltaX", name), _number(dy, "PhysicalDeltaY", name)
            size = _plausible_pixel_size(
                abs(dx) * 10.0, abs(dy) * 10.0, "SequenceOfUltrasoundRegions PhysicalDeltaX/Y", name
            )
            return size, "SequenceOfUltrasoundRegions"
    spacing = ds["PixelSpacing"] if "PixelSpacing" in ds else None
    if spacing is not None and spacing.value not in (None, ""):
        values = list(spacing.value) if spacing.VM > 1 else [spacing.value]
        if len(values) != 2:
            raise ValueError(
                f"{name}: PixelSpacing must hold two values (row, column spacing in mm), it holds "
                f"{len(values)}: {spacing.value!r}"
            )
        # DICOM gives (row, column) = (y, x)
        row, column = (_number(v, "PixelSpacing", name) for v in values)
        return _plausible_pixel_size(column, row, "PixelSpacing", name), "PixelSpacing"
    return None, "unknown"


def _to_uint8(frames: np.ndarray, bits: int) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype == np.uint16 and frames.max(initial=0) > 255 and bits <= 8:
        return (frames >> 8).astype(np.uint8)  # 16-bit palette LUT output
    lo, hi = float(frames.min()), float(frames.max())
    return np.zeros(frames.shape, np.uint8) if hi <= lo else ((frames - lo) / (hi - lo) * 255).round().astype(np.uint8)


def _one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (pydicom appends the traceback of the element that failed)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _read_dataset(path: Path):
    """The parsed dataset of ``path``; one ValueError naming the file for an empty, non-DICOM, truncated or
    unparseable file (pydicom raises many types and parses some elements only on access: all are read here)."""
    import warnings

    import pydicom

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: not a readable DICOM file (empty file, 0 bytes)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(str(path))
            ds.walk(lambda dataset, element: None)  # converts every raw element: unknown VRs and bad lengths raise
    except Exception as error:  # noqa: BLE001 - InvalidDicomError, EOFError, NotImplementedError (VR), struct.error...
        raise ValueError(f"{path}: not a readable DICOM file ({_one_line(error)})") from None
    ended = [str(w.message) for w in caught if "End of file" in str(w.message)]
    if ended or len(ds) == 0:
        raise ValueError(f"{path}: truncated DICOM file ({ended[0] if ended else 'no data elements'})")
    return ds


IMAGE_PIXEL_KEYWORDS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)  # Type 1 in the Image Pixel module and read to decode
SAMPLES = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_RCT": 3,
    "YBR_ICT": 3,
    "YBR_PARTIAL_420": 3,
}


def _header_int(ds, keyword: str, path: Path, allowed=None, minimum: int | None = None) -> int:
    value = ds[keyword].value if keyword in ds else None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {keyword} is {value!r}, not an integer") from None
    if (allowed is not None and number not in allowed) or (minimum is not None and number < minimum):
        expected = f"one of {sorted(allowed)}" if allowed is not None else f">= {minimum}"
        raise ValueError(f"{path}: {keyword} is {number}; expected {expected}")
    return number


def _check_image_pixel_module(ds, path: Path, syntax) -> dict:
    """The header's image geometry ``{rows, columns, samples, frames, photometric, bits}``, checked for presence,
    values and consistency (PS3.3 C.7.6.3 Image Pixel module, C.7.6.6 Multi-frame module) and, for native (not
    compressed) pixel data, against the pixel data's length: a header that disagrees with its pixels would be
    decoded into sheared, split or repeated frames."""
    missing = [k for k in IMAGE_PIXEL_KEYWORDS if k not in ds or ds[k].value in (None, "")]
    if missing:
        raise ValueError(f"{path}: the Image Pixel module lacks {', '.join(missing)}: cannot lay out the pixels")
    rows, columns = _header_int(ds, "Rows", path, minimum=1), _header_int(ds, "Columns", path, minimum=1)
    samples = _header_int(ds, "SamplesPerPixel", path, allowed={1, 3})
    bits = _header_int(ds, "BitsAllocated", path, allowed={1, 8, 16, 32})
    stored = _header_int(ds, "BitsStored", path, minimum=1)
    if stored > bits:
        raise ValueError(f"{path}: BitsStored {stored} exceeds BitsAllocated {bits}")
    _header_int(ds, "PixelRepresentation", path, allowed={0, 1})
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in SAMPLES:
        raise ValueError(f"{path}: PhotometricInterpretation {photometric!r} is not one of {sorted(SAMPLES)}")
    if SAMPLES[photometric] != samples:
        raise ValueError(
            f"{path}: PhotometricInterpretation {photometric} needs SamplesPerPixel "
            f"{SAMPLES[photometric]}, the header says {samples}"
        )
    if samples > 1 and "PlanarConfiguration" not in ds:
        raise ValueError(
            f"{path}: the Image Pixel module lacks PlanarConfiguration (required for SamplesPerPixel {samples})"
        )
    if photometric == "PALETTE COLOR":
        lacking = [
            f"{c}PaletteColorLookupTable{part}"
            for c in ("Red", "Green", "Blue")
            for part in ("Descriptor", "Data")
            if f"{c}PaletteColorLookupTable{part}" not in ds
            and not (part == "Data" and f"Segmented{c}PaletteColorLookupTableData" in ds)
        ]
        if lacking:
            raise ValueError(f"{path}: PALETTE COLOR without its lookup table (missing {', '.join(lacking)})")
    frames = 1
    if "NumberOfFrames" in ds and ds["NumberOfFrames"].value not in (None, ""):
        frames = _header_int(ds, "NumberOfFrames", path, minimum=1)
    # without a transfer syntax (a file read without its meta header), encapsulation shows in the first item tag
    compressed = syntax.is_compressed if syntax is not None else bytes(ds.PixelData[:4]) == b"\xfe\xff\x00\xe0"
    if not compressed:
        per_pixel = 2 if photometric == "YBR_FULL_422" else samples  # 4:2:2 stores two values per pixel
        expected = math.ceil(rows * columns * per_pixel * frames * bits / 8)
        actual = len(ds.PixelData)
        if actual not in (expected, expected + 1):  # + 1: the pad byte to an even length
            raise ValueError(
                f"{path}: the pixel data holds {actual} bytes, but the header (Rows {rows} x Columns {columns} x "
                f"{per_pixel} samples x {bits} bits x {frames} frame(s)) needs {expected}"
            )
    else:
        _check_encapsulated(ds, path, rows, columns, samples, frames)
    return {
        "rows": rows,
        "columns": columns,
        "samples": samples,
        "frames": frames,
        "photometric": photometric,
        "bits": stored,
    }


FRAME_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")  # JPEG SOI, JPEG 2000 SOC+SIZ, JP2


def _codestream_geometry(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) that a JPEG (SOF marker, ITU-T T.81 B.2.2) or JPEG 2000 codestream (SIZ marker,
    ITU-T T.800 A.5.1) declares, or None when the frame is neither or the marker is not found."""
    import struct

    try:
        if frame[:4] == b"\xff\x4f\xff\x51":
            xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[8:24])
            return ysiz - y0, xsiz - x0, struct.unpack(">H", frame[40:42])[0]
        if frame[:2] == b"\xff\xd8":
            i = 2
            while i + 10 <= len(frame) and frame[i] == 0xFF:
                marker = frame[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                    continue
                if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:  # SOFn, JPEG-LS
                    _, height, width, components = struct.unpack(">BHHB", frame[i + 4 : i + 10])
                    return height, width, components
                i += 2 + struct.unpack(">H", frame[i + 2 : i + 4])[0]
    except struct.error:
        return None
    return None


def _check_encapsulated(ds, path: Path, rows: int, columns: int, samples: int, frames: int) -> None:
    """Compressed pixel data against the header: the number of frames it holds (Basic Offset Table, else the
    fragments that start a JPEG / JPEG 2000 codestream, else one fragment per frame as RLE stores them; PS3.5
    A.4) and the size its first codestream declares."""
    from pydicom.encaps import generate_fragments, parse_basic_offsets

    try:
        offsets = parse_basic_offsets(ds.PixelData)
        fragments = list(generate_fragments(ds.PixelData))
    except Exception as error:  # noqa: BLE001 - malformed encapsulation
        raise ValueError(f"{path}: malformed encapsulated pixel data ({_one_line(error)})") from None
    if not fragments:
        raise ValueError(f"{path}: the encapsulated pixel data holds no fragment")
    starts = [f for f in fragments if f.startswith(FRAME_STARTS)]
    held = len(offsets) if offsets else (len(starts) or len(fragments))
    if held != frames:
        raise ValueError(f"{path}: the pixel data holds {held} frame(s), the header's NumberOfFrames says {frames}")
    geometry = _codestream_geometry(starts[0]) if starts else None
    if geometry is not None and geometry != (rows, columns, samples):
        raise ValueError(
            f"{path}: the compressed image is {geometry[0]} x {geometry[1]} with {geometry[2]} "
            f"component(s), the header says Rows {rows} x Columns {columns} x SamplesPerPixel {samples}"
        )


def read_ultrasound_dicom(path) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """(frames (F, H, W) or (F, H, W, 3) uint8, pixel size (sx, sy) mm or None, info) of one DICOM file.

    Raises one ValueError naming the file and the problem when it is empty, not DICOM, truncated or unparseable,
    holds no image, lacks or contradicts its Image Pixel module (a frame count or size that disagrees with the pixel
    data is an error, not a guess), has a PALETTE COLOR image without its lookup table, an implausible pixel size,
    or a compression without a decoder.
    """
    import warnings

    from pydicom.pixels import apply_color_lut

    path = Path(path)
    ds = _read_dataset(path)
    if "PixelData" not in ds:
        sop = getattr(ds, "SOPClassUID", None)
        name = str(getattr(sop, "name", sop) or "")
        damaged = not name or "Image Storage" in name  # an image class without pixels: cut short or misparsed
        raise ValueError(
            f"{path}: the DICOM holds no image ({name or 'no SOP class'}"
            f"{'; the file is truncated or damaged' if damaged else ''})"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.TransferSyntaxUID if meta is not None and "TransferSyntaxUID" in meta else None
    header = _check_image_pixel_module(ds, path, syntax)
    size, source = dicom_pixel_size(ds, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the header was checked above; pydicom's guesses are not wanted
            pixels = ds.pixel_array
            if header["photometric"] == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
    except Exception as error:  # pydicom raises several types when no plugin can decode the syntax
        name = getattr(syntax, "name", syntax)
        missing = any(word in str(error).lower() for word in ("plugin", "handler", "missing"))
        hint = (
            (
                ". JPEG and JPEG 2000 need the pylibjpeg plugins (pip install pylibjpeg pylibjpeg-libjpeg "
                "pylibjpeg-openjpeg)"
            )
            if missing
            else ""
        )
        raise ValueError(f"{path}: cannot decode its pixel data ({name}): {_one_line(error)}{hint}") from None
    pixels = np.asarray(pixels)
    colour = header["samples"] == 3 or header["photometric"] == "PALETTE COLOR"
    if header["frames"] == 1 and pixels.ndim == (3 if colour else 2):
        pixels = pixels[None]
    expected = (header["frames"], header["rows"], header["columns"], *((3,) if colour else ()))
    if pixels.shape != expected:
        raise ValueError(
            f"{path}: decoded pixels have shape {pixels.shape}, the header (NumberOfFrames, Rows, "
            f"Columns, samples) says {expected}"
        )
    if header["photometric"] == "MONOCHROME1":
        pixels = pixels.max() - pixels
    frames = _to_uint8(pixels, header["bits"])
    info = {
        "frames": frames.shape[0],
        "photometric": header["photometric"],
        "transfer_syntax": str(getattr(syntax, "name", syntax)),
        "pixel_size_source": source,
        "modality": str(getattr(ds, "Modality", "")),
    }
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
