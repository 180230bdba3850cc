"""Ultrasound DICOM in: the five real ultrasound files pydicom ships, pixel sizes from the US regions, clear errors."""

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from scripts.data.dicom import export_frames, read_ultrasound_dicom
from scripts.deployment.inference import list_images, source_frames

# name -> (frames, rows, columns, pixel size in mm or None)
FILES = {
    "examples_rgb_color.dcm": (1, 240, 320, None),
    "examples_palette.dcm": (1, 350, 800, 0.2623),
    "examples_jpeg2k.dcm": (1, 480, 640, None),
    "examples_ybr_color.dcm": (30, 240, 320, 0.510),
    "ExplVR_BigEnd.dcm": (1, 60, 80, None),
}


@pytest.mark.parametrize("name", FILES)
def test_real_ultrasound_files_decode_with_frames_and_pixel_size(name):
    frames, size, info = read_ultrasound_dicom(get_testdata_file(name))
    count, rows, columns, mm = FILES[name]
    assert frames.shape == (count, rows, columns, 3) and frames.dtype == np.uint8, frames.shape
    if mm is None:
        assert size is None and info["pixel_size_source"] == "unknown"
    else:
        assert size == pytest.approx((mm, mm), rel=1e-3) and info["pixel_size_source"] == "SequenceOfUltrasoundRegions"


def test_ybr_is_converted_to_rgb_once():
    path = get_testdata_file("examples_ybr_color.dcm")
    frames, _, info = read_ultrasound_dicom(path)
    ds = pydicom.dcmread(path)
    assert info["photometric"] == "YBR_FULL_422" and "JPEG Baseline" in info["transfer_syntax"]
    reference = ds.pixel_array  # pydicom 3 returns RGB for YBR by default
    assert np.array_equal(frames, reference)
    twice = convert_color_space(reference[0], "YBR_FULL", "RGB")
    assert np.abs(frames[0].astype(int) - twice.astype(int)).mean() > 10  # a second conversion would change it


def test_palette_is_applied():
    path = get_testdata_file("examples_palette.dcm")
    frames, _, info = read_ultrasound_dicom(path)
    indices = pydicom.dcmread(path).pixel_array
    assert info["photometric"] == "PALETTE COLOR" and indices.ndim == 2
    # the LUT maps one index to one colour: equal indices give equal RGB, and the image is not grey indices
    for value in np.unique(indices)[:20]:
        colours = np.unique(frames[0][indices == value], axis=0)
        assert len(colours) == 1
    assert not np.array_equal(frames[0][..., 0], indices)


def test_cine_exports_one_png_per_frame_with_its_pixel_size(tmp_path):
    items = export_frames(get_testdata_file("examples_ybr_color.dcm"), tmp_path)
    assert len(items) == 30 and items[3]["frame"] == 3 and items[3]["image"].endswith("examples_ybr_color_f003.png")
    assert items[0]["pixel_size_mm"] == pytest.approx([0.510, 0.510], rel=1e-3)
    listed = list_images(get_testdata_file("examples_palette.dcm"))  # listed, not decoded: that is per file, later
    assert listed == [{"image": str(get_testdata_file("examples_palette.dcm")), "dicom": True}]
    frames = source_frames(listed[0], str(tmp_path / "single"))
    assert len(frames) == 1 and frames[0]["pixel_size_mm"] == pytest.approx([0.2623, 0.2623], rel=1e-3)


def write_dicom_without_pixels(path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: no image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)


def test_bad_dicom_inputs_name_the_file(tmp_path, monkeypatch):
    report = tmp_path / "report.dcm"
    write_dicom_without_pixels(report)
    with pytest.raises(ValueError, match=r"report\.dcm: the DICOM holds no image \(Comprehensive SR"):
        read_ultrasound_dicom(report)
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file")
    with pytest.raises(ValueError, match=r"notes\.dcm: not a readable DICOM file"):
        read_ultrasound_dicom(text)

    def no_decoder(self):
        raise RuntimeError(
            "Unable to decompress 'JPEG Baseline (Process 1)' pixel data because all plugins are missing"
        )

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    with pytest.raises(
        ValueError,
        match=r"examples_ybr_color\.dcm: cannot decode its pixel data \(JPEG Baseline"
        r".*pylibjpeg",
    ):
        read_ultrasound_dicom(get_testdata_file("examples_ybr_color.dcm"))
