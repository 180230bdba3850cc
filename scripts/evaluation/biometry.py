"""Fetal biometry from a segmentation: the fitted ellipse and its circumference in mm (HC for heads, AC for abdomens).

The structure is taken as the largest connected foreground region with its holes filled; its sub-pixel boundary
(scikit-image ``find_contours`` at level 0.5) is converted to mm with the pixel size and fitted with scikit-image's
``EllipseModel`` inside scikit-image's ``ransac``: a leak into a shadow or a missing stretch of skull moves part of
the boundary off the head's ellipse, and RANSAC fits the ellipse that most boundary points agree with, then refits
it by least squares to those points alone (``method="least_squares"`` fits every boundary point, the former
behaviour). The circumference is Ramanujan's second approximation, as the HC18 challenge computes it
(van den Heuvel et al. 2018): ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))``, ``h = ((a - b) / (a + b))^2``.

Every fit reports its residual (RMS distance of the kept boundary points to the ellipse) and the fraction of boundary
points it kept, and carries quality flags (:data:`FLAGS`, :func:`quality_flags`) that say when a measurement should
not be trusted as it is.

Arrays follow the bundle's MONAI convention for 2D images: ``mask[x, y]`` (width first), pixel size ``(sx, sy)``.
Centres are in mm from the centre of pixel (0, 0); ``angle_rad`` is the direction of the semi-axis ``a`` (the longer)
from the +x axis towards +y, in [0, pi), as in the HC18 submission format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from skimage.measure import EllipseModel, find_contours, ransac

__all__ = [
    "FLAGS",
    "HC18_SUBMISSION_COLUMNS",
    "MEASUREMENT_COLUMNS",
    "PHYSIOLOGICAL_RANGE_MM",
    "ellipse_circumference",
    "ellipse_distances",
    "field_of_view",
    "fit_ellipse",
    "parse_flags",
    "quality_flags",
]

HC18_SUBMISSION_COLUMNS = ("filename", "center_x_mm", "center_y_mm", "semi_axes_a_mm", "semi_axes_b_mm", "angle_rad")
MEASUREMENT_COLUMNS = (
    "center_x_mm",
    "center_y_mm",
    "semi_axes_a_mm",
    "semi_axes_b_mm",
    "angle_rad",
    "circumference_mm",
    "area_mm2",
    "fit_residual_mm",
    "boundary_fraction_kept",
    "flags",
)

# Plausible circumference of each structure in mm; a measurement outside is flagged, never changed.
# head: the range of the reference HCs in HC18's training_set_pixel_size_and_HC.csv (999 images, about 10 to 40
#   weeks of gestation; van den Heuvel et al. 2018), 44-346 mm.
# abdomen: the ACOUSLIC-AI challenge (MICCAI 2024) gives a reference AC per sweep but publishes no range that we
#   could check here, so the band is a deliberately wide one around the fetal AC growth standard of INTERGROWTH-21st
#   (Papageorghiou et al., Lancet 2014; its centiles span roughly 7 to 40 cm from 14 to 40 weeks), 50-450 mm.
#   Give ``circumference_range_mm`` for your own population.
PHYSIOLOGICAL_RANGE_MM: dict[str, tuple[float, float]] = {"head": (44.0, 346.0), "abdomen": (50.0, 450.0)}

# the quality flags a measurement can carry, with the sentence shown to a person (overlay, SR)
FLAGS: dict[str, str] = {
    "circumference_out_of_range": "circumference outside the physiological range of the structure",
    "touches_image_border": "the mask touches the image border: the structure may be cut off",
    "touches_sector_border": "the mask touches the border of the ultrasound sector: the structure may be cut off",
    "several_components": "the mask has several sizeable components",
    "large_fit_residual": "the kept boundary points lie far from the fitted ellipse",
    "boundary_off_ellipse": "much of the mask boundary is off the fitted ellipse (a leak or a gap)",
}

# Defaults of the fit and the flags (arguments of fit_ellipse / quality_flags), chosen on drawn ellipses and the
# phantom's reference masks (docs/README.md#biometry): a clean pixel mask's sub-pixel boundary lies 0.25 px (RMS)
# from its ellipse; an outline that wobbles by 2 px still measures within 0.1 %, a leak or a notch lies far outside.
INLIER_DISTANCE_PX = 1.5  # RANSAC: a boundary point within this distance of the ellipse is kept ...
INLIER_DISTANCE_FRACTION = 0.02  # ... or within this fraction of the region's equivalent radius, if more
RANSAC_TRIALS = 300
RANSAC_POINTS = 400
RANSAC_STOP_FRACTION = 0.95  # no RANSAC when the least-squares ellipse keeps this fraction of the points
RANSAC_SEED = 0  # fixed: the same mask always gives the same measurement
MAX_FIT_RESIDUAL_PX = 1.0  # large_fit_residual: RMS distance of the kept points above this many pixels ...
MAX_FIT_RESIDUAL_FRACTION = 0.01  # ... and above this fraction of the region's equivalent radius
MIN_RANSAC_FRACTION = 0.5  # RANSAC's ellipse is used when at least this fraction of the boundary agrees with it ...
MAX_RANSAC_AREA_RATIO = 2.0  # ... and its area is at most this multiple of the region's; else least squares
MIN_FRACTION_KEPT = 0.8  # boundary_off_ellipse: fewer than this fraction of the boundary points kept
MIN_COMPONENT_FRACTION = 0.1  # several_components: another component of at least this fraction of the largest
BORDER_MARGIN_PX = 1  # touches_*_border: a foreground pixel within this many pixels of the border


def ellipse_circumference(a, b):
    """Ramanujan's second approximation of the perimeter of an ellipse with semi-axes ``a``, ``b`` (scalars or arrays).

    pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h))), h = ((a - b) / (a + b))^2; HC18 computes HC this way.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if (a < 0).any() or (b < 0).any():
        raise ValueError(f"semi-axes must be >= 0, got {a}, {b}")
    total = a + b
    h = np.divide((a - b) ** 2, total**2, out=np.zeros_like(total), where=total > 0)
    result = math.pi * total * (1.0 + 3.0 * h / (10.0 + np.sqrt(4.0 - 3.0 * h)))
    return float(result) if result.ndim == 0 else result


def ellipse_distances(points: np.ndarray, center, axes, theta: float, iterations: int = 6) -> np.ndarray:
    """Euclidean distance of each (x, y) point to the ellipse (centre, semi-axes (a, b) along theta and theta + 90°).

    The closest point is found for all points at once by the fixed-point iteration on the ellipse's evolute
    (C. Chatfield, "Simple method for distance to ellipse", blog.chatfield.io, 2017).
    Written here because scikit-image's ``EllipseModel.residuals`` solves one scipy least-squares problem per point,
    too slow for RANSAC's hundreds of trials over thousands of boundary points.
    """
    points = np.asarray(points, dtype=np.float64)
    a, b = float(axes[0]), float(axes[1])
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = points[:, 0] - center[0], points[:, 1] - center[1]
    px, py = np.abs(dx * c + dy * s), np.abs(-dx * s + dy * c)  # first quadrant of the ellipse's own frame
    tx = np.full_like(px, math.sqrt(0.5))
    ty = tx.copy()
    for _ in range(iterations):
        x, y = a * tx, b * ty
        ex, ey = (a * a - b * b) * tx**3 / a, (b * b - a * a) * ty**3 / b  # centre of curvature
        rx, ry, qx, qy = x - ex, y - ey, px - ex, py - ey
        ratio = np.hypot(rx, ry) / np.maximum(np.hypot(qx, qy), 1e-300)
        tx = np.clip((qx * ratio + ex) / a, 0.0, 1.0)
        ty = np.clip((qy * ratio + ey) / b, 0.0, 1.0)
        norm = np.hypot(tx, ty)
        tx, ty = tx / norm, ty / norm
    return np.hypot(px - a * tx, py - b * ty)


class _EllipseModel(EllipseModel):
    """scikit-image's ``EllipseModel`` (same estimate) with vectorised residuals (:func:`ellipse_distances`)."""

    def residuals(self, data):
        return ellipse_distances(data, self.center, self.axis_lengths, float(self.theta))

    def _estimate(self, data, warn_only=True):
        # scikit-image 0.26 raises TypeError (``phi %= np.pi`` on a complex number) when a degenerate sample, such
        # as RANSAC's five points nearly on a line, gives complex eigenvectors: report it as a failed estimate
        # RANSAC's degenerate samples also divide by zero inside the estimate: they are rejected, not worth a warning
        try:
            with np.errstate(all="ignore"):
                return super()._estimate(data, warn_only=warn_only)
        except TypeError as error:
            return f"degenerate sample ({error})"


def _valid_ellipse(model, *_) -> bool:
    """A fit with real, finite parameters and positive axes (a degenerate sample can give complex ones)."""
    if not model:
        return False
    values = np.array([*model.center, *model.axis_lengths, model.theta])
    return not np.iscomplexobj(values) and bool(np.isfinite(values).all()) and min(model.axis_lengths) > 0


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixel count of each label 1..n) of the 8-connected foreground regions."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, sizes


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The largest connected region with its holes filled, cropped to its bounding box, and the crop's offset."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((0, 0), bool), (0, 0)
    index = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)))) if n > 1 else 1
    box = ndimage.find_objects(labels, max_label=index)[index - 1]
    region = ndimage.binary_fill_holes(labels[box] == index)
    return region, (box[0].start, box[1].start)


def _as_2d_mask(mask: Any) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"fit_ellipse takes a 2D mask (or 1 x X x Y), got shape {mask.shape}")
    return mask != 0


def _pixel_size(pixel_size: Sequence[float] | None) -> tuple[float, float]:
    sx, sy = (1.0, 1.0) if pixel_size is None else (float(pixel_size[0]), float(pixel_size[1]))
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"pixel_size must be two positive finite numbers, got {pixel_size}")
    return sx, sy


def _inlier_distance(region: np.ndarray, pixel_size: tuple[float, float], inlier_distance_px: float) -> float:
    """RANSAC's inlier distance (mm): ``inlier_distance_px`` pixels, or INLIER_DISTANCE_FRACTION of the region's
    equivalent radius sqrt(area / pi) where that is more (a network's outline wobbles more on a larger head)."""
    pixel = (pixel_size[0] + pixel_size[1]) / 2.0
    radius = math.sqrt(float(region.sum()) / math.pi) * pixel
    return max(inlier_distance_px * pixel, INLIER_DISTANCE_FRACTION * radius)


def fit_ellipse(
    mask: Any,
    pixel_size: Sequence[float] | None = (1.0, 1.0),
    min_pixels: int = 20,
    *,
    structure: str | None = "head",
    field_of_view: np.ndarray | None = None,
    method: str = "ransac",
    inlier_distance_px: float = INLIER_DISTANCE_PX,
    circumference_range_mm: tuple[float, float] | None = None,
) -> dict | None:
    """The ellipse fitted to the largest foreground region of ``mask[x, y]`` (any non-zero value is foreground).

    Returns ``{center_x_mm, center_y_mm, semi_axes_a_mm, semi_axes_b_mm, angle_rad, circumference_mm, area_mm2,
    fit_residual_mm, boundary_fraction_kept, flags}`` (lengths in pixels when ``pixel_size`` is None), or None when
    the region is smaller than ``min_pixels`` or no ellipse fits (a straight line, say). ``fit_residual_mm`` is the
    RMS distance of the kept boundary points to the ellipse, ``boundary_fraction_kept`` the fraction of boundary
    points within ``inlier_distance_px`` of it (RANSAC's inliers; 1.0 for ``method="least_squares"``), ``flags``
    the raised :data:`FLAGS` joined by ``;`` ("" when none), from :func:`quality_flags` with ``structure`` (None:
    no range check), ``field_of_view`` (the sector as a boolean ``[x, y]`` mask, see :func:`field_of_view`; None:
    only the image border is checked) and ``circumference_range_mm``.
    """
    if method not in ("ransac", "least_squares"):
        raise ValueError(f"method must be 'ransac' or 'least_squares', got {method!r}")
    foreground = _as_2d_mask(mask)
    sx, sy = _pixel_size(pixel_size)
    region, offset = _largest_region(foreground)
    if int(region.sum()) < min_pixels:
        return None
    # pad so that a region touching the border still gives a closed contour
    contours = find_contours(np.pad(region, 1).astype(np.float32), 0.5)
    boundary = max(contours, key=len) - 1.0 + np.array(offset)  # (N, 2) in (x, y) index order of the mask
    points = boundary * np.array([sx, sy])
    if len(points) < 5:
        return None
    model = _EllipseModel.from_estimate(points)
    if not _valid_ellipse(model):
        return None
    kept = np.ones(len(points), bool)
    threshold = _inlier_distance(region, (sx, sy), inlier_distance_px)
    # a clean outline: the least-squares ellipse already keeps nearly every point, there is nothing to be robust to
    clean = method == "ransac" and (model.residuals(points) < threshold).mean() >= RANSAC_STOP_FRACTION
    if method == "ransac" and not clean:
        # the consensus is searched on at most RANSAC_POINTS evenly spaced boundary points (neighbouring contour
        # points are ~0.5 px apart and say the same); the inliers and the final fit use every point
        sample = points[:: max(1, math.ceil(len(points) / RANSAC_POINTS))]
        robust, inliers = ransac(
            sample,
            _EllipseModel,
            min_samples=5,
            residual_threshold=threshold,
            is_model_valid=_valid_ellipse,
            max_trials=RANSAC_TRIALS,
            stop_probability=0.999,
            rng=RANSAC_SEED,
        )
        if robust is not None and _valid_ellipse(robust) and inliers is not None and inliers.sum() >= 5:
            # refit on every boundary point the consensus ellipse keeps
            again = np.asarray(robust.residuals(points)) < threshold
            refit = _EllipseModel.from_estimate(points[again]) if again.sum() >= 5 else None
            candidate, agree = (refit, again) if refit is not None and _valid_ellipse(refit) else (robust, inliers)
            area = math.pi * float(np.prod(candidate.axis_lengths))
            if agree.mean() >= MIN_RANSAC_FRACTION and area <= MAX_RANSAC_AREA_RATIO * region.sum() * sx * sy:
                model, kept = candidate, agree
            # else: too little of the outline agrees on one ellipse, or that ellipse is far larger than the region
            # (an arc of a broken mask extrapolated): keep the least-squares fit of every point, which the flags mark
    (cx, cy), (r1, r2), theta = model.center, model.axis_lengths, float(model.theta)
    a, b = (r1, r2) if r1 >= r2 else (r2, r1)
    if r1 < r2:
        theta += math.pi / 2
    distances = ellipse_distances(points[kept], (cx, cy), (a, b), theta)
    fit = {
        "center_x_mm": float(cx),
        "center_y_mm": float(cy),
        "semi_axes_a_mm": float(a),
        "semi_axes_b_mm": float(b),
        "angle_rad": float(theta % math.pi),
        "circumference_mm": float(ellipse_circumference(a, b)),
        "area_mm2": float(region.sum()) * sx * sy,
        "fit_residual_mm": float(np.sqrt(np.mean(distances**2))),
        "boundary_fraction_kept": float(kept.mean()),
    }
    in_mm = pixel_size is not None
    flags = quality_flags(
        fit,
        foreground,
        (sx, sy),
        structure=structure if in_mm else None,
        field_of_view=field_of_view,
        circumference_range_mm=circumference_range_mm,
    )
    fit["flags"] = ";".join(flags)
    return fit


def parse_flags(flags: str | Iterable[str] | None) -> list[str]:
    """The flag names of a measurement's ``flags`` (the ``;``-joined text of CSV/JSON rows, or a list)."""
    if flags is None or (isinstance(flags, float) and math.isnan(flags)):
        return []
    names = flags.split(";") if isinstance(flags, str) else list(flags)
    return [str(name).strip() for name in names if str(name).strip()]


def field_of_view(image: Any, closing_px: int = 5) -> np.ndarray:
    """The ultrasound sector of a grey ``image[x, y]`` (or ``[C, x, y]``): the convex hull of the largest region of
    non-black pixels after a ``closing_px`` closing, so burned-in text beside the sector is not part of it."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image.max(axis=0)
    if image.ndim != 2:
        raise ValueError(f"field_of_view takes a 2D image (or C x X x Y), got shape {image.shape}")
    signal = ndimage.binary_closing(image > 0, structure=np.ones((3, 3), bool), iterations=closing_px, border_value=0)
    labels, sizes = _components(signal)
    if not len(sizes):
        return np.ones(image.shape, bool)
    return _convex_hull(labels == 1 + int(np.argmax(sizes)))


def _convex_hull(region: np.ndarray) -> np.ndarray:
    """The convex hull of a boolean region's pixels (as squares), as a mask of the pixels whose centres it holds.

    scikit-image's ``convex_hull_image`` gives the same hull but tests every pixel of the image against it, which
    takes tens of milliseconds per ultrasound frame; the hull's polygon is filled scan line by scan line here (the
    edge pixels can differ by one, well inside the border margin the flags use).
    """
    edge = np.argwhere(region & ~ndimage.binary_erosion(region, border_value=0))
    try:
        vertices = edge[ConvexHull(edge).vertices]  # the hull of the edge pixels' centres
    except QhullError:  # a line or a single pixel: the region is its own hull
        return region.copy()
    # PIL's polygon fill (C, scan lines) on an image whose columns are the mask's second axis
    canvas = Image.new("1", (region.shape[1], region.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([(float(y), float(x)) for x, y in vertices], fill=1, outline=1)
    return np.asarray(canvas, dtype=bool) | region


def quality_flags(
    fit: dict | None,
    mask: Any,
    pixel_size: Sequence[float] | None = (1.0, 1.0),
    *,
    structure: str | None = "head",
    field_of_view: np.ndarray | None = None,
    circumference_range_mm: tuple[float, float] | None = None,
    max_fit_residual_px: float = MAX_FIT_RESIDUAL_PX,
    max_fit_residual_fraction: float = MAX_FIT_RESIDUAL_FRACTION,
    min_fraction_kept: float = MIN_FRACTION_KEPT,
    min_component_fraction: float = MIN_COMPONENT_FRACTION,
    border_margin_px: int = BORDER_MARGIN_PX,
) -> list[str]:
    """The :data:`FLAGS` raised by a measurement ``fit`` (from :func:`fit_ellipse`) of ``mask[x, y]``, in
    :data:`FLAGS` order:

    - ``circumference_out_of_range``: circumference (mm) outside ``circumference_range_mm``, by default
      :data:`PHYSIOLOGICAL_RANGE_MM` of ``structure`` (no check when both are None or the fit is in pixels);
    - ``touches_image_border`` / ``touches_sector_border``: a foreground pixel within ``border_margin_px`` of the
      image's edge / of the edge of ``field_of_view`` inside the image (``[x, y]`` boolean sector mask);
    - ``several_components``: another 8-connected component of at least ``min_component_fraction`` of the largest;
    - ``large_fit_residual``: RMS distance of the kept boundary points above ``max_fit_residual_px`` pixels and
      above ``max_fit_residual_fraction`` of the equivalent radius sqrt(area / pi) (a ragged outline);
    - ``boundary_off_ellipse``: less than ``min_fraction_kept`` of the boundary points on the ellipse.
    """
    foreground = _as_2d_mask(mask)
    sx, sy = _pixel_size(pixel_size)
    raised = set()
    if fit:
        bounds = circumference_range_mm or (PHYSIOLOGICAL_RANGE_MM.get(structure) if structure else None)
        if structure and bounds is None:
            raise ValueError(
                f"no physiological range for structure {structure!r}; known: "
                f"{sorted(PHYSIOLOGICAL_RANGE_MM)} (or give circumference_range_mm)"
            )
        if bounds is not None and not bounds[0] <= fit["circumference_mm"] <= bounds[1]:
            raised.add("circumference_out_of_range")
        radius = math.sqrt(max(float(fit.get("area_mm2") or 0.0), 0.0) / math.pi)
        limit = max(max_fit_residual_px * (sx + sy) / 2, max_fit_residual_fraction * radius)
        if fit.get("fit_residual_mm") is not None and fit["fit_residual_mm"] > limit:
            raised.add("large_fit_residual")
        if fit.get("boundary_fraction_kept") is not None and fit["boundary_fraction_kept"] < min_fraction_kept:
            raised.add("boundary_off_ellipse")
    if foreground.any():
        m = max(int(border_margin_px), 1)
        if foreground[:m].any() or foreground[-m:].any() or foreground[:, :m].any() or foreground[:, -m:].any():
            raised.add("touches_image_border")
        if field_of_view is not None:
            sector = np.asarray(field_of_view, bool)
            if sector.shape != foreground.shape:
                raise ValueError(f"field_of_view has shape {sector.shape}, the mask {foreground.shape}")
            # border_value=1: the image's own edge is not the sector's edge (that is the other flag)
            inner = ndimage.binary_erosion(sector, structure=np.ones((3, 3), bool), iterations=m, border_value=1)
            if (foreground & ~inner).any():
                raised.add("touches_sector_border")
        _, sizes = _components(foreground)
        if len(sizes) > 1 and (np.sort(sizes)[-2] >= min_component_fraction * sizes.max()):
            raised.add("several_components")
    return [name for name in FLAGS if name in raised]
