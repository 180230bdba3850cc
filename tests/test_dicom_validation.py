"""Every SEG and SR the bundle writes passes dciodvfy (David Clunie's dicom3tools, Debian package dicom3tools).

Sources: pydicom's five real ultrasound files (single-frame RGB, palette colour, JPEG 2000, the 30-frame YBR JPEG
cine, and a big-endian legacy file without patient attributes) and a synthetic MONOCHROME2 phantom. For each, SEGs
(an ellipse and an empty mask) and SRs with and without quality flags; dciodvfy must report no "Error" line.
Warnings are allowed (e.g. the source's own one-component patient names, or the private flag coding scheme).
"""

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from skimage.draw import ellipse

from scripts.clinical.dicom_objects import phantom_ultrasound_dicom, write_results

DCIODVFY = shutil.which("dciodvfy")
pytestmark = [
    pytest.mark.skipif(
        DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools; .ci/run installs it)"
    ),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
]
SOURCES = [
    "examples_rgb_color.dcm",
    "examples_palette.dcm",
    "examples_jpeg2k.dcm",
    "examples_ybr_color.dcm",
    "ExplVR_BigEnd.dcm",
    "phantom",
]


def dciodvfy_errors(path) -> list[str]:
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


def measurement(circumference=171.3, flags=""):
    return {
        "unit": "mm",
        "center_x": 40.0,
        "center_y": 30.0,
        "semi_axes_a": 30.0,
        "semi_axes_b": 24.5,
        "angle_rad": 0.4,
        "circumference": circumference,
        "area": 2300.0,
        "flags": flags,
    }


@pytest.mark.parametrize("name", SOURCES)
def test_seg_and_sr_pass_dciodvfy(name, tmp_path):
    if name == "phantom":
        image = np.random.default_rng(0).integers(0, 255, (120, 160), dtype=np.uint8)
        path = phantom_ultrasound_dicom(image, 0.2, tmp_path / "phantom.dcm")
    else:
        path = get_testdata_file(name)
    source = pydicom.dcmread(path)
    shape = (source.Rows, source.Columns)
    head = np.zeros(shape, np.uint8)
    head[ellipse(shape[0] // 2, shape[1] // 2, shape[0] // 4, shape[1] // 4, shape=shape)] = 1
    flagged = measurement(568.9, "circumference_out_of_range;touches_sector_border;several_components")
    written = []
    if int(getattr(source, "NumberOfFrames", 1) or 1) > 1:  # cine: flagged, unflagged and empty frames in one SR
        masks = {0: head, 3: head, 7: np.zeros(shape, np.uint8)}
        written += write_results(path, masks, {0: measurement(), 3: flagged}, tmp_path / "cine", model_id="m")
    else:
        written += write_results(path, {0: head}, {0: measurement()}, tmp_path / "plain", model_id="m")
        written += write_results(path, {0: head}, {0: flagged}, tmp_path / "flagged", model_id="m2")
        written += write_results(path, {0: np.zeros(shape, np.uint8)}, None, tmp_path / "empty", model_id="m3")
    kinds = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in written)
    assert kinds.count("SR") == (1 if len(kinds) == 4 else 2) and "SEG" in kinds, kinds
    errors = {p.name: dciodvfy_errors(p) for p in written}
    assert not any(errors.values()), {k: v for k, v in errors.items() if v}
