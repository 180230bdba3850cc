"""Segmentation metrics for fetal ultrasound: Dice, HD95 and ASD, in pixels and in mm, with failures counted.

Rules (the reference implementation drops images whose prediction is empty; we do not):

- per foreground class, both prediction and label empty: Dice 1, distances 0;
- exactly one of them empty (a missed structure, or a structure predicted where there is none): a failure,
  Dice 0 and the worst distance, the image diagonal: ``sqrt(X**2 + Y**2)`` pixels, ``sqrt((X sx)**2 + (Y sy)**2)`` mm;
- otherwise MONAI's functional metrics: ``compute_dice``, ``compute_hausdorff_distance(percentile=95)``
  (the larger of the two directed 95th percentiles) and ``compute_average_surface_distance(symmetric=True)``
  (mean over the boundary points of both masks of the distance to the other mask's boundary).

Beside these, the paper's own definitions (MedPy's ``hd95`` and ``asd``, which the authors' evaluation uses) on the
network grid in pixels, so that our figures can be set beside the paper's (:func:`paper_grid_metrics`):

- ``hd95_medpy_grid_px``: the 95th percentile of the *pooled* boundary distances of both directions (MONAI's HD95
  takes the larger of the two directed 95th percentiles instead);
- ``asd_medpy_grid_px``: the mean distance from the *prediction's* boundary to the label's (one direction; MONAI's
  symmetric ASD averages both);
- boundaries are the pixels removed by one erosion with the 4-connected cross, distances are Euclidean, and both
  masks are first resized (nearest) to the network grid (``spatial_size``): the authors score at 448 x 448 pixels.
  An image with exactly one empty mask scores the grid diagonal, as the rules above.

Arrays follow MONAI: one-hot ``(C, X, Y)`` per image, channel 0 the background, and a pixel size ``[sx, sy]`` in mm
in the same spatial order. The Ignite handlers :class:`FetalDice`, :class:`FetalHD95` and :class:`FetalASD` apply the
same rules inside a MONAI evaluator, so training validation and final evaluation cannot disagree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler
from monai.metrics import (
    CumulativeIterationMetric,
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = [
    "PixelSize",
    "pixel_size_pair",
    "user_pixel_size",
    "pixel_sizes_from_batch",
    "pixel_sizes_from_engine_batch",
    "worst_distance",
    "segmentation_metrics",
    "medpy_surface_distances",
    "medpy_hd95",
    "medpy_asd",
    "paper_grid_metrics",
    "SegmentationMetric",
    "FetalSegmentationMetricHandler",
    "FetalDice",
    "FetalHD95",
    "FetalASD",
]

PixelSize = tuple[float, float]
METRICS = ("dice", "hd95", "asd")
HD_PERCENTILE = 95.0
# MONAI warns about every empty mask; the rules above define those cases, so the warning is noise here.
_EMPTY_MASK_WARNING = r"the (ground truth|prediction) of class .* is all 0"


def _scalars(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    if isinstance(value, (list, tuple)):
        return np.asarray([_scalars(v) for v in value], dtype=np.float64)
    return np.asarray(value, dtype=np.float64)


def _valid_or_none(row: np.ndarray) -> PixelSize | None:
    """A pixel size with a non-finite or non-positive entry is unknown (the placeholder that lets a batch collate)."""
    if not (np.all(np.isfinite(row)) and np.all(row > 0)):
        return None
    return float(row[0]), float(row[1])


def pixel_size_pair(value: Any) -> PixelSize | None:
    """One image's pixel size ``[sx, sy]`` (list, tuple, array, tensor, or a pair of 0-d tensors) as floats.

    ``None``, NaN, inf or non-positive entries mean "unknown" and give ``None``.
    """
    if value is None:
        return None
    row = _scalars(value).reshape(-1)
    if row.shape != (2,):
        raise ValueError(f"pixel size must be a pair [sx, sy] in mm, got shape {tuple(_scalars(value).shape)}.")
    return _valid_or_none(row)


def user_pixel_size(value: Any, what: str = "pixel_size_mm") -> PixelSize | None:
    """A pixel size the user gave: None, one number for square pixels, or ``[sx, sy]``; anything else is an error."""
    if value is None:
        return None
    pair = pixel_size_pair([value, value] if np.isscalar(value) else value)
    if pair is None:
        raise ValueError(f"{what} must be a positive number or two ([sx, sy] in mm), got {value!r}")
    return pair


def pixel_sizes_from_batch(value: Any, batch_size: int) -> list[PixelSize | None]:
    """Per-image pixel sizes from a collated batch value, one ``(sx, sy)`` or ``None`` per image.

    Accepted forms: ``None`` (all unknown); MONAI's collation of per-image ``[sx, sy]`` lists, i.e. a list of two
    tensors of shape ``(B,)``; a ``(B, 2)`` tensor or array; a plain pair ``[sx, sy]`` when ``batch_size == 1``.
    A list of per-image pairs is not accepted here because for ``B == 2`` it cannot be told apart from the
    collated form; read decollated items one at a time with :func:`pixel_size_pair` instead.
    """
    if value is None:
        return [None] * batch_size
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_scalars(v).ndim == 1 for v in value):
        table = np.stack([_scalars(value[0]), _scalars(value[1])], axis=-1)  # MONAI collation: [sx(B,), sy(B,)]
    else:
        table = _scalars(value)
    if table.shape == (2,) and batch_size == 1:
        table = table[None]
    if table.shape != (batch_size, 2):
        raise ValueError(
            f"pixel size for a batch of {batch_size} must be a (B, 2) tensor, a list of two (B,) tensors "
            f"or, for one image, a pair [sx, sy]; got shape {table.shape}."
        )
    return [_valid_or_none(row) for row in table]


def pixel_sizes_from_engine_batch(batch: Any, key: str, batch_size: int) -> list[PixelSize | None]:
    """Per-image pixel sizes from ``engine.state.batch``: a decollated list of item dicts or a collated dict."""
    if isinstance(batch, (list, tuple)):
        if len(batch) != batch_size:
            raise ValueError(f"engine batch holds {len(batch)} items but the output holds {batch_size}.")
        return [pixel_size_pair(item.get(key)) if isinstance(item, dict) else None for item in batch]
    if isinstance(batch, dict):
        return pixel_sizes_from_batch(batch.get(key), batch_size)
    return [None] * batch_size


def worst_distance(spatial_shape: Sequence[int], spacing: PixelSize | None = None) -> float:
    """The distance charged to a failed class: the image diagonal, ``sqrt(sum_i (n_i s_i)^2)``, unit spacing if None."""
    scale = (1.0,) * len(spatial_shape) if spacing is None else spacing
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial_shape, scale))))


def medpy_surface_distances(result: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distances from each boundary pixel of ``result`` to the nearest boundary pixel of ``reference`` (MedPy's rule).

    A boundary pixel is a mask pixel that one binary erosion with the 4-connected cross removes; both masks must be
    non-empty. Written with SciPy (MedPy itself is only a test dependency: it pulls in SimpleITK).
    """
    from scipy import ndimage

    result, reference = np.asarray(result, dtype=bool), np.asarray(reference, dtype=bool)
    if not result.any() or not reference.any():
        raise ValueError("surface distances need two non-empty masks")
    cross = ndimage.generate_binary_structure(result.ndim, 1)
    result_border = result ^ ndimage.binary_erosion(result, structure=cross, iterations=1)
    reference_border = reference ^ ndimage.binary_erosion(reference, structure=cross, iterations=1)
    return ndimage.distance_transform_edt(~reference_border)[result_border]


def medpy_hd95(result: np.ndarray, reference: np.ndarray) -> float:
    """95th percentile of the boundary distances of both directions pooled (``medpy.metric.binary.hd95``)."""
    pooled = np.hstack((medpy_surface_distances(result, reference), medpy_surface_distances(reference, result)))
    return float(np.percentile(pooled, HD_PERCENTILE))


def medpy_asd(result: np.ndarray, reference: np.ndarray) -> float:
    """Mean distance from the boundary of ``result`` (the prediction) to that of ``reference``
    (``medpy.metric.binary.asd``)."""
    return float(medpy_surface_distances(result, reference).mean())


def paper_grid_metrics(
    pred_mask: np.ndarray | torch.Tensor, label_mask: np.ndarray | torch.Tensor, grid_size: Sequence[int]
) -> dict[str, float]:
    """``hd95_medpy_grid_px`` and ``asd_medpy_grid_px`` of two foreground masks, both resized (nearest) to
    ``grid_size`` first; exactly one empty mask scores the grid diagonal, both empty 0."""
    resized = []
    for mask in (pred_mask, label_mask):
        mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        if tuple(mask.shape) != tuple(grid_size):
            mask = torch.nn.functional.interpolate(mask[None, None], size=tuple(grid_size), mode="nearest")[0, 0]
        resized.append(mask.numpy() > 0)
    pred, label = resized
    if pred.any() and label.any():
        return {"hd95_medpy_grid_px": medpy_hd95(pred, label), "asd_medpy_grid_px": medpy_asd(pred, label)}
    worst = 0.0 if pred.any() == label.any() else worst_distance(grid_size)
    return {"hd95_medpy_grid_px": worst, "asd_medpy_grid_px": worst}


def _check_onehot(name: str, x: torch.Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be one image, one-hot (C, X, Y); got shape {tuple(x.shape)}.")
    if not bool(torch.all((x == 0) | (x == 1))):
        raise ValueError(f"{name} must be binary one-hot, as from AsDiscreted(argmax=True, to_onehot=C).")


def segmentation_metrics(
    pred_onehot: torch.Tensor | np.ndarray,
    label_onehot: torch.Tensor | np.ndarray,
    spacing: Any = None,
    include_background: bool = False,
    metrics: Sequence[str] = METRICS,
) -> dict[str, Any]:
    """Dice, HD95 and symmetric ASD of one image, per class and averaged over classes; failures are counted.

    Args:
        pred_onehot: binary one-hot prediction ``(C, X, Y)``, channel 0 background.
        label_onehot: binary one-hot label of the same shape.
        spacing: pixel size ``[sx, sy]`` in mm (x first, as the spatial axes); ``None`` when unknown.
        include_background: also score channel 0 (normally off).
        metrics: which of ``"dice", "hd95", "asd"`` to compute (the others are left out of the result).

    Empty prediction with a non-empty label, or the reverse, scores Dice 0 and the image diagonal as distance
    (:func:`worst_distance`) instead of being dropped; both empty scores Dice 1 and distance 0.

    Returns:
        ``"dice", "hd95_px", "asd_px", "hd95_mm", "asd_mm"``: means over the scored classes (mm entries ``None``
        without spacing); ``"empty_prediction"``: some class with a label has an empty prediction; ``"failure"``:
        some class is empty on exactly one side; ``"per_class"``: ``{class_index: {the same keys}}``.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {METRICS}.")
    pred = torch.as_tensor(pred_onehot).detach().cpu().float()
    label = torch.as_tensor(label_onehot).detach().cpu().float()
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape.")
    _check_onehot("prediction", pred)
    _check_onehot("label", label)
    pixel_size = pixel_size_pair(spacing) if spacing is not None else None
    if spacing is not None and pixel_size is None:
        raise ValueError(f"spacing must be two positive finite numbers [sx, sy] in mm, got {spacing}.")

    first = 0 if include_background else 1
    classes = list(range(first, pred.shape[0]))
    if not classes:
        raise ValueError(f"no class to score: {pred.shape[0]} channel(s) and include_background={include_background}.")
    pred, label = pred[first:][None], label[first:][None]  # (1, K, X, Y)

    pred_any = pred.flatten(2).any(-1)[0]
    label_any = label.flatten(2).any(-1)[0]
    failure = pred_any ^ label_any
    scored = pred_any & label_any  # both empty: distance 0, the zeros the tables start from

    values: dict[str, torch.Tensor | None] = {}  # name -> (K,) per-class values; None where undefined (no spacing)
    if "dice" in metrics:  # MONAI with ignore_empty=False already gives 1 when both are empty, 0 when one is
        values["dice"] = compute_dice(pred, label, include_background=True, ignore_empty=False)[0].double()
    units = {"px": None} if pixel_size is None else {"px": None, "mm": pixel_size}
    for name in ("hd95", "asd"):
        if name not in metrics:
            continue
        measured = _surface_distances(name, pred[:, scored], label[:, scored], pixel_size) if scored.any() else None
        for i, (unit, size) in enumerate(units.items()):
            v = torch.zeros(len(classes), dtype=torch.float64)
            v[failure] = worst_distance(pred.shape[2:], size)
            if measured is not None:
                v[scored] = measured[i]
            values[f"{name}_{unit}"] = v
        values.setdefault(f"{name}_mm", None)

    empty_prediction = ~pred_any & label_any

    def summary(index: Any) -> dict[str, Any]:
        return {k: None if v is None else float(v[index].mean()) for k, v in values.items()}

    per_class = {
        c: {**summary(k), "empty_prediction": bool(empty_prediction[k]), "failure": bool(failure[k])}
        for k, c in enumerate(classes)
    }
    return {
        **summary(slice(None)),
        "empty_prediction": bool(empty_prediction.any()),
        "failure": bool(failure.any()),
        "per_class": per_class,
    }


def _surface_distances(
    name: str, pred: torch.Tensor, label: torch.Tensor, pixel_size: PixelSize | None
) -> torch.Tensor:
    """MONAI's HD95 or symmetric ASD of (1, K, X, Y) masks, non-empty on both sides: (n_units, K), px then mm.

    Pixels and mm come from one call, the image batched twice with unit and physical spacing.
    """
    spacings = [[1.0, 1.0]] + ([[pixel_size[0], pixel_size[1]]] if pixel_size is not None else [])
    pred = pred.expand(len(spacings), -1, -1, -1)
    label = label.expand(len(spacings), -1, -1, -1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EMPTY_MASK_WARNING)
        if name == "hd95":
            result = compute_hausdorff_distance(
                pred, label, include_background=True, percentile=HD_PERCENTILE, spacing=spacings
            )
        else:
            result = compute_average_surface_distance(
                pred, label, include_background=True, symmetric=True, spacing=spacings
            )
    return result.double()


class SegmentationMetric(CumulativeIterationMetric):
    """Cumulative Dice, HD95 or ASD with the rules of :func:`segmentation_metrics` (failures scored, never dropped).

    Call it like any MONAI metric, ``metric(y_pred, y)`` or ``metric(y_pred, y, spacing=pixel_sizes)``: batch-first
    one-hot tensors ``(B, C, X, Y)`` or lists of ``(C, X, Y)``. Distances are in pixels without ``spacing`` and in mm
    with it (see :func:`pixel_sizes_from_batch` for the accepted forms); an image whose pixel size is unknown gets
    NaN for a distance in mm, which the reduction skips and ``get_not_nans`` counts. Dice ignores spacing.
    The buffer holds one row per image and one column per scored class.
    """

    def __init__(
        self,
        metric: str = "dice",
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
        self.metric = metric
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _image_values(self, pred: torch.Tensor, label: torch.Tensor, pixel_size: PixelSize | None, in_mm: bool):
        if in_mm and pixel_size is None and self.metric != "dice":
            n_classes = pred.shape[0] - (0 if self.include_background else 1)
            return [float("nan")] * n_classes  # unknown physical size: no distance in mm for this image
        key = self.metric if self.metric == "dice" else f"{self.metric}_{'mm' if in_mm else 'px'}"
        result = segmentation_metrics(pred, label, pixel_size, self.include_background, metrics=(self.metric,))
        return [row[key] for row in result["per_class"].values()]

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Per-image, per-class values ``(B, K)``; kwargs ``spacing`` (a batch form) or ``pixel_sizes`` (per image)."""
        if y is None:
            raise ValueError("SegmentationMetric needs a label y.")
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred {tuple(y_pred.shape)} and y {tuple(y.shape)} must have the same shape.")
        sizes = self._per_image_sizes(kwargs, y_pred.shape[0])
        in_mm = sizes is not None
        rows = [self._image_values(p, t, s, in_mm) for p, t, s in zip(y_pred, y, sizes or [None] * len(y_pred))]
        return torch.tensor(rows, dtype=torch.float32, device=y_pred.device)

    def _compute_list(self, y_pred, y=None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        # MONAI's version passes the same kwargs to every item; hand each item its own pixel size instead.
        if y is None or len(y_pred) != len(y):
            raise ValueError("SegmentationMetric needs one label per prediction.")
        sizes = self._per_image_sizes(kwargs, len(y_pred))
        rows = [
            self._compute_tensor(p.detach()[None], t.detach()[None], **({} if sizes is None else {"pixel_sizes": [s]}))
            for p, t, s in zip(y_pred, y, sizes or [None] * len(y_pred))
        ]
        return torch.cat(rows, dim=0)

    @staticmethod
    def _per_image_sizes(kwargs: dict[str, Any], batch_size: int) -> list[PixelSize | None] | None:
        """``None`` means "report pixels"; a list (entries possibly ``None`` = unknown) means "report mm"."""
        if kwargs.get("pixel_sizes") is not None:
            sizes = list(kwargs["pixel_sizes"])
            assert len(sizes) == batch_size, f"{len(sizes)} pixel sizes for {batch_size} images"
            return sizes
        if kwargs.get("spacing") is not None:
            return pixel_sizes_from_batch(kwargs["spacing"], batch_size)
        return None

    def aggregate(self, reduction: MetricReduction | str | None = None):  # type: ignore[override]
        """Reduce the buffer (images x classes) with MONAI's NaN-skipping reductions; mean by default."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class FetalSegmentationMetricHandler(IgniteMetricHandler):
    """Ignite handler around :class:`SegmentationMetric`, for ``key_val_metric``/``additional_metrics`` of an evaluator.

    ``output_transform`` extracts ``(y_pred, y)`` as for ``monai.handlers.MeanDice``. With ``pixel_size_key`` set,
    distances are in mm, the pixel sizes being read from ``engine.state.batch[pixel_size_key]`` (decollated items
    or a collated batch; IgniteMetricHandler itself only sees ``(y_pred, y)``). Without it, pixels of the grid the
    evaluator works on.
    """

    def __init__(
        self,
        metric: str,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        pixel_size_key: str | None = None,
    ) -> None:
        metric_fn = SegmentationMetric(metric=metric, include_background=include_background, reduction=reduction)
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
        self.pixel_size_key = pixel_size_key

    def iteration_completed(self, engine) -> None:
        if self.pixel_size_key is None:
            super().iteration_completed(engine)
            return
        y_pred, y = self._output_transform(engine.state.output)
        batch_size = len(y_pred)
        self.update((y_pred, y, pixel_sizes_from_engine_batch(engine.state.batch, self.pixel_size_key, batch_size)))

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """``output`` is ``(y_pred, y)`` or ``(y_pred, y, per_image_pixel_sizes)``."""
        if len(output) == 2:
            self.metric_fn(output[0], output[1])
        elif len(output) == 3:
            self.metric_fn(output[0], output[1], pixel_sizes=output[2])
        else:
            raise ValueError(f"output must be (y_pred, y) or (y_pred, y, pixel_sizes), got {len(output)} items.")


class FetalDice(FetalSegmentationMetricHandler):
    """Mean Dice over images and foreground classes; an empty prediction scores 0, both empty score 1."""

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__("dice", include_background, reduction, output_transform, save_details)


class FetalHD95(FetalSegmentationMetricHandler):
    """Mean HD95 (pixels, or mm with ``pixel_size_key``); a failed class counts as the image diagonal."""

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        pixel_size_key: str | None = None,
    ) -> None:
        super().__init__("hd95", include_background, reduction, output_transform, save_details, pixel_size_key)


class FetalASD(FetalSegmentationMetricHandler):
    """Mean symmetric ASD (pixels, or mm with ``pixel_size_key``); a failed class counts as the image diagonal."""

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
        pixel_size_key: str | None = None,
    ) -> None:
        super().__init__("asd", include_background, reduction, output_transform, save_details, pixel_size_key)
