"""The service: wiring. It builds every part from the settings, hands each only what it
uses, and runs the long-lived ones in its nursery:

service nursery
  ├── key reload     (PEM file changes, JWKS cache)
  ├── registry sync  Redis key + pub/sub → registry (only with INGESTER_REDIS_URL)
  ├── prober         Storage Element readiness and capacity
  ├── saga book      leases of this process's upload records, the janitor that undoes uploads
  │                  of dead ingesters, compensations retried until done (ingester.saga.book)
  ├── tus            resumable uploads: their completions, and the janitor that removes
  │                  expired ones (ingester.tus.service)
  ├── finalizer      temporary -> permanent moves, their leases, and the janitor that
  │                  continues or rolls back a dead ingester's (ingester.finalize)
  ├── progress       forgets finished progress records (ingester.upload.progress)
  └── memory trim    gives freed heap back once uploads and tus PATCHes stop after a busy
                     spell (ingester.allocator)
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Final

import trio

from .allocator import trim_when_idle
from .auth.verifier import TokenHooks, TokenVerifier, build_verifier
from .concurrency import cleanup_scope
from .finalize.finalizer import Finalizer
from .finalize.store import FinalizeStore, MemoryFinalizeStore, RedisFinalizeStore
from .metrics import Metrics
from .ownership import MemoryOwnershipStore, Ownership, OwnershipStore, RedisOwnershipStore
from .resilience.breaker import BreakerBoard, BreakerPolicy
from .resilience.retry import RetryPolicy
from .saga.book import SagaBook
from .saga.store import MemorySagaStore, RedisSagaStore, SagaStore
from .settings import Settings
from .storage.admin import AdminRegistry
from .storage.client import StorageElementClient
from .storage.http_client import build_http_client
from .storage.pool import ElementPool
from .storage.redis_gateway import RedisGateway
from .storage.redis_registry import RedisRegistrySync
from .storage.registry import Prober, Registry, configured_elements
from .storage.se_auth import SETokenProvider, build_se_token_provider
from .tus.service import TusService
from .tus.store import MemoryTusStore, RedisTusStore, TusStore
from .upload.admission import Admission
from .upload.budget import MemoryBudget
from .upload.idempotency import (
    IdempotencyGuard,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
)
from .upload.ingest import Ingest
from .upload.pipeline import UploadPipeline
from .upload.progress import ProgressBook
from .upload.spool import Spool, SpoolBudget, SpoolFiles

# How often a drain looks whether resumable uploads' PATCHes are over.
IDLE_POLL_S: Final = 0.1

log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.http = build_http_client(max_connections=settings.max_uploads_in_flight + 32)
        self.verifier: TokenVerifier | None = build_verifier(
            settings,
            self.http,
            TokenHooks(
                cache_hit=self.metrics.auth_token_cache_hits.inc,
                full_check=self.metrics.auth_token_checks.inc,
            ),
        )
        self.se_auth: SETokenProvider = build_se_token_provider(settings, self.http)
        self.se_client = StorageElementClient(
            self.http,
            stall_timeout_s=settings.se_stall_timeout_s,
            response_timeout_s=settings.se_response_timeout_s,
            connect_timeout_s=settings.se_connect_timeout_s,
            probe_timeout_s=settings.se_probe_timeout_s,
        )
        self.registry = Registry(configured_elements(settings.storage_elements), source="static")
        self.breakers = BreakerBoard(
            BreakerPolicy(
                failure_threshold=settings.breaker_failure_threshold,
                open_base_s=settings.breaker_open_s,
                open_max_s=max(settings.breaker_open_max_s, settings.breaker_open_s),
                max_ejected_share=settings.breaker_max_ejected_share,
            )
        )
        self.prober = Prober(
            self.registry,
            self.se_client,
            interval_s=settings.se_probe_interval_s,
            breakers=self.breakers,
        )
        # One way to Redis for the process (one pool, one thread limiter, one replica-ack
        # policy), closed once at exit; every store is chosen here, Redis or this process.
        self.redis: RedisGateway | None = None
        self.registry_sync: RedisRegistrySync | None = None
        self.saga_store: SagaStore = MemorySagaStore()
        idempotency_store: IdempotencyStore = MemoryIdempotencyStore()
        ownership_store: OwnershipStore = MemoryOwnershipStore(settings.ownership_memory_max)
        self.tus_store: TusStore = MemoryTusStore()
        self.finalize_store: FinalizeStore = MemoryFinalizeStore()
        if settings.redis_url:
            redis = self.redis = RedisGateway(
                settings.redis_url, timeout_s=settings.redis_timeout_s
            )
            # Redis replaces the static registry once it has one.
            self.registry_sync = RedisRegistrySync(
                self.registry,
                self.prober,
                gateway=redis,
                refresh_s=settings.redis_registry_refresh_s,
            )
            self.saga_store = RedisSagaStore(redis)
            idempotency_store = RedisIdempotencyStore(redis)
            ownership_store = RedisOwnershipStore(redis)
            self.tus_store = RedisTusStore(redis)
            self.finalize_store = RedisFinalizeStore(redis)
        # Which element next, breakers, retry budgets, attempts in flight, compensation:
        # shared by uploads and finalization.
        self.pool = ElementPool(
            self.registry,
            self.breakers,
            self.se_client,
            self.se_auth,
            self.metrics,
            retry_policy=RetryPolicy(
                base_s=settings.retry_base_s,
                cap_s=max(settings.retry_cap_s, settings.retry_base_s),
                max_attempts=settings.retry_max_attempts,
            ),
            retry_budget_ratio=settings.retry_budget_ratio,
            compensation_timeout_s=settings.compensation_timeout_s,
            on_failure=self.prober.poke,
        )
        self.sagas = SagaBook(
            self.saga_store,
            self.pool.remove,
            self.metrics,
            lease_s=settings.saga_lease_s,
            janitor_interval_s=settings.saga_janitor_interval_s,
            backoff=RetryPolicy(
                base_s=1.0, cap_s=settings.compensation_backoff_max_s, max_attempts=1
            ),
            compensation_timeout_s=settings.compensation_timeout_s,
            recheck_s=settings.saga_recheck_s,
            stores_late=self.registry.stores_after_hangup,
        )
        self.idempotency = IdempotencyGuard(
            idempotency_store,
            ttl_s=settings.idempotency_ttl_s,
            lease_s=settings.saga_lease_s,
        )
        # Who uploaded each file, beside the saga records (see `ingester.ownership`).
        self.ownership = Ownership(ownership_store, grace_s=settings.ownership_grace_s)
        self.admin: AdminRegistry | None = None
        if settings.admin_url:
            self.admin = AdminRegistry(
                self.http,
                settings.admin_url,
                timeout_s=settings.admin_timeout_s,
                policy=RetryPolicy(
                    base_s=settings.retry_base_s,
                    cap_s=max(settings.retry_cap_s, settings.retry_base_s),
                    max_attempts=settings.admin_max_attempts,
                ),
            )
        self.progress = ProgressBook(settings.progress_retention_s)
        self.admission = Admission(
            max_in_flight=settings.max_uploads_in_flight,
            max_per_user=settings.max_uploads_per_user,
            retry_after_s=settings.retry_after_s,
        )
        self.spool_budget = SpoolBudget(settings.spool_max_bytes)
        self.spool_files = SpoolFiles(settings.spool_dir, keep_bytes=settings.spool_keep_bytes)
        # In-memory spools take from this budget too (see upload/spool.py).
        self.memory_budget = MemoryBudget(settings.memory_budget_bytes)
        self.pipeline = UploadPipeline(
            settings,
            pool=self.pool,
            sagas=self.sagas,
            metrics=self.metrics,
            spool_for=self._new_spool,
            admin=self.admin,
            clock=self.progress.now,
        )
        self.ingest = Ingest(
            settings,
            pipeline=self.pipeline,
            admission=self.admission,
            progress=self.progress,
            ownership=self.ownership,
            metrics=self.metrics,
            memory=self.memory_budget,
        )
        # Resumable uploads (tus): state store, locks, data files; completes through `ingest`.
        self.tus = TusService(
            settings,
            store=self.tus_store,
            ingest=self.ingest,
            metrics=self.metrics,
            spool_budget=self.spool_budget,
            memory=self.memory_budget,
            draining=lambda: self.draining,
        )
        # Finalization (temporary -> permanent), run in the service nursery.
        self.finalizer = Finalizer(
            settings,
            store=self.finalize_store,
            pool=self.pool,
            ownership=self.ownership,
            metrics=self.metrics.registry,
            draining=lambda: self.draining,
            admin=self.admin,
        )
        self.started = False
        self._nursery: trio.Nursery | None = None

    def _new_spool(self, upload_id: str) -> Spool:
        """An upload's failover and re-plan copy: in memory while small, then on disk."""
        return Spool(
            self.settings.spool_dir,
            upload_id,
            disk=self.spool_budget,
            memory=self.memory_budget,
            memory_limit=self.settings.spool_memory_bytes,
            files=self.spool_files,
        )

    @property
    def draining(self) -> bool:
        return self.admission.draining

    async def wait_idle(self) -> None:
        """Return once no upload is in flight: none admitted, and no resumable upload's
        `PATCH` being received or pipelined store open (those are not admitted until their
        last byte). Polled for the latter: the drain's grace bounds it."""
        while True:
            await self.admission.wait_idle()
            if self.admission.in_flight == 0 and not self.tus.busy():
                return
            await trio.sleep(IDLE_POLL_S)

    def begin_drain(self) -> None:
        if not self.admission.draining:
            log.info("draining: refusing new uploads", extra={"event": "drain"})
        self.admission.draining = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                if self.verifier is not None:
                    await nursery.start(self.verifier.run)
                # Before the prober, so the first probes cover the elements Redis names.
                if self.registry_sync is not None:
                    await nursery.start(self.registry_sync.run)
                await nursery.start(self.prober.run)
                await nursery.start(self.sagas.run)
                await nursery.start(self.tus.run)
                await nursery.start(self.finalizer.run)
                nursery.start_soon(self.progress.run)
                nursery.start_soon(
                    partial(
                        trim_when_idle,
                        lambda: self.admission.in_flight > 0 or self.tus.busy(),
                        lambda: self.admission.admitted + self.tus.bodies,
                        trimmed=self.metrics.memory_trims.inc,
                    )
                )
                self._nursery = nursery
                self.started = True
                task_status.started()
        finally:
            pending = [s for s in self.sagas.active.values() if s.record.copies]
            if pending:
                log.warning(
                    "stopping with %d sagas still compensating; %s",
                    len(pending),
                    "another replica's janitor takes them over when their lease runs out"
                    if self.redis is not None
                    else "without Redis they are lost: their copies stay",
                    extra={"event": "saga_pending_at_exit"},
                )
            # Last: every user of the gateway lived in the nursery above.
            if self.redis is not None:
                self.redis.close()
            self.spool_files.close()
            with cleanup_scope(5):
                await self.http.aclose()
