"""Ellipse biometry: Ramanujan's perimeter against the exact elliptic integral, fits of drawn ellipses, the phantom's HC."""

import csv
import math

import numpy as np
import pytest
from scipy.special import ellipe

from scripts.biometry import ellipse_circumference, fit_ellipse
from scripts.data.hc18 import TRAINING_CSV_NAME, load_hc18_mask
from scripts.data.phantom import generate_phantom


@pytest.mark.parametrize("a, b", [(5.0, 5.0), (100.0, 80.0), (60.0, 20.0), (3.0, 0.5)])
def test_ramanujan_matches_the_exact_perimeter(a, b):
    exact = 4.0 * a * ellipe(1.0 - (b / a) ** 2)  # P = 4 a E(e^2)
    # Ramanujan II errs by ~3 h^5 / 2^17: 2e-6 at a/b = 6
    assert ellipse_circumference(a, b) == pytest.approx(exact, rel=1e-5)
    assert ellipse_circumference(b, a) == pytest.approx(exact, rel=1e-5)
    assert ellipse_circumference(0.0, 0.0) == 0.0


def draw_ellipse(shape, cx, cy, a, b, theta, spacing=(1.0, 1.0)):
    """Filled ellipse mask[x, y] from a centre and semi-axes given in mm."""
    x, y = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
    v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


@pytest.mark.parametrize("spacing", [(0.2, 0.2), (0.15, 0.25)])
def test_fit_recovers_a_drawn_ellipse_in_mm(spacing):
    cx, cy, a, b, theta = 60.0, 45.0, 40.0, 28.0, 0.6
    mask = draw_ellipse((800, 400), cx, cy, a, b, theta, spacing)
    mask[5:9, 5:9] = True  # a stray blob: only the largest region counts
    mask[380:386, 170:180] = False  # a hole inside: filled
    fit = fit_ellipse(mask, spacing)
    assert fit["center_x_mm"] == pytest.approx(cx, abs=0.1) and fit["center_y_mm"] == pytest.approx(cy, abs=0.1)
    assert fit["semi_axes_a_mm"] == pytest.approx(a, rel=5e-3) and fit["semi_axes_b_mm"] == pytest.approx(b, rel=5e-3)
    assert fit["angle_rad"] == pytest.approx(theta, abs=0.01)
    assert fit["circumference_mm"] == pytest.approx(ellipse_circumference(a, b), rel=5e-3)
    assert fit["area_mm2"] == pytest.approx(math.pi * a * b, rel=1e-2)


def test_angle_is_that_of_the_longer_axis_and_empty_masks_give_none():
    mask = draw_ellipse((200, 200), 100.0, 100.0, 30.0, 60.0, 0.0)  # longer along y
    fit = fit_ellipse(mask)
    assert fit["semi_axes_a_mm"] > fit["semi_axes_b_mm"] and fit["angle_rad"] == pytest.approx(math.pi / 2, abs=0.01)
    assert fit_ellipse(np.zeros((50, 50))) is None
    with pytest.raises(ValueError, match="pixel_size"):
        fit_ellipse(mask, (0.0, 1.0))


def test_phantom_ground_truth_hc_within_half_a_percent(tmp_path):
    training = generate_phantom(tmp_path, num_subjects=12, progress=False)
    with open(training.parent / TRAINING_CSV_NAME) as f:
        rows = list(csv.DictReader(f))
    errors = []
    for row in rows:
        mask = load_hc18_mask(training / row["filename"].replace(".png", "_Annotation.png"))
        size = float(row["pixel size(mm)"])
        fit = fit_ellipse(mask.T, (size, size))  # load_hc18_mask is (H, W); fit_ellipse takes [x, y]
        hc = float(row["head circumference (mm)"])
        errors.append(abs(fit["circumference_mm"] - hc) / hc)
    assert len(errors) >= 12 and float(np.mean(errors)) <= 0.005, errors
