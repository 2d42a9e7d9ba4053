"""Which aex service the CLI and the Python client talk to: ``--url`` (``url=``), else ``AEX_URL``, else the ``aex serve`` running as this user (its ``service.json``), else ``http://AEX_HOST:AEX_PORT``.

Every command that talks to a service and ``AexClient`` resolve the address here and nowhere
else, so ``aex serve --port 9000`` followed by ``aex classify cat.png`` in another shell reaches
port 9000: ``aex serve`` writes the URL a client on this machine reaches it by beside its token
file (``aex.service_file``). A ``service.json`` whose ``aex serve`` is gone, that others may
read, or that is not what ``aex serve`` writes is refused saying what to do, never passed over
for a guess. Without one, the address is built from ``AEX_HOST`` and ``AEX_PORT`` (the
``Settings`` defaults, ``http://127.0.0.1:8000``), as ``aex serve`` would listen. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from aex.service_file import RunningService, client_url, running_service, service_file
from jobs.settings import Settings
from models.errors import BadParameterError


@dataclass(frozen=True)
class ServiceAddress:
    """The service's base URL, where it came from (``--url``, ``AEX_URL``, the service file's
    path, ``AEX_HOST/AEX_PORT``), and the ``aex serve`` that wrote the service file when the URL
    is its (its embedded Redis: ``running.redis_url``), else None."""

    url: str
    source: str
    running: RunningService | None = None


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:  # hide_input_in_errors: no value is echoed
        raise BadParameterError(f"the AEX_* settings are invalid: {exc}") from None


def find_service(url: str | None = None, settings: Settings | None = None) -> ServiceAddress:
    """The service to talk to (see the module docstring); ``settings`` default to ``Settings()``
    (the environment). BadParameterError for an AEX_URL that is not an http(s) address, or a
    service file that is stale, readable by others or malformed."""
    if url:
        return ServiceAddress(url, "--url")
    settings = settings or _settings()
    if settings.url:
        return ServiceAddress(settings.url, "AEX_URL")
    path = service_file(Path(settings.token_file) if settings.token_file else None)
    if path.exists():
        found = running_service(path)
        return ServiceAddress(found.url, str(path), found)
    return ServiceAddress(client_url(settings.host, settings.port), "AEX_HOST/AEX_PORT")


def service_url(url: str | None = None, settings: Settings | None = None) -> str:
    """``find_service(url, settings).url``: the base URL to talk to."""
    return find_service(url, settings).url
