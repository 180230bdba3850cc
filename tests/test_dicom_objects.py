"""DICOM SEG and measurement SR out: round trips through pydicom and highdicom, references, codes, UIDs, errors."""

import csv
import json
import logging
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import UID
from skimage.draw import ellipse

from scripts.clinical.dicom_objects import derived_uid, phantom_ultrasound_dicom, write_results
from scripts.data.dicom import read_ultrasound_dicom
from scripts.data.hc18 import TRAINING_CSV_NAME, load_hc18_mask
from scripts.data.phantom import generate_phantom
from scripts.evaluation.biometry import fit_ellipse

METADATA = json.loads((Path(__file__).resolve().parents[1] / "configs" / "metadata.json").read_text())
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

# the pydicom test files carry a one-component patient name that highdicom warns about
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name")


def filled_ellipse(shape, center, radii, rotation):
    mask = np.zeros(shape, np.uint8)
    rows, columns = ellipse(*center, *radii, shape=shape, rotation=rotation)
    mask[rows, columns] = 1
    return mask


def by_modality(paths):
    found = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        found.setdefault(ds.Modality, []).append((path, ds))
    return found


def content_items(items):
    """Every content item of an SR tree, depth first."""
    for item in items:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def numeric_values(sr):
    """{concept code: (value, UCUM unit)} of the NUM items in the SR."""
    return {
        item.ConceptNameCodeSequence[0].CodeValue: (
            float(item.MeasuredValueSequence[0].NumericValue),
            item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0],
        )
        for item in content_items(sr.ContentSequence)
        if item.ValueType == "NUM"
    }


def as_list(value):
    """A multi-valued element's value as a list of ints (pydicom returns a single value bare)."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, pydicom.multival.MultiValue)) else [int(value)]


def image_references(sr):
    """[(referenced SOP instance UID, frame numbers, segment numbers)] of the IMAGE items in the SR."""
    found = []
    for item in content_items(sr.ContentSequence):
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            found.append(
                (
                    ref.ReferencedSOPInstanceUID,
                    as_list(ref.get("ReferencedFrameNumber")),
                    as_list(ref.get("ReferencedSegmentNumber")),
                )
            )
    return found


def mm_row(circumference=171.3, a=30.0, b=24.5, area=2300.0):
    return {
        "unit": "mm",
        "center_x": 40.0,
        "center_y": 30.0,
        "semi_axes_a": a,
        "semi_axes_b": b,
        "angle_rad": 0.4,
        "circumference": circumference,
        "area": area,
    }


def test_seg_of_a_single_frame_ultrasound_round_trips(tmp_path):
    path = get_testdata_file("examples_rgb_color.dcm")
    source = pydicom.dcmread(path)
    mask = filled_ellipse((source.Rows, source.Columns), (120, 150), (70, 100), 0.3)
    paths = write_results(path, {0: mask}, None, tmp_path, model_id="unext-test")
    found = by_modality(paths)
    assert list(found) == ["SEG"] and len(found["SEG"]) == 1  # no measurement in mm: no SR
    seg_path, seg = found["SEG"][0]

    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SOPInstanceUID != source.SOPInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    series = seg.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "fetal head" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert (
        segment.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator,
    ) == ("69536005", "SCT")
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert METADATA["name"].startswith(algorithm.AlgorithmName) and len(algorithm.AlgorithmName) > 10
    assert algorithm.AlgorithmVersion == METADATA["version"]

    read = hd.seg.segread(seg_path)
    pixels = read.get_pixels_by_source_instance([source.SOPInstanceUID], dtype=np.uint8)
    assert pixels.shape == (1, source.Rows, source.Columns, 1)
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)


def test_uids_are_the_same_on_a_rerun_and_differ_for_another_model(tmp_path):
    path = get_testdata_file("examples_rgb_color.dcm")
    mask = filled_ellipse((240, 320), (120, 150), (50, 60), 0.0)
    first = write_results(path, {0: mask}, None, tmp_path / "a", model_id="m1")
    again = write_results(path, {0: mask}, None, tmp_path / "b", model_id="m1")
    other = write_results(path, {0: mask}, None, tmp_path / "c", model_id="m2")
    assert [p.name for p in first] == [p.name for p in again]
    assert {p.name for p in first}.isdisjoint(p.name for p in other)


def test_derived_uid_is_deterministic_valid_and_distinct():
    uid = derived_uid("1.2.3.4", "SEG", "model")
    assert uid == derived_uid("1.2.3.4", "SEG", "model")
    assert len(uid) <= 64 and UID(uid).is_valid
    others = {
        derived_uid("1.2.3.5", "SEG", "model"),
        derived_uid("1.2.3.4", "SR", "model"),
        derived_uid("1.2.3.4", "SEG", "other"),
        derived_uid("1.2.3.4", "SEGmodel"),
        derived_uid("1.2.3.4", "SE", "Gmodel"),
    }
    assert len(others) == 5 and uid not in others


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A rendered fetal-head phantom scan: (image, filled head mask, pixel size mm, HC mm from its CSV)."""
    root = tmp_path_factory.mktemp("phantom")
    training = generate_phantom(root, num_subjects=1, repeat_fraction=0.0, image_size=(320, 240), progress=False)
    with open(root / TRAINING_CSV_NAME, newline="") as f:
        row = next(csv.DictReader(f))
    image = np.asarray(Image.open(training / row["filename"]).convert("L"))
    mask = load_hc18_mask(training / row["filename"].replace(".png", "_Annotation.png"))
    return image, mask, float(row["pixel size(mm)"]), float(row["head circumference (mm)"])


def test_phantom_dicom_reads_back_with_its_pixel_size_and_its_seg_round_trips(phantom, tmp_path):
    image, mask, pixel_size, _ = phantom
    path = phantom_ultrasound_dicom(image, pixel_size, tmp_path / "phantom.dcm", patient_id="PH-7")
    frames, size, info = read_ultrasound_dicom(path)
    assert frames.shape == (1, *image.shape) and info["pixel_size_source"] == "SequenceOfUltrasoundRegions"
    np.testing.assert_array_equal(frames[0], image)
    assert size == pytest.approx((pixel_size, pixel_size), rel=1e-12)
    source = pydicom.dcmread(path)
    assert source.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage
    assert source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # explicit VR little endian
    assert source.PhotometricInterpretation == "MONOCHROME2" and source.BitsAllocated == 8

    (seg_path,) = write_results(path, {0: mask}, {}, tmp_path / "out")
    seg = pydicom.dcmread(seg_path)
    assert seg.PatientID == "PH-7" and seg.StudyInstanceUID == source.StudyInstanceUID
    pixels = hd.seg.segread(seg_path).get_pixels_by_source_instance([source.SOPInstanceUID], dtype=np.uint8)
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask)


def test_measurement_sr_holds_the_circumference_in_mm_and_references_source_and_seg(phantom, tmp_path):
    image, mask, pixel_size, csv_hc = phantom
    path = phantom_ultrasound_dicom(image, pixel_size, tmp_path / "phantom.dcm")
    fit = fit_ellipse(mask.T, (pixel_size, pixel_size))  # biometry takes mask[x, y]
    assert fit["circumference_mm"] == pytest.approx(csv_hc, rel=0.03)  # the phantom's analytic HC
    row = {"unit": "mm", **{k.removesuffix("_mm2").removesuffix("_mm"): v for k, v in fit.items()}}
    found = by_modality(write_results(path, {0: mask}, {0: row}, tmp_path / "out", model_id="unext"))
    (_, seg), (_, sr) = found["SEG"][0], found["SR"][0]
    source = pydicom.dcmread(path)

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.PatientID == source.PatientID and sr.StudyInstanceUID == source.StudyInstanceUID
    values = numeric_values(sr)
    value, unit = values["11984-2"]  # LOINC Head Circumference
    assert value == pytest.approx(row["circumference"], rel=1e-9)
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mm", "UCUM")
    assert values["131187009"][0] == pytest.approx(2 * row["semi_axes_a"], rel=1e-9)  # Major Axis
    assert values["131188004"][0] == pytest.approx(2 * row["semi_axes_b"], rel=1e-9)  # Minor Axis
    assert values["42798000"][1].CodeValue == "mm2"
    references = image_references(sr)
    assert (source.SOPInstanceUID, [], []) in references
    # frame 1 of the SEG; the frame names its segment, so no Referenced Segment Number beside it (PS3.3 C.10.9)
    assert (seg.SOPInstanceUID, [1], []) in references
    evidence = {
        ref.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, seg.SOPInstanceUID}
    assert not quality_findings(sr) and "CodingSchemeIdentificationSequence" not in sr  # an unflagged measurement


def test_cine_gets_one_seg_per_selected_frame_and_pixel_frames_stay_out_of_the_sr(tmp_path, caplog):
    path = get_testdata_file("examples_ybr_color.dcm")
    source = pydicom.dcmread(path)
    shape = (source.Rows, source.Columns)
    masks = {3: filled_ellipse(shape, (100, 140), (60, 80), 0.2), 17: filled_ellipse(shape, (130, 170), (40, 90), 1.0)}
    with caplog.at_level(logging.WARNING, logger="scripts.clinical.dicom_objects"):
        paths = write_results(path, masks, {3: mm_row(), 17: {**mm_row(), "unit": "px"}}, tmp_path, structure="abdomen")
    assert "frame 17" in caplog.text and "'px'" in caplog.text
    found = by_modality(paths)
    assert len(found["SEG"]) == 2 and len(found["SR"]) == 1
    assert len({seg.SeriesInstanceUID for _, seg in found["SEG"]}) == 1

    seg_of_frame = {}
    for seg_path, seg in found["SEG"]:
        reference = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == US_MULTIFRAME
        frame = int(reference.ReferencedFrameNumber) - 1
        seg_of_frame[frame] = seg
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "818981001"  # Abdomen
        pixels = hd.seg.segread(seg_path).get_pixels_by_source_frame(
            source.SOPInstanceUID, source_frame_numbers=[frame + 1], dtype=np.uint8
        )
        np.testing.assert_array_equal(pixels[0, :, :, 0], masks[frame])
    assert sorted(seg_of_frame) == [3, 17]

    _, sr = found["SR"][0]
    values = numeric_values(sr)
    assert values["11979-2"][0] == pytest.approx(171.3)  # LOINC Abdominal Circumference; one group only
    assert (
        sum(
            item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "11979-2"
            for item in content_items(sr.ContentSequence)
        )
        == 1
    )
    references = image_references(sr)
    assert (source.SOPInstanceUID, [4], []) in references
    assert (seg_of_frame[3].SOPInstanceUID, [1], []) in references
    assert all(uid != seg_of_frame[17].SOPInstanceUID for uid, _, _ in references)


def test_user_errors_name_the_file_and_the_problem(tmp_path):
    path = get_testdata_file("examples_rgb_color.dcm")
    with pytest.raises(ValueError, match=r"examples_rgb_color\.dcm.*frame 0 has shape \(100, 100\).*\(240, 320\)"):
        write_results(path, {0: np.zeros((100, 100), np.uint8)}, None, tmp_path)
    with pytest.raises(ValueError, match=r"examples_rgb_color\.dcm.*frame 1 out of range"):
        write_results(path, {1: np.zeros((240, 320), np.uint8)}, None, tmp_path)
    with pytest.raises(ValueError, match="unknown structure 'femur'"):
        write_results(path, {0: np.zeros((240, 320), np.uint8)}, None, tmp_path, structure="femur")
    not_image = get_testdata_file("test-SR.dcm")
    with pytest.raises(ValueError, match=r"test-SR\.dcm: not an image"):
        write_results(not_image, {0: np.zeros((2, 2), np.uint8)}, None, tmp_path)
    assert not any(tmp_path.iterdir())


def test_legacy_source_without_patient_attributes_gets_a_conformant_seg(tmp_path):
    """ExplVR_BigEnd.dcm lacks PatientID/BirthDate/Sex/StudyID/... and has ACR-NEMA dates (1997.04.24, 14:04:38):
    the SEG copies what exists, leaves the missing type-2 attributes empty (never invented), writes the dates in
    DICOM form, and the source file is untouched."""
    path = get_testdata_file("ExplVR_BigEnd.dcm")
    before = Path(path).read_bytes()
    source = pydicom.dcmread(path)
    assert "PatientID" not in source and str(source.StudyTime) == "14:04:38"
    mask = np.zeros((source.Rows, source.Columns), np.uint8)
    mask[20:40, 20:50] = 1
    (seg_path,) = write_results(path, {0: mask}, {}, tmp_path, model_id="m")
    seg = hd.seg.segread(seg_path)
    assert (seg.StudyDate, seg.StudyTime) == ("19970424", "140438")
    assert seg.PatientID == "" and seg.PatientBirthDate == "" and seg.PatientName == source.PatientName
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert np.array_equal(pydicom.dcmread(seg_path).pixel_array, mask)  # one BINARY frame: the mask itself
    assert Path(path).read_bytes() == before


def quality_findings(sr):
    """[(code value, coding scheme)] of the DCM 111052 "Quality Finding" CODE items of an SR."""
    return [
        (item.ConceptCodeSequence[0].CodeValue, item.ConceptCodeSequence[0].CodingSchemeDesignator)
        for item in content_items(sr.ContentSequence)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "111052"
    ]


def test_flagged_measurement_is_marked_in_the_sr(tmp_path):
    """Each flag is a Quality Finding in the frame's measurement group (private scheme 99FETALUS, declared), and an
    out-of-range circumference carries the standard qualifier DCM 114009 "Value out of range"."""
    path = get_testdata_file("examples_ybr_color.dcm")
    source = pydicom.dcmread(path)
    shape = (source.Rows, source.Columns)
    masks = {0: filled_ellipse(shape, (100, 140), (60, 80), 0.2), 5: filled_ellipse(shape, (120, 160), (50, 70), 0.0)}
    rows = {
        0: {**mm_row(circumference=568.9), "flags": "circumference_out_of_range;touches_sector_border"},
        5: {**mm_row(), "flags": ""},
    }
    found = by_modality(write_results(path, masks, rows, tmp_path))
    ((_, sr),) = found["SR"]
    assert sorted(quality_findings(sr)) == [("OUT_OF_RANGE", "99FETALUS"), ("SECTOR_BORDER", "99FETALUS")]
    assert [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence] == ["99FETALUS"]
    circumferences = [
        item
        for item in content_items(sr.ContentSequence)
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "11984-2"
    ]
    qualified = {
        float(item.MeasuredValueSequence[0].NumericValue): [
            q.CodeValue for q in item.get("NumericValueQualifierCodeSequence", [])
        ]
        for item in circumferences
    }
    assert qualified == {568.9: ["114009"], 171.3: []}
    # highdicom reads the flags back from the right group
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    by_circumference = {
        group.get_measurements()[0].value: [q.value.value for q in group.get_qualitative_evaluations()]
        for group in report.content.get_planar_roi_measurement_groups()
    }
    assert by_circumference == {568.9: ["OUT_OF_RANGE", "SECTOR_BORDER"], 171.3: []}
