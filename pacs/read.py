"""Reading from the configured PACS: admission checks of a reference, WADO-RS retrieval of one instance, QIDO-RS searches.

A request names a PACS of AEX_PACS (``pacs.config``) and the three UIDs of an instance;
``check_reference`` is what the API runs at admission (no network, no torch), and
``fetch_instance`` what the worker runs: the instance's Part 10 bytes, exactly as the PACS
keeps them (``transfer-syntax=*``), streamed and cut off past AEX_MAX_UPLOAD_BYTES (decoded
bytes are counted, so a compressed answer cannot inflate past it), then handed to the same
DICOM pipeline as an upload. Errors: ``unknown_pacs``, ``instance_not_found`` (the UIDs named:
they are not patient data), ``upload_too_large``, ``pacs_error`` (refused credentials, a
malformed answer) and ``pacs_unreachable`` after bounded retries with backoff (only
connection errors, time-outs, 429 and 5xx are retried). Messages name the PACS, never its
address or credentials.

QIDO-RS goes through ``dicomweb-client``; retrieval uses the same authenticated
``requests`` session but reads the answer itself, because ``retrieve_instance`` buffers the
whole answer and returns a parsed dataset (neither bounded nor the bytes as stored).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from models.errors import (
    BadParameterError,
    InstanceNotFoundError,
    PacsError,
    PacsUnreachableError,
    UnknownPacsError,
    UploadTooLargeError,
)
from pacs.config import Endpoints, PacsEndpoint

if TYPE_CHECKING:
    import requests
    from dicomweb_client.api import DICOMwebClient


T = TypeVar("T")

# A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters.
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# Attempts of one PACS request, and the first pause between two (doubled after each failure).
ATTEMPTS = 4
BACKOFF_SECONDS = 0.5
# Room for a multipart answer's boundaries and part headers beyond the instance itself.
MULTIPART_SLACK = 64 * 1024
READ_CHUNK = 64 * 1024
# The instance as stored; a PACS that cannot send that (406) is asked for its default
# (Explicit VR Little Endian).
WADO_ACCEPT = (
    'multipart/related; type="application/dicom"; transfer-syntax=*',
    'multipart/related; type="application/dicom"',
)


@dataclass(frozen=True)
class PacsReference:
    """An instance of a configured PACS, as a request names it (JSON-safe: no address, no secret)."""

    pacs: str
    study_uid: str
    series_uid: str
    instance_uid: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        return f"study {self.study_uid}, series {self.series_uid}, instance {self.instance_uid} of PACS {self.pacs!r}"


def endpoint(endpoints: Endpoints, pacs: str) -> PacsEndpoint:
    """The endpoint AEX_PACS configures under ``pacs``; UnknownPacsError otherwise."""
    found = endpoints.get(pacs) if isinstance(pacs, str) else None
    if found is None:
        known = ", ".join(sorted(endpoints)) or "none is configured (AEX_PACS)"
        raise UnknownPacsError(f"unknown PACS {str(pacs)[:64]!r}: configured are {known}")
    return found


def valid_uid(value: str) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(UID.match(value))


def check_reference(
    endpoints: Endpoints, pacs: str, study_uid: str, series_uid: str, instance_uid: str
) -> PacsReference:
    """The admission check of an input by reference (API side: no network, torch-free): the
    PACS is configured and can be read (it has a DICOMweb url), the three UIDs are valid UIDs.
    UnknownPacsError (400) or BadParameterError (400) otherwise."""
    ep = endpoint(endpoints, pacs)
    if ep.url is None:
        raise BadParameterError(f"PACS {pacs!r} is configured for C-STORE only: aex cannot read instances from it")
    for field, value in (("study_uid", study_uid), ("series_uid", series_uid), ("instance_uid", instance_uid)):
        if not valid_uid(value):
            raise BadParameterError(f"{field} must be a DICOM UID (digits and dots, at most 64 characters)")
    return PacsReference(pacs, study_uid, series_uid, instance_uid)


# --- plumbing -----------------------------------------------------------------------------
def session_for(ep: PacsEndpoint) -> requests.Session:
    """A requests session with the endpoint's credentials (and no proxies from the environment)."""
    import requests

    session = requests.Session()
    session.trust_env = False  # no ~/.netrc, no *_PROXY: the credentials go to this PACS only
    session.headers.update(ep.auth_headers())
    return session


def timeouts(ep: PacsEndpoint) -> tuple[float, float]:
    """(connect, read) seconds of each request to ``ep``."""
    return (min(10.0, ep.timeout), ep.timeout)


def dicomweb_client(ep: PacsEndpoint, session: requests.Session | None = None) -> DICOMwebClient:
    """dicomweb-client on the endpoint's DICOMweb root, without retries of its own (ours wrap it)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(ep.url, session=session or session_for(ep), timeout=timeouts(ep))
    client.set_http_retry_params(retry=False)
    return client


def retriable_status(status: int) -> bool:
    return status == 429 or status >= 500


def with_retries(
    pacs: str, what: str, fn: Callable[[], T], attempts: int = ATTEMPTS, backoff: float = BACKOFF_SECONDS
) -> T:
    """``fn()``, tried again after connection errors, time-outs, 429 and 5xx (``attempts`` in
    all, pausing ``backoff`` seconds, doubled each time); PacsUnreachableError after the last.
    Any other HTTP error of requests is re-raised for the caller to name."""
    import requests

    pause, reason = backoff, "no attempt"
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if not retriable_status(status):
                raise
            reason = f"HTTP {status}"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            # Its text names the address: only its kind is reported.
            reason = type(exc).__name__
        if attempt < attempts:
            time.sleep(pause)
            pause *= 2
    raise PacsUnreachableError(f"PACS {pacs!r} could not be reached to {what} ({reason}, {attempts} attempts)")


def http_error(pacs: str, what: str, status: int) -> PacsError:
    """The error for a PACS answering ``status`` (not retried) to ``what``."""
    if status in (401, 403):
        return PacsError(f"PACS {pacs!r} refused aex's credentials to {what} (HTTP {status}): check AEX_PACS")
    return PacsError(f"PACS {pacs!r} answered HTTP {status} to {what}")


# --- WADO-RS ------------------------------------------------------------------------------
def fetch_instance(
    endpoints: Endpoints,
    pacs: str,
    study_uid: str,
    series_uid: str,
    instance_uid: str,
    max_bytes: int,
    attempts: int = ATTEMPTS,
    backoff: float = BACKOFF_SECONDS,
) -> bytes:
    """The Part 10 bytes of one instance, by WADO-RS, as the PACS stores it (see the module
    docstring for the limits and the errors)."""
    import requests

    ref = check_reference(endpoints, pacs, study_uid, series_uid, instance_uid)
    ep = endpoint(endpoints, pacs)

    url = f"{ep.url}/studies/{study_uid}/series/{series_uid}/instances/{instance_uid}"
    session = session_for(ep)

    def get(accept: str = WADO_ACCEPT[0]) -> tuple[str, bytes]:
        with session.get(url, headers={"Accept": accept}, stream=True, timeout=timeouts(ep)) as resp:
            if resp.status_code == 406 and accept != WADO_ACCEPT[1]:
                return get(WADO_ACCEPT[1])
            if resp.status_code == 404:
                raise InstanceNotFoundError(f"no {ref.describe()}")
            resp.raise_for_status()
            declared = resp.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes + MULTIPART_SLACK:
                raise _too_large(ref, max_bytes)
            body = bytearray()
            for chunk in resp.iter_content(READ_CHUNK):
                body += chunk
                if len(body) > max_bytes + MULTIPART_SLACK:
                    raise _too_large(ref, max_bytes)
            return resp.headers.get("Content-Type", ""), bytes(body)

    try:
        with session:
            content_type, body = with_retries(pacs, f"retrieve {ref.describe()}", get, attempts, backoff)
    except requests.HTTPError as exc:
        raise http_error(pacs, f"retrieve {ref.describe()}", exc.response.status_code) from None
    data = single_part(content_type, body, pacs)
    if len(data) > max_bytes:
        raise _too_large(ref, max_bytes)
    if not data:
        raise InstanceNotFoundError(f"no {ref.describe()} (the PACS answered an empty body)")
    return data


def fetch_reference(endpoints: Endpoints, reference: dict[str, str], max_bytes: int) -> bytes:
    """``fetch_instance`` of a reference as jobs carry it (``PacsReference.as_dict()``)."""
    ref = PacsReference(**reference)
    return fetch_instance(endpoints, ref.pacs, ref.study_uid, ref.series_uid, ref.instance_uid, max_bytes)


def _too_large(ref: PacsReference, max_bytes: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"{ref.describe()} is larger than AEX_MAX_UPLOAD_BYTES ({max_bytes} bytes)")


def single_part(content_type: str, body: bytes, pacs: str) -> bytes:
    """The one DICOM part of a WADO-RS answer (``multipart/related``; a bare
    ``application/dicom`` body, which some servers send, is taken as it is)."""
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/dicom":
        return body
    if media != "multipart/related":
        raise PacsError(f"PACS {pacs!r} answered {media or 'no content type'} instead of multipart/related")
    match = re.search(r'boundary\s*=\s*"?([^";]+)"?', params, re.IGNORECASE)
    if not match:
        raise PacsError(f"PACS {pacs!r} answered a multipart body without a boundary")
    delimiter = b"--" + match.group(1).strip().encode("latin-1")
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise PacsError(f"PACS {pacs!r} answered a multipart part without headers")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    if len(parts) != 1:
        raise PacsError(f"PACS {pacs!r} answered {len(parts)} parts for one instance")
    return parts[0]


# --- QIDO-RS ------------------------------------------------------------------------------
def _qido(endpoints: Endpoints, pacs: str, what: str, call: Callable[[DICOMwebClient], list[dict]]) -> list[dict]:
    import requests

    ep = endpoint(endpoints, pacs)
    if ep.url is None:
        raise BadParameterError(f"PACS {pacs!r} has no DICOMweb url: it cannot be searched")
    client = dicomweb_client(ep)
    try:
        return with_retries(pacs, what, lambda: call(client))
    except requests.HTTPError as exc:
        raise http_error(pacs, what, exc.response.status_code) from None
    except ValueError:  # not JSON
        raise PacsError(f"PACS {pacs!r} answered something that is not DICOM JSON to {what}") from None


def json_value(item: dict[str, Any], tag: str) -> Any:
    """The first value of ``tag`` (8 hex digits) in a DICOM JSON object (None without one)."""
    values = (item.get(tag) or {}).get("Value") or [None]
    value = values[0]
    return value.get("Alphabetic") if isinstance(value, dict) else value


def search_studies(endpoints: Endpoints, pacs: str, study_date: str | None = None) -> list[dict[str, Any]]:
    """Studies of the PACS (with ``study_date``: a QIDO date or range, such as "20260101-"):
    study_uid, study_date, study_time, instances (NumberOfStudyRelatedInstances) each."""
    filters = {"StudyDate": study_date} if study_date else None
    found = _qido(
        endpoints,
        pacs,
        "search for studies",
        lambda c: c.search_for_studies(search_filters=filters, fields=["00201208"], get_remaining=True),
    )
    return [
        {
            "study_uid": json_value(item, "0020000D"),
            "study_date": json_value(item, "00080020"),
            "study_time": json_value(item, "00080030"),
            "instances": json_value(item, "00201208"),
        }
        for item in found
        if json_value(item, "0020000D")
    ]


def search_instances(endpoints: Endpoints, pacs: str, study_uid: str) -> list[dict[str, Any]]:
    """Every instance of a study: its three UIDs, SOP class, modality, and its series's
    description and manufacturer (what ``aex watch`` filters on)."""
    if not valid_uid(study_uid):
        raise BadParameterError("study_uid must be a DICOM UID")
    fields = ["00080060", "0008103E", "00080070", "00080016"]
    found = _qido(
        endpoints,
        pacs,
        f"search the instances of study {study_uid}",
        lambda c: c.search_for_instances(study_instance_uid=study_uid, fields=fields, get_remaining=True),
    )
    out = []
    for item in found:
        row = {
            "study_uid": json_value(item, "0020000D") or study_uid,
            "series_uid": json_value(item, "0020000E"),
            "instance_uid": json_value(item, "00080018"),
            "sop_class_uid": json_value(item, "00080016"),
            "modality": json_value(item, "00080060"),
            "series_description": json_value(item, "0008103E"),
            "manufacturer": json_value(item, "00080070"),
        }
        if valid_uid(row["series_uid"] or "") and valid_uid(row["instance_uid"] or ""):
            out.append(row)
    return out
