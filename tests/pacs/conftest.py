"""A real Orthanc with its DICOMweb plugin on free loopback ports, a pynetdicom storage SCP, and real DICOM files to store in them.

Orthanc runs from a JSON configuration written into the test's temporary folder (storage
there too), with remote access off and HTTP basic authentication on (user ``aex``); it is
started once per session (in well under a second) and stopped at the end. The Debian
packages ``orthanc`` and ``orthanc-dicomweb`` provide it (scripts/test.sh installs them when
run as root); without them every test that needs it skips with the reason.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ORTHANC_USER = "aex"
ORTHANC_PASSWORD = "orthanc-test-password"
ORTHANC_AET = "ORTHANCTEST"
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
START_SECONDS = 30.0
# DX "for presentation": what a digital chest X-ray is stored as.
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A running Orthanc (DICOMweb plugin on) for the session; skips when it is not installed."""
    plugin = dicomweb_plugin()
    if shutil.which("Orthanc") is None or plugin is None:
        pytest.skip("Orthanc or its DICOMweb plugin is not installed (Debian packages orthanc, orthanc-dicomweb)")
    folder = tmp_path_factory.mktemp("orthanc")
    for attempt in range(3):  # a free port can be taken between the probe and Orthanc's bind
        server = Orthanc(folder / f"run{attempt}", free_port(), free_port())
        server.folder.mkdir()
        server.start(plugin)
        if server.wait_ready():
            break
        server.stop()
    else:
        raise AssertionError(f"Orthanc did not start in {START_SECONDS} s:\n{server.log()[-3000:]}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs_settings(orthanc):
    """settings(**overrides, pacs_extra=...): Settings whose AEX_PACS names the Orthanc "orthanc"."""
    from jobs.settings import Settings

    def make(pacs_extra: dict | None = None, **overrides):
        return Settings(pacs={"orthanc": orthanc.endpoint(**(pacs_extra or {}))}, **overrides)

    return make


# --- DICOM files --------------------------------------------------------------------------
def xray(pixels, study_uid: str | None = None, modality: str = "DX") -> bytes:
    """A DX (for presentation) Part 10 file of uint16 ``pixels`` (16 bits stored), with the
    patient and study identifiers a PACS would have, in a new series of ``study_uid``."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_PRESENTATION, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PX-PACS", "Test^Pacs", "19700101", "O"
    ds.StudyDate, ds.StudyTime = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "S1", "ACC-PACS", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = modality, 1, 1, "TestVendor"
    ds.PatientOrientation, ds.ImageType = ["A", "F"], ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType, ds.BodyPartExamined = "FOR PRESENTATION", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LIN", 1
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.WindowCenter, ds.WindowWidth = 32768, 65536
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pneumonia_xrays(pneumonia_npz):
    """xrays(n, size=(rows, cols), study_uid=None) -> [Part 10 bytes]: PneumoniaMNIST test
    images upsampled to ``size`` and written as 16-bit DX X-rays."""
    import numpy as np
    from PIL import Image

    images = np.load(pneumonia_npz)["test_images"]

    def make(n: int, size=(512, 512), study_uid: str | None = None, start: int = 0) -> list[bytes]:
        out = []
        for img in images[start : start + n]:
            big = Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            out.append(xray(np.asarray(big, dtype=np.uint16) * 257, study_uid))
        return out

    return make


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


@pytest.fixture
def storage_scp():
    """A running pynetdicom storage SCP (every storage SOP class), stopped after the test."""
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
    try:
        yield scp
    finally:
        scp.stop()
