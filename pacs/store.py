"""Storing result objects back to a configured PACS: STOW-RS to its DICOMweb root, or C-STORE (pynetdicom) to its DIMSE peer.

``store_results(endpoints, pacs, objects)`` sends Part 10 objects (the Parametric Map, SC and
SR of a job) and returns a report of what was stored where: the PACS's name (never its
address), how (``stow`` or ``dimse``), and per object its SOP Class, Study, Series and SOP
Instance UIDs and a status (``stored``, ``warning`` with the PACS's reason code, or
``failed`` with a reason). Objects whose SOP Instance UID the PACS has already are not
duplicated: Orthanc answers a STOW or a C-STORE of a known SOP Instance UID with success and
keeps one instance (``OverwriteInstances`` false, its default: the first copy stays; true:
the new copy replaces it), so with deterministic UIDs a job run again stores nothing twice.
Connection failures are retried with backoff (``pacs.read.with_retries``); a PACS that
stays unreachable raises ``pacs_unreachable``; a PACS that refuses some objects does not
raise: the report says which. Each store is logged with its counts and the PACS's name
("stored 5 objects (0 failed) to orthanc via stow"; never an address, a UID or a patient
attribute). Torch-free.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from models.errors import BadParameterError, PacsError, PacsUnreachableError
from pacs.read import ATTEMPTS, BACKOFF_SECONDS, endpoint, http_error, session_for, timeouts, with_retries

if TYPE_CHECKING:
    from pydicom import Dataset

    from pacs.config import Endpoints, PacsEndpoint

log = logging.getLogger("aex.pacs")

STOW_BOUNDARY = "aex-stow-5b1d8c2e9f"
# C-STORE statuses that are warnings (stored, with a coercion or a discrepancy), not failures.
CSTORE_WARNINGS = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}


def _describe(data: bytes) -> tuple[Dataset, dict[str, Any]]:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        row = {
            "sop_class_uid": str(ds.SOPClassUID),
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "study_uid": str(ds.StudyInstanceUID),
            "series_uid": str(ds.SeriesInstanceUID),
        }
    except Exception:
        raise BadParameterError("a result object to store is not a DICOM Part 10 file with its UIDs") from None
    return ds, row


def store_results(
    endpoints: Endpoints,
    pacs: str,
    objects: Sequence[bytes],
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF_SECONDS,
) -> dict[str, Any]:
    """Store ``objects`` (Part 10 bytes) to the PACS named ``pacs``; the report (module docstring)."""
    ep = endpoint(endpoints, pacs)
    described = [_describe(data) for data in objects]
    via = ep.stores_via()
    rows = [row for _ds, row in described]
    if rows:
        if via == "stow":
            _stow(ep, pacs, objects, rows, attempts, backoff)
        else:
            _c_store(ep, pacs, [ds for ds, _row in described], rows, attempts, backoff)
    stored, failed = sum(r["status"] != "failed" for r in rows), sum(r["status"] == "failed" for r in rows)
    log.log(
        logging.WARNING if failed else logging.INFO,
        "stored %d objects (%d failed) to %s via %s",
        stored,
        failed,
        pacs,
        via,
    )
    return {"pacs": pacs, "via": via, "stored": stored, "failed": failed, "objects": rows}


def store_report(endpoints: Endpoints, pacs: str, objects: Sequence[bytes]) -> dict[str, Any]:
    """``store_results`` for a job's result: never raises one of aex's errors (the results
    are kept whatever the PACS does); a PACS that could not take them is reported as
    ``{"pacs", "error": {"code", "message"}}``."""
    from models.errors import AexError

    try:
        return store_results(endpoints, pacs, objects)
    except AexError as exc:
        log.warning("stored 0 objects (%d failed) to %s: [%s]", len(objects), pacs, exc.code)
        return {"pacs": pacs, "stored": 0, "failed": len(objects), "error": {"code": exc.code, "message": exc.message}}


# --- STOW-RS ------------------------------------------------------------------------------
def _multipart(objects: Sequence[bytes]) -> bytes:
    out = bytearray()
    for data in objects:
        out += f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{STOW_BOUNDARY}--\r\n".encode()
    return bytes(out)


def _stow(ep: PacsEndpoint, pacs: str, objects: Sequence[bytes], rows: list[dict], attempts: int, backoff: float):
    """One STOW-RS request per study (``POST {url}/studies/{study}``); rows get their status."""
    import requests

    by_study: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_study.setdefault(row["study_uid"], []).append(i)
    session = session_for(ep)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
        "Accept": "application/dicom+json",
    }
    with session:
        for study, indices in by_study.items():
            body = _multipart([objects[i] for i in indices])
            what = f"store {len(indices)} objects in study {study}"

            def post(study=study, body=body, what=what) -> requests.Response:
                resp = session.post(f"{ep.url}/studies/{study}", data=body, headers=headers, timeout=timeouts(ep))
                # 409 and 400 carry the failed and the stored objects in their body.
                if resp.status_code not in (200, 202, 400, 409):
                    resp.raise_for_status()
                    raise http_error(pacs, what, resp.status_code)
                return resp

            try:
                resp = with_retries(pacs, what, post, attempts, backoff)
            except requests.HTTPError as exc:
                raise http_error(pacs, what, exc.response.status_code) from None
            _stow_statuses(resp, pacs, [rows[i] for i in indices])


def _stow_statuses(resp, pacs: str, rows: list[dict]) -> None:
    """Each row's status from a STOW-RS answer (its Referenced and Failed SOP Sequences)."""
    from pydicom import Dataset

    try:
        answer = Dataset.from_json(resp.json()) if resp.content else Dataset()
    except ValueError:
        raise PacsError(f"PACS {pacs!r} answered a store with something that is not DICOM JSON") from None
    referenced = {
        str(item.get("ReferencedSOPInstanceUID", "")): item for item in answer.get("ReferencedSOPSequence", [])
    }
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): item for item in answer.get("FailedSOPSequence", [])}
    for row in rows:
        uid = row["sop_instance_uid"]
        if uid in failed:
            row["status"], row["reason"] = "failed", f"0x{int(failed[uid].get('FailureReason', 0x0110)):04X}"
        elif uid in referenced and "WarningReason" in referenced[uid]:
            row["status"], row["reason"] = "warning", f"0x{int(referenced[uid].WarningReason):04X}"
        elif uid in referenced or (resp.status_code == 200 and not referenced):
            row["status"] = "stored"
        else:
            row["status"], row["reason"] = "failed", f"not acknowledged (HTTP {resp.status_code})"


# --- C-STORE ------------------------------------------------------------------------------
def _c_store(ep: PacsEndpoint, pacs: str, datasets: list[Dataset], rows: list[dict], attempts: int, backoff: float):
    """One association for all the objects; rows get their status."""
    import time

    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    peer = ep.dimse
    assert peer is not None  # stores_via() says "dimse" only with a peer
    ae = AE(ae_title=ep.calling_ae_title)
    ae.connection_timeout = min(10.0, ep.timeout)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ep.timeout
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(
            sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        )
    pause, assoc = backoff, None
    for attempt in range(1, max(1, attempts) + 1):
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
        if assoc.is_established or assoc.is_rejected:
            break
        if attempt < attempts:
            time.sleep(pause)
            pause *= 2
    if assoc is None or assoc.is_rejected:
        raise PacsError(f"PACS {pacs!r} rejected the association (check its AE titles in AEX_PACS and on the PACS)")
    if not assoc.is_established:
        raise PacsUnreachableError(f"PACS {pacs!r} could not be reached for C-STORE ({attempts} attempts)")
    try:
        for ds, row in zip(datasets, rows):
            try:
                status = assoc.send_c_store(ds)
            except ValueError:  # no accepted presentation context for this SOP class
                row["status"], row["reason"] = "failed", "the PACS accepts no presentation context for it"
                continue
            code = int(status.get("Status", -1)) if status else -1
            if code == 0x0000:
                row["status"] = "stored"
            elif code in CSTORE_WARNINGS:
                row["status"], row["reason"] = "warning", f"0x{code:04X}"
            else:
                reason = f"0x{code:04X}" if code >= 0 else "no answer (the association was lost)"
                row["status"], row["reason"] = "failed", reason
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for row in rows:
        row.setdefault("status", "failed")
        if row["status"] == "failed":
            row.setdefault("reason", "not sent (the association was lost)")
