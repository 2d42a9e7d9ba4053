"""Where a running `aex serve` is: service.json beside the token file, 0600, removed by its own writer only; refused precisely when absent, stale or readable by others."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aex.service_file import (
    client_url,
    remove_service_file,
    running_service,
    service_file,
    write_service_file,
)
from models.errors import BadParameterError


def test_written_0600_beside_the_token_file_and_read_back(tmp_path):
    path = service_file(tmp_path / "config" / "token")
    assert path == tmp_path / "config" / "service.json"
    write_service_file(path, "http://127.0.0.1:8123", "unix:///tmp/aex-redis-sock-x/redis.sock")
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    found = running_service(path)
    assert (found.url, found.redis_url, found.pid) == (
        "http://127.0.0.1:8123",
        "unix:///tmp/aex-redis-sock-x/redis.sock",
        os.getpid(),
    )
    write_service_file(path, "http://127.0.0.1:8123", None)  # a Redis of one's own: not written down
    assert running_service(path).redis_url is None and "redis_url" not in json.loads(path.read_text())
    assert [p.name for p in path.parent.iterdir()] == ["service.json"]  # no temporary file left


def test_removed_only_by_the_process_that_wrote_it(tmp_path):
    path = tmp_path / "service.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": os.getpid() + 1}))
    remove_service_file(path)
    assert path.exists()  # another aex serve's
    write_service_file(path, "http://127.0.0.1:1", None)
    remove_service_file(path)
    assert not path.exists()
    remove_service_file(path)  # nothing to remove: no error


def test_absent_stale_or_readable_by_others_is_refused_saying_what_to_do(tmp_path):
    path = tmp_path / "service.json"
    with pytest.raises(BadParameterError, match="no running `aex serve` found .* give --url"):
        running_service(path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has ended
    path.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": pid}))
    path.chmod(0o600)
    with pytest.raises(BadParameterError, match=f"pid {pid}.* is not running"):
        running_service(path)
    write_service_file(path, "http://127.0.0.1:1", None)
    path.chmod(0o644)
    with pytest.raises(BadParameterError, match="readable by others"):
        running_service(path)
    path.write_text("not json")
    path.chmod(0o600)
    with pytest.raises(BadParameterError, match="is not what `aex serve` writes"):
        running_service(path)


@pytest.mark.parametrize(
    "host, url",
    [
        ("127.0.0.1", "http://127.0.0.1:8000"),
        ("0.0.0.0", "http://127.0.0.1:8000"),
        ("::", "http://[::1]:8000"),
        ("::1", "http://[::1]:8000"),
        ("aex.example", "http://aex.example:8000"),
    ],
)
def test_the_url_a_client_on_this_machine_uses(host, url):
    assert client_url(host, 8000) == url
