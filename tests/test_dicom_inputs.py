"""Inputs that cannot break the DICOM reader: a seeded corpus of mutated ultrasound DICOMs built from pydicom's five
real ultrasound files. Each class of damage ends in one ValueError that names the file and the problem (one test
per class), and a seeded random corpus (attribute deletions and changes, truncations, byte flips) ends in either
frames that agree with the header or such a ValueError, never in another exception.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from scripts.data.dicom import PIXEL_SIZE_RANGE_MM, read_ultrasound_dicom

RGB, PALETTE, JPEG2K, CINE, BIG_ENDIAN = (
    "examples_rgb_color.dcm",
    "examples_palette.dcm",
    "examples_jpeg2k.dcm",
    "examples_ybr_color.dcm",
    "ExplVR_BigEnd.dcm",
)
SOURCES = [RGB, PALETTE, JPEG2K, CINE, BIG_ENDIAN]


def mutated(tmp_path, source, change, name="mutated.dcm"):
    """``source`` (a pydicom test file) with ``change(ds)`` applied, written to ``tmp_path/name``."""
    ds = pydicom.dcmread(get_testdata_file(source))
    change(ds)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=False)
    return path


def raw(tmp_path, data: bytes, name="raw.dcm"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def source_bytes(source):
    return Path(get_testdata_file(source)).read_bytes()


def fails(path, message):
    """read_ultrasound_dicom(path) raises one ValueError that starts with the path and matches ``message``."""
    with pytest.raises(ValueError) as error:
        read_ultrasound_dicom(path)
    text = str(error.value)
    assert text.startswith(f"{path}: "), text
    assert re.search(message, text), text
    assert "\n" not in text
    return text


def test_zero_byte_and_non_dicom_files(tmp_path):
    fails(raw(tmp_path, b"", "empty.dcm"), r"not a readable DICOM file \(empty file, 0 bytes\)")
    fails(raw(tmp_path, b"just some text\n", "notes.dcm"), r"not a readable DICOM file \(InvalidDicomError")
    png = b"\x89PNG\r\n\x1a\n" + bytes(200)
    fails(raw(tmp_path, png, "picture.dcm"), "not a readable DICOM file")


@pytest.mark.parametrize(
    "keyword",
    [
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
    ],
)
def test_deleted_image_pixel_attribute(tmp_path, keyword):
    path = mutated(tmp_path, RGB, lambda ds: delattr(ds, keyword))
    fails(path, rf"the Image Pixel module lacks {keyword}: cannot lay out the pixels")


def test_deleted_planar_configuration_of_colour_data(tmp_path):
    path = mutated(tmp_path, RGB, lambda ds: delattr(ds, "PlanarConfiguration"))
    fails(path, r"lacks PlanarConfiguration \(required for SamplesPerPixel 3\)")


@pytest.mark.parametrize(
    "keyword, value, message",
    [
        ("BitsAllocated", 12, r"BitsAllocated is 12; expected one of \[1, 8, 16, 32\]"),
        ("SamplesPerPixel", 2, r"SamplesPerPixel is 2; expected one of \[1, 3\]"),
        ("BitsStored", 16, r"BitsStored 16 exceeds BitsAllocated 8"),
        ("PhotometricInterpretation", "HSV", r"PhotometricInterpretation 'HSV' is not one of"),
        ("Rows", 0, r"Rows is 0; expected >= 1"),
    ],
)
def test_wrong_image_pixel_values(tmp_path, keyword, value, message):
    fails(mutated(tmp_path, RGB, lambda ds: setattr(ds, keyword, value)), message)


@pytest.mark.parametrize("source", [RGB, CINE, JPEG2K])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_monochrome_photometric_on_colour_data(tmp_path, source, photometric):
    path = mutated(tmp_path, source, lambda ds: setattr(ds, "PhotometricInterpretation", photometric))
    fails(path, rf"PhotometricInterpretation {photometric} needs SamplesPerPixel 1, the header says 3")


def test_monochrome_with_one_sample_on_rgb_data(tmp_path):
    def grey(ds):
        ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1

    fails(mutated(tmp_path, RGB, grey), r"pixel data holds 230400 bytes, but the header .* needs 76800")


@pytest.mark.parametrize("table", ["RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableDescriptor"])
def test_palette_colour_without_lookup_table(tmp_path, table):
    path = mutated(tmp_path, PALETTE, lambda ds: delattr(ds, table))
    fails(path, rf"PALETTE COLOR without its lookup table \(missing {table}\)")


def test_palette_colour_on_rgb_data(tmp_path):
    path = mutated(tmp_path, RGB, lambda ds: setattr(ds, "PhotometricInterpretation", "PALETTE COLOR"))
    fails(path, r"PhotometricInterpretation PALETTE COLOR needs SamplesPerPixel 1, the header says 3")


def test_single_valued_pixel_spacing(tmp_path):
    path = mutated(tmp_path, RGB, lambda ds: setattr(ds, "PixelSpacing", "0.2"))
    fails(path, r"PixelSpacing must hold two values \(row, column spacing in mm\), it holds 1: '0.2'")


@pytest.mark.parametrize("delta, shown", [(1e30, "1e+31"), (1e-6, "1e-05")])
def test_implausible_ultrasound_region_pixel_size(tmp_path, delta, shown):
    def deltas(ds):
        ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY = delta

    size = re.escape(f"{shown} x {shown}")
    text = fails(
        mutated(tmp_path, PALETTE, deltas),
        rf"implausible physical pixel size {size} mm from "
        r"SequenceOfUltrasoundRegions",
    )
    assert f"{PIXEL_SIZE_RANGE_MM[0]:g}-{PIXEL_SIZE_RANGE_MM[1]:g} mm" in text


def test_implausible_pixel_spacing(tmp_path):
    fails(
        mutated(tmp_path, RGB, lambda ds: setattr(ds, "PixelSpacing", [0, 0])),
        r"implausible physical pixel size 0 x 0 mm from PixelSpacing",
    )
    fails(
        mutated(tmp_path, RGB, lambda ds: setattr(ds, "PixelSpacing", ["nan", "0.2"]), "nan.dcm"),
        r"implausible physical pixel size 0.2 x nan mm from PixelSpacing",
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda ds: setattr(ds, "Columns", ds.Columns - 1),
            r"holds 230400 bytes, but the header \(Rows 240 x Columns "
            r"319 x 3 samples x 8 bits x 1 frame\(s\)\) needs 229680",
        ),
        (lambda ds: setattr(ds, "Rows", ds.Rows // 2), r"holds 230400 bytes, but the header \(Rows 120 .*needs 115200"),
        (lambda ds: setattr(ds, "Rows", ds.Rows * 2), r"holds 230400 bytes, but the header \(Rows 480 .*needs 460800"),
    ],
)
def test_rows_or_columns_inconsistent_with_native_pixel_data(tmp_path, change, message):
    fails(mutated(tmp_path, RGB, change), message)


@pytest.mark.parametrize("source, size", [(CINE, "240 x 320"), (JPEG2K, "480 x 640")])
def test_rows_or_columns_inconsistent_with_compressed_pixel_data(tmp_path, source, size):
    path = mutated(tmp_path, source, lambda ds: setattr(ds, "Columns", ds.Columns - 1))
    fails(path, rf"the compressed image is {size} with 3 component\(s\), the header says Rows \d+ x Columns \d+")


@pytest.mark.parametrize("source, photometric", [(RGB, "RGB"), (CINE, "YBR_FULL_422"), (JPEG2K, "YBR_RCT")])
def test_one_sample_per_pixel_on_colour_data(tmp_path, source, photometric):
    path = mutated(tmp_path, source, lambda ds: setattr(ds, "SamplesPerPixel", 1))
    fails(path, rf"PhotometricInterpretation {photometric} needs SamplesPerPixel 3, the header says 1")


@pytest.mark.parametrize(
    "source, frames, message",
    [
        (RGB, 2, r"pixel data holds 230400 bytes, but the header .* 2 frame\(s\)\) needs 460800"),
        (CINE, 31, r"the pixel data holds 30 frame\(s\), the header's NumberOfFrames says 31"),
        (CINE, 2, r"the pixel data holds 30 frame\(s\), the header's NumberOfFrames says 2"),
        (JPEG2K, 2, r"the pixel data holds 1 frame\(s\), the header's NumberOfFrames says 2"),
        (CINE, 0, r"NumberOfFrames is 0; expected >= 1"),
        (CINE, None, r"the pixel data holds 30 frame\(s\), the header's NumberOfFrames says 1"),
    ],
)
def test_frame_count_disagrees_with_the_pixel_data(tmp_path, source, frames, message):
    def count(ds):
        if frames is None:
            del ds.NumberOfFrames
        else:
            ds.NumberOfFrames = frames

    fails(mutated(tmp_path, source, count), message)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.99])
def test_truncated_native_pixel_data(tmp_path, fraction):
    data = source_bytes(RGB)
    fails(
        raw(tmp_path, data[: int(len(data) * fraction)]),
        r"the pixel data holds \d+ bytes, but the header .* "
        r"needs 230400",
    )


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_truncated_compressed_pixel_data(tmp_path, fraction):
    data = source_bytes(CINE)
    fails(raw(tmp_path, data[: int(len(data) * fraction)]), r"truncated DICOM file \(End of file reached")


@pytest.mark.parametrize("length", [132, 300, 600, 1000])
def test_truncated_header(tmp_path, length):
    fails(raw(tmp_path, source_bytes(RGB)[:length]), r"truncated DICOM file|truncated or damaged")


def test_unknown_value_representation(tmp_path):
    """A flipped byte in an explicit VR turns it into one pydicom does not know."""
    data = bytearray(source_bytes(RGB))
    position = data.find(b"DA", 200)  # the first date's VR
    data[position : position + 2] = b"Q1"
    fails(
        raw(tmp_path, bytes(data)),
        r"not a readable DICOM file \(NotImplementedError: .*Unknown Value "
        r"Representation .* in tag \(0008,0012\)\)$",
    )


def test_compressed_syntax_on_native_pixel_data(tmp_path):
    """The cine's transfer syntax rewritten to Explicit VR Little Endian: its JPEG bytes read as raw pixels."""
    data = source_bytes(CINE)
    position = data.find(b"1.2.840.10008.1.2.4.50")
    data = data[:position] + b"1.2.840.10008.1.2.1\x00\x00\x00" + data[position + 22 :]
    fails(raw(tmp_path, data), r"the pixel data holds \d+ bytes, but the header")


def test_good_files_still_read():
    for name in SOURCES:
        frames, _, info = read_ultrasound_dicom(get_testdata_file(name))
        assert frames.ndim == 4 and frames.shape[0] == info["frames"] >= 1


# ---- a seeded random corpus ----------------------------------------------------------------------------------------

KEYWORDS = [
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
    "PixelSpacing",
]
VALUES = [0, 1, 2, 3, 7, 16, 31, 65535, "MONOCHROME2", "PALETTE COLOR", "YBR_FULL", "0.2", ["0.1", "0.1"]]


def random_corpus(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` mutants of the five files: a deleted or changed pixel-module attribute, a truncation, or flipped
    bytes, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        source = SOURCES[i % len(SOURCES)]
        kind = ["delete", "change", "truncate", "flip"][int(rng.integers(4))]
        path = folder / f"{i:03d}_{kind}_{source}"
        if kind in ("delete", "change"):
            keyword = KEYWORDS[int(rng.integers(len(KEYWORDS)))]
            value = VALUES[int(rng.integers(len(VALUES)))]
            ds = pydicom.dcmread(get_testdata_file(source))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    if kind == "delete" and keyword in ds:
                        delattr(ds, keyword)
                    elif kind == "change":
                        setattr(ds, keyword, value)
                    ds.save_as(path, enforce_file_format=False)
                except (OSError, TypeError, ValueError):  # a value pydicom cannot write for this VR: unchanged
                    pydicom.dcmread(get_testdata_file(source)).save_as(path, enforce_file_format=False)
        else:
            data = bytearray(source_bytes(source))
            if kind == "truncate":
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for position in rng.integers(0, len(data), int(rng.integers(1, 5))):
                    data[position] ^= 1 << int(rng.integers(8))
            path.write_bytes(bytes(data))
        paths.append(path)
    return paths


def test_seeded_random_corpus_reads_consistently_or_fails_with_a_message(tmp_path):
    outcomes = {"read": 0, "refused": 0}
    for path in random_corpus(tmp_path, 60):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frames, size, info = read_ultrasound_dicom(path)
        except ValueError as error:
            assert str(error).startswith(f"{path}: "), (path.name, str(error))
            outcomes["refused"] += 1
            continue
        # what was read agrees with the header
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        assert frames.shape[:3] == (int(header.get("NumberOfFrames") or 1), header.Rows, header.Columns), path.name
        assert frames.dtype == np.uint8 and info["frames"] == frames.shape[0]
        assert size is None or all(PIXEL_SIZE_RANGE_MM[0] <= v <= PIXEL_SIZE_RANGE_MM[1] for v in size)
        outcomes["read"] += 1
    assert outcomes["read"] >= 5 and outcomes["refused"] >= 20, outcomes
