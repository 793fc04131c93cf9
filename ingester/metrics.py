"""Prometheus metrics. One registry per app, so tests and the dev stack never share counters."""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Uploads span 4 KiB documents to 10 GiB archives: seconds from milliseconds to an hour.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600,
)  # fmt: skip
RATIO_BUCKETS: Final = (1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ...
        ProcessCollector(registry=r)
        self.uploads = Counter(
            "ingester_uploads",
            "Uploads by outcome (success, or the error code that ended them).",
            ["outcome"],
            registry=r,
        )
        self.bytes_received = Counter(
            "ingester_upload_received_bytes", "File bytes received from clients.", registry=r
        )
        self.bytes_stored = Counter(
            "ingester_upload_stored_bytes",
            "Bytes stored on Storage Elements (after compression) by successful uploads.",
            registry=r,
        )
        self.duration = Histogram(
            "ingester_upload_duration_seconds",
            "Wall time of uploads, from request to answer.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "ingester_uploads_in_flight", "Uploads being received right now.", registry=r
        )
        self.compression_ratio = Histogram(
            "ingester_compression_ratio",
            "Original size / stored size of compressed uploads.",
            ["algorithm"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        for algorithm in ("gzip", "brotli"):
            self.compression_ratio.labels(algorithm)
        self.compression_skipped = Counter(
            "ingester_compression_skipped",
            "Uploads that asked for compression but were stored as sent, by reason.",
            ["reason"],
            registry=r,
        )
        self.se_errors = Counter(
            "ingester_storage_element_errors",
            "Failed calls to Storage Elements, by element and kind.",
            ["element_id", "kind"],
            registry=r,
        )
        self.spool_bytes = Gauge(
            "ingester_spool_bytes",
            "Disk used by the spool files of uploads in flight.",
            registry=r,
        )
        self.spool_written = Counter(
            "ingester_spool_written_bytes",
            "Bytes written to spool files (uploads whose copy did not fit in memory).",
            registry=r,
        )
        self.spool_limit = Gauge(
            "ingester_spool_limit_bytes", "INGESTER_SPOOL_MAX_BYTES.", registry=r
        )
        self.memory_budget_used = Gauge(
            "ingester_memory_budget_used_bytes",
            "File data held in memory between clients and elements, all uploads together.",
            registry=r,
        )
        self.receive_held = Gauge(
            "ingester_receive_held_bytes",
            "Request bytes received from clients and not yet taken by their uploads, all "
            "connections together (INGESTER_RECEIVE_MEMORY_BYTES bounds it).",
            registry=r,
        )
        self.breaker_state = Gauge(
            "ingester_breaker_state",
            "Circuit breaker per element: 0 closed, 1 half-open, 2 open.",
            ["element_id"],
            registry=r,
        )
        self.failovers = Counter(
            "ingester_failovers",
            "Uploads moved to another Storage Element mid-stream, by the element left.",
            ["element_id"],
            registry=r,
        )
        self.failover_seconds = Histogram(
            "ingester_failover_seconds",
            "Time from an element's failure to the upload being stored on the next element "
            "(replay of what the failed one had, then the rest of the upload).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "ingester_retries",
            "Attempts repeated after a safe failure (nothing acknowledged), by element.",
            ["element_id"],
            registry=r,
        )
        self.compensations = Counter(
            "ingester_compensations",
            "Compensation attempts (removing an abandoned copy), by outcome: done, retry.",
            ["outcome"],
            registry=r,
        )
        self.compensation_backlog = Gauge(
            "ingester_compensation_backlog",
            "Saga records waiting for compensation (all replicas when the store is Redis).",
            registry=r,
        )
        self.saga_takeovers = Counter(
            "ingester_saga_takeovers",
            "Saga records taken over by the janitor after their owner's lease expired.",
            registry=r,
        )
        self.admin_registrations = Counter(
            "ingester_admin_registrations",
            "Registrations in the Admin Module file registry, by outcome: ok, failed.",
            ["outcome"],
            registry=r,
        )
        self.tus_events = Counter(
            "ingester_tus_uploads",
            "Resumable uploads by event: created, interrupted (a PATCH its client abandoned), "
            "terminated, expired. Stored ones count in ingester_uploads_total.",
            ["event"],
            registry=r,
        )
        for event in ("created", "interrupted", "terminated", "expired"):
            self.tus_events.labels(event)
        self.tus_streams = Counter(
            "ingester_tus_streams",
            "Pipelined stores of resumable uploads by outcome: stored, abandoned (no PATCH "
            "within the window, the upload went on through another replica, bytes not kept), "
            "failed (the pipeline's error; the upload is then stored from its data file).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("stored", "abandoned", "failed"):
            self.tus_streams.labels(outcome)
        self.tus_received = Counter(
            "ingester_tus_received_bytes",
            "Bytes received in resumable uploads' PATCH and creation bodies.",
            registry=r,
        )
        self.memory_trims = Counter(
            "ingester_memory_trims",
            "Times freed heap memory was given back to the system, once uploads (multipart "
            "or tus PATCHes) stopped after a busy spell.",
            registry=r,
        )
        self.se_up = Gauge(
            "ingester_storage_element_up",
            "1 when the element's last readiness probe succeeded.",
            ["element_id", "mode"],
            registry=r,
        )
        for outcome in ("done", "retry"):
            self.compensations.labels(outcome)
        for outcome in ("ok", "failed"):
            self.admin_registrations.labels(outcome)
        self.auth_failures = Counter(
            "ingester_auth_failures", "Rejected credentials, by status.", ["status"], registry=r
        )
        self.auth_token_cache_hits = Counter(
            "ingester_auth_token_cache_hits",
            "Requests whose bearer token was answered from the verified-token cache, with no "
            "signature check (INGESTER_AUTH_TOKEN_CACHE_SIZE).",
            registry=r,
        )
        self.auth_token_checks = Counter(
            "ingester_auth_token_checks",
            "Bearer tokens checked in full (signature and claims), whether they passed or not.",
            registry=r,
        )

        # Registry gauges, set at scrape time by the /metrics handler.
        self.registry_age = Gauge(
            "ingester_registry_age_seconds",
            "Seconds since the registry was last confirmed from Redis (0 without Redis, "
            "+Inf while Redis was never read).",
            registry=r,
        )
        self.registry_elements = Gauge(
            "ingester_registry_elements", "Storage Elements in the registry in use.", registry=r
        )
        self.registry_source = Gauge(
            "ingester_registry_source",
            "1 for where the registry in use comes from (redis, redis-stale, static).",
            ["source"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
