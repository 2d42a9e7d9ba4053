"""A small Python client of the aex service (httpx; never imports torch).

    from aex.client import AexClient

    with AexClient() as client:  # the service: aex.address; token: AEX_TOKEN or the token file
        view = client.classify("cat.png", model="cifar10-robust", top_k=3)
        job = client.explain("cat.png", targets=["predicted", "runner-up"], steps=35,
                             on_progress=lambda v: print(v["status"], v.get("progress")))
        client.download_images(job, "out/")

With no ``url``, the client talks to the service ``aex.address`` finds (``AEX_URL``, else the
``aex serve`` running as this user, else ``http://AEX_HOST:AEX_PORT``), as every command does.
Every request carries ``Authorization: Bearer <token>``: the ``token`` given, else
``AEX_TOKEN``, else the token file (``AEX_TOKEN_FILE``, default ``~/.config/aex/token``, where
``aex serve`` writes its first admin token); the token is never sent to another address than
the service's. Job views are the JSON of ``GET /v1/jobs/{id}`` as dicts. Every error the API reports
(``{"error": {"code", "message"}}``) and every failed or cancelled job is raised as the
named exception of ``models.errors`` for its code; an unreachable service is a
``ServiceUnavailableError``.
"""

from __future__ import annotations

import ipaddress
import json
import mimetypes
import re
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from aex.address import service_url
from aex.credentials import resolve_token
from models.errors import AexError, BadParameterError, JobFailedError, ServiceUnavailableError, error_class_for

TERMINAL = ("finished", "failed", "cancelled")
# File names the client writes: what the service names its results, nothing with a path in it.
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DICOM_SUFFIXES = (".dcm", ".dicom")

ProgressFn = Callable[[dict[str, Any]], None]


def api_error(code: str, message: str, status: int | None = None) -> AexError:
    """The named exception for an API error code, carrying the service's own code (also for
    codes this version does not know: they come back as JobFailedError with that code)."""
    exc = error_class_for(code)(message)
    if exc.code != code:
        exc.code = code
    if status is not None:
        exc.http_status = status
    return exc


def _error_from_response(resp: httpx.Response) -> AexError:
    try:
        body = resp.json()
        err = body["error"]
        return api_error(str(err["code"]), str(err["message"]), resp.status_code)
    except (ValueError, KeyError, TypeError):
        text = resp.text.strip().splitlines()[0][:300] if resp.text.strip() else resp.reason_phrase
        return api_error("http_error", f"HTTP {resp.status_code} from {resp.request.url}: {text}", resp.status_code)


def job_error(view: dict[str, Any]) -> AexError:
    """The exception for a failed or cancelled job view."""
    err = view.get("error") or {}
    code = err.get("code") or ("job_cancelled" if view.get("status") == "cancelled" else "job_failed")
    return api_error(code, err.get("message") or f"job {view.get('id')} {view.get('status')}")


def _media_type(path: Path) -> str:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "application/dicom"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _safe_file_name(name: str) -> str:
    if not SAFE_NAME.match(name) or ".." in name:
        raise BadParameterError(f"the service named a result file {name!r}, which is not a plain file name")
    return name


class AexClient:
    """Client of one aex service. ``url``: its base (``http://host:8000``; None: the one
    ``aex.address`` finds); ``timeout``: seconds for each HTTP request (not for a job: see
    ``wait``); ``token``: the bearer token (None: AEX_TOKEN, else the token file; see the
    module docstring)."""

    def __init__(
        self,
        url: str | None = None,
        timeout: float = 60.0,
        poll_interval: float = 0.2,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
    ):
        url = service_url(url)
        if not re.match(r"^https?://", url or ""):
            raise BadParameterError(f"--url must be an http:// or https:// address, got {url!r}")
        self.url = url.rstrip("/")
        self.poll_interval = poll_interval
        headers = {"Accept": "application/json"}
        token = resolve_token(token)
        if token:
            headers["Authorization"] = f"Bearer {token}"
            if self.url.startswith("http://") and not _loopback(self.url):
                warnings.warn(
                    f"sending the access token to {self.url} without TLS: use https:// outside this machine",
                    stacklevel=2,
                )
        self.http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport, headers=headers)

    # --- plumbing ----------------------------------------------------------------------
    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AexClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", path) and not path.startswith(self.url + "/"):
            # The token goes to this service only, never to an address a response named.
            raise BadParameterError(f"refusing to request {path!r}: not an address of the service at {self.url}")
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServiceUnavailableError(f"the service at {self.url} did not answer in time ({exc})") from None
        except httpx.TransportError as exc:
            raise ServiceUnavailableError(f"cannot reach the service at {self.url}: {exc}") from None
        if resp.status_code >= 400:
            raise _error_from_response(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise api_error(
                "http_error",
                f"{method} {path} answered something that is not JSON ({resp.headers.get('content-type')})",
            ) from None

    @staticmethod
    def _upload(path: str | Path) -> dict[str, tuple[str, bytes, str]]:
        path = Path(path)
        if not path.is_file():
            raise BadParameterError(f"no such file: {path}")
        return {"image": (path.name, path.read_bytes(), _media_type(path))}

    # --- the API -----------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: {"default": name, "models": [entry, ...]}."""
        return self._json("GET", "/v1/models")

    def classify(
        self,
        path: str | Path,
        model: str | None = None,
        top_k: int | None = None,
        stability: bool = False,
        on_progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Classify the image (or DICOM file) at ``path``; returns the finished job view
        (waiting for it when the service answers 202)."""
        data: dict[str, str] = {}
        if model:
            data["model"] = model
        if top_k is not None:
            data["top_k"] = str(top_k)
        if stability:  # sent only when asked: a service without the option then still answers
            data["stability"] = "true"
        view = self._json("POST", "/v1/classify", files=self._upload(path), data=data)
        if on_progress is not None:
            on_progress(view)
        if view.get("status") in TERMINAL:
            return self._finished(view)
        return self.wait(view["id"], on_progress, timeout=timeout)

    def explain(
        self,
        path: str | Path,
        model: str | None = None,
        targets: str | Iterable[str] | None = None,
        rho: float | None = None,
        steps: int | None = None,
        layer: str | None = None,
        on_progress: ProgressFn | None = None,
        wait: bool = True,
        timeout: float | None = None,
        stability_steps: int | None = None,
        stability_mode: str | None = None,
    ) -> dict[str, Any]:
        """Queue adversarial explanations and Grad-CAM for the file at ``path``. ``targets``:
        "predicted", "runner-up", "all", class names or indices (a list or a comma-separated
        string; None: the service's default). Returns the finished job view, or with
        ``wait=False`` the queued one."""
        data: dict[str, str] = {}
        if model:
            data["model"] = model
        if targets is not None:
            data["targets"] = targets if isinstance(targets, str) else ",".join(str(t) for t in targets)
        if rho is not None:
            data["rho"] = repr(float(rho))
        if steps is not None:
            data["steps"] = str(int(steps))
        if layer:
            data["layer"] = layer
        if stability_steps is not None:
            data["stability_steps"] = str(int(stability_steps))
        if stability_mode:
            data["stability_mode"] = stability_mode
        view = self._json("POST", "/v1/explain", files=self._upload(path), data=data)
        if on_progress is not None:
            on_progress(view)
        if not wait:
            return view
        if view.get("status") in TERMINAL:  # answered at once from an identical earlier request
            return self._finished(view)
        return self.wait(view["id"], on_progress, timeout=timeout)

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``: the job view as it is now."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, on_progress: ProgressFn | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Poll the job until it ends; ``on_progress(view)`` is called after every poll.
        Returns the finished view; a failed or cancelled job raises its named error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = self.poll_interval
        while True:
            view = self.job(job_id)
            if on_progress is not None:
                on_progress(view)
            if view.get("status") in TERMINAL:
                return self._finished(view)
            if deadline is not None and time.monotonic() > deadline:
                raise JobFailedError(f"job {job_id} is still {view.get('status')} after {timeout} s")
            time.sleep(interval)
            # Queued jobs can wait long; poll them less often (running ones keep the pace).
            interval = min(interval * 1.5, 2.0) if view.get("status") == "queued" else self.poll_interval

    @staticmethod
    def _finished(view: dict[str, Any]) -> dict[str, Any]:
        if view.get("status") != "finished":
            raise job_error(view)
        return view

    def cancel(self, job_id: str) -> dict[str, Any]:
        """``DELETE /v1/jobs/{id}``: cancel a queued job at once, a running one at its next step."""
        return self._json("DELETE", f"/v1/jobs/{job_id}")

    # --- administration (the admin scope) ---------------------------------------------
    def create_key(self, name: str, scopes: Iterable[str]) -> dict[str, Any]:
        """``POST /v1/keys``: a new API key; the answer holds its ``token``, shown this once."""
        return self._json("POST", "/v1/keys", json={"name": name, "scopes": list(scopes)})

    def list_keys(self) -> list[dict[str, Any]]:
        """``GET /v1/keys``: name, scopes and creation time of every key (never a token)."""
        return self._json("GET", "/v1/keys").get("keys", [])

    def revoke_key(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/keys/{name}``: the key's token stops working at once."""
        return self._json("DELETE", f"/v1/keys/{name}")

    def audit(self, since: str | None = None, until: str | None = None, limit: int | None = None) -> list[dict]:
        """``GET /v1/audit``: audit records, oldest first (``since``/``until``: ``15m``, ``1h``,
        ``7d``, an ISO 8601 time, or a record id to read on after)."""
        params = {k: v for k, v in (("since", since), ("until", until), ("limit", limit)) if v is not None}
        resp = self._request("GET", "/v1/audit", params=params)
        if "json-lines" in resp.headers.get("content-type", "") or "ndjson" in resp.headers.get("content-type", ""):
            return [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        body = resp.json()
        return body.get("records", []) if isinstance(body, dict) else body

    # --- results -----------------------------------------------------------------------
    def download(self, url: str) -> bytes:
        """The bytes at ``url`` (a path of the service, as the job view lists them)."""
        return self._request("GET", url).content

    def _save_all(self, links: dict[str, str], out_dir: str | Path) -> list[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, url in links.items():
            path = out / _safe_file_name(name)
            path.write_bytes(self.download(url))
            paths.append(path)
        return paths

    def download_images(self, job: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Save every PNG of a finished explain job (its ``images``) into ``out_dir``."""
        return self._save_all(job.get("images") or {}, out_dir)

    @staticmethod
    def dicom_links(job: dict[str, Any]) -> dict[str, str]:
        """name -> URL of the DICOM objects of a job (jobs on DICOM input), wherever the view
        lists them (``dicom`` beside ``images``, or in the result)."""
        for holder in (job, job.get("result") or {}):
            links = holder.get("dicom")
            if isinstance(links, dict) and all(isinstance(v, str) for v in links.values()):
                return links
        return {}

    def download_dicom(self, job: dict[str, Any], out_dir: str | Path) -> list[Path]:
        """Save every DICOM object of a finished job into ``out_dir`` (none for image input)."""
        links = self.dicom_links(job)
        return self._save_all({n if n.lower().endswith(".dcm") else f"{n}.dcm": u for n, u in links.items()}, out_dir)
