"""A real Orthanc with its DICOMweb plugin on free loopback ports, and a pynetdicom storage SCP, for the PACS tests.

Orthanc runs from a JSON configuration written into the test's temporary folder (storage
there too), with remote access off and HTTP basic authentication on (user ``aex``). The Debian
packages ``orthanc`` and ``orthanc-dicomweb`` provide it (scripts/test.sh installs them when
run as root); without them ``start_orthanc`` skips the test with the reason, or fails it under
``AEX_REQUIRE_ALL=1`` (``tests.support.require``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.require import missing
from tests.support.servers import free_port

ORTHANC_USER = "aex"
ORTHANC_PASSWORD = "orthanc-test-password"
ORTHANC_AET = "ORTHANCTEST"
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
START_SECONDS = 30.0


def dicomweb_plugin() -> str | None:
    """The DICOMweb plugin's library, from the Debian package's file list (else the usual paths)."""
    try:
        files = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        files = ""
    found = [line for line in files.splitlines() if line.endswith("/libOrthancDicomWeb.so")]
    return next((p for p in [*found, *PLUGIN_PATHS] if Path(p).is_file()), None)


@dataclass
class Orthanc:
    """A running Orthanc: its REST root (``rest``), DICOMweb root (``dicomweb``), DICOM port."""

    folder: Path
    http_port: int
    dicom_port: int
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self):
        self.log_path = self.folder / "orthanc.log"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.rest}/dicom-web"

    def endpoint(self, **extra) -> dict:
        """Its AEX_PACS entry (basic credentials, its DIMSE peer)."""
        entry = {
            "url": self.dicomweb,
            "username": ORTHANC_USER,
            "password": ORTHANC_PASSWORD,
            "dimse": {"ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": self.dicom_port},
            "timeout": 10.0,
        }
        return {**entry, **extra}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, **kwargs):
        import httpx

        resp = httpx.request(method, self.rest + path, auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=30, **kwargs)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def store(self, data: bytes) -> dict:
        """Store a Part 10 file through the REST API (``POST /instances``)."""
        return self.request("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})

    def start(self, plugin: str) -> None:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "AEX-TEST",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "OverwriteInstances": False,
            "StableAge": 1,
            "SaveJobs": False,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        }
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=1))
        self.proc = subprocess.Popen(
            ["Orthanc", str(config_path)],
            cwd=self.folder,
            stdout=open(self.log_path, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = START_SECONDS) -> bool:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                resp = httpx.get(f"{self.rest}/system", auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=2)
                plugins = httpx.get(f"{self.rest}/plugins", auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=2)
                if resp.status_code == 200 and "dicom-web" in plugins.json():
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class StorageSCP:
    """A pynetdicom storage SCP on a loopback port: what it received, as datasets."""

    ae_title: str
    port: int
    received: list = field(default_factory=list)
    server: object = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def start_orthanc(folder: Path) -> Orthanc:
    """A running Orthanc (DICOMweb plugin on) in ``folder``; the caller stops it. Skips (fails
    under AEX_REQUIRE_ALL=1) when Orthanc or its plugin is not installed."""
    plugin = dicomweb_plugin()
    if shutil.which("Orthanc") is None or plugin is None:
        missing("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    for attempt in range(3):  # a free port can be taken between the probe and Orthanc's bind
        server = Orthanc(folder / f"run{attempt}", free_port(), free_port())
        server.folder.mkdir(parents=True)
        server.start(plugin)
        if server.wait_ready():
            return server
        server.stop()
    raise AssertionError(f"Orthanc did not start in {START_SECONDS} s:\n{server.log()[-3000:]}")


def start_storage_scp() -> StorageSCP:
    """A running pynetdicom storage SCP (every storage SOP class) on a loopback port, keeping
    what it receives; the caller stops it."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    scp = StorageSCP("AEXTESTSCP", 0)
    lock = threading.Lock()

    def on_store(event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with lock:
            scp.received.append(ds)
        return 0x0000

    ae = AE(ae_title=scp.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    scp.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    scp.port = scp.server.server_address[1]
    return scp
