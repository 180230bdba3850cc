"""Fetal biometry from a segmentation: the fitted ellipse and its circumference in mm (HC for heads, AC for abdomens).

The structure is taken as the largest connected foreground region with its holes filled; its sub-pixel boundary
(scikit-image ``find_contours`` at level 0.5) is converted to mm with the pixel size and fitted with scikit-image's
least-squares ``EllipseModel``. The circumference is Ramanujan's second approximation (REFERENCE §2, as the HC18
challenge computes it): ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))``, ``h = ((a - b) / (a + b))^2``.

Arrays follow the bundle's MONAI convention for 2D images: ``mask[x, y]`` (width first), pixel size ``(sx, sy)``.
Centres are in mm from the centre of pixel (0, 0); ``angle_rad`` is the direction of the semi-axis ``a`` (the longer)
from the +x axis towards +y, in [0, pi), as in the HC18 submission format.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.measure import EllipseModel, find_contours

__all__ = ["ellipse_circumference", "fit_ellipse", "HC18_SUBMISSION_COLUMNS", "MEASUREMENT_COLUMNS"]

HC18_SUBMISSION_COLUMNS = ("filename", "center_x_mm", "center_y_mm", "semi_axes_a_mm", "semi_axes_b_mm", "angle_rad")
MEASUREMENT_COLUMNS = ("center_x_mm", "center_y_mm", "semi_axes_a_mm", "semi_axes_b_mm", "angle_rad",
                       "circumference_mm", "area_mm2")


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


def _largest_region(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The largest connected region with its holes filled, cropped to its bounding box, and the crop's offset."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros((0, 0), bool), (0, 0)
    index = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)))) if n > 1 else 1
    box = ndimage.find_objects(labels, max_label=index)[index - 1]
    region = ndimage.binary_fill_holes(labels[box] == index)
    return region, (box[0].start, box[1].start)


def fit_ellipse(mask: Any, pixel_size: Sequence[float] | None = (1.0, 1.0), min_pixels: int = 20) -> dict | None:
    """The ellipse fitted to the largest foreground region of ``mask[x, y]`` (any non-zero value is foreground).

    Returns ``{center_x_mm, center_y_mm, semi_axes_a_mm, semi_axes_b_mm, angle_rad, circumference_mm, area_mm2}``
    (pixel units when ``pixel_size`` is None), or None when the region is smaller than ``min_pixels`` or no ellipse
    fits (a straight line, say).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"fit_ellipse takes a 2D mask (or 1 x X x Y), got shape {mask.shape}")
    sx, sy = (1.0, 1.0) if pixel_size is None else (float(pixel_size[0]), float(pixel_size[1]))
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"pixel_size must be two positive finite numbers, got {pixel_size}")
    region, offset = _largest_region(mask != 0)
    if int(region.sum()) < min_pixels:
        return None
    # pad so that a region touching the border still gives a closed contour
    contours = find_contours(np.pad(region, 1).astype(np.float32), 0.5)
    boundary = max(contours, key=len) - 1.0 + np.array(offset)  # (N, 2) in (x, y) index order of the mask
    points = boundary * np.array([sx, sy])
    model = EllipseModel.from_estimate(points)
    if not model:
        return None
    (cx, cy), (r1, r2), theta = model.center, model.axis_lengths, float(model.theta)
    if not all(math.isfinite(v) for v in (cx, cy, r1, r2, theta)) or min(r1, r2) <= 0:
        return None
    a, b = (r1, r2) if r1 >= r2 else (r2, r1)
    if r1 < r2:
        theta += math.pi / 2
    return {
        "center_x_mm": float(cx),
        "center_y_mm": float(cy),
        "semi_axes_a_mm": float(a),
        "semi_axes_b_mm": float(b),
        "angle_rad": float(theta % math.pi),
        "circumference_mm": float(ellipse_circumference(a, b)),
        "area_mm2": float(region.sum()) * sx * sy,
    }
