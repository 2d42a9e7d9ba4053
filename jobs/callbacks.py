"""Callbacks: a POST to the client's ``callback_url`` when its job ends.

The API checks the URL when the job is submitted (http or https, host on
AEX_CALLBACK_ALLOWED_HOSTS) and stores it, with the retry policy, in ``job.meta["callback"]``:
sealed with AEX_DATA_KEY (``sealed_url``, bound to a random ``seal_id`` stored beside it: the
URL's query may hold a token, and rq's job record and the append-only file keep the meta),
with its redacted form for display (``display_url``). The sender opens it just before the
first attempt (``CallbackPolicy.cipher``); a plain ``url`` (a job queued before URLs were
sealed) is still sent.
Whoever sees the job end sends it: the worker after running it (finished, failed, timed out,
cancelled while running), the API for a job cancelled while queued or answered from an
earlier result, and the registry clean-up (a worker's or the API's) for a job whose worker
died. A claim in Redis (SET NX on the delivery record) makes that one delivery per job.

Delivery runs in its own thread and never raises: connection errors, timeouts, 429 and 5xx
are retried with exponential backoff; any other answer outside 2xx (redirects included: they
are not followed, the target could be off the allow-list) ends it. The record
(``callback_key(job_id)``: url, state, attempts, last status or error) shows in the job view,
with the URL redacted (no query, no user info). With a ``CallbackPolicy`` (from the settings)
each POST is signed (Standard Webhooks) and goes to the address the host resolved to once,
checked against the allow-list (``jobs.webhooks``); no proxy is taken from the environment.
Torch-free: the API process uses it too.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from redis import Redis

from jobs.crypto import DataCipher, cipher_from_settings
from jobs.keys import callback_key
from jobs.states import ApiStatus
from jobs.webhooks import (
    PinnedTarget,
    address_allowed,
    ip_on_allow_list,
    parse_callback_secret,
    pin,
    redact_url,
    signed_headers,
)
from models.errors import BadParameterError, DecryptionError
from models.version import __version__

log = logging.getLogger("aex.callbacks")


class _RedactUrls(logging.Filter):
    """httpx logs every request's URL at INFO, query included (a callback's may hold a token):
    its records show URLs redacted, as ``redact_url`` does."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


logging.getLogger("httpx").addFilter(_RedactUrls())

MAX_URL_LENGTH = 2048
MAX_BACKOFF_SECONDS = 300.0

# Delivery states: pending (claimed, first attempt under way), retrying, delivered, failed.
PENDING, RETRYING, DELIVERED, FAILED = "pending", "retrying", "delivered", "failed"


def host_allowed(host: str, allowed: list[str]) -> bool:
    """``host`` equals an entry, or an entry is ``*.domain`` and host is a subdomain of it."""
    host = host.lower().rstrip(".")
    if ip_on_allow_list(host, allowed):  # an IP entry, or a network such as 10.0.0.0/8
        return True
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
        if host == entry:
            return True
    return False


def check_callback_url(url: str, allowed_hosts: list[str]) -> str:
    """The URL, if callbacks may go there; else BadParameterError naming the reason."""
    url = url.strip()
    if not allowed_hosts:
        raise BadParameterError("callbacks are disabled on this service (AEX_CALLBACK_ALLOWED_HOSTS is empty)")
    if len(url) > MAX_URL_LENGTH:
        raise BadParameterError(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise BadParameterError(f"callback_url is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise BadParameterError(f"callback_url must be http:// or https://, got {parts.scheme or 'no'} scheme")
    if not host:
        raise BadParameterError("callback_url has no host")
    if not host_allowed(host, allowed_hosts) or not _literal_allowed(host, allowed_hosts):
        raise BadParameterError(
            f"callback host {host!r} is not allowed (AEX_CALLBACK_ALLOWED_HOSTS: {', '.join(allowed_hosts)})"
        )
    return url


def _literal_allowed(host: str, allowed_hosts: list[str]) -> bool:
    """A host that is an IP address passes the address check the sender makes after resolving
    (``address_allowed``: an IPv6 form that carries an IPv4 address is judged by that one)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True  # a name: checked once resolved
    return address_allowed(host, host, allowed_hosts)


class EndedJob(Protocol):
    """What a callback reads of a job: a worker's rq job, or the API's ``jobs.rqueue.JobRecord``
    (a reused result is no rq job). ``get_status`` is read only when no status is given."""

    @property
    def id(self) -> str: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...

    @property
    def ended_at(self) -> datetime | None: ...


@dataclass(frozen=True)
class CallbackPolicy:
    """How callbacks are sent: ``secret`` signs them (None: unsigned), ``allowed_hosts`` are
    the allow-list the resolved address is checked against (None: only a host that is an IP
    address, as the API checked it, may be a non-public address), ``cipher`` opens a sealed
    URL (None: only a plain one can be sent)."""

    secret: bytes | None = None
    allowed_hosts: list[str] | None = field(default=None)
    cipher: DataCipher | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings) -> CallbackPolicy:
        secret = settings.callback_secret.get_secret_value() if settings.callback_secret is not None else None
        cipher = cipher_from_settings(settings.data_key) if settings.data_key is not None else None
        return cls(parse_callback_secret(secret) if secret else None, list(settings.callback_allowed_hosts), cipher)


def _url_context(seal_id: str) -> bytes:
    return b"aex callback url\x00" + seal_id.encode()


def callback_meta(
    url: str,
    attempts: int,
    timeout: float,
    backoff: float,
    ttl: int,
    public_url: str | None,
    cipher: DataCipher,
) -> dict[str, Any]:
    """What the API stores in ``job.meta["callback"]``: the URL sealed (never in clear), its
    redacted form for display, and the delivery policy."""
    seal_id = secrets.token_hex(16)
    sealed = cipher.seal(url.encode(), _url_context(seal_id))
    return {
        "sealed_url": base64.b64encode(sealed).decode("ascii"),
        "seal_id": seal_id,
        "display_url": redact_url(url),
        "attempts": int(attempts),
        "timeout": float(timeout),
        "backoff": float(backoff),
        "ttl": int(ttl),
        "public_url": public_url,
    }


def display_url(meta: Mapping[str, Any]) -> str | None:
    """The callback URL as views, records and logs show it: no user info, query or fragment."""
    return redact_url(meta.get("display_url") or meta.get("url"))


def open_callback_url(meta: Mapping[str, Any], cipher: DataCipher | None) -> str:
    """The URL to call: ``sealed_url`` opened with ``cipher`` (DecryptionError when it cannot
    be), or a plain ``url`` of a job queued before URLs were sealed."""
    if not meta.get("sealed_url"):
        return str(meta["url"])
    if cipher is None:
        raise DecryptionError("the callback URL is sealed and this sender has no AEX_DATA_KEY")
    try:
        sealed = base64.b64decode(str(meta["sealed_url"]), validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError("the stored callback URL is not sealed data of this service") from None
    try:
        return cipher.open(sealed, _url_context(str(meta.get("seal_id", "")))).decode()
    except DecryptionError as exc:
        raise DecryptionError(f"the stored callback URL could not be opened: {exc.message}") from None


def delivery_record(conn: Redis, job: EndedJob) -> dict[str, Any] | None:
    """The job's delivery record as the job view shows it (None without a callback)."""
    meta = job.meta.get("callback")
    if not isinstance(meta, dict):
        return None
    raw = conn.get(callback_key(job.id))
    if raw:
        try:
            record = json.loads(raw)
            return {**record, "url": redact_url(record.get("url"))} if isinstance(record, dict) else record
        except json.JSONDecodeError:
            pass
    return {"url": display_url(meta), "state": "waiting", "attempts": 0}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def job_end_payload(job: EndedJob, status: ApiStatus, public_url: str | None) -> dict[str, Any]:
    """The JSON body of a callback: which job, how it ended, where its result is (never the id
    of another job: a reused result does not say whose it was)."""
    path = f"/v1/jobs/{job.id}"
    error = job.meta.get("error") if status is not ApiStatus.FINISHED else None
    if status is ApiStatus.CANCELLED and not error:
        error = {"code": "job_cancelled", "message": "the job was cancelled"}
    return {
        "job_id": job.id,
        "kind": job.meta.get("kind"),
        "model": job.meta.get("model"),
        "status": status.value,
        "result_url": (public_url.rstrip("/") + path) if public_url else path,
        "error": error if isinstance(error, dict) else None,
        "reused": bool(job.meta.get("result_job")),  # answered from an earlier result (never whose)
        "ended_at": job.ended_at.replace(tzinfo=UTC).isoformat() if job.ended_at else _now(),
    }


def notify_job_end(
    conn: Redis, job: EndedJob, status: ApiStatus, policy: CallbackPolicy | None = None
) -> threading.Thread | None:
    """Send the job's callback, once, in a thread (returned; None when there is nothing to
    send or another process has already claimed it). Never raises."""
    try:
        meta = job.meta.get("callback")
        if not isinstance(meta, dict) or not (meta.get("sealed_url") or meta.get("url")):
            return None
        payload = job_end_payload(job, status, meta.get("public_url"))
        record = {"url": display_url(meta), "state": PENDING, "attempts": 0, "status_sent": status.value}
        ttl = max(1, int(meta.get("ttl", 3600)))
        if not conn.set(callback_key(job.id), json.dumps(record), nx=True, ex=ttl):
            return None  # someone else sends it
        thread = threading.Thread(
            target=deliver,
            args=(conn, job.id, meta, payload, record, ttl, policy),
            name=f"aex-callback-{job.id[:8]}",
            daemon=False,
        )
        thread.start()
        return thread
    except Exception:
        log.exception("could not start the callback of job %s", getattr(job, "id", "?"))
        return None


def _save(conn: Redis, job_id: str, record: dict[str, Any], ttl: int) -> None:
    try:
        conn.set(callback_key(job_id), json.dumps(record), ex=ttl)
    except Exception:
        log.warning("could not record the callback state of job %s", job_id)


def _error_text(exc: Exception) -> str:
    """A delivery error for the record: its kind and reason, never a URL (its query may hold a token)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and "://" not in text and "?" not in text else type(exc).__name__


def _pin(url: str, policy: CallbackPolicy) -> PinnedTarget:
    allowed = policy.allowed_hosts
    if allowed is None:  # the API checked an IP-address host against its allow-list
        host = urlsplit(url).hostname or ""
        allowed = [host] if ip_on_allow_list(host, [host]) else []
    else:  # checked again here: a job written straight into Redis was never checked by the API
        check_callback_url(url, allowed)
    return pin(url, allowed)


def deliver(
    conn: Redis,
    job_id: str,
    meta: dict[str, Any],
    payload: dict[str, Any],
    record: dict[str, Any],
    ttl: int,
    policy: CallbackPolicy | None = None,
) -> dict[str, Any]:
    """POST ``payload`` to the callback URL of ``meta`` (opened with the policy's cipher) with
    retries; returns the final record."""
    policy = policy or CallbackPolicy()
    attempts = max(1, int(meta.get("attempts", 5)))
    backoff = float(meta.get("backoff", 1.0))
    headers = {"User-Agent": f"aex/{__version__}", "X-Aex-Job-Id": job_id, "Content-Type": "application/json"}
    body = json.dumps(payload, separators=(",", ":")).encode()
    record["url"] = display_url(meta)
    target: PinnedTarget | None = None
    try:
        with httpx.Client(timeout=float(meta.get("timeout", 10.0)), follow_redirects=False, trust_env=False) as client:
            for attempt in range(1, attempts + 1):
                record["attempts"] = attempt
                record["last_attempt_at"] = _now()
                retry = False
                try:
                    if target is None:  # resolved once, then every attempt goes to that address
                        target = _pin(open_callback_url(meta, policy.cipher), policy)
                    signed = signed_headers(policy.secret, job_id, body) if policy.secret else {}
                    resp = client.post(
                        target.url,
                        content=body,
                        headers={**headers, **signed, "Host": target.host_header},
                        extensions={"sni_hostname": target.sni_hostname},
                    )
                except (BadParameterError, DecryptionError) as exc:  # an address not allowed, a URL not opened
                    record["last_status"], record["last_error"] = None, exc.message
                    break
                except (httpx.HTTPError, OSError) as exc:
                    record["last_status"], record["last_error"] = None, _error_text(exc)
                    retry = True
                else:
                    record["last_status"], record["last_error"] = resp.status_code, None
                    if 200 <= resp.status_code < 300:
                        record["state"], record["delivered_at"] = DELIVERED, _now()
                        _save(conn, job_id, record, ttl)
                        return record
                    retry = resp.status_code == 429 or resp.status_code >= 500
                    if not retry:
                        record["last_error"] = f"HTTP {resp.status_code}: not retried"
                if not retry or attempt == attempts:
                    break
                record["state"] = RETRYING
                _save(conn, job_id, record, ttl)
                time.sleep(min(MAX_BACKOFF_SECONDS, backoff * 2 ** (attempt - 1)))
    except Exception as exc:
        log.exception("callback of job %s failed unexpectedly", job_id)
        record["last_error"] = type(exc).__name__
    record["state"] = FAILED
    _save(conn, job_id, record, ttl)
    log.warning(
        "callback of job %s to %s failed after %d attempt(s): %s",
        job_id,
        display_url(meta),
        record["attempts"],
        record.get("last_error") or record.get("last_status"),
    )
    return record
