"""The README's Orthanc without Docker: Debian's own /etc/orthanc files with the README's two snippets, run by /usr/sbin/Orthanc, work with aex (authentication on, QIDO-RS, WADO-RS, STOW-RS, C-STORE, the change feed aex watch follows).

The test copies the configuration the Debian packages installed, replaces credentials.json and
adds aex.json with the very JSON blocks the README shows (found by their HTML comment), and
only moves storage and ports into its temporary folder (the Debian file's own lines, edited in
place), then starts Orthanc on that folder as Debian's service does.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from tests.pacs.test_store import result_objects
from tests.support.dicom import xray
from tests.support.require import missing
from tests.support.servers import free_port

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "docs" / "pacs.md"
ETC = Path("/etc/orthanc")
ORTHANC = Path("/usr/sbin/Orthanc")
PASSWORD = "debian-test-password"


def readme_block(name: str) -> str:
    """The JSON block the README shows for /etc/orthanc/<name>."""
    text = README.read_text()
    marker = f"<!-- tests/pacs/test_debian_orthanc.py: {name} -->"
    assert marker in text, f"docs/pacs.md lost its {name} snippet"
    match = re.search(r"```json\n(.*?)```", text[text.index(marker) :], re.S)
    return match.group(1)


def set_value(text: str, key: str, value) -> str:
    """Debian's orthanc.json (JSON with comments) with the uncommented ``key``'s value replaced."""
    pattern = re.compile(rf'^(\s*"{key}"\s*:\s*)[^,\n]*(,?)$', re.M)
    assert pattern.search(text), key
    return pattern.sub(lambda m: f"{m.group(1)}{json.dumps(value)}{m.group(2)}", text, count=1)


@pytest.fixture(scope="module")
def debian_orthanc(tmp_path_factory):
    if not (ORTHANC.is_file() and (ETC / "orthanc.json").is_file() and (ETC / "dicomweb.json").is_file()):
        missing("the Debian packages orthanc and orthanc-dicomweb are not installed (/etc/orthanc)")
    folder = tmp_path_factory.mktemp("debian-orthanc")
    etc, storage = folder / "etc", folder / "storage"
    etc.mkdir()
    storage.mkdir()
    for path in ETC.glob("*.json"):
        shutil.copy(path, etc / path.name)
    (etc / "credentials.json").write_text(readme_block("credentials.json").replace("<a password>", PASSWORD))
    (etc / "aex.json").write_text(readme_block("aex.json"))
    http_port, dicom_port = free_port(), free_port()
    config = (etc / "orthanc.json").read_text()
    for key, value in (
        ("StorageDirectory", str(storage)),
        ("IndexDirectory", str(storage)),
        ("HttpPort", http_port),
        ("DicomPort", dicom_port),
        ("StableAge", 1),  # the test's patience, not the configuration's
    ):
        config = set_value(config, key, value)
    (etc / "orthanc.json").write_text(config)
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - the child process writes it
    proc = subprocess.Popen([str(ORTHANC), str(etc)], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    rest = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (folder / "orthanc.log").read_text()[-3000:]
            try:
                if httpx.get(f"{rest}/system", auth=("aex", PASSWORD), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (folder / "orthanc.log").read_text()[-3000:]
            time.sleep(0.1)
        yield rest, dicom_port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_the_readme_configuration_works_with_aex(debian_orthanc):
    from jobs.settings import Settings
    from pacs.read import fetch_instance, search_instances
    from pacs.store import store_results

    rest, dicom_port = debian_orthanc
    # Authentication is on: nothing without aex's account.
    assert httpx.get(f"{rest}/dicom-web/studies", timeout=10).status_code == 401
    assert "dicom-web" in httpx.get(f"{rest}/plugins", auth=("aex", PASSWORD), timeout=10).json()
    # The README's AEX_PACS value for aex on the same machine, with this test's ports.
    entry = {
        "url": f"{rest}/dicom-web",
        "username": "aex",
        "password": PASSWORD,
        "dimse": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port},
    }
    settings = Settings(pacs={"orthanc": entry, "orthanc-dimse": {**entry, "store_via": "dimse"}})

    yy, xx = np.mgrid[0:64, 0:64]
    data = xray(((xx * 40 + yy * 17) % 4096).astype(np.uint16))
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    resp = httpx.post(f"{rest}/instances", content=data, auth=("aex", PASSWORD), timeout=30)
    assert resp.status_code == 200, resp.text
    study, series, instance = (
        str(source[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )
    fetched = fetch_instance(settings.pacs, "orthanc", study, series, instance, 10_000_000)  # WADO-RS
    assert pydicom.dcmread(io.BytesIO(fetched)).SOPInstanceUID == instance

    by_stow, by_c_store = result_objects(data, n=2), result_objects(data, n=3)[2:]
    report = store_results(settings.pacs, "orthanc", by_stow)
    assert (report["via"], report["stored"], report["failed"]) == ("stow", 2, 0), report
    report = store_results(settings.pacs, "orthanc-dimse", by_c_store)
    assert (report["via"], report["stored"], report["failed"]) == ("dimse", 1, 0), report
    found = {row["instance_uid"] for row in search_instances(settings.pacs, "orthanc", study)}  # QIDO-RS
    stored = {str(pydicom.dcmread(io.BytesIO(o), stop_before_pixels=True).SOPInstanceUID) for o in by_stow + by_c_store}
    assert found == {instance, *stored}

    # The change feed aex watch follows: the study becomes stable (StableAge).
    deadline = time.monotonic() + 60
    while True:
        changes = httpx.get(f"{rest}/changes?limit=1000", auth=("aex", PASSWORD), timeout=10).json()["Changes"]
        if any(c["ChangeType"] == "StableStudy" for c in changes):
            break
        assert time.monotonic() < deadline, changes
        time.sleep(0.5)
