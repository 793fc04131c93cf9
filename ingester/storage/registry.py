"""The Storage Element registry as this process sees it, and the prober that keeps it honest.

The registry's entries come from configuration (`INGESTER_STORAGE_ELEMENTS`) or from Redis
(`redis_registry.RedisRegistrySync` replaces them as the Admin Module publishes changes).
The prober asks each element's `/health/ready` in the background, then its `/api/v1/info`
(mode, capacity, capabilities), and readiness and selection read its last answers, so no
request waits on a probe. An element whose own mode differs from the registry's is logged once
per change and shown in readiness; one whose own mode refuses writes gets none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ..resilience.breaker import BreakerBoard
from ..settings import SEMode, StorageElementConfig
from .capabilities import reported_flags, resolve, stores_after_hangup
from .client import StorageElementClient
from .selection import Candidate

log = logging.getLogger(__name__)

WRITABLE_MODES: Final = frozenset({SEMode.EDIT, SEMode.RW})


@dataclass(slots=True)
class ElementHealth:
    # None until the first probe: unknown elements stay candidates so a cold start serves.
    ready: bool | None = None
    last_error: str | None = None
    # What the element's own /api/v1/info said last (None: not asked yet, or no answer).
    reported_mode: SEMode | None = None
    reported_status: str | None = None
    reported_capabilities: dict[str, bool] = field(default_factory=dict)
    # Its own capacity, used for choice when the registry has none.
    reported_capacity: int | None = None
    # The (registry, own) modes of the last mismatch logged: each change is logged once.
    logged_mismatch: tuple[SEMode, SEMode] | None = None

    def mode_mismatch(self, registry_mode: SEMode) -> bool:
        return self.reported_mode is not None and self.reported_mode is not registry_mode

    def refuses_writes(self, registry_mode: SEMode) -> bool:
        """The registry has the element take uploads but its own mode does not."""
        return (
            registry_mode in WRITABLE_MODES
            and self.reported_mode is not None
            and self.reported_mode not in WRITABLE_MODES
        )


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

    def stores_after_hangup(self, element_id: str) -> bool:
        """What the element said last (`capabilities.stores_after_hangup`); an element not
        heard from yet, or not in the registry any more, may."""
        health = self.health.get(element_id)
        return stores_after_hangup(health.reported_capabilities if health else {})

    def candidates(self) -> list[Candidate]:
        return [self._candidate(element) for element in self.elements]

    def _candidate(self, element: StorageElementConfig) -> Candidate:
        health = self.health_of(element.id)
        keeps_metadata, accepts_empty, any_name = resolve(element, health.reported_capabilities)
        return Candidate(
            id=element.id,
            api_url=element.api_url,
            mode=element.mode,
            priority=element.priority,
            capacity_bytes=(
                element.capacity_bytes
                if element.capacity_bytes is not None
                else health.reported_capacity
            ),
            used_bytes=element.used_bytes,
            available=element.status == "online"
            and health.ready is not False
            and not health.refuses_writes(element.mode),
            keeps_metadata=keeps_metadata,
            accepts_empty_files=accepts_empty,
            serves_any_name=any_name,
            compressed_names=element.compressed_names,
        )

    def writable_ready(self) -> list[StorageElementConfig]:
        return [
            element
            for element in self.elements
            if element.mode in WRITABLE_MODES
            and element.status == "online"
            and self.health_of(element.id).ready is True
            and not self.health_of(element.id).refuses_writes(element.mode)
        ]

    def report(self, element: StorageElementConfig) -> dict[str, Any]:
        """What readiness shows of an element besides its registry entry and probe."""
        health = self.health_of(element.id)
        candidate = self._candidate(element)
        return {
            "reported_mode": None if health.reported_mode is None else health.reported_mode.value,
            "reported_status": health.reported_status,
            "mode_mismatch": health.mode_mismatch(element.mode),
            "keeps_metadata": candidate.keeps_metadata,
            "accepts_empty_files": candidate.accepts_empty_files,
            "serves_any_name": candidate.serves_any_name,
        }


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
            await self._refresh_info(element, health)
        if ready != health.ready:
            log.info(
                "storage element %s is %s",
                element.id,
                "ready" if ready else "not ready",
                extra={"storage_element_id": element.id, "event": "se_health"},
            )
        health.ready = ready
        health.last_error = None if ready else "health probe failed"

    async def _refresh_info(self, element: StorageElementConfig, health: ElementHealth) -> None:
        try:
            info = await self._client.info(element.id, element.api_url)
        except Exception as exc:  # an element without /info still serves uploads
            log.debug("info of %s failed: %s", element.id, exc)
            return
        capacity = _count(info.get("capacity_bytes"))
        used = _count(info.get("used_bytes"))
        # The registry's capacity wins (see `_candidate`); an element's own (artStore: its
        # configured maximum, 0 when none is) fills the gap.
        health.reported_capacity = capacity or None
        if used is not None:
            element.used_bytes = used
        status = info.get("status")
        health.reported_status = status if isinstance(status, str) else None
        health.reported_capabilities = reported_flags(info)
        mode = info.get("mode")
        health.reported_mode = SEMode(mode) if mode in {m.value for m in SEMode} else None
        note_mode(element, health)


def _count(value: object) -> int | None:
    """A byte count from JSON: a non-negative int (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def note_mode(element: StorageElementConfig, health: ElementHealth) -> None:
    """Log a mismatch between the registry's mode and the element's own once per change, and
    its end once."""
    if health.mode_mismatch(element.mode):
        assert health.reported_mode is not None
        seen = (element.mode, health.reported_mode)
        if health.logged_mismatch != seen:
            health.logged_mismatch = seen
            refuses = health.refuses_writes(element.mode)
            log.warning(
                "storage element %s says its mode is %s, the registry says %s%s",
                element.id,
                health.reported_mode.value,
                element.mode.value,
                "; no uploads go to it" if refuses else "",
                extra={
                    "event": "se_mode_mismatch",
                    "storage_element_id": element.id,
                    "registry_mode": element.mode.value,
                    "reported_mode": health.reported_mode.value,
                },
            )
    elif health.logged_mismatch is not None and health.reported_mode is not None:
        health.logged_mismatch = None
        log.info(
            "storage element %s and the registry agree on its mode again (%s)",
            element.id,
            element.mode.value,
            extra={"event": "se_mode_agrees", "storage_element_id": element.id},
        )


def configured_elements(elements: Iterable[StorageElementConfig]) -> list[StorageElementConfig]:
    # Copies: the prober updates used/capacity in place and settings stay as configured.
    return [element.model_copy() for element in elements]
