"""The Storage Element registry as this process sees it, and the prober that keeps it honest.

The registry's entries come from configuration (`INGESTER_STORAGE_ELEMENTS`) or from Redis
(`redis_registry.RedisRegistrySync` replaces them as the Admin Module publishes changes).
The prober asks each element's `/health/ready` in the background, and readiness and
selection read its last answer, so no request waits on a probe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from ..resilience.breaker import BreakerBoard
from ..settings import SEMode, StorageElementConfig
from .client import StorageElementClient
from .selection import Candidate

log = logging.getLogger(__name__)

WRITABLE_MODES: Final = frozenset({SEMode.EDIT, SEMode.RW})


@dataclass(slots=True)
class ElementHealth:
    # None until the first probe: unknown elements stay candidates so a cold start serves.
    ready: bool | None = None
    last_error: str | None = None


@dataclass(slots=True)
class Registry:
    elements: list[StorageElementConfig] = field(default_factory=list)
    health: dict[str, ElementHealth] = field(default_factory=dict)
    source: str = "static"

    def replace(self, elements: Sequence[StorageElementConfig], source: str) -> None:
        self.elements = list(elements)
        self.source = source
        known = {element.id for element in elements}
        self.health = {k: v for k, v in self.health.items() if k in known}

    def health_of(self, element_id: str) -> ElementHealth:
        return self.health.setdefault(element_id, ElementHealth())

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(
                id=element.id,
                api_url=element.api_url,
                mode=element.mode,
                priority=element.priority,
                capacity_bytes=element.capacity_bytes,
                used_bytes=element.used_bytes,
                available=element.status == "online"
                and self.health_of(element.id).ready is not False,
            )
            for element in self.elements
        ]

    def writable_ready(self) -> list[StorageElementConfig]:
        return [
            element
            for element in self.elements
            if element.mode in WRITABLE_MODES
            and element.status == "online"
            and self.health_of(element.id).ready is True
        ]


class Prober:
    """Probes every element's readiness on an interval and refreshes capacity from /info."""

    def __init__(
        self,
        registry: Registry,
        client: StorageElementClient,
        *,
        interval_s: float,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self._registry = registry
        self._client = client
        self._interval_s = interval_s
        self._breakers = breakers
        self._wakeup = trio.Event()

    def poke(self) -> None:
        """Probe now (after an upload saw a failure) instead of at the next interval."""
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.probe_all()
        task_status.started()
        while True:
            with trio.move_on_after(self._interval_s):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.probe_all()

    async def probe_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for element in list(self._registry.elements):
                nursery.start_soon(self._probe, element)

    async def _probe(self, element: StorageElementConfig) -> None:
        # A half-open breaker's single trial is this probe when no upload took it first.
        board = self._breakers
        trial = (
            board is not None
            and element.id in board.needs_probe(trio.current_time())
            and board.breaker(element.id).allow(trio.current_time())
        )
        ready = await self._client.probe_ready(element.id, element.api_url)
        if trial and board is not None:
            if ready:
                board.record_success(element.id, trio.current_time())
            else:
                known = [e.id for e in self._registry.elements]
                board.record_failure(element.id, trio.current_time(), known=known)
        health = self._registry.health_of(element.id)
        if ready:
            await self._refresh_capacity(element)
        if ready != health.ready:
            log.info(
                "storage element %s is %s",
                element.id,
                "ready" if ready else "not ready",
                extra={"storage_element_id": element.id, "event": "se_health"},
            )
        health.ready = ready
        health.last_error = None if ready else "health probe failed"

    async def _refresh_capacity(self, element: StorageElementConfig) -> None:
        try:
            info = await self._client.info(element.id, element.api_url)
        except Exception as exc:  # an element without /info still serves uploads
            log.debug("info of %s failed: %s", element.id, exc)
            return
        capacity = info.get("capacity_bytes")
        used = info.get("used_bytes")
        if isinstance(capacity, int) and element.capacity_bytes is None:
            element.capacity_bytes = capacity
        if isinstance(used, int):
            element.used_bytes = used


def configured_elements(elements: Iterable[StorageElementConfig]) -> list[StorageElementConfig]:
    # Copies: the prober updates used/capacity in place and settings stay as configured.
    return [element.model_copy() for element in elements]
