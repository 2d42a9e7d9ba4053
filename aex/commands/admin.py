"""The administration commands: ``aex keys create|list|revoke``, ``aex audit`` and ``aex data-key``.

``aex keys`` and ``aex audit`` go through the service's API with an ``admin`` token (``--token``,
AEX_TOKEN or the token file); ``--redis-url`` talks to the service's Redis instead, for the
first key of a service whose Redis you run yourself (the change is audited all the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aex.commands.common import UrlOpt, friendly_errors, print_json

keys_app = typer.Typer(
    name="keys",
    help="API keys of a service: create (the token is shown once), list, revoke.",
    no_args_is_help=True,
)

TokenOpt = Annotated[
    Optional[str], typer.Option(help="an admin token (default: AEX_TOKEN, else the token file)", show_default=False)
]
RedisOpt = Annotated[
    Optional[str],
    typer.Option("--redis-url", help="talk to the service's Redis directly instead of its API (first key)"),
]
# Who a change made straight in Redis is recorded as in the audit trail.
DIRECT = "redis:aex-cli"


def _client(url: str | None, token: str | None):
    from aex.client import AexClient

    return AexClient(url, token=token)


def _store(redis_url: str):
    from jobs.queues import connect
    from jobs.settings import Settings
    from service.audit import AuditLog
    from service.auth.apikeys import ApiKeyStore

    conn = connect(redis_url)
    return ApiKeyStore(conn), AuditLog.from_settings(conn, Settings(redis_url=redis_url))


@keys_app.command("create")
@friendly_errors
def create_key(
    name: Annotated[str, typer.Argument(help="the key's name (lower-case letters, digits, _ . -)")],
    scopes: Annotated[
        str, typer.Option(help="comma-separated: submit, read, admin (all of them), metrics")
    ] = "submit,read",
    save: Annotated[
        Optional[Path], typer.Option(help="write the token to this file (mode 0600) instead of printing it")
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Create an API key; prints it with its token, which is shown this once."""
    wanted = [s.strip() for s in scopes.split(",") if s.strip()]
    if redis_url:
        store, audit = _store(redis_url)
        key, secret = store.create(name, wanted)
        audit.record(DIRECT, "key.create", 201)
        key = {**key, "token": secret}
    else:
        with _client(url, token) as client:
            key = client.create_key(name, wanted)
    if save is not None:
        from aex.credentials import write_token

        path = write_token(save, key.pop("token"))
        key["token_file"] = str(path)
    else:
        typer.echo("The token is shown this once: keep it where only you can read it.", err=True)
    print_json(key)


@keys_app.command("list")
@friendly_errors
def list_keys(url: UrlOpt = None, token: TokenOpt = None, redis_url: RedisOpt = None) -> None:
    """List the API keys: name, scopes, creation time (never a token)."""
    if redis_url:
        store, audit = _store(redis_url)
        keys = store.list()
        audit.record(DIRECT, "key.list", 200)
    else:
        with _client(url, token) as client:
            keys = client.list_keys()
    print_json(keys)


@keys_app.command("revoke")
@friendly_errors
def revoke_key(
    name: Annotated[str, typer.Argument(help="the key to revoke")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Revoke an API key: its token stops working at once."""
    if redis_url:
        store, audit = _store(redis_url)
        store.revoke(name)
        audit.record(DIRECT, "key.revoke", 200)
    else:
        with _client(url, token) as client:
            client.revoke_key(name)
    print_json({"name": name, "revoked": True})


@friendly_errors
def audit(
    since: Annotated[
        Optional[str], typer.Option(help="15m, 1h, 7d, an ISO 8601 time, or a record id to read on after")
    ] = "24h",
    until: Annotated[Optional[str], typer.Option(help="the same forms as --since (default: now)")] = None,
    limit: Annotated[int, typer.Option(help="most records to print (1 to 10000)")] = 1000,
    url: UrlOpt = None,
    token: TokenOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Print the service's audit trail as JSON lines, oldest first (needs an admin token)."""
    from service.audit import to_json_lines

    if redis_url:
        _, log = _store(redis_url)
        records = log.read(since=since, until=until, limit=limit)
        log.record(DIRECT, "audit.read", 200)
    else:
        with _client(url, token) as client:
            records = client.audit(since=since, until=until, limit=limit)
    typer.echo(to_json_lines(records), nl=False)


@friendly_errors
def data_key() -> None:
    """Print a new AEX_DATA_KEY (base64 of 32 random bytes) for the API and every worker."""
    from jobs.crypto import generate_data_key

    typer.echo(generate_data_key())
