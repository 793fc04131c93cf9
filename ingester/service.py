"""The service: everything that lives as long as the server, and the nursery it runs in.

service nursery
  ├── key reload     (PEM file changes, JWKS cache)
  ├── registry sync  Redis key + pub/sub → registry (only with INGESTER_REDIS_URL)
  ├── prober         Storage Element readiness and capacity
  └── janitor        expires finished progress records
"""

from __future__ import annotations

import logging
from typing import Final

import httpx
import trio

from .auth.verifier import TokenVerifier, build_verifier
from .errors import IngesterError, StorageElementError
from .metrics import Metrics
from .resilience.breaker import BreakerBoard, BreakerPolicy
from .settings import Settings
from .storage.client import StorageElementClient
from .storage.redis_registry import RedisRegistrySync
from .storage.registry import Prober, Registry, configured_elements
from .storage.se_auth import SETokenProvider, build_se_token_provider
from .storage.selection import Candidate
from .upload.admission import Admission
from .upload.budget import MemoryBudget
from .upload.pipeline import Upload, UploadPipeline
from .upload.progress import ProgressBook
from .upload.spool import SpoolBudget

log = logging.getLogger(__name__)

# A compensation that cannot finish in this time is logged; the saga work makes it durable.
COMPENSATION_TIMEOUT_S: Final = 10.0
JANITOR_INTERVAL_S: Final = 30.0


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.http = httpx.AsyncClient(
            http1=True,
            http2=False,
            limits=httpx.Limits(
                max_connections=settings.max_uploads_in_flight + 32,
                max_keepalive_connections=64,
                keepalive_expiry=30,
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self.verifier: TokenVerifier | None = build_verifier(settings, self.http)
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
        # Element attempts in flight, so a breaker that trips can cancel them (they fail over).
        self.attempts: dict[str, set[Upload]] = {}
        self.prober = Prober(
            self.registry,
            self.se_client,
            interval_s=settings.se_probe_interval_s,
            breakers=self.breakers,
        )
        # Redis replaces the static registry once it has one.
        self.registry_sync: RedisRegistrySync | None = None
        if settings.redis_url:
            self.registry_sync = RedisRegistrySync(
                self.registry,
                self.prober,
                url=settings.redis_url,
                refresh_s=settings.redis_registry_refresh_s,
                timeout_s=settings.redis_timeout_s,
            )
        self.progress = ProgressBook(settings.progress_retention_s)
        self.admission = Admission(
            max_in_flight=settings.max_uploads_in_flight,
            max_per_user=settings.max_uploads_per_user,
            retry_after_s=settings.retry_after_s,
        )
        self.spool_budget = SpoolBudget(settings.spool_max_bytes)
        self.memory_budget = MemoryBudget(settings.memory_budget_bytes)
        self.pipeline = UploadPipeline(self)
        self.started = False
        self._nursery: trio.Nursery | None = None

    @property
    def draining(self) -> bool:
        return self.admission.draining

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
                nursery.start_soon(self._janitor)
                self._nursery = nursery
                self.started = True
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.http.aclose()

    async def _janitor(self) -> None:
        while True:
            await trio.sleep(JANITOR_INTERVAL_S)
            self.progress.expire()

    def note_se_failure(self, element_id: str, error: IngesterError) -> None:
        self.metrics.se_errors.labels(element_id, error.code).inc()
        if not (isinstance(error, StorageElementError) and error.retryable):
            return
        # Traffic failures count against the breaker (threshold, ejection cap); the prober
        # is asked to look now, so a dead element is marked not ready at once.
        self.prober.poke()
        known = [element.id for element in self.registry.elements]
        if self.breakers.record_failure(element_id, trio.current_time(), known=known):
            in_flight = self.attempts.get(element_id, set())
            log.warning(
                "circuit breaker for %s opened; cancelling %d attempts in flight there",
                element_id,
                len(in_flight),
                extra={"event": "breaker_open", "storage_element_id": element_id},
            )
            for upload in list(in_flight):
                upload.trip()

    def note_se_success(self, element_id: str) -> None:
        self.breakers.record_success(element_id, trio.current_time())

    def compensate_soon(self, element: Candidate, file_id: str, authorization: str | None) -> None:
        """Compensate in the service nursery: an upload failing over must not wait on the
        element it is leaving (a frozen one would hold it for the whole timeout)."""
        if self._nursery is None:  # pragma: no cover - uploads start after the service
            raise RuntimeError("the service is not running")
        self._nursery.start_soon(self.compensate, element, file_id, authorization)

    async def compensate(self, element: Candidate, file_id: str, authorization: str | None) -> bool:
        """Remove what an abandoned upload may have left on `element`. Runs shielded."""
        with trio.CancelScope(shield=True), trio.move_on_after(COMPENSATION_TIMEOUT_S) as scope:
            try:
                gone = await self.se_client.gc_delete(
                    element.id, element.api_url, file_id, authorization=authorization
                )
            except StorageElementError as exc:
                log.warning(
                    "compensation of %s on %s failed: %s",
                    file_id,
                    element.id,
                    exc.message,
                    extra={"event": "compensation_failed", "file_id": file_id},
                )
                return False
            log.info(
                "compensated %s on %s",
                file_id,
                element.id,
                extra={"event": "compensated", "file_id": file_id},
            )
            return gone
        if scope.cancelled_caught:
            log.warning(
                "compensation of %s on %s timed out",
                file_id,
                element.id,
                extra={"event": "compensation_failed", "file_id": file_id},
            )
        return False
