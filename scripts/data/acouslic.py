"""Reader for ACOUSLIC-AI (MICCAI 2024 fetal abdomen blind sweeps; CC BY-NC-SA), as downloaded (docs/README.md#data)::

    <root>/images/stacked_fetal_ultrasound/<uuid>.mha      744 x 562 x 840 (6 sweeps x 140 frames), 0.28 mm
    <root>/masks/stacked_fetal_abdomen/<uuid>.mha          same geometry; 0 background, 1 optimal, 2 suboptimal plane
    <root>/circumferences/fetal_abdominal_circumferences_per_sweep.csv   uuid,subject_id,sweep_1_ac_mm..sweep_6_ac_mm

Frames whose mask is non-zero become labelled candidates; ``unlabeled_per_volume`` frames drawn (seeded) from the
others (drawn per volume, the same for every split seed) form the unlabelled pool. Labels are binarised (any
non-zero is the abdomen, as the paper's F-Abd set) or,
with ``labels="keep"``, kept as 1 optimal / 2 suboptimal. Volumes are read one at a time through ITK, one sweep-sized
chunk of frames at a time where the file can be streamed (uncompressed MetaImage), else one whole volume at a time:
never more than one volume in memory. The frames are written once as PNGs under ``frames_dir/<uuid>/`` with an
``index.json``; a re-run with the same source files and parameters reads the index and opens no volume.
Items carry the subject id from the CSV (splits are by subject), the 0.28 mm pixel size from the header, the
volume, frame and sweep, and, on frames with the optimal plane, the sweep's reference AC (``ac_mm``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from scripts.utils.files import write_atomic, write_json_atomic

__all__ = [
    "IMAGES_DIR",
    "MASKS_DIR",
    "CSV_PATH",
    "CSV_HEADER",
    "is_acouslic",
    "read_circumferences",
    "StackReader",
    "extract_acouslic",
]

logger = logging.getLogger(__name__)

IMAGES_DIR = "images/stacked_fetal_ultrasound"
MASKS_DIR = "masks/stacked_fetal_abdomen"
CSV_PATH = "circumferences/fetal_abdominal_circumferences_per_sweep.csv"
SWEEPS = 6
CSV_HEADER = ("uuid", "subject_id", *(f"sweep_{i}_ac_mm" for i in range(1, SWEEPS + 1)))
LABEL_MODES = ("binary", "keep")
INDEX_VERSION = 1


def is_acouslic(root) -> bool:
    return (Path(root) / IMAGES_DIR).is_dir()


def read_circumferences(csv_path) -> dict[str, dict]:
    """``{uuid: {"subject": subject_id, "ac_mm": [sweep 1..6 AC in mm, None where empty]}}`` from the CSV."""
    csv_path = Path(csv_path)
    rows: dict[str, dict] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = tuple(field.strip() for field in next(reader, []))
        if header != CSV_HEADER:
            raise ValueError(
                f"{csv_path}: unexpected CSV header.\n  expected: {','.join(CSV_HEADER)}\n"
                f"     found: {','.join(header)}"
            )
        for line, row in enumerate(reader, start=2):
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(CSV_HEADER):
                raise ValueError(f"{csv_path}, line {line}: expected {len(CSV_HEADER)} fields, found {len(row)}")
            try:
                values = [float(f) if f.strip() else None for f in row[2:]]
            except ValueError:
                raise ValueError(f"{csv_path}, line {line}: cannot parse a circumference in {row!r}") from None
            uuid = row[0].strip()
            if uuid in rows:
                raise ValueError(f"{csv_path}, line {line}: {uuid} is listed twice")
            rows[uuid] = {
                "subject": row[1].strip(),
                "ac_mm": [v if v is not None and math.isfinite(v) and v > 0 else None for v in values],
            }
    return rows


class StackReader:
    """Lazy frame access to one 3D .mha stack (x, y, frames) through ITK: the header on opening, pixels on request."""

    def __init__(self, path) -> None:
        import itk

        self.path = Path(path)
        io = itk.ImageIOFactory.CreateImageIO(str(self.path), itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise ValueError(f"{self.path}: ITK cannot read it (not a MetaImage/ITK image)")
        io.SetFileName(str(self.path))
        try:
            io.ReadImageInformation()
        except RuntimeError as error:
            raise ValueError(f"{self.path}: cannot read the image header ({error})") from None
        if io.GetNumberOfDimensions() != 3 or io.GetNumberOfComponents() != 1:
            raise ValueError(
                f"{self.path}: expected a single-channel 3D stack (x, y, frames), found "
                f"{io.GetNumberOfDimensions()}D with {io.GetNumberOfComponents()} component(s)"
            )
        self.size = tuple(int(io.GetDimensions(i)) for i in range(3))  # (x, y, frames)
        self.spacing = (float(io.GetSpacing(0)), float(io.GetSpacing(1)))
        component = io.GetComponentTypeAsString(io.GetComponentType())
        pixel = {
            "unsigned_char": itk.UC,
            "char": itk.SC,
            "unsigned_short": itk.US,
            "short": itk.SS,
            "float": itk.F,
        }.get(component)
        if pixel is None:
            raise ValueError(f"{self.path}: unsupported pixel type {component}")
        self._type = itk.Image[pixel, 3]
        self.streamable = bool(io.CanStreamRead())
        self._volume: np.ndarray | None = None
        self._image = None

    @property
    def frames(self) -> int:
        return self.size[2]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start:stop`` as a (n, y, x) array: streamed where the file allows, else from the whole volume."""
        import itk

        if not self.streamable:
            if self._volume is None:
                self._image = itk.imread(str(self.path))  # kept alive: the view below shares its buffer
                self._volume = itk.array_view_from_image(self._image)
            return self._volume[start:stop]
        reader = itk.ImageFileReader[self._type].New(FileName=str(self.path))
        reader.UpdateOutputInformation()
        region = reader.GetOutput().GetLargestPossibleRegion()
        size, index = region.GetSize(), region.GetIndex()
        size[2], index[2] = stop - start, start
        region.SetSize(size)
        region.SetIndex(index)
        extract = itk.ExtractImageFilter[self._type, self._type].New(Input=reader.GetOutput(), ExtractionRegion=region)
        extract.SetDirectionCollapseToSubmatrix()
        extract.Update()
        return itk.array_from_image(extract.GetOutput())

    def chunks(self, length: int):
        """(start, frames) over the stack, ``length`` frames at a time."""
        for start in range(0, self.frames, length):
            yield start, self.read(start, min(self.frames, start + length))

    def close(self) -> None:
        self._volume = self._image = None


def _as_uint8(frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return frame
    return np.clip(frame, 0, 255).astype(np.uint8)


def _save_png(path: Path, array: np.ndarray) -> None:
    picture = Image.fromarray(np.ascontiguousarray(array))
    write_atomic(path, lambda f: picture.save(f, format="PNG", compress_level=1), binary=True)


def _source_stamp(*paths: Path) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _extract_volume(
    image_path: Path, mask_path: Path | None, out_dir: Path, labels: str, unlabeled_per_volume: int
) -> dict:
    """Write one volume's labelled and sampled unlabelled frames; returns its index (frames and values found)."""
    image = StackReader(image_path)
    mask = StackReader(mask_path) if mask_path is not None else None
    if mask is not None and mask.size != image.size:
        raise ValueError(
            f"{mask_path}: mask shape {mask.size} (x, y, frames) differs from its image {image_path.name} {image.size}"
        )
    uuid = image_path.name[: -len(".mha")]
    chunk = max(1, image.frames // SWEEPS)
    labelled, optimal, values = [], [], set()
    if mask is not None:
        for start, block in mask.chunks(chunk):
            for offset, frame in enumerate(block):
                if not frame.any():
                    continue
                found = set(np.unique(frame).tolist())
                if labels == "keep" and not found <= {0, 1, 2}:
                    raise ValueError(
                        f"{mask_path}: frame {start + offset} holds values {sorted(found)[:8]}; "
                        "ACOUSLIC masks are 0 background, 1 optimal, 2 suboptimal"
                    )
                values |= found
                index = start + offset
                label = (frame > 0).astype(np.uint8) if labels == "binary" else frame.astype(np.uint8)
                _save_png(out_dir / f"{uuid}_f{index:03d}_label.png", label)
                labelled.append(index)
                if 1 in found:
                    optimal.append(index)
        mask.close()
    empty = np.setdiff1d(np.arange(image.frames), labelled)
    rng = np.random.default_rng(zlib.crc32(uuid.encode()))  # the volume's own draw: the split seed changes no frame
    sampled = sorted(rng.choice(empty, size=min(unlabeled_per_volume, len(empty)), replace=False).tolist())
    wanted = set(labelled) | set(sampled)
    for start, block in image.chunks(chunk):
        if not wanted & set(range(start, start + len(block))):
            continue
        for offset, frame in enumerate(block):
            if start + offset in wanted:
                _save_png(out_dir / f"{uuid}_f{start + offset:03d}.png", _as_uint8(frame))
    image.close()
    return {
        "frames": image.frames,
        "frames_per_sweep": chunk,
        "spacing": list(image.spacing),
        "labelled": labelled,
        "optimal": optimal,
        "unlabelled": sampled,
        "values": sorted(int(v) for v in values),
    }


def extract_acouslic(
    root, frames_dir, labels: str = "binary", unlabeled_per_volume: int = 24, progress: bool = True
) -> tuple[list[dict], list[dict], int]:
    """(labelled items, unlabelled items, number of classes) of an ACOUSLIC-AI download, frames cached on disk."""
    root, frames_dir = Path(root), Path(frames_dir)
    if labels not in LABEL_MODES:
        raise ValueError(f"acouslic_labels must be one of {', '.join(LABEL_MODES)}, found {labels!r}")
    if int(unlabeled_per_volume) < 0:
        raise ValueError(f"acouslic_unlabeled_per_volume must be 0 or more, found {unlabeled_per_volume}")
    images = sorted((root / IMAGES_DIR).glob("*.mha"))
    if not images:
        raise ValueError(f"{root / IMAGES_DIR}: no .mha stacks")
    csv_path = root / CSV_PATH
    circumferences = read_circumferences(csv_path) if csv_path.is_file() else {}
    if not circumferences:
        logger.warning("%s is missing: every volume is its own subject and no reference AC is known", csv_path)
    params = {"labels": labels, "unlabeled_per_volume": int(unlabeled_per_volume), "version": INDEX_VERSION}
    labelled, unlabelled, values = [], [], {0}
    for image_path in tqdm(images, desc="extracting ACOUSLIC frames", unit="volume", disable=not progress):
        uuid = image_path.name[: -len(".mha")]
        mask_path = root / MASKS_DIR / image_path.name
        mask_path = mask_path if mask_path.is_file() else None
        out_dir = frames_dir / uuid
        stamp = _source_stamp(*filter(None, (image_path, mask_path)))
        index_path = out_dir / "index.json"
        index = None
        if index_path.is_file():
            cached = json.loads(index_path.read_text())
            if cached.get("params") == params and cached.get("source") == stamp:
                index = cached
        if index is None:
            index = {
                "params": params,
                "source": stamp,
                **_extract_volume(image_path, mask_path, out_dir, labels, int(unlabeled_per_volume)),
            }
            write_json_atomic(index_path, index)
        values |= set(index["values"])
        row = circumferences.get(uuid, {"subject": uuid, "ac_mm": [None] * SWEEPS})
        optimal = set(index["optimal"])
        base = {"subject": row["subject"], "volume": uuid, "pixel_size_mm": index["spacing"]}
        for frame in index["labelled"]:
            sweep = min(SWEEPS, frame // index["frames_per_sweep"] + 1)
            item = {
                "image": str((out_dir / f"{uuid}_f{frame:03d}.png").resolve()),
                "label": str((out_dir / f"{uuid}_f{frame:03d}_label.png").resolve()),
                **base,
                "frame": frame,
                "sweep": sweep,
            }
            ac = row["ac_mm"][sweep - 1]
            if ac is not None and frame in optimal:
                item["ac_mm"] = ac
            labelled.append(item)
        for frame in index["unlabelled"]:
            unlabelled.append(
                {
                    "image": str((out_dir / f"{uuid}_f{frame:03d}.png").resolve()),
                    **base,
                    "frame": frame,
                    "sweep": min(SWEEPS, frame // index["frames_per_sweep"] + 1),
                }
            )
    num_classes = 2 if labels == "binary" else max(2, max(values) + 1)
    return labelled, unlabelled, num_classes
