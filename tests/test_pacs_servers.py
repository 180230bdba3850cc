"""scripts.clinical.pacs against servers that misbehave, and its handling of flagged measurements, without a real PACS.

Each misbehaving server is a small ``http.server`` on 127.0.0.1 in a thread, started by the test: a QIDO answer
without StudyInstanceUID, a body that is not JSON, a server that never answers, one that answers 503 every time.
Each must end in one line that names the server, the request and the cause, from Python (PacsError) and from the
command line (exit 2, no traceback). The flagged-measurement test runs the real round trip (retrieve, decode, SEG
and SR, store) against an in-memory DICOMweb stand-in, with the inference replaced by known masks and rows.
"""

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from scripts.clinical import pacs
from scripts.clinical.dicom_objects import phantom_ultrasound_dicom

ROOT = Path(__file__).resolve().parents[1]
STUDY = "1.2.826.0.1.3680043.8.498.1"


def stand_in(answer):
    """Start a threaded HTTP server on a free loopback port whose GET handler is ``answer(handler)``; returns
    (server, DICOMweb root URL, list of the request paths it saw)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            answer(self)

        def log_message(self, *args):  # keep the test output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/dicom-web", seen


def reply(handler, status=200, body=b"", content_type="application/dicom+json"):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def malformed_study(handler):
    entry = {"00080020": {"vr": "DA", "Value": ["20260115"]}, "00100020": {"vr": "LO", "Value": ["P1"]}}
    reply(handler, body=json.dumps([entry]).encode())  # no 0020000D StudyInstanceUID


def not_json(handler):
    reply(handler, body=b"<html><body>Please log in to the hospital portal</body></html>", content_type="text/html")


def never_answers(handler):
    time.sleep(8)  # longer than the test's --timeout 2


def unavailable(handler):
    reply(handler, 503, b"busy", "text/plain")


def malformed_series(handler):
    """A good study search, then a series search whose entry has no SeriesInstanceUID."""
    if "/series" in handler.path:
        reply(handler, body=json.dumps([{"00080060": {"vr": "CS", "Value": ["US"]}}]).encode())
    else:
        reply(handler, body=json.dumps([{"0020000D": {"vr": "UI", "Value": [STUDY]}}]).encode())


@pytest.fixture
def bundle_root(tmp_path):
    """A bundle root whose models/model.pt exists (scripts.clinical.pacs hashes it for the model id before any
    request)."""
    (tmp_path / "bundle" / "models").mkdir(parents=True)
    (tmp_path / "bundle" / "models" / "model.pt").write_bytes(b"a stand-in model file")
    return tmp_path / "bundle"


CASES = {
    "malformed QIDO JSON": (
        malformed_study,
        r"the study search \(GET {url}/studies\?.*\) failed: malformed answer: "
        r"an entry without StudyInstanceUID \(0020000D\)",
    ),
    "non-JSON body": (
        not_json,
        r"the study search \(GET {url}/studies\?.*\) failed: the answer is not JSON "
        r"\(it starts '<html><body>Please log in",
    ),
    "never answers": (
        never_answers,
        r"the study search \(GET {url}/studies\?.*\) failed: no answer within 2 s "
        r"\(--timeout\)",
    ),
    "repeated 503": (
        unavailable,
        r"the study search \(GET {url}/studies\?.*\) failed: HTTP 503 Service "
        r"Unavailable on each of 2 attempts \(--retries\)",
    ),
    "malformed series": (
        malformed_series,
        rf"the series search of study {STUDY} \(GET {{url}}/studies/{STUDY}/"
        r"series\?.*\) failed: malformed answer: an entry without "
        r"SeriesInstanceUID \(0020000E\)",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_misbehaving_server_ends_in_one_line_naming_server_request_and_cause(case, bundle_root, tmp_path):
    answer, message = CASES[case]
    server, url, seen = stand_in(answer)
    try:
        with pytest.raises(pacs.PacsError) as error:
            pacs.run(
                url,
                study_uid=STUDY,
                work_dir=str(tmp_path / "work"),
                bundle_root=str(bundle_root),
                timeout=2,
                retries=2,
                progress=False,
            )
    finally:
        server.shutdown()
    text = str(error.value)
    assert "\n" not in text and text.startswith(url), text
    assert re.search(message.format(url=re.escape(url)), text), text
    print(text)
    assert seen, "the stand-in server was never asked"
    if case == "repeated 503":
        assert len(seen) == 2  # --retries 2: two attempts, then the message


@pytest.mark.slow
def test_misbehaving_server_from_the_command_line(bundle_root, tmp_path):
    server, url, _ = stand_in(malformed_study)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.clinical.pacs",
                "run",
                "--url",
                url,
                "--study_uid",
                STUDY,
                "--bundle_root",
                str(bundle_root),
                "--work_dir",
                str(tmp_path / "work"),
                "--timeout",
                "2",
                "--progress",
                "False",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.shutdown()
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "KeyError" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0] and "without StudyInstanceUID (0020000D)" in errors[0], done.stderr


@pytest.mark.slow
def test_bare_command_prints_help_not_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "scripts.clinical.pacs"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "KeyError" not in output, output
    assert "usage" in output.lower() and "run" in output, output


def test_bad_timeout_or_retries_are_refused(tmp_path):
    with pytest.raises(pacs.PacsError, match="--timeout must be a positive number of seconds, got 0"):
        pacs.connect("http://127.0.0.1:9/dicom-web", None, timeout=0)
    with pytest.raises(pacs.PacsError, match="--retries must be at least 1"):
        pacs.connect("http://127.0.0.1:9/dicom-web", None, retries=0)


# ---- flagged measurements ------------------------------------------------------------------------------------------


def flag_codes(sr):
    """Code values of the DCM 111052 "Quality Finding" items anywhere in an SR's content tree."""
    found, items = [], list(sr.ContentSequence)
    while items:
        item = items.pop()
        items += list(item.get("ContentSequence", []))
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "111052":
            found.append(item.ConceptCodeSequence[0].CodeValue)
    return found


class InMemoryPacs:
    """The DICOMweb calls scripts.clinical.pacs makes, over a dict of datasets (QIDO as DICOM JSON, WADO, STOW)."""

    def __init__(self, datasets):
        self.base_url = "http://pacs.invalid/dicom-web"
        self.instances = {str(ds.SOPInstanceUID): ds for ds in datasets}

    @staticmethod
    def _json(ds, *keywords):
        return {
            f"{pydicom.datadict.tag_for_keyword(k):08X}": {"vr": "UI", "Value": [str(getattr(ds, k))]} for k in keywords
        }

    def search_for_studies(self, search_filters=None, **_):
        return [self._json(ds, "StudyInstanceUID") for ds in self.instances.values()][:1]

    def search_for_series(self, study_instance_uid, search_filters=None, **_):
        return [
            self._json(ds, "SeriesInstanceUID")
            for ds in self.instances.values()
            if ds.StudyInstanceUID == study_instance_uid and ds.Modality == "US"
        ]

    def search_for_instances(self, study_instance_uid, series_instance_uid=None, search_filters=None, **_):
        wanted = (search_filters or {}).get("SOPInstanceUID")
        return [
            self._json(ds, "SOPInstanceUID")
            for uid, ds in self.instances.items()
            if ds.StudyInstanceUID == study_instance_uid
            and (wanted is None or uid == wanted)
            and (series_instance_uid is None or ds.SeriesInstanceUID == series_instance_uid)
        ]

    def retrieve_instance(self, study, series, sop):
        return self.instances[sop]

    def store_instances(self, datasets, study_instance_uid=None):
        for ds in datasets:
            self.instances[str(ds.SOPInstanceUID)] = ds
        return pydicom.Dataset()


def test_flagged_measurement_is_withheld_unless_asked(bundle_root, tmp_path, monkeypatch):
    """Two phantom scans: one plausible HC, one of 568.9 mm flagged out of range. By default both SEGs and the
    plausible SR are stored and the flagged measurement is withheld (summary, log); with store_flagged=True its SR
    is stored, marked with the flag."""
    image = np.full((120, 160), 40, np.uint8)
    sources = [
        pydicom.dcmread(phantom_ultrasound_dicom(image + i, 0.3, tmp_path / f"scan{i}.dcm", study_uid=STUDY))
        for i in range(2)
    ]
    mask = np.zeros((120, 160), np.uint8)
    mask[30:90, 40:120] = 1
    rows = {
        0: {"unit": "mm", "semi_axes_a": 12.0, "semi_axes_b": 9.0, "circumference": 66.3, "area": 339.0, "flags": ""},
        1: {
            "unit": "mm",
            "semi_axes_a": 100.0,
            "semi_axes_b": 80.0,
            "circumference": 568.9,
            "area": 25000.0,
            "flags": "circumference_out_of_range;touches_sector_border",
        },
    }

    def fake_inference(bundle, study_dir, items_by_source, summary, study, progress):
        found = {}
        for sop, items in items_by_source.items():
            index = [str(s.SOPInstanceUID) for s in sources].index(sop)
            for item in items:
                png = Path(item["image"])
                Image.fromarray(mask).save(study_dir / "output" / f"{png.stem}_mask.png")
                found[png.name] = {"filename": png.name, **rows[index]}
        return found

    monkeypatch.setattr(pacs, "_infer_all", fake_inference)
    for store_flagged in (False, True):
        server = InMemoryPacs(sources)
        monkeypatch.setattr(pacs, "connect", lambda *args, **kwargs: server)
        summary = pacs.run(
            server.base_url,
            study_uid=STUDY,
            work_dir=str(tmp_path / f"work{store_flagged}"),
            bundle_root=str(bundle_root),
            progress=False,
            store_flagged=store_flagged,
        )
        assert not summary["failed"], summary["failed"]
        stored = {(s["source"], s["modality"]) for s in summary["stored"]}
        good, flagged = (str(s.SOPInstanceUID) for s in sources)
        assert {(good, "SEG"), (good, "SR"), (flagged, "SEG")} <= stored
        reports = [ds for ds in server.instances.values() if ds.Modality == "SR"]
        if not store_flagged:
            assert (flagged, "SR") not in stored and len(reports) == 1
            assert summary["withheld"] == [
                {
                    "study": STUDY,
                    "source": flagged,
                    "frame": 0,
                    "unit": "mm",
                    "flags": ["circumference_out_of_range", "touches_sector_border"],
                    "circumference": 568.9,
                }
            ]
        else:
            assert (flagged, "SR") in stored and not summary["withheld"] and len(reports) == 2
            codes = {str(r.SOPInstanceUID): sorted(flag_codes(r)) for r in reports}
            assert sorted(codes.values()) == [[], ["OUT_OF_RANGE", "SECTOR_BORDER"]]  # the flagged one, marked
    assert json.loads((tmp_path / "workFalse" / "summary.json").read_text())["withheld"][0]["source"] == flagged
