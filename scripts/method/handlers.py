"""Ignite handlers of the evaluation path: per-image metrics written as a table, a summary and a picture."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.networks.utils import one_hot

from scripts.evaluation.biometry import fit_ellipse
from scripts.evaluation.metrics import paper_grid_metrics, pixel_size_pair, segmentation_metrics
from scripts.utils.files import write_atomic

__all__ = ["MetricsWriter", "TrainingCurves", "track_loss_terms", "write_atomic"]

logger = logging.getLogger(__name__)

METRIC_COLUMNS = ("dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm")
CIRCUMFERENCE_COLUMNS = ("circumference_mm", "circumference_ref_mm", "circumference_abs_error_mm")


def _as_onehot(x: Any, num_classes: int, what: str, filename: str) -> torch.Tensor:
    """(C, X, Y) one-hot as is; a (1, X, Y) or (X, Y) index map is one-hot encoded to ``num_classes`` channels."""
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{filename}: {what} must be (C, X, Y) one-hot or a (1, X, Y) index map: {tuple(x.shape)}.")
    if x.shape[0] == num_classes:
        return x.float()
    if x.shape[0] == 1:
        values = torch.unique(x)
        if bool(((values < 0) | (values >= num_classes) | (values != values.round())).any()):
            raise ValueError(
                f"{filename}: {what} index map holds values {values.tolist()}, expected integers in [0, {num_classes})."
            )
        return one_hot(x[None].long(), num_classes, dim=1)[0]
    raise ValueError(f"{filename}: {what} has {x.shape[0]} channels; expected {num_classes} (one-hot) or 1 (indices).")


def _filename(item: dict, batch_item: dict | None, pred: Any, image_key: str) -> str | None:
    """``filename_or_obj`` from the prediction's meta, else the image's (output item, then batch item)."""
    sources = [item.get(image_key)] + ([batch_item.get(image_key)] if batch_item else [])
    for source in [pred, *sources]:
        if isinstance(source, (str, os.PathLike)):
            return str(source)
        name = (getattr(source, "meta", None) or {}).get("filename_or_obj")
        if name:
            return str(name)
    if batch_item and isinstance(batch_item.get(f"{image_key}_meta_dict"), dict):
        name = batch_item[f"{image_key}_meta_dict"].get("filename_or_obj")
        return str(name) if name else None
    return None


def _known(value: Any) -> float | None:
    """A reference number as a float, None when absent or NaN (unknown)."""
    if value is None:
        return None
    value = float(torch.as_tensor(value).reshape(-1)[0])
    return value if math.isfinite(value) else None


def _items(data: Any) -> list:
    """Per-image items of ``engine.state.output`` or ``.batch``: already a list when the workflow decollates."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return decollate_batch(data, detach=True)
    return []


class MetricsWriter:
    """Per-image Dice, HD95 and ASD of an evaluator run, written to ``<output_dir>/metrics.{csv,json,png}``.

    Attach to a MONAI ``SupervisedEvaluator`` (``validate#handlers`` or ``evaluator`` handlers in a bundle config).
    On every ``ITERATION_COMPLETED`` it scores each image of ``engine.state.output`` (decollated items, or a batch
    dict) with :func:`scripts.evaluation.metrics.segmentation_metrics`: ``pred`` is one-hot (``AsDiscreted(argmax=True,
    to_onehot=C)``); ``label`` is one-hot or an index map; the pixel size is ``pixel_size_key`` of the batch item
    (or the output item), unknown when absent. On ``EPOCH_COMPLETED`` it writes, each file atomically:

    - ``metrics.csv``: one row per image: ``filename, dice, hd95_px, asd_px, hd95_mm, asd_mm, empty_prediction``
      (mm cells empty when the pixel size is unknown), then per-class columns ``<metric>_<class name>`` when there
      is more than one scored class;
    - ``metrics.json``: ``{"per_image", "mean", "std", "n_images", "n_empty_predictions", "n_failures",
      "n_images_with_pixel_size"}``; means and population standard deviations over images, empty predictions
      included with their worst distances; mm statistics over the images with a known pixel size;
    - ``metrics.png``: the per-image distributions, when ``plot`` is on.

    With ``measure_circumference`` (the default) each row also holds the circumference of the ellipse fitted to the
    predicted foreground (:func:`scripts.evaluation.biometry.fit_ellipse`; every non-background class together), the
    reference circumference (the item's ``reference_circumference_key``, e.g. HC18's ``hc_mm`` from its CSV, else the
    ellipse fitted to the label) and their absolute difference in mm: the HC18 challenge metric. The cells are empty
    where the pixel size is unknown; an image whose prediction gives no ellipse counts in ``n_circumference_failures``.

    Args:
        output_dir: folder for the files (created if missing).
        num_classes: classes including background, to one-hot index maps; default: the prediction's channels.
        include_background: also score channel 0.
        class_names: names of the scored classes for the per-class columns; default ``class<index>``.
        pred_key, label_key, image_key, pixel_size_key: keys of the output/batch items.
        file_prefix: base name of the written files.
        plot: also write ``<file_prefix>.png``.
        measure_circumference: add the circumference columns; reference_circumference_key: the item key(s) of a
            reference circumference in mm (HC18's ``hc_mm``, ACOUSLIC's ``ac_mm``; the first known one is used
            before the label's own ellipse; NaN is unknown). ellipse_method: ``fit_ellipse``'s method for the
            prediction ("ransac", or "least_squares" over every boundary point; the label's ellipse always uses
            "least_squares").
        grid_size: the network grid (``spatial_size``); when given, each row also holds the paper's definitions,
            ``hd95_medpy_grid_px`` and ``asd_medpy_grid_px`` of the foreground on that grid
            (:func:`scripts.evaluation.metrics.paper_grid_metrics`).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_classes: int | None = None,
        include_background: bool = False,
        class_names: Sequence[str] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        pixel_size_key: str = "pixel_size_mm",
        file_prefix: str = "metrics",
        plot: bool = True,
        measure_circumference: bool = True,
        ellipse_method: str = "ransac",
        reference_circumference_key: str | Sequence[str] | None = ("hc_mm", "ac_mm"),
        grid_size: Sequence[int] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_classes = num_classes
        self.include_background = include_background
        self.class_names = list(class_names) if class_names is not None else None
        self.pred_key, self.label_key, self.image_key = pred_key, label_key, image_key
        self.pixel_size_key = pixel_size_key
        self.file_prefix = file_prefix
        self.plot = plot
        self.measure_circumference = measure_circumference
        self.ellipse_method = ellipse_method
        self.reference_circumference_key = reference_circumference_key
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def iteration_completed(self, engine: Engine) -> None:
        outputs, batch = _items(engine.state.output), _items(engine.state.batch)
        for i, item in enumerate(outputs):
            batch_item = batch[i] if i < len(batch) and isinstance(batch[i], dict) else None
            self.rows.append(self.score(item, batch_item))

    def score(self, item: dict, batch_item: dict | None = None) -> dict[str, Any]:
        """One CSV row for one decollated output item (and its batch item, for the pixel size and file name)."""
        pred = item[self.pred_key]
        filename = _filename(item, batch_item, pred, self.image_key) or f"image_{len(self.rows):04d}"
        num_classes = self.num_classes or int(torch.as_tensor(pred).shape[0])
        if num_classes < 2:
            raise ValueError(f"{filename}: a 1-channel prediction does not give the class count; set num_classes.")
        pred = _as_onehot(pred, num_classes, "prediction", filename)
        label = _as_onehot(item[self.label_key], num_classes, "label", filename)
        pixel_size = pixel_size_pair(self._lookup(item, batch_item, self.pixel_size_key))
        result = segmentation_metrics(pred, label, pixel_size, self.include_background)

        row: dict[str, Any] = {"filename": filename}
        row.update({k: result[k] for k in METRIC_COLUMNS})
        if self.grid_size is not None:
            row.update(paper_grid_metrics(pred[1:].sum(0) > 0, label[1:].sum(0) > 0, self.grid_size))
        if self.measure_circumference:
            keys = self.reference_circumference_key
            keys = [keys] if isinstance(keys, str) or keys is None else keys
            reference = next(
                (v for v in (_known(self._lookup(item, batch_item, k)) for k in keys) if v is not None), None
            )
            row.update(self._circumferences(pred, label, pixel_size, reference))
        row["empty_prediction"] = result["empty_prediction"]
        row["failure"] = result["failure"]
        if len(result["per_class"]) > 1:
            for name, values in zip(self._class_names(result["per_class"]), result["per_class"].values()):
                row.update({f"{k}_{name}": values[k] for k in (*METRIC_COLUMNS, "empty_prediction")})
        return row

    @staticmethod
    def _lookup(item: dict, batch_item: dict | None, key: str | None) -> Any:
        """``key`` of the batch item, else of the output item; None when absent or no key."""
        if key is None:
            return None
        value = batch_item.get(key) if batch_item else None
        return item.get(key) if value is None else value

    def _circumferences(self, pred: torch.Tensor, label: torch.Tensor, pixel_size, reference: Any) -> dict[str, Any]:
        """Predicted and reference ellipse circumferences (mm) and their absolute difference; None where unknown."""
        if pixel_size is None:
            return dict.fromkeys(CIRCUMFERENCE_COLUMNS)
        fit = fit_ellipse((pred[1:].sum(0) > 0).numpy(), pixel_size, method=self.ellipse_method)
        if reference is not None:
            ref = reference
        else:
            label_fit = fit_ellipse((label[1:].sum(0) > 0).numpy(), pixel_size, method="least_squares")
            ref = label_fit["circumference_mm"] if label_fit else None
        value = fit["circumference_mm"] if fit else None
        error = abs(value - ref) if value is not None and ref is not None else None
        return dict(zip(CIRCUMFERENCE_COLUMNS, (value, ref, error)))

    def _class_names(self, per_class: dict[int, Any]) -> list[str]:
        if self.class_names is None:
            return [f"class{c}" for c in per_class]
        if len(self.class_names) != len(per_class):
            raise ValueError(f"class_names has {len(self.class_names)} names for {len(per_class)} scored classes.")
        return self.class_names

    def summary(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Means and population standard deviations over images of every numeric column, and the counts."""
        rows = self.rows if rows is None else rows
        numeric = [k for k in rows[0] if k != "filename" and not isinstance(rows[0][k], bool)] if rows else []
        mean, std = {}, {}
        for k in numeric:
            values = np.asarray([r[k] for r in rows if r[k] is not None], dtype=np.float64)
            mean[k] = float(values.mean()) if values.size else None
            std[k] = float(values.std()) if values.size else None
        return {
            "per_image": rows,
            "mean": mean,
            "std": std,
            "n_images": len(rows),
            "n_empty_predictions": sum(bool(r["empty_prediction"]) for r in rows),
            "n_failures": sum(bool(r["failure"]) for r in rows),
            "n_images_with_pixel_size": sum(r["hd95_mm"] is not None for r in rows),
            "n_circumference_failures": sum(
                r.get("circumference_ref_mm") is not None and r.get("circumference_mm") is None for r in rows
            ),
        }

    def epoch_completed(self, engine: Engine) -> None:
        rows = self._gather(self.rows)
        if rows is None:  # not the writing rank
            return
        if not rows:
            logger.warning("MetricsWriter: no image was scored; %s is left as it was.", self.output_dir)
            return
        summary = self.summary(rows)
        prefix = self.output_dir / self.file_prefix
        write_atomic(prefix.with_suffix(".csv"), lambda f: self._write_csv(f, rows))
        write_atomic(prefix.with_suffix(".json"), lambda f: json.dump(summary, f, indent=2, allow_nan=False))
        if self.plot:
            write_atomic(prefix.with_suffix(".png"), lambda f: self._write_plot(f, summary), binary=True)
        m = summary["mean"]
        unit = "mm" if m.get("hd95_mm") is not None else "px"
        circumference = m.get("circumference_abs_error_mm")
        logger.info(
            "%d images, %d empty predictions: Dice %.4f, HD95 %.2f %s, ASD %.2f %s%s -> %s.csv/.json",
            summary["n_images"],
            summary["n_empty_predictions"],
            m["dice"],
            m[f"hd95_{unit}"],
            unit,
            m[f"asd_{unit}"],
            unit,
            "" if circumference is None else f", circumference error {circumference:.2f} mm",
            prefix,
        )

    @staticmethod
    def _gather(rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """All ranks' rows on rank 0 (``None`` elsewhere); the rows as they are without torch.distributed."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return rows
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        return [r for part in parts for r in part] if torch.distributed.get_rank() == 0 else None

    @staticmethod
    def _write_csv(f: IO, rows: list[dict[str, Any]]) -> None:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else int(v) if isinstance(v, bool) else v) for k, v in row.items()})

    @staticmethod
    def _write_plot(f: IO, summary: dict[str, Any]) -> None:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

        rows = summary["per_image"]
        unit = "mm" if summary["n_images_with_pixel_size"] == summary["n_images"] else "px"
        panels = [("dice", "Dice"), (f"hd95_{unit}", f"HD95 ({unit})"), (f"asd_{unit}", f"ASD ({unit})")]
        fig = Figure(figsize=(9, 3.2), layout="constrained")
        axes = fig.subplots(1, len(panels))
        rng = np.random.default_rng(0)
        for ax, (key, title) in zip(axes, panels):
            values = np.asarray([r[key] for r in rows], dtype=np.float64)
            empty = np.asarray([r["empty_prediction"] for r in rows], dtype=bool)
            ax.boxplot(values, widths=0.5, showfliers=False)
            x = 1 + rng.uniform(-0.15, 0.15, size=values.size)
            ax.scatter(x[~empty], values[~empty], s=10, alpha=0.7)
            if empty.any():
                ax.scatter(x[empty], values[empty], s=18, marker="x", color="red", label="empty prediction")
                ax.legend(loc="best", fontsize=7)
            ax.set_title(f"{title}: {np.mean(values):.3g} ± {np.std(values):.2g}")
            ax.set_xticks([])
        fig.suptitle(f"{summary['n_images']} images, {summary['n_empty_predictions']} empty predictions")
        fig.savefig(f, format="png", dpi=100)


class TrainingCurves:
    """Record the loss terms of every training iteration and the metrics of every validation, and draw them.

    Writes ``<output_dir>/training_curves.png`` (loss terms and validation metrics against the iteration) and
    ``<output_dir>/validation.csv`` after every validation, so a long run can be watched while it goes.
    ``attach(trainer, evaluator)`` is called from the config's ``run`` list (the two engines reference each other).
    """

    def __init__(self, output_dir: str | os.PathLike, output_transform: Callable[[Any], dict] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_transform = output_transform
        self.losses: dict[str, list[tuple[int, float]]] = {}
        self.validation: list[dict[str, float]] = []

    def attach(self, trainer: Engine, evaluator: Engine) -> None:
        self.trainer = trainer
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._record_iteration)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._record_validation)

    def _record_iteration(self, engine: Engine) -> None:
        output = engine.state.output
        terms = self.output_transform(output) if self.output_transform else output
        for key, value in terms.items():
            if not key.startswith("w_") and key != "lr":
                self.losses.setdefault(key, []).append((engine.state.iteration, float(value)))

    def _record_validation(self, engine: Engine) -> None:
        row = {"iteration": self.trainer.state.iteration}
        row.update({k: float(v) for k, v in engine.state.metrics.items() if np.isscalar(v) or torch.is_tensor(v)})
        self.validation.append(row)
        self.write()

    def write(self) -> None:
        if idist.get_rank() != 0:  # distributed: rank 0 writes the curves
            return
        if self.validation:
            fields = list(self.validation[0])

            def write_csv(f):
                writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self.validation)

            write_atomic(self.output_dir / "validation.csv", write_csv)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4), dpi=100)
        ax_loss, ax_val = fig.subplots(1, 2)
        for key, points in sorted(self.losses.items()):
            it, val = np.array(points).T
            window = max(1, len(val) // 50)
            smooth = np.convolve(val, np.ones(window) / window, mode="valid")
            ax_loss.plot(it[window - 1 :], smooth, label=key, lw=1.2)
        ax_loss.set(xlabel="iteration", ylabel="loss (moving average)", title="training loss terms", yscale="log")
        ax_loss.legend(fontsize=7, ncol=2)
        its = [r["iteration"] for r in self.validation]
        ax_dist = ax_val.twinx()  # Dice on the left axis, distances in pixels on the right
        keys = [k for k in (self.validation[0] if self.validation else {}) if k != "iteration"]
        for colour, key in enumerate(keys):
            axis, style = (ax_val, "-") if "dice" in key else (ax_dist, "--")
            axis.plot(its, [r[key] for r in self.validation], style, color=f"C{colour}", marker="o", ms=3, label=key)
        ax_val.set(xlabel="iteration", ylabel="Dice", title="validation (deployed UNeXt)", ylim=(0, 1))
        ax_dist.set_ylabel("distance (px)")
        handles, labels = (sum(pair, []) for pair in zip(*(a.get_legend_handles_labels() for a in (ax_val, ax_dist))))
        if handles:
            ax_val.legend(handles, labels, fontsize=7, loc="center right")
        fig.tight_layout()
        write_atomic(self.output_dir / "training_curves.png", lambda f: fig.savefig(f, format="png"), binary=True)


def track_loss_terms(handlers: Sequence[Any], params: dict | None = None) -> int:
    """Make MONAI's MLflow tracking (``monai.bundle run --tracking mlflow``) log what this trainer computes.

    MONAI appends to ``train#handlers`` an ``MLFlowHandler`` that logs ``output["loss"]`` only. Each one found in
    ``handlers`` then logs every loss term and weight of :func:`scripts.method.trainer.loss_terms` per iteration, and
    ``params`` (the run's settings) as the MLflow run's parameters. Returns how many it changed (0 without tracking).
    """
    from monai.handlers import MLFlowHandler

    from scripts.method.trainer import loss_terms

    found = [h for h in handlers if isinstance(h, MLFlowHandler)]
    for handler in found:
        handler.output_transform = loss_terms
        handler.experiment_param = {**(handler.experiment_param or {}), **(params or {})}
    return len(found)
