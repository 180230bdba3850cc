"""Synthetic fetal-head ultrasound phantom written in the HC18 training-set layout.

`generate_phantom(dataset_dir)` writes exactly what the HC18 download unpacks to::

    <dataset_dir>/training_set/NNN_HC.png, NNN_HC_Annotation.png (+ NNN_2HC.png, NNN_3HC.png for repeat scans)
    <dataset_dir>/training_set_pixel_size_and_HC.csv
    <dataset_dir>/phantom.json        (generation parameters; makes the call idempotent)

so every loader and the whole pipeline run unchanged on it when the real data is not at hand.

Each image is rendered in beam (polar) coordinates and scan-converted to a convex-probe sector: tissue echogenicity
(background, placenta/uterine bands, amniotic fluid, distracting body arcs, limb bones, spine), the head (bright
skull ring whose brightness follows the beam incidence, with dropout gaps; brain texture, midline echo, ventricles
with choroid plexus), acoustic shadows accumulated along beam lines behind strong reflectors, depth attenuation with
an imperfect time-gain curve, correlated Rayleigh speckle and log compression with random gain and dynamic range.
The annotation is the analytic ellipse (the outer skull edge) as a one-pixel 8-connected outline, and the CSV HC is
that ellipse's circumference in mm (Ramanujan), so an outline fitted by any method gives the CSV value back.
Images are seeded from (seed, subject, scan), so generation is reproducible and order-independent.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, special
from tqdm import tqdm

from scripts.utils.files import write_atomic, write_json_atomic

from .hc18 import TRAINING_CSV_HEADER, TRAINING_CSV_NAME, TRAINING_DIR_NAME, ellipse_circumference

__all__ = [
    "PHANTOM_FOLDERS",
    "PHANTOM_MARKER_NAME",
    "PHANTOM_SUBJECTS",
    "generate_phantom",
    "ellipse_mask",
    "ellipse_outline",
    "save_phantom_montage",
]

logger = logging.getLogger(__name__)

PHANTOM_VERSION = 1
PHANTOM_MARKER_NAME = "phantom.json"
# the bundle's two phantoms (train.json's ``phantom``): the demo's small one, and a benchmark one of HC18's size
# (HC18: 806 subjects, 999 training images; 830 subjects here give about 1,000 images with the repeat scans below)
PHANTOM_SUBJECTS = {"demo": 200, "benchmark": 830}
PHANTOM_FOLDERS = {"demo": "phantom", "benchmark": "phantom_benchmark"}

# Head and acquisition ranges (HC18: pixel size 0.049-0.393 mm, HC 44-346 mm, heads fill much of the frame).
PIXEL_SIZE_RANGE_MM = (0.049, 0.393)  # for HC18's 800 x 540 frames; scaled for other sizes (same field of view)
HC18_SHORT_SIDE_PX = 540
HC_RANGE_MM = (100.0, 340.0)
AXIS_RATIO_RANGE = (0.70, 0.95)  # b / a of the head ellipse
SEMI_MAJOR_FRACTION_RANGE = (0.20, 0.44)  # semi-major axis in pixels / shorter image side
THIRD_SCAN_PROBABILITY = 0.1  # share of repeated subjects that get a third scan (NNN_3HC.png)
OCCLUDED_PROBABILITY = 0.15  # share of scans whose head is partly outside the sector (occluded, still annotated)
EDGE_MARGIN_PX = 2  # the annotated ellipse stays this far inside the image so its outline is closed

# Beam-grid sampling in output pixels: speckle grain is about one sample, coarser across the beam as on scanners.
DEPTH_STEP_PX = 1.25
LATERAL_STEP_PX = 2.0


# --------------------------------------------------------------------------------------------------------------------
# Ellipse drawing (annotation)
# --------------------------------------------------------------------------------------------------------------------
def ellipse_mask(shape, center_xy, semi_axes, angle_rad) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside the ellipse.

    Pixel (row y, column x) has its centre at (x, y); `angle_rad` turns the first semi-axis from +x towards +y.
    """
    height, width = shape
    cx, cy = center_xy
    a, b = semi_axes
    cos_t, sin_t = math.cos(angle_rad), math.sin(angle_rad)
    half_x = math.hypot(a * cos_t, b * sin_t)
    half_y = math.hypot(a * sin_t, b * cos_t)
    x0, x1 = max(0, math.floor(cx - half_x)), min(width, math.ceil(cx + half_x) + 1)
    y0, y1 = max(0, math.floor(cy - half_y)), min(height, math.ceil(cy + half_y) + 1)
    mask = np.zeros(shape, dtype=bool)
    if x0 >= x1 or y0 >= y1:
        return mask
    dy, dx = np.ogrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx]
    u = dx * cos_t + dy * sin_t
    v = dy * cos_t - dx * sin_t
    mask[y0:y1, x0:x1] = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return mask


def ellipse_outline(shape, center_xy, semi_axes, angle_rad) -> np.ndarray:
    """One-pixel, 8-connected closed outline (uint8 0/255) of `ellipse_mask`; filling it gives that mask back.

    The outline is the mask's inner boundary (mask pixels with a 4-neighbour outside), not a rasterised curve:
    skimage.draw.ellipse_perimeter leaves gaps on rotated ellipses, which breaks hole filling. An ellipse that
    crosses the image edge is closed along the edge (the annotation is the ellipse clipped to the image).
    """
    mask = ellipse_mask(shape, center_xy, semi_axes, angle_rad)
    interior = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return ((mask & ~interior) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Random fields
# --------------------------------------------------------------------------------------------------------------------
def _rbf_weights(n: int, m: int) -> np.ndarray:
    """(n, m) Gaussian interpolation weights taking m coarse knots to n samples."""
    x = np.linspace(0.0, m - 1.0, n)[:, None]
    w = np.exp(-0.5 * ((x - np.arange(m)[None, :]) / 0.7) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng, shape, knots) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with about `knots` (rows, cols) degrees of freedom."""
    coarse = rng.standard_normal(knots).astype(np.float32)
    rows = _rbf_weights(shape[0], knots[0]) @ coarse
    columns = _rbf_weights(shape[1], knots[1])
    # a sum of rank-one terms: float32 GEMM with an inner size this small is far slower in OpenBLAS
    field = np.zeros(shape, dtype=np.float32)
    for k in range(knots[1]):
        field += np.multiply.outer(rows[:, k], columns[:, k])
    return (field - field.mean()) / (field.std() + 1e-6)


def _smooth_curve(rng, n: int, knots: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random 1D curve of n samples."""
    curve = _rbf_weights(n, knots) @ rng.standard_normal(knots).astype(np.float32)
    return (curve - curve.mean()) / (curve.std() + 1e-6)


def _harmonics(rng, t, orders: int, amplitude: float, table_size: int = 720):
    """Random periodic modulation 1 + amplitude * sum_k c_k cos(k t + phi_k) / k, k = 1..orders (t in radians).

    Tabulated over one period and looked up, which is far cheaper than evaluating cosines at every sample.
    """
    period = np.linspace(-np.pi, np.pi, table_size, endpoint=False)
    table = np.ones(table_size, dtype=np.float32)
    for k in range(1, orders + 1):
        table += (amplitude / k) * rng.standard_normal() * np.cos(k * period + rng.uniform(0, 2 * np.pi))
    index = ((t + np.pi) * (table_size / (2 * np.pi))).astype(np.int32) % table_size
    return table[index]


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


# --------------------------------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Head:
    """A subject's head: the same for all its scans."""

    a_mm: float
    b_mm: float
    anatomy_seed: int
    num_scans: int


@dataclass(frozen=True)
class _Pose:
    """One scan's head placement in pixels and its pixel size."""

    center_xy: tuple
    semi_axes_px: tuple
    angle_rad: float
    pixel_size_mm: float

    @property
    def hc_mm(self) -> float:
        return ellipse_circumference(*self.semi_axes_px) * self.pixel_size_mm


def _subject_head(seed: int, subject: int, repeat_fraction: float) -> _Head:
    rng = np.random.default_rng([seed, 0, subject])
    repeat_draw, third_draw = rng.random(2)  # drawn first and always, so the head does not depend on repeat_fraction
    hc_mm = rng.uniform(*HC_RANGE_MM)
    ratio = rng.uniform(*AXIS_RATIO_RANGE)
    a_mm = hc_mm / ellipse_circumference(1.0, ratio)
    num_scans = 1 if repeat_draw >= repeat_fraction else (3 if third_draw < THIRD_SCAN_PROBABILITY else 2)
    return _Head(a_mm=a_mm, b_mm=a_mm * ratio, anatomy_seed=int(rng.integers(2**31)), num_scans=num_scans)


def _scan_name(subject: int, scan: int) -> str:
    return f"{subject:03d}_{'' if scan == 1 else scan}HC"


@dataclass(frozen=True)
class _Sector:
    """Convex-probe field of view: virtual apex above the frame, beams within +-half_angle, depths r_min..r_max."""

    apex_xy: tuple
    r_min: float
    r_max: float
    half_angle: float

    def contains(self, x, y):
        dx, dy = np.asarray(x) - self.apex_xy[0], np.asarray(y) - self.apex_xy[1]
        radius = np.hypot(dx, dy)
        return (radius >= self.r_min) & (radius <= self.r_max) & (np.abs(np.arctan2(dx, dy)) <= self.half_angle)


def _draw_sector(rng, image_size) -> _Sector:
    width, height = image_size
    apex_y = -rng.uniform(0.15, 0.6) * height
    r_min = -apex_y + rng.uniform(0.0, 0.04) * height
    half_angle = math.atan2(rng.uniform(0.42, 0.6) * width, height - apex_y)
    r_max = rng.uniform(0.95, 1.15) * (height - apex_y)
    return _Sector((width / 2 + rng.normal(0, 0.02 * width), apex_y), r_min, r_max, half_angle)


def _draw_pose(rng, head: _Head, sector: _Sector, image_size) -> _Pose:
    """Size, rotation and position of the head; the head lies inside the sector except for OCCLUDED_PROBABILITY."""
    width, height = image_size
    short_side = min(width, height)
    a_px = rng.uniform(*SEMI_MAJOR_FRACTION_RANGE) * short_side
    pixel_size_range = np.array(PIXEL_SIZE_RANGE_MM) * (HC18_SHORT_SIDE_PX / short_side)
    pixel_size = float(np.clip(head.a_mm / a_px, *pixel_size_range))
    pixel_size = round(pixel_size, 9)  # the CSV stores 9 decimals; the HC is computed from the stored value
    a_px = head.a_mm / pixel_size
    b_px = head.b_mm / pixel_size
    angle = rng.uniform(0.0, np.pi)
    half_x = math.hypot(a_px * math.cos(angle), b_px * math.sin(angle))
    half_y = math.hypot(a_px * math.sin(angle), b_px * math.cos(angle))
    # keep the whole ellipse in the frame; only tiny frames with big heads need this shrink (the head then deviates)
    shrink = min(1.0, (width / 2 - EDGE_MARGIN_PX - 1) / half_x, (height / 2 - EDGE_MARGIN_PX - 1) / half_y)
    a_px, b_px, half_x, half_y = a_px * shrink, b_px * shrink, half_x * shrink, half_y * shrink
    # place the head so that the required share of its outline lies inside the sector
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    cos_t, sin_t = math.cos(angle), math.sin(angle)
    ring_x = a_px * np.cos(t) * cos_t - b_px * np.sin(t) * sin_t
    ring_y = a_px * np.cos(t) * sin_t + b_px * np.sin(t) * cos_t
    required = rng.uniform(0.6, 0.9) if rng.random() < OCCLUDED_PROBABILITY else 1.0
    best, best_inside = None, -1.0
    for _attempt in range(40):
        cx = rng.uniform(half_x + EDGE_MARGIN_PX, width - 1 - half_x - EDGE_MARGIN_PX)
        cy = rng.uniform(half_y + EDGE_MARGIN_PX, height - 1 - half_y - EDGE_MARGIN_PX)
        inside = float(sector.contains(cx + ring_x, cy + ring_y).mean())
        if inside > best_inside:
            best, best_inside = (cx, cy), inside
        if inside >= required:
            break
    return _Pose(center_xy=best, semi_axes_px=(a_px, b_px), angle_rad=angle, pixel_size_mm=pixel_size)


def _draw_scene(seed: int, subject: int, scan: int, head: _Head, image_size):
    """(rng for the rest of the rendering, sector, pose) of one scan."""
    rng = np.random.default_rng([seed, 1, subject, scan])
    sector = _draw_sector(rng, image_size)
    return rng, sector, _draw_pose(rng, head, sector, image_size)


class _EllipseFrame:
    """Ellipse-local coordinates of the beam-grid samples (u along the first axis, rho = 1 on the ellipse)."""

    def __init__(self, x, y, center_xy, semi_axes, angle_rad):
        # python floats keep the float32 grids float32 (NumPy scalars would promote them to float64)
        self.a, self.b = float(semi_axes[0]), float(semi_axes[1])
        self.cos, self.sin = math.cos(angle_rad), math.sin(angle_rad)
        dx, dy = x - float(center_xy[0]), y - float(center_xy[1])
        self.u = dx * self.cos + dy * self.sin
        self.v = dy * self.cos - dx * self.sin
        un, vn = self.u / self.a, self.v / self.b
        self.rho = np.sqrt(un * un + vn * vn)
        self.t = np.arctan2(vn, un)  # parametric angle

    def incidence(self, beam_x, beam_y):
        """|cos| of the angle between the beam and the ellipse normal at parameter t (1 = specular)."""
        nu, nv = np.cos(self.t) / self.a, np.sin(self.t) / self.b
        norm = np.sqrt(nu * nu + nv * nv) + 1e-12
        nx = (nu * self.cos - nv * self.sin) / norm
        ny = (nu * self.sin + nv * self.cos) / norm
        return np.abs(nx * beam_x + ny * beam_y)

    def radius_px(self):
        """Distance from the centre to the ellipse along parameter t, in pixels."""
        return np.sqrt((self.a * np.cos(self.t)) ** 2 + (self.b * np.sin(self.t)) ** 2)


def _ring(frame: _EllipseFrame, center_rho: float, half_width_rho: float):
    return np.exp(-(((frame.rho - center_rho) / half_width_rho) ** 2))


def _segment_distance(x, y, p0, p1):
    p0, p1 = [float(c) for c in p0], [float(c) for c in p1]
    px, py = p1[0] - p0[0], p1[1] - p0[1]
    length2 = px * px + py * py + 1e-9
    s = np.clip(((x - p0[0]) * px + (y - p0[1]) * py) / length2, 0.0, 1.0)
    return np.hypot(x - p0[0] - s * px, y - p0[1] - s * py)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _pixel_grid(height: int, width: int):
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _render_scan(rng, head: _Head, sector: _Sector, pose: _Pose, image_size) -> np.ndarray:
    """Render one B-mode frame (uint8, shape (height, width)) of `head` placed at `pose`, seen through `sector`."""
    width, height = image_size
    anatomy = np.random.default_rng(head.anatomy_seed)

    # ---- beam grid: samples along each beam line of the sector, cropped to what the frame shows
    (apex_x, apex_y), r_min, r_max, half_angle = sector.apex_xy, sector.r_min, sector.r_max, sector.half_angle
    border_x = np.concatenate([np.arange(width), np.arange(width), np.zeros(height), np.full(height, width - 1.0)])
    border_y = np.concatenate([np.zeros(width), np.full(width, height - 1.0), np.arange(height), np.arange(height)])
    r_max = min(r_max, float(np.hypot(border_x - apex_x, border_y - apex_y).max()) + 2.0)
    half_angle = min(half_angle, float(np.abs(np.arctan2(border_x - apex_x, border_y - apex_y)).max()) + 0.01)
    n_depth = int((r_max - r_min) / DEPTH_STEP_PX) + 2
    n_lines = int(2 * half_angle * r_max / LATERAL_STEP_PX) + 2
    depth = np.linspace(r_min, r_max, n_depth, dtype=np.float32)[:, None]
    theta = np.linspace(-half_angle, half_angle, n_lines, dtype=np.float32)[None, :]
    beam_x, beam_y = np.sin(theta), np.cos(theta)
    x = apex_x + depth * beam_x
    y = apex_y + depth * beam_y
    grid = (n_depth, n_lines)
    short_side = min(width, height)

    diffuse = np.empty(grid, np.float32)  # speckle-generating echogenicity (amplitude)
    specular = np.zeros(grid, np.float32)  # bright coherent reflectors (bone)
    attenuation = np.zeros(grid, np.float32)  # what casts shadows behind itself, per sample

    # ---- background tissue with slow texture, placenta and uterine wall as bands across the beams
    diffuse[:] = rng.uniform(0.12, 0.28) * np.exp(0.35 * _smooth_field(rng, grid, (7, 6)))
    for _ in range(rng.integers(1, 3)):
        band_depth = rng.uniform(r_min, r_max) + 0.08 * short_side * _smooth_curve(rng, n_lines, 4)[None, :]
        offset = depth - band_depth
        if rng.random() < 0.6:  # placenta: thick, granular, moderately bright
            thickness = rng.uniform(0.06, 0.2) * short_side
            inside = special.expit(offset / 3.0) * special.expit((thickness - offset) / 6.0)
            level = rng.uniform(0.25, 0.5) * np.exp(0.3 * _smooth_field(rng, grid, (24, 20)))
            diffuse += inside * (level - diffuse)
        wall = np.exp(-((offset / rng.uniform(2.0, 5.0)) ** 2))
        diffuse += rng.uniform(0.3, 0.9) * wall

    head_frame = _EllipseFrame(x, y, pose.center_xy, pose.semi_axes_px, pose.angle_rad)
    a_px, b_px = pose.semi_axes_px

    # ---- amniotic fluid around the head (and a pocket elsewhere): anechoic
    fluid_level = rng.uniform(0.003, 0.015)
    if rng.random() < 0.8:
        margin = rng.uniform(0.05, 0.4) * _harmonics(rng, head_frame.t, 4, 0.7)
        fluid = np.clip((1.0 + margin - head_frame.rho) / 0.03, 0.0, 1.0)  # margin < 0: head touches tissue
        diffuse += fluid * (fluid_level - diffuse)
    for _ in range(rng.integers(0, 3)):
        center = (rng.uniform(0, width), rng.uniform(0, height))
        pocket = _EllipseFrame(x, y, center, rng.uniform(0.05, 0.25, 2) * short_side, rng.uniform(0, np.pi))
        fluid = np.clip((1.0 - pocket.rho * _harmonics(rng, pocket.t, 3, 0.25)) / 0.1, 0.0, 1.0)
        diffuse += fluid * (fluid_level - diffuse)

    # ---- distractors outside the head: other body sections as partial bright arcs, limb bones, a spine
    clutter = np.zeros(grid, np.float32)
    clutter_attenuation = np.zeros(grid, np.float32)
    for _ in range(rng.integers(0, 3)):
        for _attempt in range(20):  # a distractor centred outside the head
            center = (rng.uniform(0, width), rng.uniform(0, height))
            if _EllipseFrame(center[0], center[1], pose.center_xy, pose.semi_axes_px, pose.angle_rad).rho > 1.25:
                break
        axes = (rng.uniform(0.3, 1.0) * a_px, rng.uniform(0.3, 0.9) * b_px)
        arc = _EllipseFrame(x, y, center, axes, rng.uniform(0, np.pi))
        window = np.exp(-((_wrap(arc.t - rng.uniform(-np.pi, np.pi)) / rng.uniform(0.5, 1.8)) ** 4))
        strength = rng.uniform(0.5, 2.0) * window * (0.2 + 0.8 * arc.incidence(beam_x, beam_y) ** 2)
        ring = _ring(arc, 1.0, rng.uniform(0.03, 0.07))
        clutter += strength * ring
        clutter_attenuation += 0.3 * strength * ring
        inner = np.clip((0.97 - arc.rho) / 0.05, 0.0, 1.0)
        diffuse += inner * (rng.uniform(0.08, 0.3) - diffuse)
    for _ in range(rng.integers(0, 3)):
        p0 = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        direction = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.12, 0.35) * short_side
        p1 = p0 + length * np.array([math.cos(direction), math.sin(direction)])
        bone = np.exp(-((_segment_distance(x, y, p0, p1) / rng.uniform(2.0, 4.5)) ** 2))
        strength = rng.uniform(1.0, 2.5)
        clutter += strength * bone
        clutter_attenuation += 1.0 * strength * bone
    if rng.random() < 0.35:
        start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        direction = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.025, 0.045) * short_side
        for k in range(int(rng.integers(5, 11))):
            c = start + k * step * np.array([math.cos(direction), math.sin(direction)])
            vertebra = np.exp(-((x - float(c[0])) ** 2 + (y - float(c[1])) ** 2) / (2 * (0.3 * step) ** 2))
            clutter += rng.uniform(1.0, 2.5) * vertebra
            clutter_attenuation += 0.8 * vertebra
    outside_head = np.clip((head_frame.rho - 1.03) / 0.03, 0.0, 1.0)
    specular += clutter * outside_head
    attenuation += clutter_attenuation * outside_head

    # ---- the head: brain, midline, ventricles with choroid plexus, skull ring, scalp
    skull_half_width = anatomy.uniform(0.022, 0.04)
    skull_center = 1.0 - 1.3 * skull_half_width  # the annotation (rho = 1) follows the outer skull edge
    brain = np.clip((skull_center - skull_half_width - head_frame.rho) / 0.02, 0.0, 1.0)
    brain_level = anatomy.uniform(0.06, 0.2) * np.exp(0.4 * _smooth_field(rng, grid, (12, 10)))
    diffuse += brain * (brain_level - diffuse)
    u, v = head_frame.u, head_frame.v
    front = anatomy.choice([-1.0, 1.0])
    # midline echo (falx) along the long axis, broken into segments
    along = np.interp(u / a_px, np.linspace(-1, 1, 14), rng.random(14)).astype(np.float32)
    segments = np.clip(3.0 * (along - 0.25), 0.0, 1.0)
    midline = np.exp(-((v / rng.uniform(1.0, 2.2)) ** 2)) * segments * brain
    diffuse += rng.uniform(0.3, 0.8) * midline
    # cavum septi pellucidi: a small dark box on the midline in the front half
    csp = (np.abs(v) < anatomy.uniform(0.04, 0.07) * b_px) & (front * u > 0.12 * a_px) & (front * u < 0.32 * a_px)
    diffuse[csp] *= 0.4
    for side in [-1.0, 1.0] if anatomy.random() < 0.5 else [anatomy.choice([-1.0, 1.0])]:
        center_u = -front * anatomy.uniform(0.3, 0.55) * a_px
        center_v = side * anatomy.uniform(0.15, 0.35) * b_px
        c_x = pose.center_xy[0] + center_u * head_frame.cos - center_v * head_frame.sin
        c_y = pose.center_xy[1] + center_u * head_frame.sin + center_v * head_frame.cos
        tilt = pose.angle_rad + side * anatomy.uniform(0.1, 0.5)
        axes = (anatomy.uniform(0.15, 0.25) * a_px, anatomy.uniform(0.05, 0.09) * b_px)
        ventricle = _EllipseFrame(x, y, (c_x, c_y), axes, tilt)
        diffuse *= 1.0 - 0.6 * np.clip((1.0 - ventricle.rho) / 0.3, 0.0, 1.0)
        choroid = np.clip((0.7 - ventricle.rho * _harmonics(rng, ventricle.t, 3, 0.3)) / 0.3, 0.0, 1.0)
        diffuse += rng.uniform(0.15, 0.45) * choroid
    # skull: bright where the beam meets it head-on, faint along the sides, with dropout gaps
    skull_profile = _ring(head_frame, skull_center, skull_half_width)
    skull_gain = (0.06 + 0.94 * head_frame.incidence(beam_x, beam_y) ** 2.5) * _harmonics(rng, head_frame.t, 6, 0.25)
    for _ in range(rng.integers(0, 4)):
        gap = np.exp(-((_wrap(head_frame.t - rng.uniform(-np.pi, np.pi)) / rng.uniform(0.08, 0.35)) ** 2))
        skull_gain = skull_gain * (1.0 - rng.uniform(0.6, 1.0) * gap)
    skull = rng.uniform(2.0, 4.0) * np.clip(skull_gain, 0.0, None) * skull_profile
    specular += skull
    attenuation += rng.uniform(0.2, 0.5) * skull
    scalp = np.exp(-(((head_frame.rho - 1.02) / 0.025) ** 2))
    diffuse += rng.uniform(0.05, 0.25) * scalp

    # ---- shadows: transmission behind each sample along its beam line, streaky across lines
    line_variation = np.exp(0.4 * _smooth_curve(rng, n_lines, max(4, n_lines // 6)))[None, :]
    optical_depth = np.cumsum(attenuation * line_variation, axis=0) * (DEPTH_STEP_PX / (4.0 * short_side / 540.0))
    optical_depth -= attenuation * line_variation * (DEPTH_STEP_PX / (4.0 * short_side / 540.0))
    transmission = np.exp(-0.15 * optical_depth)

    # ---- near-field reverberation and depth gain (attenuation with an imperfect time-gain compensation)
    near = np.exp(-(depth - r_min) / (rng.uniform(0.02, 0.08) * height))
    diffuse += rng.uniform(0.1, 0.5) * near * np.exp(0.5 * _smooth_field(rng, grid, (8, 30)))
    relative_depth = (depth - r_min) / (r_max - r_min)
    gain = np.exp(-rng.uniform(0.0, 1.2) * relative_depth + 0.2 * _smooth_curve(rng, n_depth, 5)[:, None])
    gain = gain * np.exp(0.15 * _smooth_curve(rng, n_lines, 4))[None, :]

    # ---- correlated Rayleigh speckle, amplitude image, log compression with random gain / dynamic range
    noise = rng.standard_normal((2, *grid), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0, 0.9, 1.1), mode="wrap")
    speckle = np.hypot(noise[0], noise[1])
    speckle /= speckle.mean()
    np.maximum(diffuse, 0.0, out=diffuse)
    amplitude = (diffuse * speckle + specular * (0.55 + 0.45 * speckle)) * transmission * gain
    decibels = 20.0 * np.log10(amplitude + 1e-4)
    dynamic_range = rng.uniform(40.0, 55.0)
    top = np.percentile(decibels[::3, ::3], 99.8) + rng.uniform(-4.0, 2.0)
    polar_image = np.clip((decibels - (top - dynamic_range)) / dynamic_range, 0.0, 1.0) ** rng.uniform(0.9, 1.4)

    # ---- scan conversion to the cartesian frame; black outside the sector
    rows, cols = _pixel_grid(height, width)
    dx, dy = cols - apex_x, rows - apex_y
    radius = np.hypot(dx, dy)
    angle = np.arctan2(dx, dy)
    depth_step, line_step = depth[1, 0] - depth[0, 0], theta[0, 1] - theta[0, 0]
    coords = np.stack([(radius - r_min) / depth_step, (angle + half_angle) / line_step])
    image = ndimage.map_coordinates(polar_image, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    image = image * 255.0 + 1.5 * rng.standard_normal(image.shape, dtype=np.float32) * (image > 0)
    return np.clip(image, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Writing the data set
# --------------------------------------------------------------------------------------------------------------------
def _plan(num_subjects: int, repeat_fraction: float, seed: int):
    """[(subject, scan, head)] for every image of the phantom, in file order."""
    scans = []
    for subject in range(num_subjects):
        head = _subject_head(seed, subject, repeat_fraction)
        scans.extend((subject, scan, head) for scan in range(1, head.num_scans + 1))
    return scans


def _render(seed: int, subject: int, scan: int, head: _Head, image_size):
    rng, sector, pose = _draw_scene(seed, subject, scan, head, image_size)
    image = _render_scan(rng, head, sector, pose, image_size)
    outline = ellipse_outline(image.shape, pose.center_xy, pose.semi_axes_px, pose.angle_rad)
    return image, outline, pose


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    write_atomic(path, lambda f: Image.fromarray(array).save(f, format="PNG", compress_level=1), binary=True)


def generate_phantom(
    dataset_dir, num_subjects=200, repeat_fraction=0.2, image_size=(800, 540), seed=0, progress=True
) -> Path:
    """Write a synthetic HC18-like training set into `dataset_dir` (layout in the module docstring).

    `image_size` is (width, height) as PIL states it; arrays are (height, width). Returns the `training_set` folder.
    Idempotent: a complete phantom with the same parameters (recorded in phantom.json) is returned as is; an
    interrupted one is finished; one with other parameters is replaced. A folder holding images that the phantom
    did not write is refused.
    """
    dataset_dir = Path(dataset_dir)
    width, height = (int(side) for side in image_size)
    if num_subjects < 1 or width < 64 or height < 64 or not 0.0 <= repeat_fraction <= 1.0 or int(seed) < 0:
        raise ValueError(
            f"phantom parameters out of range: num_subjects={num_subjects} (>= 1), image_size={image_size} "
            f"(each side >= 64), repeat_fraction={repeat_fraction} (0-1), seed={seed} (>= 0)"
        )
    params = {
        "num_subjects": int(num_subjects),
        "repeat_fraction": float(repeat_fraction),
        "image_size": [width, height],
        "seed": int(seed),
    }
    training_dir = dataset_dir / TRAINING_DIR_NAME
    csv_path = dataset_dir / TRAINING_CSV_NAME
    marker_path = dataset_dir / PHANTOM_MARKER_NAME
    plan = _plan(params["num_subjects"], params["repeat_fraction"], params["seed"])
    names = [_scan_name(subject, scan) for subject, scan, _ in plan]

    previous = json.loads(marker_path.read_text()) if marker_path.is_file() else None
    resume = previous is not None and previous.get("params") == params and previous.get("version") == PHANTOM_VERSION
    if resume:
        if (
            previous.get("complete")
            and csv_path.is_file()
            and all(
                (training_dir / f"{n}.png").is_file() and (training_dir / f"{n}_Annotation.png").is_file()
                for n in names
            )
        ):
            return training_dir
    elif previous is not None:  # another phantom: remove exactly the files it wrote
        for name in previous.get("images", []):
            for path in (training_dir / f"{name}.png", training_dir / f"{name}_Annotation.png"):
                path.unlink(missing_ok=True)
        logger.info("replacing the phantom in %s (parameters changed)", dataset_dir)
    elif training_dir.is_dir() and any(training_dir.glob("*.png")):
        raise ValueError(f"{training_dir} holds images that the phantom did not write; refusing to overwrite them")

    training_dir.mkdir(parents=True, exist_ok=True)
    marker = {
        "generator": "scripts.data.phantom",
        "version": PHANTOM_VERSION,
        "params": params,
        "complete": False,
        "images": names,
    }
    write_json_atomic(marker_path, marker)

    rows = []
    for (subject, scan, head), name in zip(tqdm(plan, desc="phantom", unit="image", disable=not progress), names):
        image_path, annotation_path = training_dir / f"{name}.png", training_dir / f"{name}_Annotation.png"
        if resume and image_path.is_file() and annotation_path.is_file():
            pose = _draw_scene(params["seed"], subject, scan, head, (width, height))[2]
        else:  # write only what is missing: files from an interrupted run were written whole (atomically)
            image, outline, pose = _render(params["seed"], subject, scan, head, (width, height))
            for array, path in ((image, image_path), (outline, annotation_path)):
                if not (resume and path.is_file()):
                    _save_png_atomic(array, path)
        rows.append((f"{name}.png", f"{pose.pixel_size_mm:.9f}", f"{pose.hc_mm:.2f}"))

    def write_csv(handle):
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TRAINING_CSV_HEADER)
        writer.writerows(rows)

    write_atomic(csv_path, write_csv)
    marker["complete"] = True
    write_json_atomic(marker_path, marker)
    logger.info("phantom: %d subjects, %d images in %s", num_subjects, len(names), training_dir)
    return training_dir


def save_phantom_montage(training_dir, output_png, count=8, columns=4, tile_width=400) -> Path:
    """Save the first `count` images of an HC18-layout folder as a grid: each row of images, then the same images
    with their annotation outlines in red."""
    training_dir = Path(training_dir)
    images = sorted(p for p in training_dir.glob("*HC.png"))[:count]
    if not images:
        raise FileNotFoundError(f"{training_dir}: no NNN_HC.png images to show")
    plain, annotated = [], []
    for path in images:
        gray = np.asarray(Image.open(path).convert("L"))
        outline = np.asarray(Image.open(path.with_name(path.stem + "_Annotation.png")).convert("L")) > 0
        outline = ndimage.binary_dilation(outline, iterations=max(1, gray.shape[1] // (2 * tile_width)))
        rgb = np.repeat(gray[..., None], 3, axis=2)
        tile_height = round(tile_width * gray.shape[0] / gray.shape[1])
        plain.append(Image.fromarray(rgb).resize((tile_width, tile_height), Image.BILINEAR))
        rgb[outline] = (255, 40, 40)
        annotated.append(Image.fromarray(rgb).resize((tile_width, tile_height), Image.BILINEAR))
    tile_height = plain[0].height
    groups = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * tile_width, 2 * groups * tile_height))
    for index in range(len(images)):
        x, group = (index % columns) * tile_width, index // columns
        sheet.paste(plain[index], (x, 2 * group * tile_height))
        sheet.paste(annotated[index], (x, (2 * group + 1) * tile_height))
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(output_png)
    return output_png
