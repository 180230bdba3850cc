"""Inference for ``configs/inference.json``: the model file of the chosen backend, the input listing (with pixel
sizes), a dataset and evaluator that batch the folder and skip a bad file, measurements, overlays, progress.

The pipeline: a DataLoader with workers decodes and preprocesses each input file (:class:`InferenceDataset`: an
image, or every frame of a DICOM) and batches the frames at the network's size (:func:`collate_frames`); the
evaluator (:class:`FolderEvaluator`) runs the network once per batch and MONAI's postprocessing per frame; the
handlers measure, draw and write each frame's results in a small thread pool (:class:`BackgroundWriter`) while the
next batch is decoded and computed. A file that fails to decode or preprocess is reported in one line and skipped
(:class:`ProgressReport`); the run ends with a summary and, if any file failed, a non-zero exit
(:func:`exit_on_failures`).
"""

from __future__ import annotations

import csv
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import list_data_collate
from monai.engines import SupervisedEvaluator
from monai.engines.utils import engine_apply_transform
from monai.transforms import apply_transform
from monai.utils.enums import CommonKeys as Keys
from PIL import Image, ImageDraw
from scipy import ndimage

from scripts.data.hc18 import TEST_CSV_NAME, TRAINING_CSV_NAME, read_hc18_csv
from scripts.data.transforms import channel_argmax
from scripts.deployment.onnx_network import ONNX_EXPORT_COMMAND
from scripts.evaluation.biometry import (
    HC18_SUBMISSION_COLUMNS,
    MEASUREMENT_COLUMNS,
    field_of_view,
    fit_ellipse,
    parse_flags,
)
from scripts.evaluation.metrics import pixel_size_pair, user_pixel_size
from scripts.method.settings import require_file
from scripts.utils.files import IMAGE_SUFFIXES, image_stem, write_atomic, write_json_atomic

__all__ = [
    "BACKENDS",
    "require_model",
    "list_images",
    "source_frames",
    "failure_reason",
    "InferenceDataset",
    "collate_frames",
    "FolderEvaluator",
    "BackgroundWriter",
    "ProgressReport",
    "exit_on_failures",
    "overlay_rgb",
    "OverlayWriter",
    "MeasurementWriter",
]

#: how configs/inference.json runs the network: the eager UNeXt from models/model.pt, or the exported ONNX model
BACKENDS = ("torch", "onnxruntime")

logger = logging.getLogger(__name__)

# annotation and output files that sit beside images in the supported layouts and are not inputs
NOT_INPUTS = ("_Annotation.png", "_mask.png", "_overlay.png")
# one colour per foreground class (RGB): green, magenta, cyan, yellow
CLASS_COLOURS = np.array([[0, 230, 64], [230, 0, 200], [0, 200, 230], [240, 220, 0]], dtype=np.float32)
ELLIPSE_COLOUR = np.array([255, 220, 0], dtype=np.float32)
FLAG_COLOUR = (255, 64, 64)

# keys of a collated batch that are not the network's input: per-frame values kept beside the batch, failed files
EXTRAS, FAILED, FILES = "per_frame_extras", "failed_files", "file_count"


def require_model(backend: str, ckpt_file: str, onnx_path: str) -> str:
    """The model file ``backend`` runs (``ckpt_file`` for torch, ``onnx_path`` for onnxruntime); a clear error if it
    is missing or the backend unknown, and a warning if the ONNX file is older than the checkpoint it came from."""
    if backend not in BACKENDS:
        raise ValueError(f"config value backend={backend!r} is invalid: one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        require_file(onnx_path, f"the ONNX model: export it first with: {ONNX_EXPORT_COMMAND}")
        if Path(ckpt_file).is_file() and Path(ckpt_file).stat().st_mtime > Path(onnx_path).stat().st_mtime:
            logger.warning(
                f"{onnx_path} is older than {ckpt_file}: export it again if the model was retrained "
                f"({ONNX_EXPORT_COMMAND})"
            )
        return onnx_path
    return require_file(ckpt_file, "the trained model: run configs/train.json first")


def list_images(
    input_dir: str,
    suffixes: Sequence[str] = IMAGE_SUFFIXES,
    pixel_size_mm: Any = None,
    pixel_size_csv: str | None = None,
) -> list[dict]:
    """``[{"image": path[, "pixel_size_mm": [sx, sy]]}, ...]`` for an image file or every image directly in a folder.

    Nothing is decoded here. Annotations and this bundle's outputs are skipped. DICOM files (``.dcm``, or
    extension-less files with the DICOM marker) are listed as ``{"image": path, "dicom": True}``: their frames and
    physical pixel size come out when :class:`InferenceDataset` decodes them. Other files get their pixel size from
    ``pixel_size_csv`` (HC18's ``filename,pixel size(mm)[,head circumference (mm)]``), else from an HC18 CSV found
    in or beside the folder, else from ``pixel_size_mm`` (one number or [sx, sy]); otherwise it is unknown and
    measurements are in pixels.
    """
    from scripts.data.dicom import is_dicom

    source = Path(input_dir)
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist (set --input_dir to an image, a DICOM or a folder)")
    folder = source if source.is_dir() else source.parent
    candidates = sorted(folder.iterdir()) if source.is_dir() else [source]
    dicoms = [p for p in candidates if p.is_file() and (p.suffix.lower() == ".dcm" or (not p.suffix and is_dicom(p)))]
    files = [
        p
        for p in candidates
        if p.is_file()
        and p not in dicoms
        and p.name.lower().endswith(tuple(suffixes))
        and not p.name.endswith(NOT_INPUTS)
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
    return items + [{"image": str(p), "dicom": True} for p in dicoms]


def source_frames(item: dict, frames_dir: str | None) -> list[dict]:
    """The frame items of one listed input: the item itself for an image; for a DICOM (``"dicom": True``) each frame
    written as a PNG into ``frames_dir`` with the DICOM's pixel size (:func:`scripts.data.dicom.export_frames`)."""
    if not item.get("dicom"):
        return [item]
    from scripts.data.dicom import export_frames

    if frames_dir is None:
        raise ValueError(f"{item['image']}: DICOM input needs frames_dir, a folder for its decoded frames")
    return export_frames(item["image"], frames_dir)


def failure_reason(error: BaseException, file: str | None = None) -> str:
    """One line: the innermost cause of ``error`` (MONAI wraps a transform's error in "applying transform ...");
    without the leading ``<file>: `` of the bundle's own messages, else with the error's type."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if file and text.startswith(f"{file}: "):
        return text[len(file) + 2 :]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class InferenceDataset(torch.utils.data.Dataset):
    """One item per listed input file: the list of its preprocessed frames (one for an image, one per DICOM frame),
    or ``[{FAILED: {"file", "reason"}}]`` when it cannot be decoded or preprocessed, so one bad file is skipped
    instead of stopping the DataLoader."""

    def __init__(self, data: Sequence[dict], transform: Callable, frames_dir: str | None = None) -> None:
        self.data, self.transform, self.frames_dir = list(data), transform, frames_dir

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> list[dict]:
        item = self.data[index]
        try:
            return [apply_transform(self.transform, dict(frame)) for frame in source_frames(item, self.frames_dir)]
        except Exception as error:  # noqa: BLE001 - any decoding or preprocessing error skips this file, named
            file = str(item.get("image"))
            return [{FAILED: {"file": file, "reason": failure_reason(error, file)}}]


def collate_frames(files: Sequence[list[dict]]) -> dict:
    """The frames of a DataLoader batch of :class:`InferenceDataset` items as one network batch.

    Values that every frame has as tensors of one shape (the image at the network's size) are collated with MONAI's
    ``list_data_collate``; the rest (the original image, whose size differs per frame, pixel sizes, DICOM sources)
    stay per frame under ``EXTRAS``; failed files go under ``FAILED``, the number of files under ``FILES``.
    """
    frames = [frame for frames in files for frame in frames]
    good = [frame for frame in frames if FAILED not in frame]
    shared = set.intersection(*(set(f) for f in good)) if good else set()
    stacked = {
        k
        for k in shared
        if all(isinstance(f[k], torch.Tensor) for f in good) and len({tuple(f[k].shape) for f in good}) == 1
    }
    batch = list_data_collate([{k: f[k] for k in stacked} for f in good]) if good else {}
    batch[EXTRAS] = [{k: v for k, v in f.items() if k not in stacked} for f in good]
    batch[FAILED] = [frame[FAILED] for frame in frames if FAILED in frame]
    batch[FILES] = len(files)
    return batch


class FolderEvaluator(SupervisedEvaluator):
    """MONAI's SupervisedEvaluator over :func:`collate_frames` batches: the network runs once per batch, the
    postprocessing once per frame; each frame's ``EXTRAS`` join its decollated item before the handlers run.

    With a ``writer`` the postprocessing (back to the frame's size, argmax, cleaning, the mask file) runs in its
    threads while the next batch goes through the network: ``pred`` in each output item is then a Future of the
    postprocessed prediction, which the handlers' own tasks in the same writer resolve (:class:`MeasurementWriter`,
    :class:`OverlayWriter`); the run ends when every task has. ``state.failed`` lists the files that failed so far
    (``{"file", "reason"}``), ``state.frames_done`` and ``state.files_done`` count the frames and files handled; a
    batch whose files all failed skips the forward.
    """

    def __init__(
        self, *args: Any, postprocessing: Callable | None = None, writer: BackgroundWriter | None = None, **kwargs: Any
    ) -> None:
        self.writer = writer
        self.frame_postprocessing = postprocessing if writer is not None else None
        super().__init__(*args, postprocessing=None if writer is not None else postprocessing, **kwargs)
        self.add_event_handler(Events.STARTED, self._reset_counters)
        if writer is not None:
            self.add_event_handler(Events.COMPLETED, lambda _: writer.wait())

    @staticmethod
    def _reset_counters(engine: Engine) -> None:
        engine.state.failed, engine.state.batch_failed, engine.state.frames_done, engine.state.files_done = [], [], 0, 0

    def _postprocess(self, batch_item: dict, output_item: dict) -> Any:
        return engine_apply_transform(batch_item, output_item, self.frame_postprocessing)[1][Keys.PRED]

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, Any]) -> Any:
        extras, failed = batchdata.pop(EXTRAS, []), batchdata.pop(FAILED, [])
        engine.state.failed.extend(failed)
        engine.state.files_done += batchdata.pop(FILES, 0)
        engine.state.batch_failed = failed
        if not extras:
            engine.state.batch = []
            return []
        output = super()._iteration(engine, batchdata)
        for item, extra in zip(engine.state.batch, extras):
            item.update(extra)
        if self.frame_postprocessing is not None:
            for item, out in zip(engine.state.batch, engine.state.output):
                out[Keys.PRED] = self.writer.submit(self._postprocess, dict(item), dict(out))
        engine.state.frames_done += len(extras)
        return output


class BackgroundWriter:
    """A small thread pool for the per-frame work after the forward (measuring, drawing, writing files).

    At most ``max_pending`` tasks wait at a time (``submit`` blocks beyond that, so that results cannot pile up in
    memory when writing is slower than the network); :meth:`wait` blocks until every task has finished and raises
    the first task error (:class:`ProgressReport` waits at the end of the run). ``threads=0`` runs each task at once
    in the caller.
    """

    def __init__(self, threads: int = 2, max_pending: int | None = None) -> None:
        self.threads = int(threads)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="inference-writer") if self.threads else None
        self.slots = threading.BoundedSemaphore(max_pending or max(16, 8 * self.threads))
        self.pending: list[Future] = []

    def submit(self, task: Callable, *args: Any) -> Future:
        if self.pool is None:
            done: Future = Future()
            done.set_result(task(*args))
            return done
        self.slots.acquire()
        try:
            future = self.pool.submit(task, *args)
        except BaseException:
            self.slots.release()
            raise
        future.add_done_callback(lambda _: self.slots.release())
        self.pending = [f for f in self.pending if not f.done() or f.exception() is not None] + [future]
        return future

    def wait(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, Future) else value


def _then(future: Future, step: Callable[[Any], Any]) -> Future:
    """A Future of ``step(future.result())`` (or of its exception), set when ``future`` is done."""
    chained: Future = Future()

    def done(source: Future) -> None:
        error = source.exception()
        chained.set_exception(error) if error is not None else chained.set_result(step(source.result()))

    future.add_done_callback(done)
    return chained


class ProgressReport:
    """Evaluator handler: progress where people wait, for inference and evaluation alike.

    A progress bar over the input files (for :class:`FolderEvaluator`; otherwise over the images), with the images
    done and the files failed in its postfix; one line per file that failed (the file and the cause) as it happens;
    and at the end a summary: images, files, seconds, images per second, and the files that failed. With a
    ``writer`` the summary waits for its pending work, so attach this handler after the writers.
    """

    def __init__(self, desc: str = "inference", progress: bool = True, writer: BackgroundWriter | None = None) -> None:
        self.desc, self.progress, self.writer = desc, progress, writer
        self.bar = None
        self.started, self.images = 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        from tqdm import tqdm

        self.started, self.images = time.perf_counter(), 0
        loader = getattr(engine, "data_loader", None)
        total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
        unit = "file" if isinstance(engine, FolderEvaluator) else "image"
        self.bar = tqdm(total=total, desc=self.desc, unit=unit, disable=not self.progress, dynamic_ncols=True)

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output
        self.images += len(output) if isinstance(output, list) else 1
        failures = getattr(engine.state, "batch_failed", [])
        if failures:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():  # each line above the bar, not through it
                for failure in failures:
                    logger.error(f"{failure['file']}: skipped: {failure['reason']}")
        if self.bar is not None:
            self.bar.update(getattr(engine.state, "files_done", self.images) - self.bar.n)
            self.bar.set_postfix(images=self.images, failed=len(getattr(engine.state, "failed", [])))

    def _completed(self, engine: Engine) -> None:
        if self.writer is not None:
            self.writer.wait()
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.started
        failed = getattr(engine.state, "failed", [])
        files = getattr(engine.state, "files_done", self.images) - len(failed)
        message = (
            f"{self.desc}: {self.images} images from {files} files in {seconds:.1f} s "
            f"({self.images / seconds if seconds > 0 else float('nan'):.2f} images/s)"
        )
        if failed:
            logger.error(
                f"{message}; {len(failed)} file(s) failed and were skipped: "
                + ", ".join(Path(f["file"]).name for f in failed)
            )
        else:
            logger.info(message)


def exit_on_failures(evaluator: Engine) -> None:
    """End the command with exit status 1 and one line when any input file failed (after everything else ran)."""
    failed = getattr(evaluator.state, "failed", [])
    if failed:
        raise SystemExit(
            f"{len(failed)} input file(s) could not be processed (see the lines above): "
            + "; ".join(f"{f['file']}: {f['reason']}" for f in failed)
        )


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


def ellipse_points_px(fit: dict, pixel_size: Sequence[float]) -> np.ndarray:
    """(N, 2) pixel coordinates (x, y) along a fitted ellipse given in physical units with pixel size (sx, sy)."""
    a, b, theta = fit["semi_axes_a_mm"], fit["semi_axes_b_mm"], fit["angle_rad"]
    t = np.linspace(0.0, 2.0 * np.pi, max(64, int(4 * (a + b) / min(pixel_size) * np.pi)), endpoint=False)
    x = fit["center_x_mm"] + a * np.cos(t) * math.cos(theta) - b * np.sin(t) * math.sin(theta)
    y = fit["center_y_mm"] + a * np.cos(t) * math.sin(theta) + b * np.sin(t) * math.cos(theta)
    return np.stack([x / pixel_size[0], y / pixel_size[1]], axis=1)


def display_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is at most ``max_size`` (None: unchanged; never enlarged)."""
    if not max_size or max(width, height) <= max_size:
        return width, height
    scale = max_size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def overlay_rgb(
    image: torch.Tensor,
    pred: torch.Tensor,
    alpha: float = 0.35,
    ellipse: np.ndarray | None = None,
    max_size: int | None = None,
    flags: Sequence[str] = (),
) -> np.ndarray:
    """Tint each predicted class over the image and draw its boundary; MONAI (C, W, H) inputs, (H, W, 3) output.

    ``ellipse``: (N, 2) pixel coordinates (x, y) of a fitted ellipse, drawn in yellow two pixels wide. ``max_size``:
    the picture is drawn with its longer side at most this many pixels (image area-averaged, mask nearest-neighbour,
    ellipse scaled). ``flags``: quality flag names written in red in the top-left corner.
    """
    rgb = _as_display(image)
    index = _as_index_map(pred)
    h, w = rgb.shape[:2]
    dw, dh = display_size(w, h, max_size)
    if (dw, dh) != (w, h):
        rgb = np.asarray(Image.fromarray(rgb).resize((dw, dh), Image.Resampling.BOX))
        index = np.asarray(Image.fromarray(index.astype(np.uint8)).resize((dw, dh), Image.Resampling.NEAREST))
        if ellipse is not None:
            ellipse = ellipse * np.array([dw / w, dh / h])
    rgb = rgb.astype(np.float32)
    for c in range(1, int(index.max(initial=0)) + 1):
        region = index == c
        colour = CLASS_COLOURS[(c - 1) % len(CLASS_COLOURS)]
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
        boundary = region & ~ndimage.binary_erosion(region, iterations=2)
        rgb[boundary] = colour
    if ellipse is not None and len(ellipse):
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            x = np.floor(ellipse[:, 0]).astype(int) + dx
            y = np.floor(ellipse[:, 1]).astype(int) + dy
            inside = (x >= 0) & (x < dw) & (y >= 0) & (y < dh)
            rgb[y[inside], x[inside]] = ELLIPSE_COLOUR
    rgb = rgb.clip(0, 255).astype(np.uint8)
    if flags:
        picture = Image.fromarray(rgb)
        draw = ImageDraw.Draw(picture)
        for i, name in enumerate(flags):
            draw.text((4, 4 + 12 * i), f"! {name}", fill=FLAG_COLOUR)
        rgb = np.asarray(picture)
    return rgb


def _source_name(item: dict, key: str, fallback: str) -> str:
    return str(getattr(item.get(key), "meta", {}).get("filename_or_obj", fallback))


class OverlayWriter:
    """Evaluator handler: writes ``<output_dir>/<stem>_overlay.png`` for every image of every iteration.

    ``image_key`` must hold the image at its original geometry (the config copies it before resizing) and
    ``pred_key`` the prediction already restored to that geometry. The ellipse and quality flags of the measurement
    a :class:`MeasurementWriter` attached before this handler left (output key ``measurement``) are drawn too. The
    picture's longer side is at most ``max_size`` pixels (None: the image's own size). With a ``writer`` the drawing
    and writing run in its thread pool.
    """

    def __init__(
        self,
        output_dir: str,
        image_key: str = "original",
        pred_key: str = "pred",
        alpha: float = 0.35,
        max_size: int | None = 512,
        writer: BackgroundWriter | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.image_key, self.pred_key, self.alpha = image_key, pred_key, alpha
        self.max_size, self.writer = max_size, writer or BackgroundWriter(0)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def write(self, image: Any, pred: Any, stem: str, measurement: Any) -> None:
        pred, measurement = _resolve(pred), _resolve(measurement) or {}
        fit, ellipse = measurement.get("fit"), None
        if fit:
            ellipse = ellipse_points_px(fit, measurement["pixel_size"])
        flags = parse_flags(fit.get("flags")) if fit else []
        picture = Image.fromarray(overlay_rgb(image, pred, self.alpha, ellipse, self.max_size, flags))
        # zlib level 1: 4x faster than PIL's default 6 on an 800 x 540 overlay, and no larger on ultrasound
        write_atomic(
            self.output_dir / f"{stem}_overlay.png",
            lambda f: picture.save(f, format="PNG", compress_level=1),
            binary=True,
        )

    def __call__(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for out, item in zip(engine.state.output, engine.state.batch):
            stem = image_stem(_source_name(item, self.image_key, "image"))
            self.writer.submit(self.write, item[self.image_key], out[self.pred_key], stem, out.get("measurement"))


class MeasurementWriter:
    """Evaluator handler: the ellipse fitted to each predicted mask, in mm where the pixel size is known.

    Writes ``measurements.csv`` and ``measurements.json`` to ``output_dir`` at the end of the run: one row per image
    with ``filename, unit, pixel_size_x_mm, pixel_size_y_mm, center_x, center_y, semi_axes_a, semi_axes_b, angle_rad,
    circumference, area, fit_residual, boundary_fraction_kept, flags`` (``unit`` is ``mm``, or ``px`` when the image
    has no pixel size; empty when no ellipse fits; ``flags`` the quality flags of
    :data:`scripts.evaluation.biometry.FLAGS`
    joined by ``;``). ``circumference`` is the head circumference for fetal-head data (``structure`` "head"), the
    abdominal one for abdomens. With ``sector_key`` (the original image) a mask touching the ultrasound sector's
    border is flagged too. With ``hc18_submission`` it also writes ``hc18_submission.csv`` in the challenge's format
    (every image needs a pixel size). The fit is left in each output item under ``measurement`` for
    :class:`OverlayWriter` (a Future when a ``writer`` runs the fits in its thread pool). Attach it before the
    OverlayWriter; ``pred_key`` holds the class-index mask at the original geometry.
    """

    COLUMNS = ("filename", "unit", "pixel_size_x_mm", "pixel_size_y_mm") + tuple(
        c.removesuffix("_mm").removesuffix("_mm2") for c in MEASUREMENT_COLUMNS
    )

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        image_key: str = "image",
        pixel_size_key: str = "pixel_size_mm",
        hc18_submission: bool = False,
        structure: str | None = "head",
        sector_key: str | None = None,
        writer: BackgroundWriter | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key, self.pixel_size_key = pred_key, image_key, pixel_size_key
        self.hc18_submission, self.structure, self.sector_key = hc18_submission, structure, sector_key
        self.writer = writer or BackgroundWriter(0)
        self.rows: list[Any] = []  # rows, or Futures of rows while the writer's threads measure

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def measure(self, pred: Any, pixel_size: Any, filename: str, image: Any = None) -> tuple[dict, dict | None]:
        """One row, and the fit (in mm, or px without a pixel size), for a (1, X, Y) index or (C, X, Y) mask;
        ``image`` (C, X, Y), when given, for the sector-border flag."""
        pred = torch.as_tensor(pred).detach().cpu()
        foreground = (channel_argmax(pred, 0)[0] > 0) if pred.shape[0] > 1 else (pred[0] > 0)
        size = pixel_size_pair(pixel_size)
        sector = field_of_view(torch.as_tensor(image).detach().cpu().numpy()) if image is not None else None
        fit = fit_ellipse(foreground.numpy(), size, structure=self.structure, field_of_view=sector)
        row: dict[str, Any] = dict.fromkeys(self.COLUMNS)
        row.update(filename=filename, unit="mm" if size else "px")
        if size:
            row["pixel_size_x_mm"], row["pixel_size_y_mm"] = size
        if fit:
            for column in MEASUREMENT_COLUMNS:
                row[column.removesuffix("_mm").removesuffix("_mm2")] = fit[column]
        return row, fit

    def _measure_item(self, pred: Any, size: Any, filename: str, image: Any) -> tuple[dict, dict]:
        try:
            row, fit = self.measure(_resolve(pred), size, filename, image)
        except Exception as error:  # noqa: BLE001 - the mask is written; one failed fit does not stop the folder
            logger.error(f"{filename}: no measurement: {failure_reason(error)}")
            row, fit = {**dict.fromkeys(self.COLUMNS), "filename": filename, "unit": ""}, None
        return row, {"fit": fit, "pixel_size": pixel_size_pair(size) or (1.0, 1.0)}

    def __call__(self, engine: Engine) -> None:
        for out, item in zip(engine.state.output, engine.state.batch):
            filename = Path(_source_name(item, self.image_key, f"image_{len(self.rows):04d}")).name
            image = item.get(self.sector_key) if self.sector_key else None
            done = self.writer.submit(
                self._measure_item, out[self.pred_key], item.get(self.pixel_size_key), filename, image
            )
            self.rows.append(done)
            out["measurement"] = _then(done, lambda result: result[1])

    def write(self, engine: Engine | None = None) -> None:
        self.rows = [r.result()[0] if isinstance(r, Future) else r for r in self.rows]
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

            def value(row, column):
                return 0.0 if row[column.removesuffix("_mm")] is None else row[column.removesuffix("_mm")]

            submission = [
                {"filename": r["filename"], **{c: value(r, c) for c in HC18_SUBMISSION_COLUMNS[1:]}} for r in rows
            ]
            write_atomic(
                self.output_dir / "hc18_submission.csv", lambda f: table(f, HC18_SUBMISSION_COLUMNS, submission)
            )
