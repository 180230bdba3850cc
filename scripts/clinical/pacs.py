"""PACS round trip over DICOMweb: find ultrasound studies, run the bundle's inference, store DICOM SEG + SR back.

``python -m scripts.clinical.pacs run --url https://pacs.example.org/dicom-web --study_uid 1.2.3`` (or ``--date_from
20260101 --date_to 20261231``) does, per study:

1. QIDO-RS: the study (by StudyInstanceUID, or by StudyDate range with ModalitiesInStudy), its series of
   ``--modality`` (US) and their instances;
2. WADO-RS: each instance to ``<work_dir>/<study>/input/<SOPInstanceUID>.dcm`` (kept: a re-run reads it from there),
   decoded into frames by :mod:`scripts.data.dicom` (``--frames "[0,3]"`` keeps only those frames of a cine);
3. the bundle's ``configs/inference.json`` in this process, output in ``<work_dir>/<study>/output`` (masks,
   overlays, ``measurements.json``);
4. :func:`scripts.clinical.dicom_objects.write_results`: per source instance a DICOM SEG (one per selected cine frame)
   and, where a frame's ellipse is measured in mm, a TID 1500 SR, in ``<work_dir>/<study>/derived``; their UIDs are
   derived from the source SOP Instance UID and the model's hash, so a re-run makes the same UIDs. A measurement
   with quality flags (:data:`scripts.evaluation.biometry.FLAGS`: implausible circumference, mask at the border, several
   components, poor ellipse fit) is not stored as a result: its SEG is, its SR measurement group is withheld and
   listed in the summary; ``--store_flagged True`` stores it, marked by its flags in the SR;
5. STOW-RS of each derived object unless QIDO already finds its SOP Instance UID ("already stored").

A server that misbehaves (an HTTP error, a body that is not DICOM JSON, a QIDO entry without its UID, no answer
within ``--timeout`` seconds, the same 503 on each of ``--retries`` attempts) ends the run, or the instance it
concerns, in one line that names the server, the request and the cause.

Credentials come from ``FETAL_PACS_USER`` / ``FETAL_PACS_PASSWORD`` or ``--credentials_file`` (JSON
``{"user": ..., "password": ...}`` or one ``user:password`` line), never from the command line, and are sent as
HTTP basic auth; nothing printed or logged contains them. One instance that cannot be retrieved, decoded, segmented,
encoded or stored is reported and the run goes on. The summary is printed, written to ``<work_dir>/summary.json``
and returned by :func:`run`; the command exits with 1 when anything failed, 2 on an error that stops the whole run
(PACS unreachable, credentials refused, no study found).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.evaluation.biometry import parse_flags
from scripts.utils.files import image_stem, write_atomic, write_json_atomic

__all__ = [
    "ENV_USER",
    "ENV_PASSWORD",
    "PacsError",
    "connect",
    "find_instances",
    "find_studies",
    "masked_url",
    "inference_parser",
    "model_id",
    "read_credentials",
    "run",
    "run_inference",
]

logger = logging.getLogger(__name__)

ENV_USER, ENV_PASSWORD = "FETAL_PACS_USER", "FETAL_PACS_PASSWORD"
MODEL_ID_HEX = 16  # hex digits of the model file's SHA-256 kept as the model id (in derived UIDs and descriptions)
SOP_INSTANCE_UID, SERIES_INSTANCE_UID, STUDY_INSTANCE_UID = "00080018", "0020000E", "0020000D"
QIDO_PAGE = 500  # results asked for per QIDO request
TIMEOUT_S = 60.0  # seconds a request waits for the server (--timeout); a STOW of a long cine takes a while
RETRIES = 5  # attempts per request when the server answers 429, 408, 503 or 504 (--retries; dicomweb-client's)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PacsError(RuntimeError):
    """An error that stops the whole run: unreachable PACS, refused credentials, no study, bad arguments."""


# ---- credentials and connection ---------------------------------------------------------------------------------


def masked_url(url: str) -> str:
    """``url`` with any user:password part replaced by ``***`` (for messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_credentials(credentials_file: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """(user, password) from ``credentials_file`` (JSON with user/username and password, or a ``user:password``
    line), else from the environment variables FETAL_PACS_USER and FETAL_PACS_PASSWORD, else None (no auth)."""
    if credentials_file is not None:
        path = Path(credentials_file)
        if not path.is_file():
            raise PacsError(f"credentials file {path} does not exist")
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("credentials file %s is readable by other users: chmod 600 it", path)
        text = path.read_text(encoding="utf-8").strip()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            user, password = data.get("user", data.get("username")), data.get("password")
        elif ":" in text and "\n" not in text:
            user, password = text.split(":", 1)
        else:
            user = password = None
        if not user or password is None:
            raise PacsError(
                f'credentials file {path}: expected JSON {{"user": ..., "password": ...}} or one line user:password'
            )
        return str(user), str(password)
    user, password = os.environ.get(ENV_USER), os.environ.get(ENV_PASSWORD)
    if bool(user) != (password is not None):
        raise PacsError(f"set both {ENV_USER} and {ENV_PASSWORD}, or neither")
    return (user, password) if user else None


def _recording_session():
    """A requests session that remembers its last request (``"GET <url>"``), so that a failure can name it."""
    import requests

    class RecordingSession(requests.Session):
        last_request = "(no request yet)"

        def request(self, method, url, *args, **kwargs):
            self.last_request = f"{str(method).upper()} {url}"
            return super().request(method, url, *args, **kwargs)

    return RecordingSession()


def connect(url: str, credentials: tuple[str, str] | None, timeout: float = TIMEOUT_S, retries: int = RETRIES):
    """A :class:`dicomweb_client.api.DICOMwebClient` on ``url`` whose requests session sends HTTP basic auth.

    Each request waits at most ``timeout`` seconds for the server; an answer 429, 408, 503 or 504 is retried by
    dicomweb-client with exponential back-off (2, 4, 8 ... s), ``retries`` attempts in all.
    """
    import requests
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsError(f"--url {masked_url(url)}: expected the DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    if parts.username is not None or parts.password is not None:
        raise PacsError(
            f"--url {masked_url(url)} carries credentials: give them through {ENV_USER} / "
            f"{ENV_PASSWORD} or --credentials_file instead"
        )
    if not (float(timeout) > 0):
        raise PacsError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if int(retries) < 1:
        raise PacsError(f"--retries must be at least 1 (attempts per request), got {retries!r}")
    session = _recording_session()
    if credentials is not None:
        session.auth = requests.auth.HTTPBasicAuth(*credentials)
        if parts.scheme == "http" and parts.hostname not in LOOPBACK:
            logger.warning(
                "%s is plain HTTP: the credentials cross the network unencrypted (use https)", masked_url(url)
            )
    client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=float(timeout))
    client.set_http_retry_params(max_attempts=int(retries))
    return client


class MalformedAnswer(ValueError):
    """A DICOMweb answer that parses but lacks what DICOM PS3.18 requires (a QIDO entry without its UID)."""


def _pacs_call(what: str, url: str, call, client=None):
    """Run a DICOMweb call; whatever the server does wrong becomes one :class:`PacsError` line that names the
    server, the request (``client``'s last one) and the cause (:func:`_failure`); other errors propagate."""
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the server's doing
        message = _failure(error, what, masked_url(url), client)
        if message is None:
            raise
        raise PacsError(message) from None


def _failure(error: BaseException, what: str, server: str, client=None) -> str | None:
    """The one-line message for a server's failure: refused credentials, another HTTP error, the same retriable
    error on every attempt, no answer within the timeout, no connection, a body that is not JSON, a malformed
    answer; None for an error that is not the server's."""
    import requests
    from requests.exceptions import JSONDecodeError as NotJson
    from retrying import RetryError

    session = getattr(client, "_session", None)
    request = f" ({session.last_request})" if getattr(session, "last_request", None) else ""
    if isinstance(error, requests.HTTPError):
        code = error.response.status_code if error.response is not None else None
        if code in (401, 403):
            return (
                f"{server} refused the credentials (HTTP {code}) for {what}{request}: check {ENV_USER} / "
                f"{ENV_PASSWORD} or --credentials_file"
            )
        reason = getattr(error.response, "reason", "") or ""
        return f"{server}: {what}{request} failed: HTTP {code} {reason}".rstrip()
    if isinstance(error, RetryError):
        attempt = getattr(error, "last_attempt", None)
        response = getattr(attempt, "value", None)
        answer = (
            f"HTTP {response.status_code} {response.reason or ''}".rstrip()
            if hasattr(response, "status_code")
            else str(response)
        )
        attempts = getattr(attempt, "attempt_number", "?")
        return f"{server}: {what}{request} failed: {answer} on each of {attempts} attempts (--retries)"
    if isinstance(error, requests.Timeout):
        timeout = getattr(client, "_timeout", None)
        within = f" within {timeout:g} s" if isinstance(timeout, (int, float)) else ""
        return f"{server}: {what}{request} failed: no answer{within} (--timeout)"
    if isinstance(error, requests.ConnectionError):
        return f"cannot reach {server} for {what}{request}: {type(error).__name__}"
    if isinstance(error, NotJson):
        start = " ".join(str(getattr(error, "doc", "") or "").split())[:60]
        return f"{server}: {what}{request} failed: the answer is not JSON (it starts {start!r})"
    if isinstance(error, MalformedAnswer):
        return f"{server}: {what}{request} failed: malformed answer: {error}"
    return None


def _uid(item: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object; :class:`MalformedAnswer` when it has none."""
    try:
        return str(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        from pydicom.datadict import keyword_for_tag

        keyword = keyword_for_tag(int(tag, 16)) or tag
        shown = json.dumps(item)[:80] if isinstance(item, dict) else repr(item)[:80]
        raise MalformedAnswer(f"an entry without {keyword} ({tag}): {shown}") from None


def _search_all(search, key_tag: str, **kwargs) -> list[dict]:
    """Every result of a QIDO ``search``, page by page (limit/offset), until a page is short or brings nothing new.

    Not dicomweb-client's ``get_remaining``: it pages until an empty answer, and a server that ignores ``offset``
    (Orthanc's DICOMweb plugin 1.7 does when ModalitiesInStudy is given) answers the same page forever.
    """
    results: dict[str, dict] = {}
    offset = 0
    while True:
        page = search(limit=QIDO_PAGE, offset=offset, **kwargs)
        if not isinstance(page, list):
            raise MalformedAnswer(f"a JSON {type(page).__name__} where DICOM JSON (an array of objects) belongs")
        new = {_uid(item, key_tag): item for item in page if _uid(item, key_tag) not in results}
        results.update(new)
        if len(page) < QIDO_PAGE or not new:
            return list(results.values())
        offset += len(page)


# ---- queries ----------------------------------------------------------------------------------------------------


def find_studies(
    client, study_uid: str | None = None, date_from: Any = None, date_to: Any = None, modality: str = "US"
) -> list[str]:
    """StudyInstanceUIDs: ``study_uid`` if the PACS has it, else every study with StudyDate in [date_from, date_to]
    (YYYYMMDD, either end open) and ``modality`` among ModalitiesInStudy."""
    if study_uid:
        filters = {"StudyInstanceUID": str(study_uid)}
    elif date_from is not None or date_to is not None:
        dates = [str(d) if d is not None else "" for d in (date_from, date_to)]
        if any(d and (len(d) != 8 or not d.isdigit()) for d in dates):
            raise PacsError(f"--date_from/--date_to: expected YYYYMMDD, got {dates[0] or '-'} / {dates[1] or '-'}")
        filters = {"StudyDate": f"{dates[0]}-{dates[1]}", "ModalitiesInStudy": modality}
    else:
        raise PacsError("name the studies: --study_uid UID, or --date_from YYYYMMDD and/or --date_to YYYYMMDD")
    found = _pacs_call(
        "the study search",
        client.base_url,
        lambda: _search_all(client.search_for_studies, STUDY_INSTANCE_UID, search_filters=filters),
        client,
    )
    studies = sorted({_uid(s, STUDY_INSTANCE_UID) for s in found})
    if not studies:
        raise PacsError(
            f"{masked_url(client.base_url)} has no study matching " + ", ".join(f"{k}={v}" for k, v in filters.items())
        )
    return studies


def find_instances(client, study_uid: str, modality: str = "US") -> list[tuple[str, str]]:
    """[(SeriesInstanceUID, SOPInstanceUID)] of every instance in the study's series of ``modality``."""
    series = _pacs_call(
        f"the series search of study {study_uid}",
        client.base_url,
        lambda: _search_all(
            client.search_for_series,
            SERIES_INSTANCE_UID,
            study_instance_uid=study_uid,
            search_filters={"Modality": modality},
        ),
        client,
    )
    instances = []
    for series_uid in sorted({_uid(s, SERIES_INSTANCE_UID) for s in series}):
        found = _pacs_call(
            f"the instance search of series {series_uid}",
            client.base_url,
            lambda: _search_all(
                client.search_for_instances,
                SOP_INSTANCE_UID,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
            ),
            client,
        )
        instances += sorted((series_uid, _uid(i, SOP_INSTANCE_UID)) for i in found)
    return instances


def is_stored(client, study_uid: str, sop_instance_uid: str) -> bool:
    """Whether QIDO finds an instance with this SOPInstanceUID in the study."""
    found = _pacs_call(
        f"the search for instance {sop_instance_uid}",
        client.base_url,
        lambda: [
            _uid(i, SOP_INSTANCE_UID)
            for i in client.search_for_instances(
                study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_instance_uid}
            )
        ],
        client,
    )
    return sop_instance_uid in found


# ---- model and inference ----------------------------------------------------------------------------------------


def model_id(bundle_root: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of ``<bundle_root>/models/model.pt``."""
    path = Path(bundle_root) / "models" / "model.pt"
    if not path.is_file():
        raise PacsError(f"{path} does not exist: the trained model is needed (run configs/train.json first)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:MODEL_ID_HEX]


def inference_parser(
    bundle_root: str | os.PathLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike, items: list[dict]
):
    """``<bundle_root>/configs/inference.json`` as a ConfigParser with ``bundle_root``, ``input_dir``,
    ``output_dir`` and its ``datalist`` set to ``items`` (frames from :func:`scripts.data.dicom.export_frames`)."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the config imports `scripts`
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update(
        {"bundle_root": str(root), "input_dir": str(input_dir), "output_dir": str(output_dir), "datalist": items}
    )
    return parser


def run_inference(
    bundle_root: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    items: list[dict],
    progress: bool = True,
) -> list[dict]:
    """Run the bundle's inference evaluator in this process on ``items``; returns the rows of
    ``<output_dir>/measurements.json`` (masks and overlays are beside it)."""
    parser = inference_parser(bundle_root, input_dir, output_dir, items)
    parser["progress"] = progress  # the bundle's own progress bar
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    if evaluator.state.failed:  # inference.json skips a frame it cannot take; here the caller decides per source
        raise ValueError("; ".join(f"{f['file']}: {f['reason']}" for f in evaluator.state.failed))
    return json.loads((Path(output_dir) / "measurements.json").read_text())


def _select_frames(items: list[dict], frames: Any) -> list[dict]:
    if frames is None or frames == "all":
        return items
    wanted = {int(frames)} if isinstance(frames, (int, str)) else {int(f) for f in frames}
    return [item for item in items if item["frame"] in wanted]


# ---- the round trip ---------------------------------------------------------------------------------------------


def _reason(error: BaseException | str) -> str:
    """The innermost cause (MONAI wraps a transform's error as "applying transform ...": the cause names the file)."""
    if isinstance(error, str):
        return error
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _fail(summary: dict, study: str, source: str, stage: str, error: BaseException | str) -> None:
    reason = _reason(error)
    summary["failed"].append({"study": study, "source": source, "stage": stage, "reason": reason})
    logger.error("%s: %s failed: %s", source, stage, reason)


def _infer_all(
    bundle_root, study_dir: Path, sources: dict[str, list[dict]], summary: dict, study: str, progress: bool
) -> dict[str, dict]:
    """Measurement rows by frame PNG name for every source that went through inference.

    One run over every frame of the study; should it fail (a frame the network cannot take: too small, unreadable),
    each source runs on its own so that only the failing one is reported. Failed sources are emptied.
    """
    from scripts.deployment.inference import MeasurementWriter

    input_dir, output_dir = study_dir / "input", study_dir / "output"
    every = [item for items in sources.values() for item in items]
    if not every:
        return {}
    try:
        rows = run_inference(bundle_root, input_dir, output_dir, every, progress)
    except Exception as error:  # noqa: BLE001 - which source failed is found by running them one at a time
        logger.warning("inference over the study failed (%s); running each instance on its own", _reason(error))
        rows = []
        for sop, items in tqdm(
            list(sources.items()), desc="inference per instance", unit="instance", disable=not progress
        ):
            if not items:
                continue
            try:
                rows += run_inference(bundle_root, input_dir, output_dir, items, progress=False)
            except Exception as single:  # noqa: BLE001
                _fail(summary, study, sop, "inference", single)
                sources[sop] = []
        writer = MeasurementWriter(str(output_dir))
        writer.rows = rows
        writer.write()  # measurements.csv/json of every source that succeeded
    return {row["filename"]: row for row in rows}


def _store(client, study: str, source: str, derived: Sequence[Path], summary: dict) -> None:
    import pydicom

    new = []
    for path in derived:
        ds = pydicom.dcmread(str(path))
        entry = {
            "study": study,
            "source": source,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "modality": str(ds.get("Modality", "")),
            "file": str(path),
        }
        if is_stored(client, str(ds.StudyInstanceUID), entry["sop_instance_uid"]):
            summary["skipped"].append({**entry, "reason": "already stored"})
        else:
            new.append((ds, entry))
    if not new:
        return
    response = _pacs_call(
        f"the storage of {len(new)} object(s) into study {study}",
        client.base_url,
        lambda: client.store_instances([ds for ds, _ in new], study_instance_uid=study),
        client,
    )
    failed = {
        str(item.ReferencedSOPInstanceUID): int(getattr(item, "FailureReason", 0))
        for item in getattr(response, "FailedSOPSequence", None) or []
    }
    for _, entry in new:
        if entry["sop_instance_uid"] in failed:
            _fail(
                summary,
                study,
                source,
                "store",
                f"{entry['modality']} {entry['sop_instance_uid']} refused (failure reason "
                f"0x{failed[entry['sop_instance_uid']]:04X})",
            )
        else:
            summary["stored"].append(entry)


def _withhold_flagged(
    measurements: dict[int, dict], study: str, source: str, summary: dict, store_flagged: bool
) -> dict[int, dict]:
    """The measurements (frame -> row) to put in the SR: a measurement with quality flags is left out and listed
    under ``summary["withheld"]``, unless ``store_flagged`` (then the SR carries it, marked by its flags)."""
    kept = {}
    for frame, row in measurements.items():
        flags = parse_flags(row.get("flags"))
        if flags and not store_flagged and row.get("circumference") not in (None, ""):
            summary["withheld"].append(
                {
                    "study": study,
                    "source": source,
                    "frame": frame,
                    "flags": flags,
                    "circumference": row.get("circumference"),
                    "unit": row.get("unit"),
                }
            )
            logger.warning(
                "%s frame %d: measurement withheld from the SR (flags: %s; --store_flagged True stores it, marked)",
                source,
                frame,
                ", ".join(flags),
            )
            continue
        kept[frame] = row
    return kept


def _round_trip_study(
    client,
    study: str,
    work_dir: Path,
    bundle_root: Path,
    modality: str,
    structure: str,
    frames: Any,
    model: str,
    summary: dict,
    progress: bool,
    store_flagged: bool = False,
) -> None:
    import pydicom

    from scripts.clinical.dicom_objects import write_results
    from scripts.data.dicom import export_frames

    study_dir = work_dir / study
    input_dir, output_dir, derived_dir = study_dir / "input", study_dir / "output", study_dir / "derived"
    instances = find_instances(client, study, modality)
    summary["instances"] += len(instances)
    logger.info("study %s: %d %s instances", study, len(instances), modality)

    # 1. retrieve (kept on disk: SOP instances do not change) and decode into frames
    sources: dict[str, list[dict]] = {}
    paths: dict[str, Path] = {}
    for series, sop in tqdm(instances, desc=f"retrieve {study[-12:]}", unit="instance", disable=not progress):
        path = input_dir / f"{sop}.dcm"
        if not path.is_file():
            try:
                ds = _pacs_call(
                    f"the retrieval of instance {sop}",
                    client.base_url,
                    lambda s=series, i=sop: client.retrieve_instance(study, s, i),
                    client,
                )
                write_atomic(path, lambda f, d=ds: pydicom.dcmwrite(f, d, enforce_file_format=True), binary=True)
            except Exception as error:  # noqa: BLE001 - one instance does not stop the study
                _fail(summary, study, sop, "retrieve", error)
                continue
        try:
            items = _select_frames(export_frames(path, output_dir / "frames"), frames)
        except Exception as error:  # noqa: BLE001
            _fail(summary, study, sop, "decode", error)
            continue
        if not items:
            _fail(summary, study, sop, "decode", f"none of the frames {frames} exists in this instance")
            continue
        sources[sop], paths[sop] = items, path

    # 2. the bundle's inference over every decoded frame
    rows = _infer_all(bundle_root, study_dir, sources, summary, study, progress)

    # 3. SEG + SR per source instance, stored unless already there
    for sop, items in tqdm(list(sources.items()), desc=f"store {study[-12:]}", unit="instance", disable=not progress):
        if not items:
            continue  # failed in inference
        try:
            masks, measurements = {}, {}
            for item in items:
                png = Path(item["image"])
                masks[item["frame"]] = np.asarray(Image.open(output_dir / f"{image_stem(png)}_mask.png"))
                measurements[item["frame"]] = rows[png.name]
            measurements = _withhold_flagged(measurements, study, sop, summary, store_flagged)
            derived = write_results(
                paths[sop], masks, measurements, derived_dir / sop, structure=structure, model_id=model
            )
        except Exception as error:  # noqa: BLE001
            _fail(summary, study, sop, "encode", error)
            continue
        try:
            _store(client, study, sop, derived, summary)
        except Exception as error:  # noqa: BLE001
            _fail(summary, study, sop, "store", error)


def _print_summary(summary: dict) -> None:
    lines = [
        f"PACS {summary['url']}: {len(summary['studies'])} studies, {summary['instances']} instances, "
        f"stored {len(summary['stored'])}, skipped {len(summary['skipped'])} (already stored), "
        f"withheld {len(summary.get('withheld', []))} (flagged measurements), failed {len(summary['failed'])}"
    ]
    lines += [f"  stored  {s['modality']:<4} {s['sop_instance_uid']}  <- {s['source']}" for s in summary["stored"]]
    lines += [f"  skipped {s['modality']:<4} {s['sop_instance_uid']}  ({s['reason']})" for s in summary["skipped"]]
    lines += [
        f"  withheld SR  {w['source']} frame {w['frame']}: {', '.join(w['flags'])} (--store_flagged True "
        "stores it, marked)"
        for w in summary.get("withheld", [])
    ]
    lines += [f"  FAILED  {f['source']}  [{f['stage']}] {f['reason']}" for f in summary["failed"]]
    print("\n".join(lines), flush=True)


def run(
    url: str,
    study_uid: str | None = None,
    date_from: Any = None,
    date_to: Any = None,
    modality: str = "US",
    work_dir: str = "eval/pacs",
    bundle_root: str = ".",
    structure: str = "head",
    frames: Any = "all",
    credentials_file: str | None = None,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
    retries: int = RETRIES,
    store_flagged: bool = False,
) -> dict:
    """Round trip for the studies named by ``study_uid`` or the StudyDate range; returns the summary
    ``{"url", "model_id", "studies", "instances", "stored": [...], "skipped": [...], "withheld": [...],
    "failed": [...]}`` (entries name study, source SOP instance, and the derived object, the withheld frame and its
    quality flags, or the failed stage and its reason).

    A measurement with quality flags (:data:`scripts.evaluation.biometry.FLAGS`) is not stored as a result: its frame's
    SEG is stored, its SR measurement group is withheld and listed under ``withheld``. ``store_flagged=True`` stores it,
    marked in the SR by its flags. ``timeout`` (seconds per request) and ``retries`` (attempts per request on 429,
    408, 503, 504) bound how long a server that misbehaves can hold the run.
    """
    root = Path(bundle_root).resolve()
    work = Path(work_dir)
    model = model_id(root)
    client = connect(url, read_credentials(credentials_file), timeout=timeout, retries=retries)
    summary: dict[str, Any] = {
        "url": masked_url(url),
        "model_id": model,
        "studies": [],
        "instances": 0,
        "stored": [],
        "skipped": [],
        "withheld": [],
        "failed": [],
    }
    with logging_redirect_tqdm():
        summary["studies"] = find_studies(client, study_uid, date_from, date_to, modality)
        for study in summary["studies"]:
            _round_trip_study(
                client, study, work, root, modality, structure, frames, model, summary, progress, bool(store_flagged)
            )
    write_json_atomic(work / "summary.json", summary)
    _print_summary(summary)
    return summary


def main(argv: Iterable[str] | None = None) -> None:
    """``python -m scripts.clinical.pacs run ...``: exit 1 when an instance failed, 2 when the run could not go on."""
    from scripts.utils.cli import USER_ERRORS
    from scripts.utils.cli import main as cli_main

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for chatty in ("dicomweb_client", "highdicom", "ignite.engine"):  # a line per request / copied module / epoch
        logging.getLogger(chatty).setLevel(logging.WARNING)
    summary = cli_main(
        {"run": run},
        __doc__,
        prog="python -m scripts.clinical.pacs",
        argv=argv,
        errors=(PacsError, *USER_ERRORS),
        serialize=lambda _: None,
    )
    if isinstance(summary, dict) and summary["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
