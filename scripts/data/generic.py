"""Image/label folder layouts: generic ``images/`` + ``labels/``, FUGC and PSFHS (docs/README.md#data).

    generic  <root>/images/<stem>.<ext>  [+ <root>/labels/<stem>.<ext>]      any mix of PNG, JPG, NIfTI, MHA, NRRD
    fugc     <root>/train/labeled_data/images|labels/0001.png + <root>/train/unlabeled_data/images/*.png
    psfhs    <root>/image_mha/<name>.mha + <root>/label_mha/<name>.mha

Labels are class-index masks (0 background, 1..C-1), paired with images by file stem; an image without a label
joins the unlabelled pool. Every label is read once when the datalist is prepared: its size must equal its
image's and its values must be integers, so a 0/255 mask or a mismatched file is named at once instead of failing
mid-training. Pixel sizes come from NIfTI/MHA/NRRD headers (in mm), or from ``pixel_size_mm`` for formats that
carry none (PNG, JPG); else they are unknown and distances are reported in pixels only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from scripts.evaluation.metrics import pixel_size_pair, user_pixel_size
from scripts.utils.files import IMAGE_SUFFIXES, image_stem

__all__ = ["LAYOUTS", "check_label", "detect_folder_layout", "list_folder_layout", "read_header", "read_label"]

LAYOUTS = {
    # name: (labelled image folder, label folder, unlabelled-only image folder or None)
    "fugc": ("train/labeled_data/images", "train/labeled_data/labels", "train/unlabeled_data/images"),
    "psfhs": ("image_mha", "label_mha", None),
    "generic": ("images", "labels", None),
}
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def detect_folder_layout(dataset_dir) -> str | None:
    """The first layout of :data:`LAYOUTS` whose image folder exists in ``dataset_dir``, else None."""
    root = Path(dataset_dir)
    for name, (images, _labels, _unlabelled) in LAYOUTS.items():
        if (root / images).is_dir():
            return name
    return None


def _image_files(folder: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES):
            stem = image_stem(path)
            if stem in files:
                raise ValueError(f"{folder}: two files share the stem {stem!r}: {files[stem].name}, {path.name}")
            files[stem] = path
    return files


def read_header(path: Path) -> tuple[tuple[int, ...], tuple[float, float] | None]:
    """(2D size as (x, y), pixel size (sx, sy) in mm or None) from the file's header, without reading pixels."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            header = nib.load(str(path)).header
            shape, zooms = header.get_data_shape(), header.get_zooms()
            return tuple(int(s) for s in shape[:2]), (float(zooms[0]), float(zooms[1]))
        if name.endswith((".mha", ".mhd", ".nrrd")):
            import itk

            io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
            if io is None:
                raise ValueError("ITK has no reader for it")
            io.SetFileName(str(path))
            io.ReadImageInformation()
            size = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
            spacing = (float(io.GetSpacing(0)), float(io.GetSpacing(1)))
            return size[:2], spacing
        with Image.open(path) as image:
            return (int(image.size[0]), int(image.size[1])), None
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read the image header ({error})") from None


def read_label(path: Path) -> np.ndarray:
    """A label's class-index array (x, y); JPEG is refused (lossy compression changes the class values)."""
    name = path.name.lower()
    if name.endswith(LOSSY_SUFFIXES):
        raise ValueError(f"{path}: labels must be lossless (PNG, NIfTI, MHA, NRRD), not JPEG")
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            array = np.asarray(nib.load(str(path)).dataobj)
        elif name.endswith((".mha", ".mhd", ".nrrd")):
            import itk

            array = itk.array_view_from_image(itk.imread(str(path))).T  # ITK arrays are (y, x): back to (x, y)
        else:
            with Image.open(path) as image:
                array = np.asarray(image).T
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: cannot read the label ({error})") from None
    array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"{path}: a label must be a single-channel 2D mask, found shape {array.shape}")
    return array


def check_label(label_path: Path, image_path: Path, image_size: tuple[int, ...]) -> int:
    """Validate one label against its image's size; returns its largest class index."""
    label = read_label(label_path)
    if tuple(label.shape) != tuple(image_size):
        raise ValueError(
            f"{label_path}: label size {tuple(label.shape)} differs from its image {image_path.name} {tuple(image_size)}"  # noqa: E501
        )
    values = np.unique(label)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.round(values)):
        raise ValueError(f"{label_path}: label values must be class indices 0, 1, 2, ...; found {values[:8].tolist()}")
    if values.max() >= 32:
        raise ValueError(
            f"{label_path}: label values {values[:8].tolist()} look like an intensity mask, not class indices "
            "(a 0/255 mask? save it as 0/1)"
        )
    return int(values.max())


def list_folder_layout(dataset_dir, layout: str, pixel_size_mm=None) -> tuple[list[dict], list[dict], int]:
    """(labelled items, unlabelled-only items, number of classes) of a folder layout of :data:`LAYOUTS`.

    Items are ``{"image", ["label"], "subject", ["pixel_size_mm"]}`` with absolute paths; the subject is the stem.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)} or hc18")
    root = Path(dataset_dir)
    image_dir, label_dir, unlabelled_dir = (root / p if p else None for p in LAYOUTS[layout])
    images, labels = _image_files(image_dir), _image_files(label_dir)
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise ValueError(
            f"{label_dir}: {len(orphans)} label(s) without an image in {image_dir}: {', '.join(orphans[:5])}"
        )
    extra = _image_files(unlabelled_dir) if unlabelled_dir else {}
    if not images and not extra:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    default = user_pixel_size(pixel_size_mm, "dataset_pixel_size_mm")

    def item(stem: str, path: Path) -> tuple[dict, tuple[int, ...]]:
        entry = {"image": str(path.resolve()), "subject": stem}
        size, spacing = read_header(path)
        spacing = pixel_size_pair(spacing) if spacing else None  # a header may hold 0 or NaN: unknown
        if spacing or default:
            entry["pixel_size_mm"] = list(spacing or default)
        return entry, size

    labelled, unlabelled, max_class = [], [], 0
    for stem, path in images.items():
        entry, size = item(stem, path)
        if stem in labels:
            max_class = max(max_class, check_label(labels[stem], path, size))
            entry["label"] = str(labels[stem].resolve())
            labelled.append(entry)
        else:
            unlabelled.append(entry)
    unlabelled += [item(f"unlabelled/{stem}", path)[0] for stem, path in extra.items()]
    if len(labelled) < 3:
        raise ValueError(
            f"{label_dir}: {len(labelled)} labelled image(s); at least 3 are needed (training, validation, test)"
        )
    return labelled, unlabelled, max(2, max_class + 1)
