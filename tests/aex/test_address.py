"""Which service the CLI and the client talk to (aex/address.py): --url, else AEX_URL, else the running `aex serve`'s service.json, else http://AEX_HOST:AEX_PORT; every command and AexClient() resolve it the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from typer.testing import CliRunner

from aex.address import find_service, service_url
from aex.cli import app
from aex.client import AexClient
from aex.credentials import write_token
from aex.service_file import service_file, write_service_file
from jobs.settings import Settings
from models.errors import BadParameterError

runner = CliRunner()


@pytest.fixture
def config(tmp_path, monkeypatch):
    """An empty config folder as AEX_TOKEN_FILE's, and no AEX_URL, AEX_HOST or AEX_PORT."""
    for name in ("AEX_URL", "AEX_HOST", "AEX_PORT", "AEX_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    token = tmp_path / "config" / "token"
    monkeypatch.setenv("AEX_TOKEN_FILE", str(token))
    return token


def dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_the_order_url_then_aex_url_then_service_file_then_host_and_port(config, monkeypatch):
    assert find_service() == find_service(None, Settings())
    found = find_service()
    assert (found.url, found.source, found.running) == ("http://127.0.0.1:8000", "AEX_HOST/AEX_PORT", None)
    monkeypatch.setenv("AEX_PORT", "9123")
    monkeypatch.setenv("AEX_HOST", "0.0.0.0")  # a server on every address is reached on loopback
    assert service_url() == "http://127.0.0.1:9123"

    where = write_service_file(service_file(config), "http://127.0.0.1:8456", "unix:///tmp/x/redis.sock")
    found = find_service()
    assert (found.url, found.source) == ("http://127.0.0.1:8456", str(where))
    assert found.running.redis_url == "unix:///tmp/x/redis.sock" and found.running.pid == os.getpid()

    monkeypatch.setenv("AEX_URL", "https://aex.example.org")
    found = find_service()
    assert (found.url, found.source, found.running) == ("https://aex.example.org", "AEX_URL", None)
    assert find_service("http://127.0.0.1:1") == find_service("http://127.0.0.1:1", Settings())
    assert find_service("http://127.0.0.1:1").source == "--url"


def test_settings_given_are_read_instead_of_the_environment(config, tmp_path):
    settings = Settings(host="::", port=8777, token_file=tmp_path / "elsewhere" / "token")
    assert service_url(settings=settings) == "http://[::1]:8777"
    write_service_file(service_file(settings.token_file), "http://127.0.0.1:8999", None)
    assert service_url(settings=settings) == "http://127.0.0.1:8999"
    assert service_url(settings=settings.model_copy(update={"url": "http://10.0.0.1:80"})) == "http://10.0.0.1:80"


def test_a_stale_or_open_service_file_and_a_bad_aex_url_are_refused(config, monkeypatch):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path = service_file(config)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"url": "http://127.0.0.1:1", "pid": int(gone.stdout)}))
    path.chmod(0o600)
    with pytest.raises(BadParameterError, match="is not running: start it, or give --url"):
        service_url()
    assert service_url("http://127.0.0.1:2") == "http://127.0.0.1:2"  # --url never reads the file
    write_service_file(path, "http://127.0.0.1:1", None)
    path.chmod(0o644)
    with pytest.raises(BadParameterError, match="readable by others"):
        service_url()
    for bad in ("127.0.0.1:8000", "ftp://aex.example.org", "http://"):
        monkeypatch.setenv("AEX_URL", bad)
        with pytest.raises(BadParameterError, match="AEX_URL takes the service's http:// or https:// address"):
            service_url()


def test_the_client_without_a_url_talks_to_the_service_found(config, monkeypatch):
    seen = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"models": [], "default": None})

    transport = httpx.MockTransport(answer)
    with AexClient(transport=transport, token="aex_" + "x" * 43) as client:
        client.models()
    write_service_file(service_file(config), "http://127.0.0.1:8456", None)
    with AexClient(transport=transport, token="aex_" + "x" * 43) as client:
        client.models()
    monkeypatch.setenv("AEX_URL", "http://[::1]:8080/")
    with AexClient(transport=transport, token="aex_" + "x" * 43) as client:
        assert client.url == "http://[::1]:8080"
        client.models()
    assert seen == [
        "http://127.0.0.1:8000/v1/models",
        "http://127.0.0.1:8456/v1/models",
        "http://[::1]:8080/v1/models",
    ]


@pytest.mark.parametrize(
    "command",
    [
        ["classify", "{png}"],
        ["explain", "{png}", "--out", "{out}"],
        ["keys", "list"],
        ["keys", "create", "someone"],
        ["keys", "revoke", "someone"],
        ["audit"],
    ],
)
def test_every_command_without_url_goes_where_aex_url_says(command, config, monkeypatch, tmp_path):
    dead = dead_url()
    monkeypatch.setenv("AEX_URL", dead)
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    args = [a.format(png=png, out=tmp_path / "out") for a in command]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"error [service_unavailable]: cannot reach the service at {dead}" in res.stderr


def test_explain_refuses_a_checkpoint_and_a_url_together(config, tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    both = ["--url", "http://127.0.0.1:1", "--checkpoint", str(tmp_path / "c.safetensors")]
    res = runner.invoke(app, ["explain", str(png), "--out", str(tmp_path / "o"), *both])
    assert res.exit_code == 2
    assert "give one of --checkpoint (run offline) and --url (use the service), not both" in res.stderr
    res = runner.invoke(app, ["explain", str(png), "--out", str(tmp_path / "o"), "--clamp"])
    assert res.exit_code == 2 and "offline-only options given without --checkpoint: --clamp" in res.stderr


@pytest.mark.e2e
def test_the_commands_find_the_running_service_by_its_file_or_its_port(
    live_api, api_token, config, monkeypatch, tmp_path
):
    """The session's API on a free port: found through service.json (as `aex serve` writes it)
    and through AEX_PORT, with neither --url nor AEX_URL."""
    from PIL import Image

    write_token(config, api_token)
    png = tmp_path / "grey.png"
    Image.new("L", (28, 28), 90).save(png)
    port = int(live_api.rsplit(":", 1)[1])
    write_service_file(service_file(config), live_api, None)
    res = runner.invoke(app, ["classify", str(png), "--model", "tiny-grey", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["predicted"]["class_name"] in ("normal", "pneumonia")
    service_file(config).unlink()
    monkeypatch.setenv("AEX_PORT", str(port))
    res = runner.invoke(app, ["keys", "list"])
    assert res.exit_code == 0, res.output
    assert "tests-admin" in res.stdout
