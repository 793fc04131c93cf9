"""The Storage Elements as the upload and finalize paths use them: which one to try next,
what a failure or a success does to its breaker, retry budgets, the attempts in flight a
tripped breaker cancels, and compensation (removing what an abandoned attempt left).

Both the upload pipeline and the finalizer take an `ElementPool`, not the service: the
policy lives here once, and a test builds a pool from a registry, a breaker board and an
element client, with no service around it.

    pool = ElementPool(registry, breakers, client, auth, metrics, ...)
    element = pool.next_element(SEMode.RW, size, tried)
    with pool.attempt(element.id, upload):      # a trip of element.id calls upload.trip()
        stored = await pool.client.upload(...)
    pool.note_success(element.id)               # or pool.note_failure(element.id, error)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Protocol

import trio

from ..auth.principal import Principal
from ..concurrency import cleanup_scope
from ..errors import IngesterError, StorageElementError
from ..metrics import Metrics
from ..resilience.breaker import BreakerBoard
from ..resilience.retry import RetryBudget, RetryPolicy
from ..saga.record import Copy, Removal
from ..settings import SEMode
from .capabilities import Fit
from .client import StorageElementClient
from .registry import Registry
from .se_auth import SETokenProvider
from .selection import Candidate, rank_candidates

log = logging.getLogger(__name__)


class Trippable(Protocol):
    """An attempt in flight on an element: `trip()` ends it (it fails over elsewhere)."""

    def trip(self) -> None: ...


class ElementPool:
    def __init__(
        self,
        registry: Registry,
        breakers: BreakerBoard,
        client: StorageElementClient,
        auth: SETokenProvider,
        metrics: Metrics,
        *,
        retry_policy: RetryPolicy,
        retry_budget_ratio: float,
        compensation_timeout_s: float,
        on_failure: Callable[[], None] = lambda: None,
    ) -> None:
        self.registry = registry
        self.breakers = breakers
        self.client = client
        self.auth = auth
        self.metrics = metrics
        self.retry_policy = retry_policy
        self._retry_budget_ratio = retry_budget_ratio
        self._compensation_timeout_s = compensation_timeout_s
        # Told of every failure that counts (the prober looks again at once).
        self._on_failure = on_failure
        self._retry_budgets: dict[str, RetryBudget] = {}
        # Attempts in flight, by element, so a breaker that trips can cancel them.
        self._in_flight: dict[str, set[Trippable]] = {}

    # --- choosing ----------------------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        return self.registry.candidates()

    def first_choice(self, mode: SEMode, declared: int | None) -> Candidate | None:
        """The element an upload would go to now, without taking a breaker's trial."""
        ranked = rank_candidates(self.candidates(), mode=mode, declared_size=declared)
        allowed = set(self.breakers.allowed([c.id for c in ranked], trio.current_time()))
        return next((c for c in ranked if c.id in allowed), None)

    def next_element(
        self,
        mode: SEMode,
        declared: int | None,
        tried: Collection[str],
        fit: Fit | None = None,
    ) -> Candidate | None:
        """The best candidate not in `tried` that can take the file (`fit`) and whose breaker
        lets a request through (taking the trial of a half-open one)."""
        ranked = rank_candidates(
            self.candidates(), mode=mode, declared_size=declared, exclude=tried
        )
        if fit is not None:
            ranked = [c for c in ranked if fit.takes(c)]
        now = trio.current_time()
        allowed = set(self.breakers.allowed([c.id for c in ranked], now))
        return next(
            (c for c in ranked if c.id in allowed and self.breakers.breaker(c.id).allow(now)),
            None,
        )

    def retry_budget(self, element_id: str) -> RetryBudget:
        budget = self._retry_budgets.get(element_id)
        if budget is None:
            budget = self._retry_budgets[element_id] = RetryBudget(ratio=self._retry_budget_ratio)
        return budget

    # --- outcomes ----------------------------------------------------------------------------

    @contextmanager
    def attempt(self, element_id: str, attempt: Trippable) -> Iterator[None]:
        """`attempt` is in flight on `element_id` for the block: a trip of that element's
        breaker meanwhile calls `attempt.trip()`."""
        in_flight = self._in_flight.setdefault(element_id, set())
        in_flight.add(attempt)
        try:
            yield
        finally:
            in_flight.discard(attempt)

    def in_flight(self, element_id: str) -> int:
        return len(self._in_flight.get(element_id, ()))

    def note_failure(self, element_id: str, error: IngesterError) -> None:
        self.metrics.se_errors.labels(element_id, error.code).inc()
        if not (isinstance(error, StorageElementError) and error.retryable):
            return
        # Traffic failures count against the breaker (threshold, ejection cap); the prober
        # is asked to look now, so a dead element is marked not ready at once.
        self._on_failure()
        known = [element.id for element in self.registry.elements]
        if self.breakers.record_failure(element_id, trio.current_time(), known=known):
            in_flight = self._in_flight.get(element_id, set())
            log.warning(
                "circuit breaker for %s opened; cancelling %d attempts in flight there",
                element_id,
                len(in_flight),
                extra={"event": "breaker_open", "storage_element_id": element_id},
            )
            for attempt in list(in_flight):
                attempt.trip()

    def note_success(self, element_id: str) -> None:
        self.breakers.record_success(element_id, trio.current_time())

    # --- credentials and clean-up ------------------------------------------------------------

    async def authorization(self, principal: Principal | None) -> str | None:
        """What requests to elements carry for `principal` (None: the service's own)."""
        return await self.auth.authorization(principal)

    async def compensate(self, copy: Copy, file_id: str, authorization: str | None) -> bool:
        """Remove what an abandoned upload may have left on `copy`'s element: True when it is
        gone. Shielded and bounded: it runs on the way out of cancelled uploads too."""
        return await self.remove(copy, file_id, authorization) is not None

    async def remove(self, copy: Copy, file_id: str, authorization: str | None) -> Removal | None:
        """`compensate`, saying whether the element held something; None when the removal
        could not be carried out now."""
        timeout_s = self._compensation_timeout_s
        with cleanup_scope(timeout_s):
            try:
                if authorization is None:
                    authorization = await self.auth.authorization(None)
                removal = await self.client.gc_delete(
                    copy.element_id, copy.api_url, file_id, authorization=authorization
                )
            except IngesterError as exc:
                _compensation_failed(copy, file_id, exc.message)
                return None
            log.info(
                "compensated %s on %s (%s)",
                file_id,
                copy.element_id,
                removal.value,
                extra={"event": "compensated", "file_id": file_id},
            )
            return removal
        _compensation_failed(copy, file_id, f"timed out after {timeout_s:g} s")
        return None


def _compensation_failed(copy: Copy, file_id: str, why: str) -> None:
    log.warning(
        "compensation of %s on %s failed: %s",
        file_id,
        copy.element_id,
        why,
        extra={"event": "compensation_failed", "file_id": file_id},
    )
