"""The operator's path on one machine: `aex serve` (embedded Redis) says where it is in service.json beside its token, and `aex watch --pacs orthanc` with neither --url nor AEX_REDIS_URL finds it, submits a new DX from a real Orthanc, and its results land back in the study."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from pacs.read import search_instances
from tests.aex.test_serve import REPO_ROOT, start_serve, stop_serve
from tests.support.dicom import xray

pytestmark = pytest.mark.e2e


def test_watch_finds_the_running_serve_by_itself(orthanc, service_models, tmp_path):
    from jobs.settings import Settings

    pacs = json.dumps({"orthanc": orthanc.endpoint()})
    serve, base = start_serve(service_models, tmp_path, AEX_PACS=pacs)
    where = tmp_path / "config" / "service.json"
    watch = None
    try:
        assert where.stat().st_mode & 0o777 == 0o600
        doc = json.loads(where.read_text())
        assert doc["url"] == base and doc["pid"] == serve.pid and doc["redis_url"].startswith("unix://")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
        env.update(
            HOME=str(tmp_path / "home"),
            AEX_TOKEN_FILE=str(tmp_path / "config" / "token"),
            AEX_PACS=pacs,
            AEX_LOG_LEVEL="INFO",
        )
        log = open(tmp_path / "watch.log", "wb")  # noqa: SIM115 - the child process writes it
        watch = subprocess.Popen(
            [sys.executable, "-m", "aex.cli", "watch", "--pacs", "orthanc", "--model", "tiny-grey", "--interval", "1"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while "watching PACS 'orthanc'" not in (tmp_path / "watch.log").read_text():
            assert watch.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.2)
        assert "submitting by reference" in (tmp_path / "watch.log").read_text()

        yy, xx = np.mgrid[0:64, 0:64]
        data = xray(((xx * 40 + yy * 17) % 4096).astype(np.uint16))
        orthanc.store(data)
        study = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
        settings = Settings(pacs={"orthanc": orthanc.endpoint()})
        deadline = time.monotonic() + 180
        while True:
            derived = [r for r in search_instances(settings.pacs, "orthanc", study) if r["manufacturer"] == "aex"]
            if len(derived) >= 4:  # the map, the SCs and the SR, stored back by the worker
                break
            assert watch.poll() is None and time.monotonic() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.5)
    finally:
        if watch is not None:
            watch.send_signal(signal.SIGTERM)
            watch.wait(60)
        stop_serve(serve, tmp_path)
    assert not where.exists()  # removed when aex serve stopped
