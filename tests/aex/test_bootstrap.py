"""What `aex serve` sets up before it serves (aex/bootstrap.py): the data key (generated for the
embedded Redis, kept 0600 in AEX_REDIS_DIR, required with an external Redis) and the first
admin token (written 0600 to the token file, its path printed and never the token, restored
with the same token after the embedded Redis restarted empty)."""

from __future__ import annotations

import pytest

from aex.bootstrap import DATA_KEY_FILE, FirstAdmin, with_data_key
from aex.credentials import read_token
from jobs.crypto import cipher_from_settings
from jobs.settings import Settings
from models.errors import BadParameterError
from service.auth import ApiKeyStore

DB = 2  # no other test uses it


@pytest.fixture(autouse=True)
def _no_aex_environment(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("AEX_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def conn(redis_db):
    return redis_db(DB)


def test_the_data_key_of_the_embedded_redis(tmp_path):
    once, twice = with_data_key(Settings()), with_data_key(Settings())
    assert once.data_key.get_secret_value() != twice.data_key.get_secret_value()  # nothing kept: a new one
    cipher_from_settings(once.data_key)  # a valid key
    assert "AEX_DATA_KEY" in once.as_env()  # the workers get it

    folder = tmp_path / "redis"
    first = with_data_key(Settings(redis_dir=folder))
    path = folder / DATA_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert with_data_key(Settings(redis_dir=folder)).data_key == first.data_key  # the same one next time
    given = with_data_key(Settings(redis_dir=folder, data_key=twice.data_key.get_secret_value()))
    assert given.data_key == twice.data_key  # AEX_DATA_KEY wins

    path.chmod(0o644)
    with pytest.raises(BadParameterError, match="readable by others"):
        with_data_key(Settings(redis_dir=folder))
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(BadParameterError, match="base64 of 32"):
        with_data_key(Settings(redis_dir=folder))


def test_an_external_redis_needs_aex_data_key():
    with pytest.raises(BadParameterError, match="AEX_DATA_KEY is not set") as info:
        with_data_key(Settings(redis_url="redis://redis.example.org:6379/0"))
    assert "aex data-key" in info.value.message


def test_the_first_admin_token_is_written_and_only_its_path_printed(redis_server, conn, tmp_path, capsys):
    settings = Settings(redis_url=f"{redis_server.url}?db={DB}", token_file=tmp_path / "cfg" / "token")
    admin = FirstAdmin(settings)
    admin.ensure()
    token = read_token(tmp_path / "cfg" / "token")  # refuses a file others may read
    assert (tmp_path / "cfg" / "token").stat().st_mode & 0o777 == 0o600
    assert ApiKeyStore(conn).authenticate(token).scopes == frozenset({"submit", "read", "admin", "metrics"})
    printed = capsys.readouterr().err
    assert str(tmp_path / "cfg" / "token") in printed and token not in printed
    assert "Access token" in printed and "Authorization: Bearer" in printed

    # Redis restarted empty (no persistence): the same token works again, the file unchanged.
    conn.flushdb()
    admin.restore()
    assert ApiKeyStore(conn).authenticate(token).id == "admin"
    assert read_token(tmp_path / "cfg" / "token") == token

    # Keys exist already (a persistent Redis): nothing is made or written, and it says so.
    later = FirstAdmin(settings.model_copy(update={"token_file": tmp_path / "other"}))
    later.ensure()
    assert not (tmp_path / "other").exists()
    assert "holds API keys already" in capsys.readouterr().err

    # AEX_AUTH=off: no token at all.
    conn.flushdb()
    FirstAdmin(settings.model_copy(update={"auth": "off", "token_file": tmp_path / "off"})).ensure()
    assert not ApiKeyStore(conn).exists() and not (tmp_path / "off").exists()
