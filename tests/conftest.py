"""Fixtures shared by every test: the shared data sets, a real Redis (the one `aex serve` embeds) and its databases, the session's service stack (two real workers on tiny checkpoints) and its API, served in process or by uvicorn. Their builders live in ``tests.support``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from tests.support import require, shared_data_dir
from tests.support.checkpoints import service_models as write_service_models
from tests.support.dicom import bundled_dicom, write_dicom
from tests.support.images import encode_image, write_tiny_medmnist
from tests.support.redisdb import Databases
from tests.support.servers import serve_app
from tests.support.stack import CALLBACK_HOSTS, LONG_STEPS, WorkerProcess, poll_job, stack_settings, start_workers


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require.data_file(
        shared_data_dir(), "shared data (set AEX_SHARED_DATA or place ../shared/data beside the repo)"
    )


@pytest.fixture(scope="session")
def cifar_test_tar(shared_data: Path) -> Path:
    return require.data_file(shared_data / "cifar10-jpeg" / "test.tar", "CIFAR-10's test images")


@pytest.fixture(scope="session")
def pneumonia_npz(shared_data: Path) -> Path:
    return require.data_file(shared_data / "pneumoniamnist" / "pneumoniamnist.npz", "PneumoniaMNIST")


@pytest.fixture(scope="session")
def reference_checkpoints(shared_data: Path) -> Path:
    require.data_file(shared_data / "reference-checkpoints" / "resnet44-robust.pt", "the reference checkpoints")
    return shared_data / "reference-checkpoints"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Data-set caches of tests go to a temporary folder, never the user's ~/.cache.
    monkeypatch.setenv("AEX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aex-cache"))


@pytest.fixture(scope="session")
def service_models(tmp_path_factory) -> Path:
    """The stacks' model folder: tiny-rgb and tiny-grey (``tests.support.checkpoints``)."""
    return write_service_models(tmp_path_factory.mktemp("served-models"))


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
    databases = Databases(redis_server)
    yield databases.open
    databases.close()


@pytest.fixture
def conn(redis_db, request):
    """A client on the test module's own database ``DB`` (a module-level int, never 0) of the
    session's Redis, emptied before and after the test."""
    return redis_db(request.module.DB)


@pytest.fixture(scope="session")
def service_stack(redis_server, service_models, tmp_path_factory):
    """Two real workers on Redis db 0; yields their settings (the API's). The workers also
    allow callbacks to the receivers tests/service/test_callback.py runs on 127.0.0.1 (a
    worker checks the address it connects to against its own AEX_CALLBACK_ALLOWED_HOSTS); the
    settings yielded keep the default, no callbacks, which the API enforces at submission."""
    settings = stack_settings(redis_server, 0, service_models)
    workers = settings.model_copy(update={"callback_allowed_hosts": CALLBACK_HOSTS})
    procs = start_workers(workers, 2, tmp_path_factory.mktemp("worker-logs"))
    try:
        yield settings
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def api_token(service_stack) -> str:
    """The token of the session's admin key in the stack's Redis (``tests.support.tokens``)."""
    from tests.support.tokens import token_for

    return token_for(service_stack)


@pytest.fixture(scope="session")
def api(service_stack, api_token):
    """A TestClient on the API of the session's stack, sending the admin token."""
    from tests.support.tokens import api_client

    with api_client(service_stack) as client:
        yield client


@pytest.fixture(scope="session")
def live_api(service_stack):
    """The API of the session's stack served for real by uvicorn on a free 127.0.0.1 port, for
    clients outside the process (a browser, the ``aex`` client). Yields its base URL."""
    from service.app import create_app

    with serve_app(create_app(service_stack)) as url:
        yield url


@pytest.fixture(scope="module")
def serve_api():
    """serve_api(settings) -> base URL: the API with ``settings`` served for real by uvicorn on
    a free 127.0.0.1 port, with the limits `aex serve` gives it (service.server.server_options:
    AEX_MAX_CONNECTIONS, keep-alive); each is stopped at the end of the test module."""
    from service.app import create_app
    from service.server import server_options

    with contextlib.ExitStack() as running:
        yield lambda settings: running.enter_context(serve_app(create_app(settings), **server_options(settings)))


@pytest.fixture(scope="session")
def settings_for(redis_server, service_models):
    """settings_for(db, **overrides): settings of a stack on Redis database ``db``."""
    return lambda db, **overrides: stack_settings(redis_server, db, service_models, **overrides)


@pytest.fixture(scope="session")
def settings_on(service_models):
    """settings_on(server, db, **overrides): settings of a test stack on a Redis server of the
    test's own (an ``aex.embedded_redis.EmbeddedRedis``), database ``db``."""
    return lambda server, db, **overrides: stack_settings(server, db, service_models, **overrides)


@pytest.fixture(name="start_workers")
def _start_workers(tmp_path, request):
    """start_workers(settings, n): n worker processes, registered, stopped after the test."""

    def start(settings, n: int) -> list[WorkerProcess]:
        procs = start_workers(settings, n, tmp_path)
        request.addfinalizer(lambda: [p.stop(timeout=30) for p in procs])
        return procs

    return start


# Fixtures that hand a builder of tests.support to the tests that take it as an argument.
@pytest.fixture(scope="session")
def worker_process():
    return WorkerProcess


@pytest.fixture(scope="session")
def long_steps() -> int:
    return LONG_STEPS


@pytest.fixture(scope="session")
def poll():
    return poll_job


@pytest.fixture(scope="session")
def make_image():
    return encode_image


@pytest.fixture
def tiny_medmnist():
    return write_tiny_medmnist


@pytest.fixture(scope="session")
def dicom_file():
    return write_dicom


@pytest.fixture(scope="session")
def pydicom_file():
    return bundled_dicom
