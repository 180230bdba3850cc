"""Ultrasound DICOM out: the predicted mask as DICOM Segmentation (SEG) and the biometry as a TID 1500 measurement SR.

Both are built with highdicom and copy the patient and study of the source image, so that a PACS files them beside it.
Their UIDs come from :func:`derived_uid` (a hash of the source SOP Instance UID, the object kind, the structure and
the model id): running the same model on the same source again gives the same UIDs, so a PACS replaces instead of
duplicating, while another model, structure or source gives new ones.

Codes (checked against pydicom's code dictionary, DICOM PS3.16):

- Segment: category SCT 91723000 "Anatomical Structure" (CID 7150); property type (:data:`STRUCTURES`)
  SCT 69536005 "Head" for ``head`` and SCT 818981001 "Abdomen" for ``abdomen``. SNOMED CT has observables for the
  fetus ("Head circumference of fetus") but no body-structure concept for the fetal head that DICOM uses, so the
  fetus is stated in the SR's subject context (DCM 121026 "Fetus", TID 1008) and in the segment label.
- SR: title DCM 126000 "Imaging Measurement Report", procedure SCT 268445003 "Ultrasound scan - obstetric";
  circumference LOINC 11984-2 "Head Circumference" / 11979-2 "Abdominal Circumference" (both in CID 12005 "Fetal
  Biometry Measurement"), finding site from CID 12020 "Fetal Biometry Anatomic Site": SCT 89546000 "Skull" /
  SCT 818981001 "Abdomen"; SCT 131187009 "Major Axis" and 131188004 "Minor Axis" carry the ellipse's full axis
  lengths 2a and 2b (those concepts are whole axes, not semi-axes), SCT 42798000 "Area" the region's area; units UCUM
  ``mm`` and ``mm2``.

Quality flags (:data:`scripts.evaluation.biometry.FLAGS`) of a measurement are written into its TID 1410 measurement
group as qualitative evaluations: one CODE item each, concept DCM 111052 "Quality Finding", value a code of the private
coding scheme ``99FETALUS`` (:data:`FLAG_CODES`; PS3.16 section 8 allows private schemes whose designator starts
with "99"; it is declared in the SR's Coding Scheme Identification Sequence). A circumference outside the
physiological range also carries the standard numeric value qualifier DCM 114009 "Value out of range" (CID 42),
which a receiving system can read without knowing our scheme. Whether a flagged measurement is stored at all is the
caller's decision (:mod:`scripts.clinical.pacs` leaves it out unless asked).

Multi-frame ultrasound (cine) SEG: highdicom 0.28.2 refuses a SEG over more than one frame of a source without a
Frame of Reference ("Only a single frame is supported when the source image has no Frame of Reference UID"), and
handles a US Multi-frame source of any length as an enhanced multi-frame image whose functional groups it does not
have (AttributeError on SharedFunctionalGroupsSequence). So each selected cine frame gets its own single-frame
SEG: highdicom builds it from a metadata-only view of the source presented as Ultrasound Image Storage (the frame's
pixels align with the SEG's one frame), and the references are then set to what they are: the source's real SOP class
and ``ReferencedFrameNumber`` = frame index + 1 in the per-frame derivation, the top-level Source Image Sequence and
the Referenced Series Sequence. All SEGs of one source share one series; ``highdicom.seg.segread(...)
.get_pixels_by_source_frame(source_uid, [frame + 1])`` gives each frame's mask back.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from hashlib import sha256
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from scripts.evaluation.biometry import parse_flags
from scripts.utils.files import write_atomic

__all__ = [
    "STRUCTURES",
    "build_measurement_report",
    "build_segmentation",
    "derived_uid",
    "flag_code",
    "phantom_ultrasound_dicom",
    "write_results",
]

logger = logging.getLogger(__name__)

METADATA_PATH = Path(__file__).resolve().parents[2] / "configs" / "metadata.json"
UID_NAMESPACE = "fetal-ultrasound-bundle"  # hashed into every derived UID: other tools hashing the same UIDs differ

# segmented property type of each structure the bundle segments
STRUCTURES: dict[str, Code] = {"head": codes.SCT.Head, "abdomen": codes.SCT.Abdomen}
SEGMENT_LABELS = {"head": "fetal head", "abdomen": "fetal abdomen"}
CIRCUMFERENCE = {"head": codes.LN.HeadCircumference, "abdomen": codes.LN.AbdominalCircumference}
FINDING_SITE = {"head": codes.SCT.Skull, "abdomen": codes.SCT.Abdomen}  # CID 12020
SEGMENT_CATEGORY = codes.SCT.AnatomicalStructure
FETUS_ID = "1"  # TID 1008 Subject ID: the model measures one fetus per image and cannot tell twins apart
SEG_SERIES_NUMBER = 900
SR_SERIES_NUMBER = 901
CONTENT_QUALIFICATION = "RESEARCH"  # configs/metadata.json intended_use: research only
LO_MAX = 64  # characters in a DICOM Long String (algorithm and model names)

# quality flags in the SR: private codes (Code Value is SH, at most 16 characters; Code Meaning LO, at most 64)
FLAG_SCHEME = "99FETALUS"
FLAG_CODES: dict[str, Code] = {
    "circumference_out_of_range": Code("OUT_OF_RANGE", FLAG_SCHEME, "Circumference outside physiological range"),
    "touches_image_border": Code("IMAGE_BORDER", FLAG_SCHEME, "Mask touches the image border"),
    "touches_sector_border": Code("SECTOR_BORDER", FLAG_SCHEME, "Mask touches the ultrasound sector border"),
    "several_components": Code("COMPONENTS", FLAG_SCHEME, "Mask has several sizeable components"),
    "large_fit_residual": Code("FIT_RESIDUAL", FLAG_SCHEME, "Large ellipse fit residual"),
    "boundary_off_ellipse": Code("OFF_ELLIPSE", FLAG_SCHEME, "Much of the mask boundary is off the ellipse"),
}
QUALITY_FINDING = Code("111052", "DCM", "Quality Finding")
VALUE_OUT_OF_RANGE = Code("114009", "DCM", "Value out of range")  # CID 42 Numeric Value Qualifier


def derived_uid(*parts: str) -> str:
    """A UID that is a hash of ``parts`` (pydicom ``generate_uid(entropy_srcs=...)``): same parts, same UID.

    The parts are JSON-encoded as a list, so ("ab", "c") and ("a", "bc") differ (pydicom joins its sources bare).
    """
    return str(generate_uid(entropy_srcs=[json.dumps([UID_NAMESPACE, *(str(p) for p in parts)])]))


def _bundle_identity() -> dict[str, str]:
    """Name, version and authors of the bundle from configs/metadata.json ("unknown" where absent)."""
    try:
        meta = json.loads(METADATA_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    name = str(meta.get("name") or "fetal ultrasound bundle")
    if len(name) > LO_MAX:  # keep the name before its parenthesis, else cut
        short = name.split(" (")[0]
        name = short if len(short) <= LO_MAX else name[:LO_MAX]
    return {
        "name": name,
        "version": str(meta.get("version") or "unknown"),
        "manufacturer": str(meta.get("authors") or "unknown")[:LO_MAX],
    }


def _describe(source: Dataset) -> str:
    """The source's file name for messages, else its SOP Instance UID."""
    filename = getattr(source, "filename", None)
    if isinstance(filename, (str, os.PathLike)) and str(filename):
        return str(filename)
    return f"source {getattr(source, 'SOPInstanceUID', '(no SOP Instance UID)')}"


def _check_structure(structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {sorted(STRUCTURES)}")


def _frame_count(source: Dataset) -> int:
    return int(getattr(source, "NumberOfFrames", 1) or 1)


def _is_cine(source: Dataset) -> bool:
    return source.SOPClassUID == UltrasoundMultiFrameImageStorage or _frame_count(source) > 1


def _check_image(source: Dataset) -> None:
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")
        if k not in source
    ]
    if "PixelData" not in source or missing:
        sop = getattr(source, "SOPClassUID", None)
        raise ValueError(
            f"{_describe(source)}: not an image ({getattr(sop, 'name', sop) or 'no SOP class'}; "
            f"missing {', '.join(missing) or 'PixelData'})"
        )
    if _frame_count(source) > 1 and source.SOPClassUID != UltrasoundMultiFrameImageStorage:
        raise ValueError(
            f"{_describe(source)}: multi-frame {source.SOPClassUID.name} is not supported; "
            "only Ultrasound Image Storage and Ultrasound Multi-frame Image Storage"
        )


# type-2 patient/study attributes highdicom copies into every new object: empty when the source lacks them
IDENTITY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)
DATE_TIME = {"DA": (".", re.compile(r"^\d{8}$")), "TM": (":", re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$"))}


def _conformant(source: Dataset) -> Dataset:
    """``source``, or a copy of it that highdicom accepts: missing type-2 patient/study attributes present but empty
    (never invented), legacy ACR-NEMA dates and times (``1997.04.24``, ``14:04:38``) in DICOM form, and any other
    unparseable date or time emptied. The source file itself is never changed."""
    fixes = {}
    for keyword in IDENTITY_KEYWORDS:
        if keyword not in source:
            fixes[keyword] = ""
    for element in source:
        if element.VR in DATE_TIME and element.VM == 1 and element.value not in (None, ""):
            separator, pattern = DATE_TIME[element.VR]
            text = str(element.value).strip()
            if not pattern.match(text):
                cleaned = text.replace(separator, "")
                fixes[element.keyword] = cleaned if pattern.match(cleaned) else ""
    if not fixes:
        return source
    fixed = copy.deepcopy(source)
    for keyword, value in fixes.items():
        setattr(fixed, keyword, value)
    logger.info(
        "%s: made conformant for the derived objects (source unchanged): %s",
        _describe(source),
        ", ".join(f"{k}={v!r}" for k, v in fixes.items()),
    )
    return fixed


def _single_frame_view(source: Dataset) -> Dataset:
    """Metadata of ``source`` without pixels, presented as single-frame Ultrasound Image Storage for highdicom."""
    view = Dataset()
    view.file_meta = getattr(source, "file_meta", FileMetaDataset())
    for element in source:
        if element.keyword not in ("PixelData", "NumberOfFrames", "FrameIncrementPointer", "SOPClassUID"):
            view.add(element)
    view.SOPClassUID = UltrasoundImageStorage
    return view


def _point_references_at_frame(seg: Dataset, source: Dataset, frame_number: int) -> None:
    """Make the SEG's references name the real multi-frame source and its 1-based ``frame_number``."""
    items = list(seg.get("SourceImageSequence", []))
    for group in seg.PerFrameFunctionalGroupsSequence:
        for derivation in group.get("DerivationImageSequence", []):
            items.extend(derivation.get("SourceImageSequence", []))
    for item in items:
        assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        item.ReferencedSOPClassUID = source.SOPClassUID
        item.ReferencedFrameNumber = frame_number
    for series in seg.ReferencedSeriesSequence:
        # highdicom shares these items with the Source Image Sequence; the Series and Instance Reference macro
        # (PS3.3 C.17.4) holds no frame number, so each instance gets its own item without one
        series.ReferencedInstanceSequence = [Dataset() for _ in series.ReferencedInstanceSequence]
        for instance in series.ReferencedInstanceSequence:
            instance.ReferencedSOPClassUID = source.SOPClassUID
            instance.ReferencedSOPInstanceUID = source.SOPInstanceUID


def build_segmentation(
    source: pydicom.Dataset,
    masks: dict[int, np.ndarray],
    structure: str = "head",
    model_id: str = "",
    frames: list[int] | None = None,
) -> list[pydicom.Dataset]:
    """BINARY SEG(s) of ``masks`` (0-based frame -> (Rows, Columns) class-index mask, > 0 is ``structure``).

    One SEG for a single-frame source, one per selected frame of a cine (module docstring); ``frames`` defaults to
    every frame with a mask. Raises ValueError naming the source for a non-image source, a frame out of range or
    without a mask, or a mask whose shape is not (Rows, Columns).
    """
    _check_structure(structure)
    _check_image(source)
    source = _conformant(source)
    name, cine, count = _describe(source), _is_cine(source), _frame_count(source)
    masks = {int(frame): mask for frame, mask in masks.items()}
    frames = sorted(masks) if frames is None else [int(f) for f in frames]
    if not frames:
        raise ValueError(f"{name}: no masks to write")
    for frame in frames:
        if not 0 <= frame < count:
            raise ValueError(f"{name}: frame {frame} out of range (the source has {count} frame(s), 0-based)")
        if frame not in masks:
            raise ValueError(f"{name}: no mask for selected frame {frame}")
        shape = np.shape(masks[frame])
        if shape != (source.Rows, source.Columns):
            raise ValueError(
                f"{name}: mask for frame {frame} has shape {shape}, expected (Rows, Columns) = "
                f"({source.Rows}, {source.Columns})"
            )

    identity = _bundle_identity()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=identity["name"],
        version=identity["version"],
        family=codes.cid7162.ArtificialIntelligence,
        parameters={"model_id": model_id} if model_id else None,
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABELS[structure],
        segmented_property_category=SEGMENT_CATEGORY,
        segmented_property_type=STRUCTURES[structure],
        algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm,
    )
    uid_parts = (str(source.SOPInstanceUID), "SEG", model_id, structure)
    series_uid = derived_uid(*uid_parts, "series")
    base = _single_frame_view(source) if cine else source
    segmentations = []
    for frame in frames:
        seg = hd.seg.Segmentation(
            source_images=[base],
            pixel_array=(np.asarray(masks[frame]) > 0).astype(np.uint8),
            segmentation_type="BINARY",
            segment_descriptions=[description],
            series_instance_uid=series_uid,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=derived_uid(*uid_parts, "frame", str(frame)),
            instance_number=frame + 1,
            manufacturer=identity["manufacturer"],
            manufacturer_model_name=identity["name"],
            software_versions=identity["version"],
            device_serial_number=model_id or "unknown",
            content_label=f"FETAL_{structure.upper()}"[:16],
            content_description=f"{SEGMENT_LABELS[structure]}" + (f", frame {frame + 1}" if cine else ""),
            series_description=f"AI {SEGMENT_LABELS[structure]} segmentation",
            omit_empty_frames=False,
            content_qualification=CONTENT_QUALIFICATION,
        )
        if cine:
            _point_references_at_frame(seg, source, frame + 1)
        # General Image module, PS3.3 C.7.6.1: Patient Orientation is Type 2C, required when the image has no Image
        # Orientation/Position (Patient); a SEG of ultrasound without a Frame of Reference has none, and highdicom
        # 0.28.2 does not write it. The mask shares the source's pixel grid, so it shares its orientation (or none).
        seg.PatientOrientation = source.get("PatientOrientation", "") or ""
        segmentations.append(seg)
    return segmentations


def _seg_by_frame(source: Dataset, segmentations: Sequence[Dataset]) -> dict[int, Dataset]:
    """0-based source frame -> the SEG that segments it (a single-frame source's SEG is frame 0)."""
    found = {}
    for seg in segmentations:
        for group in seg.PerFrameFunctionalGroupsSequence:
            for derivation in group.get("DerivationImageSequence", []):
                for item in derivation.get("SourceImageSequence", []):
                    if item.ReferencedSOPInstanceUID == source.SOPInstanceUID:
                        found[int(item.get("ReferencedFrameNumber", 1)) - 1] = seg
    return found


MEASUREMENT_KEYS = ("semi_axes_a", "semi_axes_b", "circumference", "area")


def _measured_frames(
    measurements: Mapping[int, Mapping[str, Any]] | None, name: str = "", warn: bool = True
) -> list[int]:
    """Frames whose measurement is an ellipse in mm; a frame in pixels is skipped (with a warning if ``warn``)."""
    frames = []
    for frame, row in sorted((measurements or {}).items()):
        values = [row.get(k) for k in MEASUREMENT_KEYS]
        if any(v is None or v == "" or not math.isfinite(float(v)) for v in values):
            continue  # no ellipse fitted
        if row.get("unit") != "mm":
            if warn:
                logger.warning(
                    "%s frame %d: measurement in %r, not mm (no pixel size); left out of the SR, which "
                    "needs physical units",
                    name,
                    frame,
                    row.get("unit"),
                )
            continue
        frames.append(int(frame))
    return frames


def build_measurement_report(
    source: pydicom.Dataset,
    segmentations: list[pydicom.Dataset],
    measurements: dict[int, dict],
    structure: str = "head",
    model_id: str = "",
) -> pydicom.Dataset:
    """Comprehensive SR (TID 1500): one planar measurement group per frame with an ellipse in mm.

    Each group references the segment of that frame's SEG and the source image (frame number for cines) and holds
    the circumference (mm), Major/Minor Axis = 2a/2b (mm) and the area (mm2). Frames without a fit or in pixels are
    skipped (module docstring); ValueError when no frame is left or a measured frame has no SEG.
    ComprehensiveSR, not Comprehensive3DSR: the references are 2D and ultrasound has no frame of reference.
    """
    _check_structure(structure)
    _check_image(source)
    source = _conformant(source)
    name, cine = _describe(source), _is_cine(source)
    measurements = {int(frame): row for frame, row in (measurements or {}).items()}  # JSON keys are strings
    frames = _measured_frames(measurements, name)
    if not frames:
        raise ValueError(f"{name}: no frame has an ellipse measured in mm; nothing to report")
    seg_of = _seg_by_frame(source, segmentations)
    missing = [f for f in frames if f not in seg_of]
    if missing:
        raise ValueError(f"{name}: no SEG among the {len(segmentations)} given references frame(s) {missing}")

    identity = _bundle_identity()
    algorithm = hd.sr.AlgorithmIdentification(
        name=identity["name"], version=identity["version"], parameters=[model_id] if model_id else None
    )
    uid_parts = (str(source.SOPInstanceUID), "SR", model_id, structure)
    groups, flagged = [], []
    for frame in frames:
        row, seg = measurements[frame], seg_of[frame]
        a, b = float(row["semi_axes_a"]), float(row["semi_axes_b"])
        mm, mm2 = codes.UCUM.Millimeter, codes.UCUM.SquareMillimeter
        values = [
            (CIRCUMFERENCE[structure], float(row["circumference"]), mm),
            (codes.SCT.MajorAxis, 2 * max(a, b), mm),
            (codes.SCT.MinorAxis, 2 * min(a, b), mm),
            (codes.SCT.Area, float(row["area"]), mm2),
        ]
        flags = parse_flags(row.get("flags"))
        qualifiers = {CIRCUMFERENCE[structure]: VALUE_OUT_OF_RANGE} if "circumference_out_of_range" in flags else {}
        referenced_segment = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            frame_number=1,
            segment_number=1,
            source_image=hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
                referenced_frame_numbers=[frame + 1] if cine else None,
            ),
        )
        # TID 1410 references a SEG *frame* (DCM 121214), which names its segment already; PS3.3 C.10.9 (SOP
        # Instance Reference macro) forbids Referenced Segment Number beside Referenced Frame Number, and highdicom
        # 0.28.2 writes both: keep the frame (frame 1 of a one-segment, one-frame SEG is segment 1).
        del referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(*uid_parts, "tracking", str(frame)),
                    identifier=SEGMENT_LABELS[structure] + (f" frame {frame + 1}" if cine else ""),
                ),
                referenced_segment=referenced_segment,
                finding_type=STRUCTURES[structure],
                finding_sites=[hd.sr.FindingSite(FINDING_SITE[structure])],
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(name=n, value=v, unit=u, qualifier=qualifiers.get(n), algorithm_id=algorithm)
                    for n, v, u in values
                ],
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(QUALITY_FINDING, flag_code(f)) for f in flags]
                or None,
            )
        )
        if flags:
            flagged.append(frame)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(identity["name"], identity["version"], model_id, "device"),
            name=identity["name"],
            manufacturer_name=identity["manufacturer"],
            model_name=identity["name"],
            serial_number=model_id or None,
        ),
    )
    subject = hd.sr.SubjectContext(
        subject_class=codes.DCM.Fetus, subject_class_specific_context=hd.sr.SubjectContextFetus(subject_id=FETUS_ID)
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer, subject_context=subject),
        procedure_reported=codes.SCT.UltrasoundScanObstetric,
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
    )
    used = {id(seg_of[f]): seg_of[f] for f in frames}
    return hd.sr.ComprehensiveSR(
        evidence=[source, *used.values()],
        content=report[0],
        series_instance_uid=derived_uid(*uid_parts, "series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(*uid_parts, "instance"),
        instance_number=1,
        manufacturer=identity["manufacturer"],
        is_complete=True,
        series_description=f"AI {SEGMENT_LABELS[structure]} biometry",
        content_qualification=CONTENT_QUALIFICATION,
        coding_schemes=[
            CodingSchemeIdentificationItem(
                designator=FLAG_SCHEME,
                name="Fetal ultrasound bundle quality flags",
                responsible_organization=identity["manufacturer"],
            )
        ]
        if flagged
        else None,
    )


def flag_code(flag: str) -> Code:
    """The SR code of a quality flag (:data:`FLAG_CODES`; a flag it does not know gets a code made of its name)."""
    return FLAG_CODES.get(flag) or Code(flag.upper()[:16], FLAG_SCHEME, flag.replace("_", " ")[:LO_MAX])


def write_results(source_path, masks, measurements, out_dir, structure="head", model_id="") -> list[Path]:
    """Build the SEG(s) and, where a frame has an ellipse in mm, the SR for the DICOM at ``source_path``, and write
    each atomically to ``out_dir/<Modality>_<SOPInstanceUID>.dcm``. Returns the paths written."""
    source_path, out_dir = Path(source_path), Path(out_dir)
    try:
        source = pydicom.dcmread(source_path)
    except (InvalidDicomError, OSError) as error:
        raise ValueError(f"{source_path}: not a readable DICOM file ({error})") from None
    objects = build_segmentation(source, masks, structure=structure, model_id=model_id)
    if _measured_frames(measurements, warn=False):
        objects.append(build_measurement_report(source, objects, measurements, structure=structure, model_id=model_id))
    else:
        logger.warning(
            "%s: no ellipse measured in mm to report (or every one withheld); writing the segmentation "
            "without a measurement SR",
            source_path,
        )
    paths = []
    for ds in objects:
        path = out_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
        if path.resolve() == source_path.resolve():
            raise ValueError(f"{path}: refusing to write over the source DICOM")
        write_atomic(path, lambda f, d=ds: d.save_as(f, enforce_file_format=True), binary=True)
        paths.append(path)
    return paths


def phantom_ultrasound_dicom(
    image: np.ndarray,
    pixel_size_mm: float,
    path,
    patient_id="PHANTOM-001",
    patient_name="Phantom^Fetal",
    study_uid=None,
) -> Path:
    """Write a synthetic single-frame Ultrasound Image Storage file (MONOCHROME2, 8 bit, explicit VR little endian).

    One US region covers the image with PhysicalDeltaX/Y = ``pixel_size_mm`` / 10 cm. UIDs are derived from the
    image's bytes, pixel size and patient (the study's too when ``study_uid`` is None), so the same phantom
    uploaded twice is the same instance.
    """
    image, path = np.asarray(image), Path(path)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"{path}: the phantom image must be a (H, W) uint8 array, got {image.shape} {image.dtype}")
    if not (float(pixel_size_mm) > 0 and math.isfinite(float(pixel_size_mm))):
        raise ValueError(f"{path}: pixel_size_mm must be a positive number, got {pixel_size_mm}")
    content = sha256(image.tobytes() + repr((image.shape, float(pixel_size_mm))).encode()).hexdigest()
    study_uid = study_uid or derived_uid("phantom", patient_id, content, "study")
    now = datetime.now()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = derived_uid("phantom", patient_id, content, study_uid, "instance")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    # patient, study, series, equipment
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "F"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = study_uid, "1", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyDescription = "Synthetic fetal ultrasound phantom"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.SeriesInstanceUID = derived_uid("phantom", patient_id, content, study_uid, "series")
    ds.Manufacturer, ds.ManufacturerModelName = _bundle_identity()["manufacturer"], "phantom"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    # image pixel
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(image).tobytes()
    # US region calibration: one 2D tissue region over the whole image, deltas in cm
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = image.shape[1] - 1, image.shape[0] - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = float(pixel_size_mm) / 10.0
    ds.SequenceOfUltrasoundRegions = [region]
    write_atomic(path, lambda f: ds.save_as(f, enforce_file_format=True), binary=True)
    return path
