"""Fetal biometry from a segmentation: the fitted ellipse and its circumference in mm (HC for heads, AC for abdomens).

The structure is taken as the largest connected foreground region with its holes filled; its sub-pixel boundary
(scikit-image ``find_contours`` at level 0.5) is converted to mm with the pixel size and fitted robustly: a leak
into a shadow or a missing stretch of skull moves part of the boundary off the head's ellipse, and RANSAC
(:func:`ransac_ellipse`, trials in batches) finds the ellipse that most boundary points lie close to, then
scikit-image's ``EllipseModel`` refits it by least squares to those points alone (``method="least_squares"`` fits
every boundary point, the former behaviour). The circumference is Ramanujan's second approximation, as the HC18
challenge computes it (van den Heuvel et al. 2018): ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))``,
``h = ((a - b) / (a + b))^2``.

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
from skimage.measure import EllipseModel, find_contours

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
    "ransac_ellipse",
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
RANSAC_TRIALS = 1000  # at most; in batches of 200 (ransac_ellipse) ...
RANSAC_STOP_PROBABILITY = 0.999  # ... until an all-inlier sample was drawn with this probability
RANSAC_POINTS = 400
FINALISTS = 20  # RANSAC: trials per batch scored again with the exact distances (ransac_ellipse)
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


def ellipse_distances(points: np.ndarray, center, axes, theta, iterations: int = 6) -> np.ndarray:
    """Euclidean distance of each (x, y) point to the ellipse (centre, semi-axes (a, b) along theta and theta + 90°).

    The closest point is found for all points at once by the fixed-point iteration on the ellipse's evolute
    (C. Chatfield, "Simple method for distance to ellipse", blog.chatfield.io, 2017).
    Written here because scikit-image's ``EllipseModel.residuals`` solves one scipy least-squares problem per point,
    too slow for RANSAC's hundreds of trials over thousands of boundary points. The ellipse's parameters may be
    arrays of T ellipses: the result is then (T, N), one row per ellipse.
    """
    points = np.asarray(points, dtype=np.float64)
    cx, cy, a, b, theta = (np.asarray(v, dtype=np.float64)[..., None] for v in (*center, *axes, theta))
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = points[:, 0] - cx, points[:, 1] - cy
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


def _conics_through(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The conic ``A x^2 + B xy + C y^2 + D x + E y + F = 0`` through each of T sets of five (x, y) points
    (``samples`` (T, 5, 2)): its coefficients (T, 6) in coordinates centred on each set's mean and divided by its
    scale, with those means (T, 2) and scales (T,). The coefficients are the null vector of the 5 x 6 design matrix
    (batched SVD)."""
    mean = samples.mean(axis=1)
    scale = np.maximum(np.abs(samples - mean[:, None]).max(axis=(1, 2)), 1e-12)
    x, y = np.moveaxis((samples - mean[:, None]) / scale[:, None, None], -1, 0)
    design = np.stack([x * x, x * y, y * y, x, y, np.ones_like(x)], axis=-1)
    return np.linalg.svd(design)[2][:, -1], mean, scale


def _ellipse_of_conic(conic: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(cx, cy, a, b, theta, valid)`` of T conics from :func:`_conics_through` (``valid`` False where a conic is no
    real ellipse): the centre solves the gradient's zero, the semi-axes are ``sqrt(-F0 / lambda)`` for the
    eigenvalues ``lambda`` of ``[[A, B/2], [B/2, C]]`` (``F0`` the conic's value at the centre), the longer one
    (``a``) along the smaller eigenvalue's axis, at ``0.5 atan2(B, A - C) + pi/2``."""
    A, B, C, D, E, F = (conic * np.where(conic[:, :1] + conic[:, 2:3] < 0, -1.0, 1.0)).T  # the sign with A + C > 0
    with np.errstate(all="ignore"):
        det = 4 * A * C - B * B  # > 0 for an ellipse (the coefficients have norm 1: ~1e-16 for a line)
        cx, cy = (B * E - 2 * C * D) / det, (B * D - 2 * A * E) / det
        f0 = A * cx * cx + B * cx * cy + C * cy * cy + D * cx + E * cy + F
        half_sum, half_diff = (A + C) / 2, np.hypot((A - C) / 2, B / 2)
        a, b = np.sqrt(-f0 / (half_sum - half_diff)), np.sqrt(-f0 / (half_sum + half_diff))
    theta = 0.5 * np.arctan2(B, A - C) + math.pi / 2
    valid = (det > 1e-12) & np.isfinite(a) & np.isfinite(b) & (b > 0)
    return mean[:, 0] + cx * scale, mean[:, 1] + cy * scale, a * scale, b * scale, theta, valid


def _msac_finalists(points: np.ndarray, picks: np.ndarray, threshold: float) -> tuple[np.ndarray, ...] | None:
    """The :data:`FINALISTS` of one batch of trials (``picks``: (T, 5) point indices) of least approximate MSAC cost,
    as ``(cx, cy, a, b, theta)`` arrays; None when no trial gives an ellipse."""
    conic, mean, scale = _conics_through(points[picks])
    *ellipse, valid = _ellipse_of_conic(conic, mean, scale)
    if not valid.any():
        return None
    conic, mean, scale = conic[valid], mean[valid], scale[valid]
    x = (points[:, 0] - mean[:, :1]) / scale[:, None]  # (T, N), each trial's own coordinates
    y = (points[:, 1] - mean[:, 1:]) / scale[:, None]
    A, B, C, D, E, F = (c[:, None] for c in conic.T)
    value = (A * x + B * y + D) * x + (C * y + E) * y + F
    gradient = np.hypot(2 * A * x + B * y + D, B * x + 2 * C * y + E)
    approximate = np.minimum(np.abs(value) / np.maximum(gradient, 1e-300) * scale[:, None], threshold)
    order = np.argsort((approximate**2).sum(axis=1), kind="stable")[:FINALISTS]
    return tuple(v[valid][order] for v in ellipse)


def ransac_ellipse(
    points: np.ndarray,
    threshold: float,
    max_trials: int = 1000,
    seed: int = 0,
    stop_probability: float = 0.999,
    batch: int = 200,
) -> tuple[tuple[float, float], tuple[float, float], float] | None:
    """RANSAC's consensus ellipse ``((cx, cy), (a, b), theta)`` of (N, 2) points: of the ellipses through five random
    points (seeded), the one of least MSAC cost (Torr and Zisserman 2000), the sum over the points of the squared
    distance capped at ``threshold`` (most points close to it, and those closest); None when no sample gives one.

    Trials run in batches of ``batch`` until enough have been drawn to find an all-inlier sample with
    ``stop_probability`` at the best ellipse's inlier fraction ``w`` (``log(1 - p) / log(1 - w^5)`` trials, as
    scikit-image's ``ransac`` stops), or ``max_trials``. In a batch every trial is first scored with Sampson's
    first-order distances, ``|Q(p)| / |grad Q(p)|`` for the conic ``Q`` (Hartley and Zisserman, Multiple View
    Geometry, 2nd ed., section 4.2.6), which match the Euclidean distance near the curve; its :data:`FINALISTS` of
    least cost are scored again with the exact distances (:func:`ellipse_distances`). Written here because
    scikit-image's ``ransac`` runs one trial at a time in Python with its ``EllipseModel``, which dominated an image's
    inference (docs/benchmark.md); here a batch of trials is computed at once as arrays.
    """
    rng = np.random.default_rng(seed)
    best, best_cost, needed, done = None, math.inf, max_trials, 0
    while done < min(needed, max_trials):
        picks = np.argpartition(rng.random((batch, len(points))), 4, axis=1)[:, :5]  # 5 distinct points per trial
        done += batch
        finalists = _msac_finalists(points, picks, threshold)
        if finalists is None:
            continue
        cx, cy, a, b, theta = finalists
        distances = ellipse_distances(points, (cx, cy), (a, b), theta)
        costs = (np.minimum(distances, threshold) ** 2).sum(axis=1)
        i = int(np.argmin(costs))
        if costs[i] < best_cost:
            best_cost = costs[i]
            best = (float(cx[i]), float(cy[i])), (float(a[i]), float(b[i])), float(theta[i])
            w = float((distances[i] < threshold).mean())
            needed = math.ceil(math.log(1 - stop_probability) / math.log1p(-(w**5))) if 0 < w < 1 else done
    return best


class _EllipseModel(EllipseModel):
    """scikit-image's ``EllipseModel`` (same estimate) with vectorised residuals (:func:`ellipse_distances`)."""

    def residuals(self, data):
        return ellipse_distances(data, self.center, self.axis_lengths, float(self.theta))

    def _estimate(self, data, warn_only=True):
        # scikit-image 0.26 raises TypeError (``phi %= np.pi`` on a complex number) when degenerate points (nearly
        # on a line) give complex eigenvectors: report it as a failed estimate; such points also divide by zero
        # inside the estimate, which is then rejected, not worth a warning
        try:
            with np.errstate(all="ignore"):
                return super()._estimate(data, warn_only=warn_only)
        except TypeError as error:
            return f"degenerate sample ({error})"


def _valid_ellipse(model) -> bool:
    """A fit with real, finite parameters and positive axes (degenerate points can give complex ones)."""
    if not model:
        return False
    values = np.array([*model.center, *model.axis_lengths, model.theta])
    return not np.iscomplexobj(values) and bool(np.isfinite(values).all()) and min(model.axis_lengths) > 0


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, pixel count of each label 1..n) of the 8-connected foreground regions."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels, sizes


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """The rows and columns of a 2D mask's foreground, widened by ``margin`` inside the image; None if empty.

    The labelling and morphology below run on this crop of an ultrasound frame, where the structure is a fraction
    of it: the same result (labels in the same scan order, the same sizes), less work."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, mask.shape[0])),
        slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, mask.shape[1])),
    )


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The largest connected region with its holes filled, cropped to its bounding box, and the crop's offset."""
    crop = _bounding_box(mask)
    if crop is None:
        return np.zeros((0, 0), bool), (0, 0)
    mask = mask[crop]
    labels, n = ndimage.label(mask)
    index = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)))) if n > 1 else 1
    box = ndimage.find_objects(labels, max_label=index)[index - 1]
    region = ndimage.binary_fill_holes(labels[box] == index)
    return region, (crop[0].start + box[0].start, crop[1].start + box[1].start)


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
    ellipse = tuple(model.center), tuple(model.axis_lengths), float(model.theta)
    kept = np.ones(len(points), bool)
    distances = model.residuals(points)  # of the kept points to the ellipse; recomputed if RANSAC replaces it
    threshold = _inlier_distance(region, (sx, sy), inlier_distance_px)
    # a clean outline: the least-squares ellipse already keeps nearly every point, there is nothing to be robust to
    clean = method == "ransac" and (distances < threshold).mean() >= RANSAC_STOP_FRACTION
    if method == "ransac" and not clean:
        # the consensus is searched on at most RANSAC_POINTS evenly spaced boundary points (neighbouring contour
        # points are ~0.5 px apart and say the same); the inliers and the final fit use every point
        sample = points[:: max(1, math.ceil(len(points) / RANSAC_POINTS))]
        robust = ransac_ellipse(sample, threshold, RANSAC_TRIALS, RANSAC_SEED, RANSAC_STOP_PROBABILITY)
        agree = ellipse_distances(points, *robust) < threshold if robust is not None else np.zeros(len(points), bool)
        if agree.sum() >= 5:
            # refit by least squares on every boundary point the consensus ellipse keeps
            refit = _EllipseModel.from_estimate(points[agree])
            candidate = (
                (tuple(refit.center), tuple(refit.axis_lengths), float(refit.theta))
                if _valid_ellipse(refit)
                else robust
            )
            area = math.pi * float(np.prod(candidate[1]))
            if agree.mean() >= MIN_RANSAC_FRACTION and area <= MAX_RANSAC_AREA_RATIO * region.sum() * sx * sy:
                ellipse, kept = candidate, agree
                distances = ellipse_distances(points[kept], *candidate)
            # else: too little of the outline agrees on one ellipse, or that ellipse is far larger than the region
            # (an arc of a broken mask extrapolated): keep the least-squares fit of every point, which the flags mark
    (cx, cy), (r1, r2), theta = ellipse
    a, b = (r1, r2) if r1 >= r2 else (r2, r1)
    if r1 < r2:
        theta += math.pi / 2
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
    image = np.asarray(image)
    if image.ndim == 3:
        image = image.max(axis=0)
    if image.ndim != 2:
        raise ValueError(f"field_of_view takes a 2D image (or C x X x Y), got shape {image.shape}")
    signal = _closing(image > 0, closing_px)
    labels, sizes = _components(signal)
    if not len(sizes):
        return np.ones(image.shape, bool)
    return _convex_hull(labels == 1 + int(np.argmax(sizes)))


def _closing(mask: np.ndarray, steps: int) -> np.ndarray:
    """``ndimage.binary_closing(mask, 3 x 3 square, iterations=steps, border_value=0)``, computed as one closing by
    the (2 steps + 1)-square through separable max/min filters (zeros outside the image in both passes)."""
    size = 2 * steps + 1
    return ndimage.minimum_filter(ndimage.maximum_filter(mask, size, mode="constant"), size, mode="constant")


def _convex_hull(region: np.ndarray) -> np.ndarray:
    """The convex hull of a boolean region's pixels (as squares), as a mask of the pixels whose centres it holds.

    scikit-image's ``convex_hull_image`` gives the same hull but tests every pixel of the image against it, slow on
    a whole ultrasound frame; the hull's polygon is filled scan line by scan line here (the
    edge pixels can differ by one, well inside the border margin the flags use).
    """
    rows = np.flatnonzero(region.any(axis=1))
    first = region[rows].argmax(axis=1)
    last = region.shape[1] - 1 - region[rows, ::-1].argmax(axis=1)
    ends = np.concatenate([np.stack([rows, first], 1), np.stack([rows, last], 1)])  # each row's outermost pixels
    try:
        vertices = ends[ConvexHull(ends).vertices]  # the hull of their centres
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
    m = max(int(border_margin_px), 1)
    crop = _bounding_box(foreground, margin=m)  # every test below looks at most m pixels beyond the foreground
    if crop is not None:
        if foreground[:m].any() or foreground[-m:].any() or foreground[:, :m].any() or foreground[:, -m:].any():
            raised.add("touches_image_border")
        if field_of_view is not None:
            sector = np.asarray(field_of_view, bool)
            if sector.shape != foreground.shape:
                raise ValueError(f"field_of_view has shape {sector.shape}, the mask {foreground.shape}")
            # border_value=1: the image's own edge is not the sector's edge (that is the other flag); the crop's
            # other edges lie m pixels beyond the foreground, as far as the m erosion steps reach
            inner = ndimage.binary_erosion(sector[crop], structure=np.ones((3, 3), bool), iterations=m, border_value=1)
            if (foreground[crop] & ~inner).any():
                raised.add("touches_sector_border")
        _, sizes = _components(foreground[crop])
        if len(sizes) > 1 and (np.sort(sizes)[-2] >= min_component_fraction * sizes.max()):
            raised.add("several_components")
    return [name for name in FLAGS if name in raised]
