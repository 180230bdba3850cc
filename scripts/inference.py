"""Inference helpers for ``configs/inference.json``: the model file of the chosen backend, the input listing (with
pixel sizes), measurements, overlays."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from scipy import ndimage

from scripts.biometry import HC18_SUBMISSION_COLUMNS, MEASUREMENT_COLUMNS, fit_ellipse
from scripts.data.hc18 import TEST_CSV_NAME, TRAINING_CSV_NAME, read_hc18_csv
from scripts.files import IMAGE_SUFFIXES, image_stem, write_atomic, write_json_atomic
from scripts.metrics import pixel_size_pair, user_pixel_size
from scripts.onnx_network import ONNX_EXPORT_COMMAND
from scripts.settings import require_file
from scripts.transforms import channel_argmax

__all__ = ["BACKENDS", "require_model", "list_images", "overlay_rgb", "OverlayWriter", "MeasurementWriter"]

#: how configs/inference.json runs the network: the eager UNeXt from models/model.pt, or the exported ONNX model
BACKENDS = ("torch", "onnxruntime")

logger = logging.getLogger(__name__)

# annotation and output files that sit beside images in the supported layouts and are not inputs
NOT_INPUTS = ("_Annotation.png", "_mask.png", "_overlay.png")
# one colour per foreground class (RGB): green, magenta, cyan, yellow
CLASS_COLOURS = np.array([[0, 230, 64], [230, 0, 200], [0, 200, 230], [240, 220, 0]], dtype=np.float32)


def require_model(backend: str, ckpt_file: str, onnx_path: str) -> str:
    """The model file ``backend`` runs (``ckpt_file`` for torch, ``onnx_path`` for onnxruntime); a clear error if it
    is missing or the backend unknown, and a warning if the ONNX file is older than the checkpoint it came from."""
    if backend not in BACKENDS:
        raise ValueError(f"config value backend={backend!r} is invalid: one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        require_file(onnx_path, f"the ONNX model: export it first with: {ONNX_EXPORT_COMMAND}")
        if Path(ckpt_file).is_file() and Path(ckpt_file).stat().st_mtime > Path(onnx_path).stat().st_mtime:
            logger.warning(f"{onnx_path} is older than {ckpt_file}: export it again if the model was retrained "
                           f"({ONNX_EXPORT_COMMAND})")
        return onnx_path
    return require_file(ckpt_file, "the trained model: run configs/train.json first")


def list_images(input_dir: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, pixel_size_mm: Any = None,
                pixel_size_csv: str | None = None, frames_dir: str | None = None) -> list[dict]:
    """``[{"image": path[, "pixel_size_mm": [sx, sy]]}, ...]`` for an image file or every image directly in a folder.

    Annotations and this bundle's outputs are skipped. DICOM files (``.dcm``, or extension-less files with the
    DICOM marker) are decoded by :mod:`scripts.data.dicom`: each frame is written as a PNG into ``frames_dir`` and
    carries the DICOM's physical pixel size. Other files get their pixel size from ``pixel_size_csv`` (HC18's
    ``filename,pixel size(mm)[,head circumference (mm)]``), else from an HC18 CSV found in or beside the folder,
    else from ``pixel_size_mm`` (one number or [sx, sy]); otherwise it is unknown and measurements are in pixels.
    """
    from scripts.data.dicom import export_frames, is_dicom

    source = Path(input_dir)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist (set --input_dir to an image, a DICOM or a folder)")
    folder = source if source.is_dir() else source.parent
    candidates = sorted(folder.iterdir()) if source.is_dir() else [source]
    dicoms = [p for p in candidates if p.is_file() and (p.suffix.lower() == ".dcm" or (not p.suffix and is_dicom(p)))]
    files = [
        p for p in candidates
        if p.is_file() and p not in dicoms and p.name.lower().endswith(tuple(suffixes)) and not p.name.endswith(NOT_INPUTS)
    ]
    if not files and not dicoms:
        raise ValueError(f"{source} holds no images ({', '.join(suffixes)})")
    if pixel_size_csv is None:
        found = [c for d in (folder, folder.parent) for c in (d / TEST_CSV_NAME, d / TRAINING_CSV_NAME) if c.is_file()]
        pixel_size_csv = str(found[0]) if found else None
    sizes = read_hc18_csv(pixel_size_csv) if pixel_size_csv else {}
    default = user_pixel_size(pixel_size_mm)
    items = []
    for p in files:
        item: dict[str, Any] = {"image": str(p)}
        size = sizes[p.name]["pixel_size_mm"] if p.name in sizes else None
        pair = [size, size] if size is not None else (list(default) if default else None)
        if pair:
            item["pixel_size_mm"] = pair
        items.append(item)
    if dicoms:
        if frames_dir is None:
            raise ValueError(f"{dicoms[0]}: DICOM input needs frames_dir, a folder for its decoded frames")
        for p in dicoms:
            items += export_frames(p, frames_dir)
    return items


def _as_index_map(pred: torch.Tensor) -> np.ndarray:
    """(C, W, H) one-hot/probabilities or (1, W, H) indices -> (H, W) class indices."""
    pred = torch.as_tensor(pred).detach().cpu()
    index = channel_argmax(pred, 0)[0] if pred.shape[0] > 1 else pred[0].round().long()
    return index.numpy().T


def _as_display(image: torch.Tensor) -> np.ndarray:
    """(C, W, H) image in any range -> (H, W, 3) uint8 for display, min-max scaled."""
    img = torch.as_tensor(image).detach().cpu().float()
    img = img[:3] if img.shape[0] >= 3 else img[:1].expand(3, *img.shape[1:])
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) * 255.0 if hi > lo else torch.zeros_like(img)
    return img.permute(2, 1, 0).numpy().astype(np.uint8)


ELLIPSE_COLOUR = np.array([255, 220, 0], dtype=np.float32)


def ellipse_points_px(fit: dict, pixel_size: Sequence[float]) -> np.ndarray:
    """(N, 2) pixel coordinates (x, y) along a fitted ellipse given in physical units with pixel size (sx, sy)."""
    a, b, theta = fit["semi_axes_a_mm"], fit["semi_axes_b_mm"], fit["angle_rad"]
    t = np.linspace(0.0, 2.0 * np.pi, max(64, int(4 * (a + b) / min(pixel_size) * np.pi)), endpoint=False)
    x = fit["center_x_mm"] + a * np.cos(t) * math.cos(theta) - b * np.sin(t) * math.sin(theta)
    y = fit["center_y_mm"] + a * np.cos(t) * math.sin(theta) + b * np.sin(t) * math.cos(theta)
    return np.stack([x / pixel_size[0], y / pixel_size[1]], axis=1)


def overlay_rgb(image: torch.Tensor, pred: torch.Tensor, alpha: float = 0.35, ellipse: np.ndarray | None = None) -> np.ndarray:
    """Tint each predicted class over the image and draw its boundary; MONAI (C, W, H) inputs, (H, W, 3) output.

    ``ellipse``: (N, 2) pixel coordinates (x, y) of a fitted ellipse, drawn in yellow two pixels wide.
    """
    rgb = _as_display(image).astype(np.float32)
    index = _as_index_map(pred)
    for c in range(1, int(index.max(initial=0)) + 1):
        region = index == c
        colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        boundary = region & ~ndimage.binary_erosion(region, iterations=2)
        rgb[boundary] = colour
    if ellipse is not None and len(ellipse):
        h, w = rgb.shape[:2]
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x = np.floor(ellipse[:, 0]).astype(int) + dx
            y = np.floor(ellipse[:, 1]).astype(int) + dy
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            rgb[y[inside], x[inside]] = ELLIPSE_COLOUR
    return rgb.clip(0, 255).astype(np.uint8)


class OverlayWriter:
    """Evaluator handler: writes ``<output_dir>/<stem>_overlay.png`` for every image of every iteration.

    ``image_key`` must hold the image at its original geometry (the config copies it before resizing) and
    ``pred_key`` the prediction already restored to that geometry. The ellipse a :class:`MeasurementWriter`
    attached before this handler fitted (output key ``measurement``) is drawn too.
    """

    def __init__(self, output_dir: str, image_key: str = "original", pred_key: str = "pred", alpha: float = 0.35):
        self.output_dir = Path(output_dir)
        self.image_key, self.pred_key, self.alpha = image_key, pred_key, alpha

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        outputs, batch = engine.state.output, engine.state.batch
        for out, item in zip(outputs, batch):
            image = item[self.image_key]
            source = str(getattr(image, "meta", {}).get("filename_or_obj", "image"))
            stem = image_stem(source)
            measurement = out.get("measurement") or {}
            ellipse = None
            if measurement.get("fit"):
                ellipse = ellipse_points_px(measurement["fit"], measurement["pixel_size"])
            picture = Image.fromarray(overlay_rgb(image, out[self.pred_key], self.alpha, ellipse))
            # zlib level 1: 4x faster than PIL's default 6 on an 800 x 540 overlay, and no larger on ultrasound
            write_atomic(self.output_dir / f"{stem}_overlay.png",
                         lambda f: picture.save(f, format="PNG", compress_level=1), binary=True)


class MeasurementWriter:
    """Evaluator handler: the ellipse fitted to each predicted mask, in mm where the pixel size is known.

    Writes ``measurements.csv`` and ``measurements.json`` to ``output_dir`` at the end of the run: one row per image
    with ``filename, unit, pixel_size_x_mm, pixel_size_y_mm, center_x, center_y, semi_axes_a, semi_axes_b, angle_rad,
    circumference, area`` (``unit`` is ``mm``, or ``px`` when the image has no pixel size; empty when no ellipse
    fits). ``circumference`` is the head circumference for fetal-head data, the abdominal one for abdomens. With
    ``hc18_submission`` it also writes ``hc18_submission.csv`` in the challenge's format (every image needs a pixel
    size). The fit is left in each output item under ``measurement`` for :class:`OverlayWriter`. Attach it before
    the OverlayWriter; ``pred_key`` holds the class-index mask at the original geometry.
    """

    COLUMNS = ("filename", "unit", "pixel_size_x_mm", "pixel_size_y_mm") + tuple(
        c.removesuffix("_mm").removesuffix("_mm2") for c in MEASUREMENT_COLUMNS
    )

    def __init__(self, output_dir: str, pred_key: str = "pred", image_key: str = "image",
                 pixel_size_key: str = "pixel_size_mm", hc18_submission: bool = False) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key, self.pixel_size_key = pred_key, image_key, pixel_size_key
        self.hc18_submission = hc18_submission
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def measure(self, pred: Any, pixel_size: Any, filename: str) -> tuple[dict, dict | None]:
        """One row, and the fit (in mm, or px without a pixel size), for a (1, X, Y) index or (C, X, Y) mask."""
        pred = torch.as_tensor(pred).detach().cpu()
        foreground = (channel_argmax(pred, 0)[0] > 0) if pred.shape[0] > 1 else (pred[0] > 0)
        size = pixel_size_pair(pixel_size)
        fit = fit_ellipse(foreground.numpy(), size)
        row: dict[str, Any] = dict.fromkeys(self.COLUMNS)
        row.update(filename=filename, unit="mm" if size else "px")
        if size:
            row["pixel_size_x_mm"], row["pixel_size_y_mm"] = size
        if fit:
            for column in MEASUREMENT_COLUMNS:
                row[column.removesuffix("_mm").removesuffix("_mm2")] = fit[column]
        return row, fit

    def __call__(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        for out, item in zip(outputs, batch):
            image = item.get(self.image_key)
            filename = Path(str(getattr(image, "meta", {}).get("filename_or_obj", f"image_{len(self.rows):04d}"))).name
            size = item.get(self.pixel_size_key)
            row, fit = self.measure(out[self.pred_key], size, filename)
            self.rows.append(row)
            out["measurement"] = {"fit": fit, "pixel_size": pixel_size_pair(size) or (1.0, 1.0)}

    def write(self, engine: Engine | None = None) -> None:
        if not self.rows:
            return
        rows = list(self.rows)

        def table(f, columns=self.COLUMNS, source=rows):
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in source)

        write_atomic(self.output_dir / "measurements.csv", table)
        write_json_atomic(self.output_dir / "measurements.json", rows)
        if self.hc18_submission:
            missing = [r["filename"] for r in rows if r["unit"] != "mm"]
            if missing:
                raise ValueError(
                    f"hc18_submission needs every image's pixel size; none for {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''} (put test_set_pixel_size.csv in or beside the input folder)"
                )
            submission = [
                {"filename": r["filename"], **{c: (0.0 if r[c.removesuffix("_mm")] is None else r[c.removesuffix("_mm")])
                                               for c in HC18_SUBMISSION_COLUMNS[1:]}}
                for r in rows
            ]
            write_atomic(self.output_dir / "hc18_submission.csv",
                         lambda f: table(f, HC18_SUBMISSION_COLUMNS, submission))
