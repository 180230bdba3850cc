"""Ellipse biometry: Ramanujan's perimeter against the exact elliptic integral, fits of drawn ellipses (clean, with a
leak, with a missing arc), the phantom's HC, and the quality flags."""

import csv
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.special import ellipe
from skimage.measure import EllipseModel

from scripts.data.hc18 import TRAINING_CSV_NAME, load_hc18_mask
from scripts.data.phantom import generate_phantom
from scripts.evaluation.biometry import (
    PHYSIOLOGICAL_RANGE_MM,
    ellipse_circumference,
    ellipse_distances,
    field_of_view,
    fit_ellipse,
    parse_flags,
    quality_flags,
    ransac_ellipse,
)


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


def test_distance_to_ellipse_matches_dense_sampling():
    rng = np.random.default_rng(3)
    for _ in range(6):
        a = rng.uniform(5, 100)
        b, theta, center = a * rng.uniform(0.05, 1.0), rng.uniform(0, math.pi), rng.uniform(-50, 50, 2)
        points = center + rng.normal(0, 1, (20, 2)) * a
        t = np.linspace(0, 2 * math.pi, 100_001)
        ex = center[0] + a * math.cos(theta) * np.cos(t) - b * math.sin(theta) * np.sin(t)
        ey = center[1] + a * math.sin(theta) * np.cos(t) + b * math.cos(theta) * np.sin(t)
        brute = np.array([np.hypot(ex - x, ey - y).min() for x, y in points])
        np.testing.assert_allclose(ellipse_distances(points, center, (a, b), theta), brute, atol=2e-5 * a)

    # several ellipses at once: one row of distances per ellipse, each equal to its own single-ellipse call
    axes = np.array([[30.0, 10.0], [20.0, 20.0]])
    rows = ellipse_distances(
        points, (np.zeros(2), np.array([0.0, 1.0])), (axes[:, 0], axes[:, 1]), np.array([0.3, 1.0])
    )
    for row, (a, b), theta, cy in zip(rows, axes, (0.3, 1.0), (0.0, 1.0)):
        np.testing.assert_allclose(row, ellipse_distances(points, (0.0, cy), (a, b), theta))


def ellipse_points(center, a, b, theta, t):
    """(x, y) points of an ellipse at parameter angles t."""
    c, s = math.cos(theta), math.sin(theta)
    return np.stack(
        [center[0] + a * c * np.cos(t) - b * s * np.sin(t), center[1] + a * s * np.cos(t) + b * c * np.sin(t)], 1
    )


def test_ransac_finds_the_ellipse_most_points_lie_on():
    """Half the points on an ellipse (jittered by 0.1), half on a wrong one and scattered: RANSAC's consensus is the
    first ellipse (centre, semi-axes a >= b, angle mod pi), whatever the seed."""
    rng = np.random.default_rng(5)
    truth = (12.0, -7.0), 40.0, 25.0, 2.0
    on = ellipse_points(*truth, rng.uniform(0, 2 * math.pi, 200)) + rng.normal(0, 0.1, (200, 2))
    decoy = ellipse_points((30.0, 5.0), 30.0, 28.0, 0.0, rng.uniform(0, 2 * math.pi, 100))
    points = np.concatenate([on, decoy, rng.uniform(-60, 60, (100, 2))])
    for seed in range(3):
        (cx, cy), (a, b), theta = ransac_ellipse(points, threshold=0.5, seed=seed)
        assert (cx, cy) == pytest.approx(truth[0], abs=0.5) and (a, b) == pytest.approx(truth[1:3], abs=0.5)
        assert a >= b and math.remainder(theta - truth[3], math.pi) == pytest.approx(0.0, abs=0.05)
        # a consensus of five jittered points is itself a little off: it keeps most of the true points and almost
        # none of the others, and scikit-image's least-squares fit of those lands on the truth
        inliers = ellipse_distances(points, (cx, cy), (a, b), theta) < 0.5
        assert inliers[:200].mean() > 0.75 and inliers[200:].mean() < 0.05
        refit = EllipseModel.from_estimate(points[inliers])
        assert tuple(refit.center) == pytest.approx(truth[0], abs=0.05)
        assert sorted(refit.axis_lengths, reverse=True) == pytest.approx(truth[1:3], abs=0.05)
    assert ransac_ellipse(np.stack([np.arange(20.0), 2 * np.arange(20.0)], 1), threshold=0.5) is None  # a line


# A drawn head: semi-axes 40 x 30 mm at 0.2 mm pixels (200 x 150 px), rotated; boundary point at parameter angle phi
CX, CY, A, B, THETA, SPACING = 80.0, 54.0, 40.0, 30.0, 0.5, (0.2, 0.2)


def boundary_point(phi):
    return (
        CX + A * math.cos(phi) * math.cos(THETA) - B * math.sin(phi) * math.sin(THETA),
        CY + A * math.cos(phi) * math.sin(THETA) + B * math.sin(phi) * math.cos(THETA),
    )


def grid():
    return np.meshgrid(np.arange(800) * SPACING[0], np.arange(540) * SPACING[1], indexing="ij")


def with_blob(mask):
    """A leak: a disk of radius 0.5 b attached on the outline (a neighbouring echo-free region)."""
    x, y = grid()
    bx, by = boundary_point(1.0)
    return mask | ((x - bx) ** 2 + (y - by) ** 2 <= (0.5 * B) ** 2)


def with_strip(mask):
    """A leak: a band of the head's length running out from the outline (a shadow)."""
    x, y = grid()
    bx, by = boundary_point(2.5)
    d = np.array([bx - CX, by - CY]) / math.hypot(bx - CX, by - CY)
    along, across = (x - bx) * d[0] + (y - by) * d[1], -(x - bx) * d[1] + (y - by) * d[0]
    return mask | ((along >= -1) & (along <= A) & (np.abs(across) <= 0.25 * B))


def without_arc(mask):
    """A missing arc: the part of the head beyond a chord is gone (cut off by the sector edge), 20 % of the outline."""
    x, y = grid()
    u = (x - CX) * math.cos(THETA) + (y - CY) * math.sin(THETA)
    v = -(x - CX) * math.sin(THETA) + (y - CY) * math.cos(THETA)
    phi, half = 4.0, 0.2 * math.pi  # parametric angle of the gap's middle and half of its span
    return mask & ((u / A) * math.cos(phi) + (v / B) * math.sin(phi) <= math.cos(half))


def with_notch(mask):
    """A missing arc: a bite of radius 0.5 b out of the outline (the mask stops short where the skull is faint)."""
    x, y = grid()
    bx, by = boundary_point(5.5)
    return mask & ~((x - bx) ** 2 + (y - by) ** 2 <= (0.5 * B) ** 2)


@pytest.mark.parametrize("damage", [with_blob, with_strip, without_arc, with_notch])
def test_leak_or_missing_arc_does_not_drag_the_ellipse(damage):
    truth = ellipse_circumference(A, B)
    mask = damage(draw_ellipse((800, 540), CX, CY, A, B, THETA, SPACING))
    fit = fit_ellipse(mask, SPACING)
    assert fit["circumference_mm"] == pytest.approx(truth, rel=0.01)
    assert fit["semi_axes_a_mm"] == pytest.approx(A, rel=0.01) and fit["semi_axes_b_mm"] == pytest.approx(B, rel=0.01)
    assert fit["center_x_mm"] == pytest.approx(CX, abs=0.3) and fit["center_y_mm"] == pytest.approx(CY, abs=0.3)
    # the damaged stretch is left out, and reported as such
    assert 0.6 < fit["boundary_fraction_kept"] < 0.95
    assert fit["fit_residual_mm"] < 0.5 * SPACING[0]
    # fitting every boundary point (the former method) is dragged by more than 1 %
    plain = fit_ellipse(mask, SPACING, method="least_squares")
    assert abs(plain["circumference_mm"] - truth) / truth > 0.01
    assert plain["boundary_fraction_kept"] == 1.0


def test_clean_fit_reports_a_small_residual_all_points_kept_and_no_flags():
    fit = fit_ellipse(draw_ellipse((800, 540), CX, CY, A, B, THETA, SPACING), SPACING)
    assert fit["boundary_fraction_kept"] == 1.0 and fit["fit_residual_mm"] < 0.4 * SPACING[0]
    assert fit["flags"] == "" and parse_flags(fit["flags"]) == []
    again = fit_ellipse(draw_ellipse((800, 540), CX, CY, A, B, THETA, SPACING), SPACING)
    assert again == fit  # RANSAC is seeded: the same mask always measures the same


def test_implausible_circumference_is_flagged_by_structure():
    assert PHYSIOLOGICAL_RANGE_MM["head"] == (44.0, 346.0)  # HC18's reference HC range
    huge = draw_ellipse((800, 540), 80.0, 54.0, 50.0, 40.0, 0.0, (0.2, 0.2))  # HC 284 mm at 0.2 mm ...
    assert "circumference_out_of_range" not in parse_flags(fit_ellipse(huge, (0.2, 0.2))["flags"])
    fit = fit_ellipse(huge, (0.4, 0.4))  # ... 567 mm at 0.4 mm, like the untrained model's 568.9 mm
    assert fit["circumference_mm"] == pytest.approx(2 * ellipse_circumference(50.0, 40.0), rel=0.01)
    assert parse_flags(fit["flags"]) == ["circumference_out_of_range"]
    hc_380 = draw_ellipse((800, 540), 100.0, 67.0, 66.0, 54.0, 0.0, (0.25, 0.25))  # 380 mm: no head, an abdomen
    assert parse_flags(fit_ellipse(hc_380, (0.25, 0.25))["flags"]) == ["circumference_out_of_range"]
    assert fit_ellipse(hc_380, (0.25, 0.25), structure="abdomen")["flags"] == ""
    assert fit_ellipse(hc_380, None)["flags"] == ""  # in pixels: no physiological range applies
    assert fit_ellipse(hc_380, (0.25, 0.25), structure=None)["flags"] == ""
    with pytest.raises(ValueError, match="no physiological range for structure 'femur'"):
        fit_ellipse(hc_380, (0.25, 0.25), structure="femur")


def fan(shape=(400, 300), half_angle=0.6):
    """A sector image[x, y]: speckle inside a fan from an apex above the image, black outside; a text blob aside."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    inside = (np.abs(np.arctan2(x - shape[0] / 2, y + 40)) < half_angle) & (np.hypot(x - shape[0] / 2, y + 40) < 330)
    image = np.where(inside, np.random.default_rng(0).integers(1, 255, shape), 0).astype(np.uint8)
    image[5:30, 5:12] = 255  # burned-in text in the corner, outside the sector
    return image, inside


def test_sector_closing_equals_scipy_iterated_binary_closing():
    from scripts.evaluation.biometry import _closing

    rng = np.random.default_rng(4)
    for trial in range(12):
        mask = rng.random((90, 70)) > (0.5 if trial % 2 else 0.8)
        mask[:, :3] = rng.random((90, 3)) > 0.3  # foreground on the border: the zeros outside count
        for steps in (1, 5):
            expected = ndimage.binary_closing(mask, np.ones((3, 3), bool), iterations=steps, border_value=0)
            np.testing.assert_array_equal(_closing(mask, steps), expected)


def test_field_of_view_is_the_sector_and_a_mask_on_its_edge_is_flagged():
    image, inside = fan()
    sector = field_of_view(image)
    assert not sector[5:30, 5:12].any()  # the text is not part of it
    assert (sector & inside).sum() / inside.sum() > 0.99 and (sector & ~inside).sum() / inside.sum() < 0.02
    well_inside = draw_ellipse(image.shape, 200.0, 150.0, 50.0, 40.0, 0.0)
    fit = fit_ellipse(well_inside, (0.2, 0.2), field_of_view=sector)
    assert fit["flags"] == ""
    # a head whose side lies beyond the fan's left edge: the mask stops at the sector border
    cut = draw_ellipse(image.shape, 110.0, 150.0, 50.0, 40.0, 0.0) & inside
    flags = parse_flags(fit_ellipse(cut, (0.2, 0.2), field_of_view=sector)["flags"])
    assert "touches_sector_border" in flags and "touches_image_border" not in flags


def test_sector_hull_matches_scikit_image_convex_hull_image():
    """The scan-line hull equals scikit-image's convex_hull_image but for pixels on its edge."""
    from skimage.morphology import convex_hull_image

    from scripts.evaluation.biometry import _convex_hull

    image, inside = fan()
    rng = np.random.default_rng(1)
    for region in (
        inside,
        inside & (rng.random(inside.shape) > 0.3),
        draw_ellipse(inside.shape, 200, 150, 60, 30, 0.5),
    ):
        expected, hull = convex_hull_image(region), _convex_hull(region)
        edge_band = ndimage.binary_dilation(expected, iterations=2) & ~ndimage.binary_erosion(expected, iterations=2)
        differ = expected != hull
        assert not (differ & ~edge_band).any() and differ.sum() < 0.01 * expected.sum()
    line = np.zeros((20, 20), bool)
    line[5, 3:9] = True
    assert np.array_equal(_convex_hull(line), line)  # degenerate: its own hull


def test_border_components_and_ragged_outline_flags():
    mask = draw_ellipse((300, 200), 150.0, 100.0, 60.0, 45.0, 0.3)
    assert quality_flags(fit_ellipse(mask), mask) == []
    at_edge = draw_ellipse((300, 200), 58.5, 100.0, 60.0, 45.0, 0.3)  # reaches x = 0
    assert parse_flags(fit_ellipse(at_edge)["flags"]) == ["touches_image_border"]
    two = mask | draw_ellipse((300, 200), 260.0, 40.0, 25.0, 20.0, 0.0)  # 18 % of the head's area beside it
    assert parse_flags(fit_ellipse(two)["flags"]) == ["several_components"]
    speck = mask | draw_ellipse((300, 200), 260.0, 40.0, 3.0, 3.0, 0.0)  # a speck is no component worth a flag
    assert parse_flags(fit_ellipse(speck)["flags"]) == []
    # a ragged outline: a 200 x 150 px ellipse whose outline wobbles by 3 px: the kept points spread far from it
    x, y = np.meshgrid(np.arange(600), np.arange(500), indexing="ij")
    angle = np.arctan2((y - 250.0) / 150.0, (x - 300.0) / 200.0)
    ragged = np.hypot((x - 300.0) / 200.0, (y - 250.0) / 150.0) <= 1 + 3.0 / 170.0 * np.sin(20 * angle)
    fit = fit_ellipse(ragged, None)
    assert parse_flags(fit["flags"]) == ["large_fit_residual"] and fit["fit_residual_mm"] > 1.5
    assert fit["circumference_mm"] == pytest.approx(ellipse_circumference(200.0, 150.0), rel=0.01)
    leak = with_strip(draw_ellipse((800, 540), CX, CY, A, B, THETA, SPACING))  # 30 % of the outline off the ellipse
    assert parse_flags(fit_ellipse(leak, SPACING)["flags"]) == ["boundary_off_ellipse"]


def test_flags_on_the_foreground_crop_equal_the_whole_frame():
    """quality_flags works on the foreground's bounding box (widened by the margin): the sector-border and
    component flags equal scipy's erosion and labelling of the whole frame, also with the mask on the image edge."""
    rng = np.random.default_rng(7)
    x, y = np.meshgrid(np.arange(120), np.arange(90), indexing="ij")
    for trial in range(24):
        margin = 1 + trial % 3
        sector = np.hypot(x - rng.uniform(40, 80), y - rng.uniform(-10, 20)) < rng.uniform(50, 110)
        sector &= rng.random(sector.shape) > 0.02  # specks off the sector: its edge is ragged
        cx, cy = rng.uniform(0, 120), rng.uniform(0, 90)
        mask = np.hypot((x - cx) / rng.uniform(5, 30), (y - cy) / rng.uniform(5, 30)) <= 1
        mask |= rng.random(mask.shape) > 0.999  # specks: more components
        if not mask.any():
            continue
        inner = ndimage.binary_erosion(sector, np.ones((3, 3), bool), iterations=margin, border_value=1)
        sizes = np.bincount(ndimage.label(mask, np.ones((3, 3), bool))[0].ravel())[1:]
        flags = quality_flags(None, mask, field_of_view=sector, border_margin_px=margin, min_component_fraction=0.0)
        assert ("touches_sector_border" in flags) == bool((mask & ~inner).any()), trial
        assert ("several_components" in flags) == (len(sizes) > 1), trial
    # the sector's edge just beyond the mask's last row or column: flagged when within the margin, and only then
    disc = np.hypot(x - 60, y - 45) <= 20  # rows and columns 40..80 and 25..65
    for margin in (1, 2, 3):
        for gap in range(margin + 2):  # sector pixels between the disc and the sector's edge
            for sector in (x <= 80 + gap, y >= 25 - gap):
                flags = quality_flags(None, disc, field_of_view=sector, border_margin_px=margin)
                assert ("touches_sector_border" in flags) == (gap < margin), (margin, gap)
