"""The PACS endpoints an operator configures (AEX_PACS): their validated form, and their JSON for child processes.

``AEX_PACS`` is a JSON object mapping a name to an endpoint::

    {"orthanc": {"url": "http://pacs:8042/dicom-web", "username": "aex", "password": "...",
                 "dimse": {"ae_title": "ORTHANC", "host": "pacs", "port": 4242},
                 "calling_ae_title": "AEX", "orthanc_rest": "http://pacs:8042"}}

``url`` is the DICOMweb root (QIDO-RS, WADO-RS, STOW-RS under it); credentials are a bearer
``token`` or ``username``/``password`` (basic), never both, never in the URL; ``dimse`` is a
C-STORE peer (for a PACS that speaks DIMSE only, or with ``"store_via": "dimse"``);
``orthanc_rest`` is Orthanc's REST root, whose change feed ``aex watch`` follows (found by
itself beside ``url`` when the PACS is an Orthanc). Requests name an endpoint, never an
address, so nothing a client sends can make aex connect elsewhere. Secrets are ``SecretStr``:
masked in every repr and dump; only ``endpoints_env`` (for a child process's environment)
writes them out. Torch-free; imports nothing of aex but the error catalogue.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

# A PACS name as requests and Redis keys carry it.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# An AE title: 1 to 16 characters of the default character repertoire, no backslash, not all spaces.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _http_root(value: str, what: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// address")
    if parts.username or parts.password:
        raise ValueError(f"{what} may not hold credentials: give token, or username and password")
    if parts.query or parts.fragment:
        raise ValueError(f"{what} may not have a query or a fragment")
    return value.strip().rstrip("/")


def _ae_title(value: str, what: str) -> str:
    if not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{what} must be 1 to 16 printable characters (no backslash), not only spaces")
    return value.strip()


class DimsePeer(BaseModel):
    """A DICOM network peer that accepts C-STORE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae_title(value, "dimse.ae_title")

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9.:_\[\]-]+$", value):
            raise ValueError("dimse.host must be a host name or an IP address")
        return value


class PacsEndpoint(BaseModel):
    """One configured PACS (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    token: SecretStr | None = None
    username: str | None = Field(None, repr=False)
    password: SecretStr | None = None
    dimse: DimsePeer | None = None
    calling_ae_title: str = "AEX"
    orthanc_rest: str | None = None
    # How results are stored back: STOW-RS to url (the default when there is one), or C-STORE
    # to dimse (the default without url).
    store_via: Literal["stow", "dimse"] | None = None
    # Seconds to connect, then to wait for each answer.
    timeout: float = Field(30.0, gt=0.0, le=600.0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_root(value, "url")

    @field_validator("orthanc_rest")
    @classmethod
    def _check_rest(cls, value: str | None) -> str | None:
        return None if value is None else _http_root(value, "orthanc_rest")

    @field_validator("calling_ae_title")
    @classmethod
    def _check_calling(cls, value: str) -> str:
        return _ae_title(value, "calling_ae_title")

    @model_validator(mode="after")
    def _consistent(self) -> PacsEndpoint:
        if self.url is None and self.dimse is None:
            raise ValueError("give url (its DICOMweb root), dimse (a C-STORE peer), or both")
        if self.token is not None and (self.username is not None or self.password is not None):
            raise ValueError("give either token (bearer) or username and password (basic), not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if any(v is not None and not v.get_secret_value() for v in (self.token, self.password)) or self.username == "":
            raise ValueError("token, username and password may not be empty")
        if self.store_via == "stow" and self.url is None:
            raise ValueError('store_via "stow" needs url')
        if self.store_via == "dimse" and self.dimse is None:
            raise ValueError('store_via "dimse" needs dimse')
        return self

    def stores_via(self) -> Literal["stow", "dimse"]:
        """How results are stored to this PACS."""
        return self.store_via or ("stow" if self.url else "dimse")

    def auth_headers(self) -> dict[str, str]:
        """The Authorization header of every HTTP request to this PACS (none without credentials)."""
        import base64

        if self.token is not None:
            return {"Authorization": f"Bearer {self.token.get_secret_value()}"}
        if self.username is not None and self.password is not None:
            pair = f"{self.username}:{self.password.get_secret_value()}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        return {}


def parse_endpoints(value: Any) -> dict[str, PacsEndpoint]:
    """AEX_PACS (JSON text, or a mapping) as validated endpoints. ValueError names the PACS
    and the key at fault, never a value (it may be a secret)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("AEX_PACS must be a JSON object mapping names to endpoints") from None
    if not isinstance(value, dict):
        raise ValueError("AEX_PACS must be a JSON object mapping names to endpoints")
    endpoints: dict[str, PacsEndpoint] = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(
                "AEX_PACS names are 1 to 64 letters, digits, '_', '.' or '-', starting with one of the first two"
            )
        if isinstance(entry, PacsEndpoint):
            endpoints[name] = entry
            continue
        try:
            endpoints[name] = PacsEndpoint.model_validate(entry)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                for err in exc.errors(include_input=False, include_url=False)
            )
            raise ValueError(f"AEX_PACS[{name!r}]: {problems}") from None
    return endpoints


def endpoints_env(endpoints: dict[str, PacsEndpoint]) -> str:
    """AEX_PACS as JSON with its secrets written out: for a child process's environment only."""
    out: dict[str, dict[str, Any]] = {}
    for name, ep in endpoints.items():
        entry = ep.model_dump(exclude_none=True)
        for key in ("token", "password"):
            if isinstance(entry.get(key), SecretStr):
                entry[key] = entry[key].get_secret_value()
        out[name] = entry
    return json.dumps(out, separators=(",", ":"))


# The configured endpoints by name, as the PACS functions take them (``Settings.pacs``).
Endpoints = Mapping[str, PacsEndpoint]
