"""``aex watch`` against a real Orthanc: new stable studies are found (change feed, QIDO-RS poll), each wanted instance submitted exactly once, state resumed from Redis."""

from __future__ import annotations

import io
import threading
import time

import pydicom
import pytest
from pydicom.uid import generate_uid

from aex.watcher import Watcher, WatchState, wanted
from models.errors import QueueFullError, UndecodableImageError

DB = 13  # the conn fixture's database (tests/conftest.py), shared with tests/service/test_client_limits.py

WAIT_SECONDS = 30.0


def wait_until(condition, timeout: float = WAIT_SECONDS, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout} s")
        time.sleep(0.1)


def uid_of(data: bytes, keyword: str) -> str:
    return str(getattr(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), keyword))


class Recorder:
    """A submit function that records what it was given (and can turn the first ones away)."""

    def __init__(self, refuse_first: int = 0, error=QueueFullError):
        self.refs, self.refuse_first, self.error, self.calls = [], refuse_first, error, 0
        self.lock = threading.Lock()

    def __call__(self, ref) -> str:
        with self.lock:
            self.calls += 1
            if self.calls <= self.refuse_first:
                raise self.error("not now")
            self.refs.append(ref)
            return f"job-{len(self.refs)}"

    def instances(self) -> list[str]:
        with self.lock:
            return [r.instance_uid for r in self.refs]


class Running:
    """A watcher run in a thread (as ``aex watch`` runs it), stopped like Ctrl-C stops it."""

    def __init__(self, watcher: Watcher):
        self.watcher = watcher
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.watcher.run()
        except BaseException as exc:
            self.error = exc

    def stop(self):
        self.watcher.stop.set()
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "the watcher did not stop"
        if self.error is not None:
            raise self.error


def watcher(settings, conn, submit, model="m", **kwargs) -> Watcher:
    return Watcher(settings, "orthanc", WatchState(conn, "orthanc", model), submit, interval=0.2, **kwargs)


def test_a_study_stored_after_the_start_is_submitted_exactly_once(orthanc, pacs_settings, conn, pneumonia_xrays):
    from pacs.store import store_results
    from tests.pacs.test_store import result_objects

    before = pneumonia_xrays(1, start=20)[0]
    stored = orthanc.store(before)  # there (and stable) before the watcher: not its business
    study_path = f"/studies/{stored['ParentStudy']}"
    wait_until(lambda: orthanc.request("GET", study_path)["IsStable"], what="the earlier study stable")
    settings, submit = pacs_settings(), Recorder()
    w = watcher(settings, conn, submit, modalities=frozenset({"DX"}))
    assert w.feed == "orthanc"
    run = Running(w)
    try:
        wait_until(lambda: conn.get("aex:watch:orthanc:m:cursor") is not None, what="the cursor")
        study = pneumonia_xrays(2, start=21, study_uid=generate_uid())
        for data in study:
            orthanc.store(data)
        orthanc.store(pydicom_ct_in(study[0]))  # modality CT: filtered out
        wanted_uids = {uid_of(d, "SOPInstanceUID") for d in study}
        wait_until(lambda: set(submit.instances()) == wanted_uids, what="both X-rays submitted")
        # Results stored back into the study make it stable again: they are not inputs.
        store_results(settings.pacs, "orthanc", result_objects(study[0]))
        later = pneumonia_xrays(1, start=23, study_uid=uid_of(study[0], "StudyInstanceUID"))[0]
        orthanc.store(later)
        wait_until(lambda: uid_of(later, "SOPInstanceUID") in submit.instances(), what="the later X-ray")
        time.sleep(2.5)  # room for any stray StableStudy event
    finally:
        run.stop()
    assert sorted(submit.instances()) == sorted(wanted_uids | {uid_of(later, "SOPInstanceUID")})
    assert uid_of(before, "SOPInstanceUID") not in submit.instances()
    assert conn.get("aex:watch:orthanc:m:lock") is None  # released at the stop


def pydicom_ct_in(xray: bytes) -> bytes:
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.StudyInstanceUID = uid_of(xray, "StudyInstanceUID")
    ds.SeriesInstanceUID = ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_it_resumes_where_it_stopped_and_submits_nothing_twice(orthanc, pacs_settings, conn, pneumonia_xrays):
    settings, first = pacs_settings(), Recorder()
    run = Running(watcher(settings, conn, first))
    wait_until(lambda: conn.get("aex:watch:orthanc:m:cursor") is not None, what="the cursor")
    one = pneumonia_xrays(1, start=30)[0]
    orthanc.store(one)
    wait_until(lambda: first.instances() == [uid_of(one, "SOPInstanceUID")], what="the first study")
    run.stop()
    two = pneumonia_xrays(1, start=31)[0]
    orthanc.store(two)  # while nobody watches
    time.sleep(1.5)
    second = Recorder()
    run = Running(watcher(settings, conn, second))
    try:
        wait_until(lambda: second.instances() == [uid_of(two, "SOPInstanceUID")], what="the study stored meanwhile")
        time.sleep(1.0)
    finally:
        run.stop()
    assert second.instances() == [uid_of(two, "SOPInstanceUID")]
    assert conn.get(f"aex:watch:orthanc:m:instance:{uid_of(one, 'SOPInstanceUID')}") == b"job:job-1"


def test_a_submission_turned_away_is_tried_again_and_a_refused_one_is_not(
    orthanc, pacs_settings, conn, pneumonia_xrays
):
    settings, busy = pacs_settings(), Recorder(refuse_first=2)
    run = Running(watcher(settings, conn, busy, model="busy"))
    try:
        wait_until(lambda: conn.get("aex:watch:orthanc:busy:cursor") is not None, what="the cursor")
        data = pneumonia_xrays(1, start=32)[0]
        orthanc.store(data)
        wait_until(lambda: busy.instances() == [uid_of(data, "SOPInstanceUID")], what="the submission after 429s")
    finally:
        run.stop()
    assert busy.calls == 3
    bad = Recorder(refuse_first=5, error=UndecodableImageError)
    run = Running(watcher(settings, conn, bad, model="bad"))
    try:
        wait_until(lambda: conn.get("aex:watch:orthanc:bad:cursor") is not None, what="the cursor")
        data = pneumonia_xrays(1, start=33)[0]
        orthanc.store(data)
        key = f"aex:watch:orthanc:bad:instance:{uid_of(data, 'SOPInstanceUID')}"
        wait_until(lambda: conn.get(key) == b"failed:undecodable_image", what="the refusal remembered")
        time.sleep(1.5)
    finally:
        run.stop()
    assert bad.calls == 1


def test_the_qido_poll_finds_todays_studies_once(orthanc, pacs_settings, conn, pneumonia_xrays):
    settings, submit = pacs_settings(), Recorder()
    data = pneumonia_xrays(1, start=34)[0]
    orthanc.store(data)
    w = watcher(settings, conn, submit, model="qido", feed="qido")
    assert w.feed == "qido"
    for _ in range(3):
        w.step()
    # Every X-ray stored today by these tests is in the window, once each; CT_small (2004) is not.
    assert uid_of(data, "SOPInstanceUID") in submit.instances()
    assert len(submit.instances()) == len(set(submit.instances()))
    assert conn.get("aex:watch:orthanc:qido:cursor").decode() == time.strftime("%Y-%m-%d")


def test_what_is_wanted():
    image = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "modality": "DX", "manufacturer": "Vendor"}
    assert wanted(image, frozenset()) and wanted(image, frozenset({"DX", "CR"}))
    assert not wanted(image, frozenset({"CR"}))
    assert not wanted({**image, "manufacturer": "aex"}, frozenset())
    assert not wanted({**image, "series_description": "aex x (NOT FOR DIAGNOSTIC USE)"}, frozenset())
    for sop_class in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4"):
        assert not wanted({**image, "sop_class_uid": sop_class}, frozenset())


@pytest.mark.e2e
def test_aex_watch_explains_a_new_study_once_and_stores_the_results_back(
    orthanc, settings_on, start_workers, serve_api, pneumonia_xrays, tmp_path
):
    """The command itself, against a stack of its own whose API and worker know the Orthanc
    (AEX_PACS): a study stored after it started is explained once, by reference (the worker
    fetches the instance by WADO-RS and stores the result objects back by STOW-RS), the results
    come back into the study as their own series, and Ctrl-C stops it cleanly."""

    from aex.embedded_redis import EmbeddedRedis
    from tests.support.tokens import token_for

    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        stack = settings_on(server, 0, pacs={"orthanc": orthanc.endpoint()})
        workers = start_workers(stack, 1)
        try:
            _watch_once(orthanc, stack, serve_api(stack), pneumonia_xrays, tmp_path, token_for(stack))
        finally:
            for w in workers:
                w.stop(timeout=30)
    finally:
        server.stop()


def _watch_once(orthanc, service_stack, live_api, pneumonia_xrays, tmp_path, token):
    import json
    import os
    import signal
    import subprocess
    import sys

    from jobs.queues import connect
    from jobs.settings import Settings
    from pacs.read import search_instances
    from tests.support import REPO_ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
    env.update(
        AEX_PACS=json.dumps({"orthanc": orthanc.endpoint()}),
        AEX_REDIS_URL=service_stack.redis_url,
        AEX_TOKEN=token,
        AEX_LOG_LEVEL="INFO",
    )
    command = [sys.executable, "-m", "aex.cli", "watch", "--pacs", "orthanc", "--url", live_api]
    command += ["--model", "tiny-grey", "--modality", "DX,CR", "--interval", "0.3"]
    log = tmp_path / "watch.log"
    proc = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    conn = connect(service_stack.redis_url)
    key = "aex:watch:orthanc:tiny-grey:{}"
    try:
        wait_until(lambda: conn.get(key.format("cursor")) is not None or proc.poll() is not None, what="the cursor")
        assert proc.poll() is None, log.read_text()
        (data,) = pneumonia_xrays(1, size=(512, 512), start=50)
        orthanc.store(data)
        study, instance = uid_of(data, "StudyInstanceUID"), uid_of(data, "SOPInstanceUID")
        submitted = lambda: (conn.get(key.format(f"instance:{instance}")) or b"").startswith((b"job:", b"failed:"))
        wait_until(submitted, what="the submission")
        job = conn.get(key.format(f"instance:{instance}")).decode()
        assert job.startswith("job:"), job
        settings = Settings(pacs={"orthanc": orthanc.endpoint()})

        def results() -> list[dict]:
            return [row for row in search_instances(settings.pacs, "orthanc", study) if row["instance_uid"] != instance]

        wait_until(lambda: results(), timeout=120, what="the results stored back")
        time.sleep(3.0)  # the study is stable again: its results must not come back as inputs
        assert all(row["manufacturer"] == "aex" and row["study_uid"] == study for row in results())
        assert list(conn.scan_iter(key.format("instance:*"))) == [key.format(f"instance:{instance}").encode()]
        assert conn.hlen(key.format("jobs")) == 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            conn.close()
    assert rc == 0, log.read_text()
    assert "stopped after submitting 1 jobs" in log.read_text()
