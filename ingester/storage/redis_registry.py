"""The Storage Element registry from Redis (contract: "Registry in Redis").

The Admin Module writes the registry as one JSON string under `artstore:storage_elements` and
announces each change on the `artstore:service_discovery` channel. `RedisRegistrySync` keeps
the in-memory `Registry` in step with it:

  registry sync (service nursery)
    ├── refresher   reads the key at start, on each announcement, and every
    │               `redis_registry_refresh_s` (exponential backoff while Redis is down)
    └── listener    the change feed: `RedisGateway.listen` (a connection and a thread
                    of its own, polling `get_message(timeout=...)`, a PING when quiet);
                    lost, it is made again through Sentinel and the key read again

Every read goes through the process's `RedisGateway` (`ingester.storage.redis_gateway`):
retries off and socket timeouts set, so a dead Redis costs one timeout per attempt, never
the 4-15 s of redis-py's default retry loop. When Redis is down, the key is missing or holds
something invalid, the last known good registry stays in force (or the static
`INGESTER_STORAGE_ELEMENTS` when nothing was ever read), and each state change is logged
once, not every attempt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Literal

import pydantic
import trio

from ..boundary import RedisUnavailable
from ..resilience.retry import RetryPolicy, backoff_s
from ..settings import SEMode, StorageElementConfig
from .redis_gateway import RedisGateway
from .registry import Prober, Registry

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

REGISTRY_KEY: Final = "artstore:storage_elements"
DISCOVERY_CHANNEL: Final = "artstore:service_discovery"
STATUSES: Final = frozenset({"online", "offline", "degraded", "maintenance"})
WRITABLE_MODES: Final = frozenset({SEMode.EDIT, SEMode.RW})

# Reconnect backoff while Redis is unreachable: 0.25, 0.5, 1, 2, 4, 5, 5, ... seconds; not
# jittered (one reader per process), so the ceiling of `resilience.retry.backoff_s`.
RECONNECT_BACKOFF: Final = RetryPolicy(base_s=0.25, cap_s=5.0)

Source = Literal["redis", "static", "redis-stale"]


# --- parsing (pure) --------------------------------------------------------------------------


def _status_of(entry: Mapping[str, Any], mode: SEMode, where: str) -> str:
    """The element's status as selection uses it.

    `status` is authoritative when it says anything but `online`. An `online` element that
    the Admin Module flags `is_available: false` (or, for edit/rw, `is_writable: false`) is
    treated as `offline`: the flags are the more specific, more recent word, and taking an
    element out of selection is the safe side of a disagreement. No `status` means `online`
    unless a flag says otherwise.
    """
    status = entry.get("status", "online")
    if not isinstance(status, str) or status not in STATUSES:
        raise ValueError(
            f"{where}: status must be one of {', '.join(sorted(STATUSES))}, got {status!r}"
        )
    if status != "online":
        return status
    if entry.get("is_available") is False:
        return "offline"
    if mode in WRITABLE_MODES and entry.get("is_writable") is False:
        return "offline"
    return status


def parse_registry(raw: bytes | str) -> list[StorageElementConfig]:
    """The contract's registry document → our element configs; `ValueError` saying what is wrong.

    Any error rejects the whole document: the caller keeps its last known good registry,
    which is safer than serving a registry with elements silently missing.
    """
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"registry is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"registry must be a JSON object, got {type(document).__name__}")
    entries = document.get("storage_elements")
    if not isinstance(entries, list):
        raise ValueError("registry has no storage_elements list")
    elements: list[StorageElementConfig] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"storage_elements[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
        # artStore writes both; `element_id` is the stable one when they differ.
        element_id = entry.get("element_id") or entry.get("id")
        if not isinstance(element_id, str) or not element_id:
            raise ValueError(f"{where}: needs a non-empty element_id or id")
        where = f"{where} ({element_id})"
        if element_id in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(element_id)
        raw_mode = entry.get("mode")
        if raw_mode not in {m.value for m in SEMode}:
            raise ValueError(f"{where}: mode must be edit, rw, ro or ar, got {raw_mode!r}")
        mode = SEMode(raw_mode)
        fields: dict[str, Any] = {
            "id": element_id,
            "api_url": entry.get("api_url"),
            "mode": mode,
            "status": _status_of(entry, mode, where),
        }
        # The capability fields are the ingester's own (the Admin Module writes none): an
        # operator may add them to an entry; absent, the element's /api/v1/info or the safe
        # default decides (see `capabilities`).
        for name in (
            "priority",
            "capacity_bytes",
            "used_bytes",
            "keeps_metadata",
            "accepts_empty_files",
            "serves_any_name",
            "compressed_names",
        ):
            if entry.get(name) is not None:
                fields[name] = entry[name]
        try:
            elements.append(StorageElementConfig.model_validate(fields, strict=False))
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"
                for error in exc.errors()
            )
            raise ValueError(f"{where}: {problems}") from None
    return elements


# --- the sync --------------------------------------------------------------------------------


def reconnect_wait_s(failures: int) -> float:
    """Delay before the next attempt after `failures` consecutive failures (≥ 1)."""
    return backoff_s(max(failures - 1, 0), RECONNECT_BACKOFF, _no_jitter)


def _no_jitter() -> float:
    return 1.0


class RedisRegistrySync:
    """Keeps `registry` equal to the registry in Redis, last known good when Redis is not."""

    def __init__(
        self,
        registry: Registry,
        prober: Prober,
        *,
        gateway: RedisGateway,
        refresh_s: float,
    ) -> None:
        self._registry = registry
        self._prober = prober
        self._refresh_s = refresh_s
        self._gateway = gateway
        # Set by the listener (a message, a fresh subscription) to ask for a read now.
        self._wanted = trio.Event()
        self._read_failures = 0
        self._last_raw: bytes | None = None
        # What the last read found: "ok", "down", "missing", "invalid"; logged on change only.
        self._state = "init"
        self._listener_up = False
        self.connected = False
        self.last_success_at: float | None = None
        self.has_redis_registry = False

    @property
    def source(self) -> Source:
        if not self.has_redis_registry:
            return "static"
        return "redis" if self._state == "ok" and self.connected else "redis-stale"

    def age_s(self, now: float) -> float | None:
        """Seconds since the registry was last confirmed from Redis; None if it never was."""
        return None if self.last_success_at is None else max(now - self.last_success_at, 0.0)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One attempt, whatever it gives: startup must not wait for Redis.
        await self.refresh()
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresher)
            nursery.start_soon(self._listener)

    # --- reading ---------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the key once and apply it; never raises for Redis or content problems."""
        try:
            raw = await self._gateway.call(_get_registry)
        except RedisUnavailable as exc:
            self._read_failures += 1
            self._set_connected(False)
            self._set_state("down", f"Redis unreachable: {exc}")
            return
        self._read_failures = 0
        self._set_connected(True)
        if raw is None:
            self._set_state("missing", f"Redis has no {REGISTRY_KEY}")
            return
        if raw == self._last_raw:
            self.last_success_at = trio.current_time()
            # Unchanged since the last good read: keep the elements and what the prober
            # learnt about them.
            self._set_state("ok", None)
            return
        try:
            elements = parse_registry(raw)
        except ValueError as exc:
            self._set_state("invalid", f"{REGISTRY_KEY} rejected: {exc}")
            return
        self._last_raw = raw
        self.last_success_at = trio.current_time()
        self.has_redis_registry = True
        self._set_state("ok", None)
        self._registry.replace(elements, self.source)
        log.info(
            "storage element registry from Redis: %s",
            ", ".join(f"{e.id} ({e.mode.value}, {e.status})" for e in elements) or "empty",
            extra={"event": "registry_updated", "count": len(elements)},
        )
        # New elements have no health yet: probe now rather than at the next interval.
        self._prober.poke()

    def _set_state(self, state: str, message: str | None) -> None:
        if state != self._state:
            if state == "ok":
                if self._state != "init":
                    log.info("registry in Redis is readable again", extra={"event": "registry"})
            else:
                kept = "last registry from Redis" if self.has_redis_registry else "static registry"
                keeping = "the " + kept
                log.warning(
                    "%s; keeping %s", message, keeping, extra={"event": "registry_" + state}
                )
            self._state = state
        self._registry.source = self.source

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._registry.source = self.source

    async def _refresher(self) -> None:
        while True:
            delay = (
                reconnect_wait_s(self._read_failures) if self._read_failures else self._refresh_s
            )
            with trio.move_on_after(delay):
                await self._wanted.wait()
            self._wanted = trio.Event()
            await self.refresh()

    # --- pub/sub ---------------------------------------------------------------------------

    async def _listener(self) -> None:
        failures = 0
        while True:
            try:
                await self._gateway.listen(
                    DISCOVERY_CHANNEL, subscribed=self._on_subscribed, message=self._want
                )
            except RedisUnavailable as exc:
                if self._listener_up:
                    log.warning(
                        "registry change feed lost: %s",
                        exc,
                        extra={"event": "registry_feed_lost"},
                    )
                    failures = 0
                self._listener_up = False
                failures += 1
                # The feed going down says Redis is down: report it now, not at the next read.
                self._set_connected(False)
                self._want()
            await trio.sleep(reconnect_wait_s(failures))

    def _on_subscribed(self) -> None:
        if not self._listener_up:
            log.info("subscribed to %s", DISCOVERY_CHANNEL, extra={"event": "registry_feed"})
        self._listener_up = True
        self._want()

    def _want(self) -> None:
        # On the trio side, so it sets whichever event the refresher waits on right now.
        self._wanted.set()


def _get_registry(client: redis.Redis) -> bytes | None:
    value = client.get(REGISTRY_KEY)
    assert value is None or isinstance(value, bytes)
    return value
