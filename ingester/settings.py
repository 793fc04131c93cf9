"""The one typed settings object. No other module reads the environment."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .storage.redis_url import check_redis_url

GIB = 1024**3
MIB = 1024**2


class ConfigProblems(ValueError):
    """Settings that are each valid but do not fit together; one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class SEMode(StrEnum):
    """Storage Element modes (contract): what each allows."""

    EDIT = "edit"
    RW = "rw"
    RO = "ro"
    AR = "ar"


class SEAuthMode(StrEnum):
    FORWARD = "forward"
    STATIC = "static"
    CLIENT_CREDENTIALS = "client_credentials"


class CompressedNames(StrEnum):
    """How compressed bytes stay readable on an element that does not keep our metadata."""

    # The stored name says so (`.br`/`.gz`) and the type is the compressed form's.
    SUFFIX = "suffix"
    # No compression toward that element.
    OFF = "off"


class StorageElementConfig(BaseModel):
    """One entry of the static registry (`INGESTER_STORAGE_ELEMENTS`)."""

    id: str = Field(min_length=1)
    api_url: str = Field(min_length=1)
    mode: SEMode
    priority: int = 100
    capacity_bytes: int | None = Field(default=None, ge=0)
    used_bytes: int | None = Field(default=None, ge=0)
    status: Literal["online", "offline", "degraded", "maintenance"] = "online"
    # Capabilities (see the README, "artStore's Storage Element"). None: unknown, then what
    # the element's /api/v1/info says, then the safe answer (no).
    # The element stores the `metadata` and `content_type` fields of an upload.
    keeps_metadata: bool | None = None
    # The element stores a file of zero bytes (artStore's refuses it with a 500).
    accepts_empty_files: bool | None = None
    # The element's downloads carry any file name (artStore's fail, 500, on a name outside
    # Latin-1: such names are then sent percent-encoded, see `capabilities.stored_name`).
    serves_any_name: bool | None = None
    # For an element that does not keep metadata: how a compressed upload is stored there
    # (None: INGESTER_COMPRESSED_NAMES).
    compressed_names: CompressedNames | None = None

    @field_validator("api_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("api_url must start with http:// or https://")
        return value.rstrip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INGESTER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    host: str = "0.0.0.0"
    port: int = Field(default=8020, ge=0, le=65535)
    # A second listener for /metrics and readiness detail (unset: both on the public port).
    # When set, the public port's readiness answers only {"status"} and its /metrics is 404.
    internal_port: int | None = Field(default=None, ge=0, le=65535)
    # Where the internal listener binds; unset means INGESTER_HOST.
    internal_host: str | None = None

    # --- authentication of callers
    auth_public_key_path: Path | None = None
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_leeway_s: float = Field(default=30.0, ge=0)
    # How often the PEM file's mtime is checked; a changed file is reloaded.
    auth_key_reload_interval_s: float = Field(default=2.0, gt=0)
    auth_jwks_cache_s: float = Field(default=300.0, gt=0)
    # Tokens that passed verification, kept until their `exp` (0: check every request).
    auth_token_cache_size: int = Field(default=1024, ge=0)

    # --- Storage Elements
    redis_url: str | None = None
    # Registry sync from Redis: periodic re-read besides pub/sub, and the connect/read
    # timeout of every Redis call (retries are off, so this bounds each attempt).
    redis_registry_refresh_s: float = Field(default=30.0, gt=0)
    # At least 0.5 s: a durable write waits up to 0.2 s for a replica's acknowledgement
    # (`WAIT`, `redis_gateway.REPLICA_ACK_TIMEOUT_S`) besides its round trip; below that
    # every such write would time out and be taken for one that may have run.
    redis_timeout_s: float = Field(default=1.0, ge=0.5)
    storage_elements: Annotated[list[StorageElementConfig], NoDecode] = Field(default_factory=list)
    se_auth: SEAuthMode = SEAuthMode.FORWARD
    se_token: str | None = None
    se_token_url: str | None = None
    se_client_id: str | None = None
    se_client_secret: str | None = None
    se_connect_timeout_s: float = Field(default=5.0, gt=0)
    # No byte accepted by the Storage Element for this long means it is stalled.
    se_stall_timeout_s: float = Field(default=30.0, gt=0)
    # How long to wait for the Storage Element's answer once the body is sent (it fsyncs).
    se_response_timeout_s: float = Field(default=120.0, gt=0)
    se_probe_timeout_s: float = Field(default=2.0, gt=0)
    # Readiness re-probes elements at most this often; probes are cached in between.
    se_probe_interval_s: float = Field(default=5.0, gt=0)

    # Circuit breaker per element: consecutive failures that open it, the first open period
    # (doubling per trip up to the max), and the largest share of elements open at once.
    breaker_failure_threshold: int = Field(default=5, ge=1)
    breaker_open_s: float = Field(default=5.0, gt=0)
    breaker_open_max_s: float = Field(default=120.0, gt=0)
    breaker_max_ejected_share: float = Field(default=0.5, ge=0, le=1)

    # --- retries (safe failures only: nothing was stored; see the README)
    # Rounds over the candidates in all, the first included; between rounds a full-jitter
    # backoff from retry_base_s doubling up to retry_cap_s.
    retry_max_attempts: int = Field(default=4, ge=1)
    retry_base_s: float = Field(default=0.2, ge=0)
    retry_cap_s: float = Field(default=5.0, ge=0)
    # Share of an element's requests that may be retries (plus a floor of 1 per second).
    retry_budget_ratio: float = Field(default=0.2, ge=0)

    # --- saga (records in Redis with INGESTER_REDIS_URL, in the process otherwise)
    # An upload's record is leased to its ingester for this long, renewed every third of it;
    # when a lease runs out (the ingester died) another replica's janitor undoes the upload.
    saga_lease_s: float = Field(default=30.0, gt=0)
    saga_janitor_interval_s: float = Field(default=5.0, gt=0)
    # A compensation that failed is retried with full-jitter backoff up to this.
    compensation_backoff_max_s: float = Field(default=300.0, gt=0)
    compensation_timeout_s: float = Field(default=10.0, gt=0)
    # An element sent a whole body it never answered (the attempt was abandoned after its
    # last byte) may still store the file: a removal there that finds nothing is checked
    # again until this long after, the last check as it runs out.
    saga_recheck_s: float = Field(default=600.0, gt=0)

    # Admin Module file registry: POST {admin_url}/api/v1/files after each stored upload.
    admin_url: str | None = None
    admin_timeout_s: float = Field(default=10.0, gt=0)
    # Attempts in all for a registration that failed safely (connect error, 5xx).
    admin_max_attempts: int = Field(default=3, ge=1)
    # A successful upload's result is replayed to a repeat with the same Idempotency-Key for
    # this long.
    idempotency_ttl_s: float = Field(default=86400.0, gt=0)
    # Who uploaded each file, kept by the ingester itself (Redis `ingester:owner:*`, or in the
    # process): for a temporary file its ttl_days plus this, for a permanent one this alone.
    ownership_grace_s: float = Field(default=86400.0, gt=0)
    # Without Redis: at most this many records in the process (the soonest to expire go first).
    ownership_memory_max: int = Field(default=100_000, ge=1)
    # Compressed uploads toward an element that does not keep metadata (registry
    # `keeps_metadata: false`, the default for elements that do not say): `suffix` stores them
    # as `<name>.br`/`.gz` with the compressed form's type, `off` does not compress for it.
    compressed_names: CompressedNames = CompressedNames.SUFFIX
    spool_dir: Path = Path("/tmp/ingester-spool")
    # Keep a copy of the original bytes, so an upload can fail over mid-stream.
    failover_spool: bool = True
    # An upload's copy stays in memory up to this size (within the memory budget), on disk
    # past it: small uploads touch no disk.
    spool_memory_bytes: int = Field(default=1 * MIB, ge=0)
    # Disk all spools of this process may use together; past it uploads get 503.
    spool_max_bytes: int = Field(default=50 * GIB, gt=0)
    # Spool files kept open for the next upload, all together at most this size: an upload
    # writes over their cached pages instead of new ones (see upload/spool.py, SpoolFiles).
    spool_keep_bytes: int = Field(default=1 * GIB, ge=0)

    # --- limits
    max_file_size: int = Field(default=10 * GIB, gt=0)
    max_uploads_in_flight: int = Field(default=128, ge=1)
    max_uploads_per_user: int = Field(default=16, ge=1)
    # A client that sends nothing for this long gets 408.
    client_idle_timeout_s: float = Field(default=60.0, gt=0)
    # Whole-upload deadline; 0 disables it (large files on slow links).
    upload_deadline_s: float = Field(default=0.0, ge=0)
    retry_after_s: int = Field(default=5, ge=1)
    max_description_length: int = 1000
    max_filename_length: int = Field(default=255, ge=16, le=1024)

    # --- pipeline
    # Chunks each channel between pipeline tasks holds (a chunk is what one body read gave).
    pipeline_queue_depth: int = Field(default=2, ge=1)
    # File data held in the process between clients and elements, all uploads together.
    # With receive_memory_bytes, what bounds the peak under many uploads (README, Benchmarks).
    memory_budget_bytes: int = Field(default=32 * MIB, ge=4 * MIB)
    # Quart body buffer: the ASGI receiver pauses while this much is unread.
    body_buffer_limit: int = Field(default=1 * MIB, ge=64 * 1024)
    # hypercorn's socket read size (its default is 64 KiB). Every read costs the same
    # Python work on its way through hypercorn, Quart and the parser, whatever its size.
    socket_read_size: int = Field(default=1 * MIB, ge=4096)
    # hypercorn's per-request queue of body messages (each up to socket_read_size).
    app_queue_size: int = Field(default=2, ge=1)
    # Request bodies on their way in (socket reads, app queues, body buffers), all
    # connections together; outside memory_budget_bytes. Reads shrink from socket_read_size
    # (down to 64 KiB) as more connections receive at once (ingester/http/receive.py).
    receive_memory_bytes: int = Field(default=48 * MIB, ge=1 * MIB)
    compression_min_size: int = Field(default=4096, ge=0)
    brotli_quality: int = Field(default=4, ge=0, le=11)
    gzip_level: int = Field(default=6, ge=1, le=9)
    # Store uncompressed when the first chunk does not shrink below this ratio.
    compression_min_gain: float = Field(default=0.95, gt=0, le=1)
    progress_retention_s: float = Field(default=300.0, gt=0)

    # --- hostile clients (see the README's "Hostile clients")
    # A request head must arrive whole within this long: from the connection's accept, or
    # from its first byte on a kept-alive connection. Else 408 (or a silent close if nothing
    # came).
    header_timeout_s: float = Field(default=10.0, gt=0)
    # Request heads larger than this, or with more header fields, get 431 however the bytes
    # arrive.
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024 * 1024)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    # Open client connections of the public listener. At the cap the connection that has
    # waited longest for a request head is closed to make room; with none idle, the new one
    # gets 503 SERVICE_BUSY at once.
    max_connections: int = Field(default=1024, ge=16)
    # A request body must bring at least this many bytes in every window of this many
    # seconds the server spends waiting for it (time the server is not reading is not
    # counted); else 408 CLIENT_TOO_SLOW. 0 bytes turns the check off.
    client_min_rate_bytes: int = Field(default=16 * 1024, ge=0)
    client_min_rate_window_s: float = Field(default=60.0, gt=0)

    # --- HTTP surface
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # After SIGTERM, keep listening at least this long (readiness 503, new uploads 503 with
    # Retry-After) so a load balancer takes the replica out before its port closes: a
    # request it sends meanwhile on a kept-alive connection would otherwise meet a closed
    # one. Counted within the grace period. Behind haproxy: its checks' time to mark a
    # server down (`ingester.haproxy_config.DRAIN_DELAY_S`); 0 where a preStop hook waits.
    drain_delay_s: float = Field(default=0.0, ge=0)
    # The interactive API page at /docs (Swagger UI, served from a pinned package, no CDN).
    docs_enabled: bool = False

    # --- resumable uploads (tus 1.0.0 at /api/v1/uploads; see the README)
    # Largest upload (Tus-Max-Size is the smaller of this and max_file_size).
    tus_max_size: int = Field(default=10 * GIB, gt=0)
    # Largest body one PATCH (or creation request) may carry; 0 means no limit but the length.
    tus_max_chunk_size: int = Field(default=0, ge=0)
    # An unfinished upload expires this long after its last stored byte (Upload-Expires).
    tus_expiration_s: float = Field(default=86400.0, gt=0)
    # A stored upload's result stays readable (GET, a retried final PATCH) this long.
    tus_result_retention_s: float = Field(default=86400.0, gt=0)
    # How often the janitor removes expired uploads and orphaned data files.
    tus_janitor_interval_s: float = Field(default=60.0, gt=0)
    # The per-upload lock's time to live (renewed every 0.2 s by its holder): how long a
    # dead replica's lock blocks its upload.
    tus_lock_ttl_s: float = Field(default=6.0, gt=0)
    # How long a request waits for the holder to let go before answering 423.
    tus_lock_wait_s: float = Field(default=10.0, gt=0)
    # How long a retried final PATCH waits for the store in progress before answering 503.
    tus_completion_wait_s: float = Field(default=600.0, gt=0)
    # Pipelined store: while PATCHes keep coming to a replica, it streams the bytes to the
    # element as they arrive; a stream that sees no PATCH for this long is abandoned (the
    # upload is then stored from its data file at completion). 0 turns it off.
    tus_pipeline_window_s: float = Field(default=2.0, ge=0)
    # How far that stream may trail the PATCHes before they wait for it (the most a final
    # PATCH waits for, besides the element's commit); at least 1 MiB is used (the stream
    # reads whole MiBs while PATCHes come), so 0 keeps them as close as that allows.
    tus_pipeline_lag_bytes: int = Field(default=16 * MIB, ge=0)
    # Finished uploads' data files kept (in <spool_dir>/tus/.reuse, shared by replicas) for
    # the next uploads to write over their cached pages, all together at most this size;
    # 0 removes each one (see tus/data.py).
    tus_keep_bytes: int = Field(default=1 * GIB, ge=0)
    # Per user (the token's `sub`): unfinished uploads at once, and the sum of their declared
    # lengths (a deferred length counts as Tus-Max-Size until declared); past either, 429.
    # 0 turns a cap off.
    tus_max_uploads_per_user: int = Field(default=100, ge=0)
    tus_max_bytes_per_user: int = Field(default=50 * GIB, ge=0)

    # --- finalization (temporary -> permanent at /api/v1/finalize; see the README)
    # The source copy is deleted this long after the commit (a safety delay: readers that
    # found the old location finish).
    finalize_source_delete_delay_s: float = Field(default=300.0, ge=0)
    # A transaction is leased to its ingester for this long (renewed every third of it); when
    # the lease runs out (the ingester died) a replica, or the restarted one, takes it over.
    finalize_lease_s: float = Field(default=30.0, gt=0)
    finalize_janitor_interval_s: float = Field(default=5.0, gt=0)
    # Copies running at once in this process (others wait, pending).
    finalize_max_concurrent: int = Field(default=4, ge=1)
    # Rounds over the rw candidates before the move is rolled back.
    finalize_max_attempts: int = Field(default=3, ge=1)
    # Finished transactions stay readable (status, list) this long.
    finalize_retention_s: float = Field(default=604800.0, gt=0)

    @field_validator("storage_elements", mode="before")
    @classmethod
    def _parse_elements(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return []
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc.msg} at position {exc.pos}") from exc
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        check_redis_url(value)
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Rules across settings: every broken one is reported, not only the first."""
        problems: list[str] = []
        if self.auth_public_key_path is not None and self.auth_jwks_url is not None:
            problems.append("set INGESTER_AUTH_PUBLIC_KEY_PATH or INGESTER_AUTH_JWKS_URL, not both")
        if self.se_auth is SEAuthMode.STATIC and not self.se_token:
            problems.append("INGESTER_SE_AUTH=static needs INGESTER_SE_TOKEN")
        if self.se_auth is SEAuthMode.CLIENT_CREDENTIALS and not (
            self.se_token_url and self.se_client_id and self.se_client_secret
        ):
            problems.append(
                "INGESTER_SE_AUTH=client_credentials needs INGESTER_SE_TOKEN_URL, "
                "INGESTER_SE_CLIENT_ID and INGESTER_SE_CLIENT_SECRET"
            )
        if (
            self.internal_port is not None
            and self.internal_port == self.port != 0
            and (self.internal_host or self.host) == self.host
        ):
            problems.append("INGESTER_INTERNAL_PORT must differ from INGESTER_PORT")
        ids = [element.id for element in self.storage_elements]
        if len(ids) != len(set(ids)):
            problems.append("INGESTER_STORAGE_ELEMENTS has duplicate ids")
        if problems:
            raise ConfigProblems(problems)
        return self
