"""Draw docs/pacs_result.png from what a PACS holds after ``python -m scripts.clinical.pacs run``: for each measurement
SR of a study, the source image, the stored SEG's mask outline and the SR's circumference, all read back over DICOMweb.

    FETAL_PACS_USER=... FETAL_PACS_PASSWORD=... python docs/make_pacs_figure.py --url http://127.0.0.1:8042/dicom-web \
        --study_uid 1.2.3 --output docs/pacs_result.png
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import fire
import highdicom as hd
import numpy as np
import pydicom
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.clinical import pacs  # noqa: E402
from scripts.data.dicom import read_ultrasound_dicom  # noqa: E402

LOINC_CIRCUMFERENCES = {"11984-2": "HC", "11979-2": "AC"}


def _retrieve(client, study: str, series: str, sop: str) -> pydicom.Dataset:
    return client.retrieve_instance(study, series, sop)


def _measurements(sr: pydicom.Dataset) -> list[dict]:
    """Circumference name, value (mm), SEG SOP UID, source SOP UID and frames of each group of a TID 1500 SR."""
    report = hd.sr.srread(io.BytesIO(_bytes(sr)))
    found = []
    for group in report.content.get_planar_roi_measurement_groups():
        segment = group.referenced_segmentation_frame
        source = segment.source_image_for_segmentation
        for measurement in group.get_measurements():
            name = LOINC_CIRCUMFERENCES.get(measurement.name.value)
            if name:
                found.append(
                    {
                        "name": name,
                        "mm": float(measurement.value),
                        "seg": segment.referenced_sop_instance_uid,
                        "source": source.referenced_sop_instance_uid,
                        "frames": source.referenced_frame_numbers,
                    }
                )
    return found


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def main(
    url: str,
    study_uid: str,
    output: str = "docs/pacs_result.png",
    credentials_file: str | None = None,
    max_panels: int = 3,
) -> str:
    from matplotlib.figure import Figure

    client = pacs.connect(url, pacs.read_credentials(credentials_file))
    instances = {}
    for series in client.search_for_series(study_uid):
        series_uid = series["0020000E"]["Value"][0]
        modality = series.get("00080060", {}).get("Value", [""])[0]
        for instance in client.search_for_instances(study_uid, series_uid):
            instances[instance["00080018"]["Value"][0]] = (series_uid, modality)
    panels = []
    for sop, (series, modality) in instances.items():
        if modality != "SR":
            continue
        for m in _measurements(_retrieve(client, study_uid, series, sop)):
            seg_ds = _retrieve(client, study_uid, instances[m["seg"]][0], m["seg"])
            seg = hd.seg.Segmentation.from_dataset(seg_ds)
            source_ds = _retrieve(client, study_uid, instances[m["source"]][0], m["source"])
            path = Path("/tmp") / f"pacs_figure_{m['source']}.dcm"
            source_ds.save_as(path, enforce_file_format=True)
            frames, pixel_size, _ = read_ultrasound_dicom(path)
            frame = (m["frames"] or [1])[0] - 1
            mask = np.asarray(seg.pixel_array).reshape(-1, *frames.shape[1:3])[0] > 0
            panels.append((frames[frame], mask, m, pixel_size, str(getattr(source_ds, "PatientID", ""))))
    if not panels:
        raise SystemExit(f"no measurement SR with a circumference in study {study_uid}")
    panels = panels[:max_panels]
    figure = Figure(figsize=(5.2 * len(panels), 4.4), dpi=110)
    for i, (image, mask, m, pixel_size, patient) in enumerate(panels):
        axis = figure.add_subplot(1, len(panels), i + 1)
        axis.imshow(image if image.ndim == 3 else image, cmap=None if image.ndim == 3 else "gray")
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        overlay = np.zeros((*mask.shape, 4))
        overlay[edge] = (0.1, 1.0, 0.3, 1.0)
        axis.imshow(overlay)
        axis.set_title(f"SEG read back from the PACS; SR: {m['name']} {m['mm']:.1f} mm", fontsize=9)
        axis.text(
            0.01,
            0.01,
            f"patient {patient}, pixel {pixel_size[0]:.3f} mm",
            color="yellow",
            fontsize=7,
            transform=axis.transAxes,
        )
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(output)
    return output


if __name__ == "__main__":
    fire.Fire(main)
