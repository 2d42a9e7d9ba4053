"""What `aex serve` sets up before it serves (aex/bootstrap.py): the data key (kept 0600 in the
embedded Redis's folder, the per-user state folder by default, a new one each run when
ephemeral, required with an external Redis) and the first admin token (written 0600 to the
token file, its path printed and never the token; after the embedded Redis restarted without
its data a NEW token, never the earlier one, which may have been revoked and answers key_lost)."""

from __future__ import annotations

import pytest

from aex.bootstrap import DATA_KEY_FILE, FirstAdmin, with_data_key
from aex.credentials import read_token
from jobs.crypto import cipher_from_settings
from jobs.settings import Settings
from models.errors import BadParameterError, KeyLostError, UnauthenticatedError
from service.auth import ApiKeyStore

DB = 2  # no other test uses it


@pytest.fixture(autouse=True)
def _no_aex_environment(monkeypatch, tmp_path):
    import os

    for name in [n for n in os.environ if n.startswith("AEX_")]:
        monkeypatch.delenv(name)
    # The default folder is the user's: here a home of the test's own, never the real one.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)


def test_the_folder_of_the_embedded_redis(tmp_path, monkeypatch):
    """Persistent by default, in the per-user state folder; ephemeral only when asked, and
    never together with a folder."""
    assert Settings().embedded_redis_dir() == tmp_path / "home" / ".local" / "state" / "aex" / "redis"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert Settings().embedded_redis_dir() == tmp_path / "state" / "aex" / "redis"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")  # not absolute: ignored, as XDG says
    assert Settings().embedded_redis_dir() == tmp_path / "home" / ".local" / "state" / "aex" / "redis"
    monkeypatch.setenv("AEX_REDIS_DIR", str(tmp_path / "mine"))
    assert Settings().embedded_redis_dir() == tmp_path / "mine"
    monkeypatch.setenv("AEX_REDIS_EPHEMERAL", "true")
    with pytest.raises(BadParameterError, match="set one of them"):
        Settings().embedded_redis_dir()
    monkeypatch.delenv("AEX_REDIS_DIR")
    assert Settings().embedded_redis_dir() is None
    assert not (tmp_path / "home").exists() and not (tmp_path / "mine").exists()  # nothing made by asking


def test_the_data_key_of_the_embedded_redis(tmp_path):
    once, twice = with_data_key(Settings(redis_ephemeral=True)), with_data_key(Settings(redis_ephemeral=True))
    assert once.data_key.get_secret_value() != twice.data_key.get_secret_value()  # nothing kept: a new one
    cipher_from_settings(once.data_key)  # a valid key
    assert "AEX_DATA_KEY" in once.as_env()  # the workers get it
    assert not (tmp_path / "home").exists()

    # By default the key lives in the per-user state folder, beside the Redis data it encrypts.
    default = with_data_key(Settings())
    kept = tmp_path / "home" / ".local" / "state" / "aex" / "redis" / DATA_KEY_FILE
    assert kept.stat().st_mode & 0o777 == 0o600
    assert with_data_key(Settings()).data_key == default.data_key

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

    # Redis restarted keeping its data (persistence): nothing is made, the file unchanged,
    # and a key revoked before stays revoked.
    store = ApiKeyStore(conn)
    _, other = store.create("other", ["admin"])
    store.revoke("admin")
    admin.after_restart()
    with pytest.raises(UnauthenticatedError, match="unknown or revoked") as info:
        store.authenticate(token)
    assert not isinstance(info.value, KeyLostError)
    assert read_token(tmp_path / "cfg" / "token") == token and store.authenticate(other).id == "other"

    # Redis restarted without its data (ephemeral): a NEW admin token, written to the file;
    # the earlier one (revoked) never works again, and says it was lost, as every other key.
    conn.flushdb()
    admin.after_restart()
    new = read_token(tmp_path / "cfg" / "token")
    assert new != token and store.authenticate(new).id == "admin"
    for earlier in (token, other):
        with pytest.raises(KeyLostError, match="ask an admin for a new key"):
            store.authenticate(earlier)
    # A second restart without its data: another new token; the one before is lost in turn.
    conn.flushdb()
    admin.after_restart()
    newer = read_token(tmp_path / "cfg" / "token")
    assert newer not in (token, new) and store.authenticate(newer).id == "admin"
    with pytest.raises(KeyLostError):
        store.authenticate(new)

    # Keys exist already (a persistent Redis): nothing is made or written, and it says so.
    later = FirstAdmin(settings.model_copy(update={"token_file": tmp_path / "other"}))
    later.ensure()
    assert not (tmp_path / "other").exists()
    assert "holds API keys already" in capsys.readouterr().err

    # AEX_AUTH=off: no token at all.
    conn.flushdb()
    FirstAdmin(settings.model_copy(update={"auth": "off", "token_file": tmp_path / "off"})).ensure()
    assert not ApiKeyStore(conn).exists() and not (tmp_path / "off").exists()
