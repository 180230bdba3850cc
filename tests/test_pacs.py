"""PACS round trip against a real Orthanc (Debian packages orthanc + orthanc-dicomweb) on loopback.

The module starts its own Orthanc with a throw-away storage folder, HTTP basic auth and the DICOMweb plugin on a
free port (no DICOM port), uploads pydicom's five real ultrasound files, a phantom fetal head and two broken
instances into one study with STOW-RS, runs ``scripts.clinical.pacs`` twice (in process, then as the CLI) and reads the
SEG and SR back from Orthanc. The model is the demo UNeXt shipped in ``models/model.pt`` (trained on the phantom
at its default 800 x 540, the size generated here; training itself is tested in test_bundle.py and test_resume.py).
"""

import csv
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from scripts.clinical import pacs
from scripts.clinical.dicom_objects import phantom_ultrasound_dicom
from scripts.data.hc18 import TRAINING_CSV_NAME, read_hc18_csv
from scripts.data.phantom import generate_phantom

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PACKAGES = ["orthanc", "orthanc-dicomweb"]
STUDY_DATE = "20260115"
PATIENT = {"PatientID": "PACS-TEST-1", "PatientName": "Test^Fetal"}
# pydicom's real ultrasound files: single-frame ones get one SEG each; the 30-frame cine is limited to two frames
SINGLE_FRAME = ["examples_rgb_color", "examples_palette", "examples_jpeg2k", "ExplVR_BigEnd"]
CINE = "examples_ybr_color"
FRAMES = [0, 3]
LOINC_HEAD_CIRCUMFERENCE = "11984-2"


# ---- Orthanc ----------------------------------------------------------------------------------------------------


def _orthanc_missing() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed (.ci/run installs them), else why the tests skip."""
    missing = [str(path) for path in (ORTHANC, DICOMWEB_PLUGIN) if not path.exists()]
    if missing:
        return (
            f"Orthanc is not installed ({', '.join(missing)} missing): .ci/run installs the Debian packages "
            f"{' '.join(PACKAGES)}, or run apt-get install {' '.join(PACKAGES)}"
        )
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A running Orthanc on 127.0.0.1: {"root", "dicomweb", "user", "password"}; stopped after the module."""
    reason = _orthanc_missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("orthanc")
    port, user, password = _free_port(), "clinician", secrets.token_urlsafe(12)
    config = {
        "Name": "fetal-pacs-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "DicomPort": _free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1", "Ssl": False},
        "SaveJobs": False,
        "HttpThreadsCount": 8,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen(
        [str(ORTHANC), "--no-jobs", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"Orthanc exited with {process.returncode}:\n{(folder / 'orthanc.log').read_text()[-3000:]}"
                )
            try:
                if requests.get(f"{root}/system", auth=(user, password), timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                log_text = (folder / "orthanc.log").read_text()[-3000:]
                raise AssertionError(f"Orthanc did not answer within 60 s:\n{log_text}")
            time.sleep(0.2)
        yield {"root": root, "dicomweb": f"{root}/dicom-web", "user": user, "password": password}
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _client(orthanc):
    return pacs.connect(orthanc["dicomweb"], (orthanc["user"], orthanc["password"]))


def _instance_count(orthanc) -> int:
    stats = requests.get(f"{orthanc['root']}/statistics", auth=(orthanc["user"], orthanc["password"]), timeout=10)
    stats.raise_for_status()
    return int(stats.json()["CountInstances"])


# ---- the model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory):
    """A bundle root with this repository's configs, its shipped model and a small phantom in data/phantom."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes((ROOT / "models" / "model.pt").read_bytes())
    generate_phantom(root / "data" / "phantom", num_subjects=2, progress=False)
    (root / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    return root


# ---- the study in the PACS --------------------------------------------------------------------------------------


def _into_study(ds: pydicom.Dataset, study_uid: str) -> pydicom.Dataset:
    ds.StudyInstanceUID, ds.StudyDate = study_uid, STUDY_DATE
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def study(orthanc, bundle_root, tmp_path_factory):
    """Upload one US study: {"uid", "sources": name -> SOPInstanceUID, "phantom_pixel_size_mm", "broken", "tiny",
    "count"} (the two broken instances' SOP Instance UIDs, the number of instances uploaded)."""
    folder = tmp_path_factory.mktemp("upload")
    uid = str(generate_uid())
    datasets, sources = [], {}
    for name in [*SINGLE_FRAME, CINE]:
        ds = _into_study(pydicom.dcmread(get_testdata_file(f"{name}.dcm")), uid)
        datasets.append(ds)
        sources[name] = str(ds.SOPInstanceUID)

    # a phantom fetal head with a known pixel size, as an Ultrasound Image Storage file with US regions
    dataset_dir = bundle_root / "data" / "phantom"
    name, row = next(iter(read_hc18_csv(str(dataset_dir / TRAINING_CSV_NAME)).items()))
    image = np.asarray(Image.open(dataset_dir / "training_set" / name).convert("L"))
    path = phantom_ultrasound_dicom(
        image,
        row["pixel_size_mm"],
        folder / "phantom.dcm",
        study_uid=uid,
        patient_id=PATIENT["PatientID"],
        patient_name=PATIENT["PatientName"],
    )
    datasets.append(_into_study(pydicom.dcmread(path), uid))
    sources["phantom"] = str(datasets[-1].SOPInstanceUID)

    # broken 1: JPEG baseline whose bytes are not a JPEG (the PACS stores it, nothing can decode it)
    broken = _into_study(pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm")), uid)
    broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    broken.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    broken.PixelData = encapsulate([b"\xff\xd8\xff\xe0 this is not a JPEG stream \xff\xd9"])
    broken["PixelData"].VR = "OB"
    datasets.append(broken)
    # broken 2: a 16 x 16 image decodes but is below the network's minimum size, so inference refuses it
    tiny_path = phantom_ultrasound_dicom(
        np.full((16, 16), 90, np.uint8),
        0.2,
        folder / "tiny.dcm",
        study_uid=uid,
        patient_id=PATIENT["PatientID"],
        patient_name=PATIENT["PatientName"],
    )
    datasets.append(_into_study(pydicom.dcmread(tiny_path), uid))

    response = _client(orthanc).store_instances(datasets)
    assert not getattr(response, "FailedSOPSequence", None), response
    assert _instance_count(orthanc) == len(datasets)
    return {
        "uid": uid,
        "sources": sources,
        "phantom_pixel_size_mm": row["pixel_size_mm"],
        "broken": str(broken.SOPInstanceUID),
        "tiny": str(datasets[-1].SOPInstanceUID),
        "count": len(datasets),
    }


@pytest.fixture(scope="module")
def first_run(orthanc, study, bundle_root, tmp_path_factory):
    """The round trip by StudyInstanceUID, in process, credentials from a file."""
    work = tmp_path_factory.mktemp("pacs_work")
    credentials = tmp_path_factory.mktemp("secrets") / "pacs_credentials.json"
    credentials.write_text(json.dumps({"user": orthanc["user"], "password": orthanc["password"]}))
    credentials.chmod(0o600)
    # the demo model's measurements of pydicom's non-fetal scans may be flagged: store them marked here
    # (test_flagged_measurement_is_not_stored_as_a_result_unless_asked checks the gate)
    summary = pacs.run(
        orthanc["dicomweb"],
        study_uid=study["uid"],
        work_dir=str(work),
        bundle_root=str(bundle_root),
        frames=FRAMES,
        credentials_file=str(credentials),
        progress=False,
        store_flagged=True,
    )
    return {"summary": summary, "work": work, "output": work / study["uid"] / "output"}


def _stored(summary, source, modality):
    return [s for s in summary["stored"] if s["source"] == source and s["modality"] == modality]


def _retrieve(orthanc, study_uid, sop_instance_uid):
    client = _client(orthanc)
    found = client.search_for_instances(
        study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_instance_uid}
    )
    assert len(found) == 1, sop_instance_uid
    series = found[0]["0020000E"]["Value"][0]
    return client.retrieve_instance(study_uid, series, sop_instance_uid)


# ---- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_without_credentials_are_refused(orthanc):
    assert requests.get(f"{orthanc['dicomweb']}/studies", timeout=10).status_code == 401
    assert requests.get(f"{orthanc['root']}/", timeout=10).status_code == 401
    wrong = requests.get(f"{orthanc['dicomweb']}/studies", auth=(orthanc["user"], "wrong"), timeout=10)
    assert wrong.status_code == 401
    with pytest.raises(pacs.PacsError, match="refused the credentials") as error:
        pacs.find_studies(pacs.connect(orthanc["dicomweb"], (orthanc["user"], "not-the-password")), study_uid="1.2.3")
    assert "not-the-password" not in str(error.value)


@pytest.mark.slow
def test_round_trip_stores_a_seg_per_frame_and_the_phantom_sr(first_run, study):
    summary = first_run["summary"]
    failed = {f["source"]: f["stage"] for f in summary["failed"]}
    assert failed == {study["broken"]: "decode", study["tiny"]: "inference"}, summary["failed"]
    assert summary["studies"] == [study["uid"]] and summary["instances"] == study["count"]
    assert not summary["skipped"]
    for name in [*SINGLE_FRAME, "phantom"]:
        assert len(_stored(summary, study["sources"][name], "SEG")) == 1, name
    assert len(_stored(summary, study["sources"][CINE], "SEG")) == len(FRAMES)
    # an SR wherever a frame's ellipse is measured in mm, and only there
    rows = json.loads((first_run["output"] / "measurements.json").read_text())
    measured = {
        r["filename"].split("_f")[0].removesuffix(".png")
        for r in rows
        if r["unit"] == "mm" and r["circumference"] is not None
    }
    assert study["sources"]["phantom"] in measured
    for name, sop in study["sources"].items():
        assert len(_stored(summary, sop, "SR")) == (1 if sop in measured else 0), name
    assert json.loads((first_run["work"] / "summary.json").read_text())["stored"] == summary["stored"]


@pytest.mark.slow
def test_seg_read_back_references_the_source_and_holds_the_bundles_mask(orthanc, first_run, study):
    for name in [*SINGLE_FRAME, "phantom"]:
        source_uid = study["sources"][name]
        source = pydicom.dcmread(first_run["work"] / study["uid"] / "input" / f"{source_uid}.dcm")
        stored = _stored(first_run["summary"], source_uid, "SEG")
        assert len(stored) == 1, f"{name}: {len(stored)} SEGs stored; failures: {first_run['summary']['failed']}"
        seg = hd.seg.Segmentation.from_dataset(_retrieve(orthanc, study["uid"], stored[0]["sop_instance_uid"]))
        assert [uids[2] for uids in seg.get_source_image_uids()] == [source_uid], name
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns), name
        decoded = seg.get_pixels_by_source_instance([source_uid], combine_segments=True)[0]
        expected = np.asarray(Image.open(first_run["output"] / f"{source_uid}_mask.png")) > 0
        assert decoded.shape == expected.shape and np.array_equal(decoded > 0, expected), name


def _numeric_items(content):
    for item in content:
        if item.ValueType == "NUM":
            yield item
        yield from _numeric_items(item.get("ContentSequence", []))


@pytest.mark.slow
def test_sr_read_back_holds_the_phantoms_head_circumference_in_mm(orthanc, first_run, study):
    source_uid = study["sources"]["phantom"]
    (entry,) = _stored(first_run["summary"], source_uid, "SR")
    sr = _retrieve(orthanc, study["uid"], entry["sop_instance_uid"])
    (hc,) = [
        i
        for i in _numeric_items(sr.ContentSequence)
        if i.ConceptNameCodeSequence[0].CodeValue == LOINC_HEAD_CIRCUMFERENCE
    ]
    value = hc.MeasuredValueSequence[0]
    assert value.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    with open(first_run["output"] / "measurements.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["filename"] == f"{source_uid}.png")
    assert row["unit"] == "mm"
    assert float(row["pixel_size_x_mm"]) == pytest.approx(study["phantom_pixel_size_mm"])
    assert float(value.NumericValue) == pytest.approx(float(row["circumference"]), rel=1e-6)
    evidence = [
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    ]
    assert source_uid in evidence


@pytest.mark.slow
def test_second_run_from_the_cli_stores_nothing_new(orthanc, first_run, study, bundle_root):
    before = _instance_count(orthanc)
    assert before == study["count"] + len(first_run["summary"]["stored"])
    env = {**os.environ, pacs.ENV_USER: orthanc["user"], pacs.ENV_PASSWORD: orthanc["password"]}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.clinical.pacs",
            "run",
            "--url",
            orthanc["dicomweb"],
            "--date_from",
            "20260101",
            "--date_to",
            "20261231",
            "--work_dir",
            str(first_run["work"]),
            "--bundle_root",
            str(bundle_root),
            "--frames",
            json.dumps(FRAMES),
            "--store_flagged",
            "True",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output  # the two broken instances fail again
    assert orthanc["password"] not in output
    assert _instance_count(orthanc) == before
    summary = json.loads((first_run["work"] / "summary.json").read_text())
    assert summary["stored"] == []
    assert sorted(s["sop_instance_uid"] for s in summary["skipped"]) == sorted(
        s["sop_instance_uid"] for s in first_run["summary"]["stored"]
    )
    assert {s["reason"] for s in summary["skipped"]} == {"already stored"}
    assert {f["source"]: f["stage"] for f in summary["failed"]} == {
        study["broken"]: "decode",
        study["tiny"]: "inference",
    }
    assert "already stored" in output and "failed 2" in output


@pytest.mark.slow
def test_flagged_measurement_is_not_stored_as_a_result_unless_asked(orthanc, bundle_root, tmp_path):
    """The phantom scan uploaded with ten times its pixel size: the head measures ten times its HC (over 1000 mm,
    outside HC18's 44-346 mm). The SEG is stored, the SR is not (listed as withheld); with store_flagged=True the SR
    is stored with the flag as a Quality Finding and the qualifier "Value out of range" on the HC."""
    uid = str(generate_uid())
    dataset_dir = bundle_root / "data" / "phantom"
    name, row = next(iter(read_hc18_csv(str(dataset_dir / TRAINING_CSV_NAME)).items()))
    image = np.asarray(Image.open(dataset_dir / "training_set" / name).convert("L"))
    path = phantom_ultrasound_dicom(
        image,
        10 * row["pixel_size_mm"],
        tmp_path / "giant.dcm",
        study_uid=uid,
        patient_id="PACS-TEST-2",
        patient_name="Test^Giant",
    )
    source = _into_study(pydicom.dcmread(path), uid)
    assert not getattr(_client(orthanc).store_instances([source]), "FailedSOPSequence", None)
    sop = str(source.SOPInstanceUID)
    credentials = tmp_path / "credentials.json"
    credentials.write_text(json.dumps({"user": orthanc["user"], "password": orthanc["password"]}))
    credentials.chmod(0o600)

    summary = pacs.run(
        orthanc["dicomweb"],
        study_uid=uid,
        work_dir=str(tmp_path / "work"),
        bundle_root=str(bundle_root),
        credentials_file=str(credentials),
        progress=False,
    )
    assert not summary["failed"], summary["failed"]
    (withheld,) = summary["withheld"]
    assert withheld["source"] == sop and "circumference_out_of_range" in withheld["flags"]
    assert float(withheld["circumference"]) > 346.0
    assert len(_stored(summary, sop, "SEG")) == 1 and not _stored(summary, sop, "SR")
    found = _client(orthanc).search_for_instances(study_instance_uid=uid, search_filters={"Modality": "SR"})
    assert found == []
    rows = json.loads((tmp_path / "work" / uid / "output" / "measurements.json").read_text())
    assert "circumference_out_of_range" in rows[0]["flags"]  # marked in the JSON (and the CSV beside it)

    marked = pacs.run(
        orthanc["dicomweb"],
        study_uid=uid,
        work_dir=str(tmp_path / "work"),
        bundle_root=str(bundle_root),
        credentials_file=str(credentials),
        progress=False,
        store_flagged=True,
    )
    (entry,) = _stored(marked, sop, "SR")
    sr = _retrieve(orthanc, uid, entry["sop_instance_uid"])
    findings = [
        i
        for i in _content(sr.ContentSequence)
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "111052"
    ]
    assert ("OUT_OF_RANGE", "99FETALUS") in {
        (i.ConceptCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodingSchemeDesignator) for i in findings
    }
    (hc,) = [
        i
        for i in _numeric_items(sr.ContentSequence)
        if i.ConceptNameCodeSequence[0].CodeValue == LOINC_HEAD_CIRCUMFERENCE
    ]
    assert [q.CodeValue for q in hc.NumericValueQualifierCodeSequence] == ["114009"]  # Value out of range


def _content(items):
    for item in items:
        yield item
        yield from _content(item.get("ContentSequence", []))


# ---- credentials without a PACS ---------------------------------------------------------------------------------


def test_credentials_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(pacs.ENV_USER, raising=False)
    monkeypatch.delenv(pacs.ENV_PASSWORD, raising=False)
    assert pacs.read_credentials() is None
    line = tmp_path / "line"
    line.write_text("alice:pa:ss\n")
    assert pacs.read_credentials(line) == ("alice", "pa:ss")
    as_json = tmp_path / "json"
    as_json.write_text(json.dumps({"username": "bob", "password": "pw"}))
    assert pacs.read_credentials(as_json) == ("bob", "pw")
    bad = tmp_path / "bad"
    bad.write_text("no separator")
    with pytest.raises(pacs.PacsError, match="user:password"):
        pacs.read_credentials(bad)
    monkeypatch.setenv(pacs.ENV_USER, "carol")
    with pytest.raises(pacs.PacsError, match="both"):
        pacs.read_credentials()
    monkeypatch.setenv(pacs.ENV_PASSWORD, "secret")
    assert pacs.read_credentials() == ("carol", "secret")


def test_credentials_in_the_url_are_refused_and_masked():
    assert (
        pacs.masked_url("https://u:topsecret@pacs.example.org:8443/dicom-web")
        == "https://***@pacs.example.org:8443/dicom-web"
    )
    with pytest.raises(pacs.PacsError) as error:
        pacs.connect("https://u:topsecret@pacs.example.org/dicom-web", None)
    assert "topsecret" not in str(error.value)


def test_an_inference_failure_past_preprocessing_fails_only_its_source(tmp_path, monkeypatch):
    """The whole-study run fails; each source then runs alone and only the failing one is reported."""

    class Parser:
        def get_parsed_content(self, key):
            assert key == "preprocessing"
            return lambda item: item

    def fake_inference(bundle_root, input_dir, output_dir, items, progress=True):
        if any(item["image"].endswith("bad.png") for item in items):
            raise RuntimeError("applying transform") from ValueError("bad.png: the network failed")
        return [{"filename": Path(item["image"]).name, "unit": "px"} for item in items]

    monkeypatch.setattr(pacs, "inference_parser", lambda *args: Parser())
    monkeypatch.setattr(pacs, "run_inference", fake_inference)
    sources = {
        "1.1": [{"image": "/f/good.png", "frame": 0}],
        "1.2": [{"image": "/f/bad.png", "frame": 0}],
        "1.3": [{"image": "/f/cine_f000.png", "frame": 0}, {"image": "/f/cine_f003.png", "frame": 3}],
    }
    summary = {"failed": []}
    rows = pacs._infer_all(tmp_path, tmp_path / "study", sources, summary, "9.9", progress=False)
    assert sorted(rows) == ["cine_f000.png", "cine_f003.png", "good.png"]
    assert summary["failed"] == [
        {"study": "9.9", "source": "1.2", "stage": "inference", "reason": "ValueError: bad.png: the network failed"}
    ]
    assert sources["1.2"] == [] and len(sources["1.3"]) == 2
    written = json.loads((tmp_path / "study" / "output" / "measurements.json").read_text())
    assert [r["filename"] for r in written] == ["good.png", "cine_f000.png", "cine_f003.png"]
