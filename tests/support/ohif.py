"""The OHIF Viewer for the tests: its pinned static build (scripts/install-ohif), served on 127.0.0.1 with a real Orthanc's DICOMweb behind the same origin, and driven in Debian's Chromium.

One loopback HTTP server answers everything the browser asks for: OHIF's files (any other
path is the single-page app's index.html), ``/app-config.js`` written here (``app_config``: its
one data source is ``/dicom-web`` of the same origin, so no CORS and no credentials in the
page), and ``/dicom-web/...`` proxied to Orthanc with its basic credentials added and the
browser's Host header kept (Orthanc writes the BulkDataURIs of its metadata with it, so they
point at this origin; an Encapsulated PDF's document is fetched through them). Every response
carries the cross-origin isolation headers (COOP same-origin, COEP require-corp) that OHIF's
deployment guide asks for when Cornerstone's volume loader uses SharedArrayBuffer; with them
the page is cross-origin isolated. The test records any request that leaves the origin.
OHIF's guided tour (an overlay that would catch the test's clicks) is configured away.

Missing parts skip with the reason, except where ``AEX_REQUIRE_ALL=1`` (``.ci/run`` sets
it; ``tests.support.require``): there a missing part fails, so CI cannot pass with the viewer
test skipped.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import mimetypes
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from tests.support import REPO_ROOT
from tests.support.require import missing

INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-ohif"
CHROMIUM = Path("/usr/bin/chromium")
# No GPU here: WebGL, which Cornerstone renders with, runs on ANGLE's SwiftShader, which
# Chromium is retiring as an automatic fallback; asked for by name, it stays available.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_SECONDS = 300
PROXY_SECONDS = 30
# Headers of Orthanc's answers passed on to the browser (the rest are hop-by-hop or its own).
PASSED_HEADERS = ("content-type", "etag", "last-modified", "content-location")


def install_ohif() -> Path:
    """The folder of OHIF's build (index.html and its bundles), installed by scripts/install-ohif
    when it is not yet (a download of about 50 MB the first time, nothing after)."""
    try:
        out = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=INSTALL_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        missing(f"scripts/install-ohif did not finish in {INSTALL_SECONDS} s")
    if out.returncode != 0:
        missing(f"scripts/install-ohif failed: {out.stderr.strip()[-500:]}")
    folder = Path(out.stdout.strip().splitlines()[-1])
    if not (folder / "index.html").is_file():
        missing(f"scripts/install-ohif named {folder}, which has no index.html")
    return folder


def artifacts_dir(tmp_path: Path) -> Path:
    """Where the test's screenshots go: ``$AEX_TEST_ARTIFACTS/ohif`` (.ci/run sets it to the
    checkout's test-artifacts/), else ``tmp_path/ohif`` (kept by pytest for its last runs)."""
    root = os.environ.get("AEX_TEST_ARTIFACTS")
    folder = (Path(root) if root else tmp_path) / "ohif"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def chromium():
    """Debian's Chromium, headless, driven by Playwright (no browser download)."""
    if not CHROMIUM.exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; scripts/test.sh does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def app_config(origin: str) -> str:
    """OHIF's ``window.config``: one DICOMweb data source, ``/dicom-web`` of ``origin`` (Orthanc
    behind the proxy; WADO-RS images and thumbnails, bulk data by URI), no study list, no investigational-use dialog, no guided tour. ``singlepart`` leaves
    out "pdf": with it OHIF fetches a PDF from ``.../rendered``, which Orthanc refuses for an
    Encapsulated PDF (400); without it, from the document's BulkDataURI."""
    root = f"{origin}/dicom-web"
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        # The guided tour of the viewer (an onboarding overlay) would catch the test's clicks.
        "customizationService": [{"ohif.tours": {"$set": []}}],
        "showStudyList": False,
        "investigationalUseDialog": {"option": "never"},
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "Orthanc (tests)",
                    "name": "orthanc",
                    "wadoUriRoot": root,
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=1)};\n"


class OhifServer:
    """OHIF's build and an Orthanc's DICOMweb on one loopback origin (module docstring).

    dist: OHIF's dist folder; orthanc_rest: Orthanc's REST root (``http://127.0.0.1:port``);
    auth: its (user, password). ``url`` is the origin; ``viewer(study_uid)`` the viewer's URL."""

    def __init__(self, dist: Path, orthanc_rest: str, auth: tuple[str, str]):
        self.dist = Path(dist).resolve()
        target = urlsplit(orthanc_rest)
        self.orthanc = (target.hostname, target.port)
        self.authorization = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        self.proxied: list[tuple[str, int]] = []  # (path, Orthanc's status) of each proxied request
        # Each proxied request as a line (seconds since the server started, status, bytes, path):
        # with the screenshots, what the viewer fetched and when (a view that never came).
        self.requests: list[str] = []
        self.started = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.answer(self)

            def do_HEAD(self):
                server.answer(self)

            def log_message(self, *_args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.config = app_config(self.url).encode()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def viewer(self, study_uid: str) -> str:
        """The URL of the default (longitudinal) mode's viewer on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- answering ------------------------------------------------------------------------
    def answer(self, req: BaseHTTPRequestHandler) -> None:
        path = urlsplit(req.path).path
        if path.startswith("/dicom-web/"):
            self.proxy(req)
        elif path == "/app-config.js":
            self.send(req, 200, self.config, "text/javascript")
        else:
            self.static(req, path)

    def static(self, req: BaseHTTPRequestHandler, path: str) -> None:
        file = (self.dist / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.dist):
            self.send(req, 404, b"not found", "text/plain")
            return
        if not file.is_file():
            # A route of the single-page app (/viewer, /, ...): its index.html.
            file = self.dist / "index.html"
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self.send(req, 200, file.read_bytes(), kind)

    def proxy(self, req: BaseHTTPRequestHandler) -> None:
        # The browser's Host: Orthanc writes the BulkDataURIs of its metadata with it, so they
        # point at this origin, not at Orthanc's own port (which the page may not fetch).
        headers = {"Authorization": self.authorization, "Host": req.headers.get("Host", "")}
        for name in ("Accept", "Range"):
            if req.headers.get(name):
                headers[name] = req.headers[name]
        conn = http.client.HTTPConnection(*self.orthanc, timeout=PROXY_SECONDS)
        try:
            conn.request(req.command, req.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            passed = {k: v for k, v in resp.getheaders() if k.lower() in PASSED_HEADERS}
        except OSError as exc:
            self.record(req.path, 502, 0)
            self.send(req, 502, f"Orthanc: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        self.record(req.path, resp.status, len(body))
        self.send(req, resp.status, body, passed.pop("Content-Type", None) or "application/octet-stream", passed)

    def record(self, path: str, status: int, size: int) -> None:
        self.proxied.append((path, status))
        self.requests.append(f"{time.monotonic() - self.started:8.2f} {status} {size:>9} {path}")

    @staticmethod
    def send(req: BaseHTTPRequestHandler, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
        req.send_response(status)
        req.send_header("Content-Type", kind)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.send_header("Cross-Origin-Opener-Policy", "same-origin")
        req.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        req.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for name, value in (extra or {}).items():
            req.send_header(name, value)
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(body)
