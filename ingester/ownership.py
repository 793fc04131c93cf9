"""Who uploaded each file, as the ingester saw it: the owner checks do not depend on what a
Storage Element recorded.

artStore's element records the subject of the token it was called with as the uploader, and
with `INGESTER_SE_AUTH=static` (or `client_credentials`) that is the ingester's service
account, not the user; its `GET /api/v1/files/{id}` does not even say who. So the ingester
writes its own record when it acknowledges an upload, beside the saga records (Redis with
`INGESTER_REDIS_URL`, this process otherwise), and finalization's owner check reads it first.

Redis layout:
  ingester:owner:<file_id>   JSON {subject, username, retention_policy, recorded_at}, with a
                             time to live (see `retention_s`)

Retention: a temporary file is on its element for `ttl_days`, after which there is nothing to
finalize; its record lives that long plus `INGESTER_OWNERSHIP_GRACE_S` (the element's clean-up
may run late). A permanent file cannot be finalized again: its record lives the grace alone.
Without Redis the records live in the process, at most `INGESTER_OWNERSHIP_MEMORY_MAX` of them
(the soonest to expire go first), and die with it: finalization then falls back to the Admin
Module's `uploaded_by` and the element's own record, as before.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol, TypeVar

import trio

from .boundary import RedisUnavailable
from .storage.redis_gateway import RedisGateway

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "ingester:owner:"
DAY_S: Final = 86400.0
# An ownership write or read that takes longer than this is a store that is away: the upload
# is acknowledged without it (logged), the owner check falls back.
CALL_TIMEOUT_S: Final = 2.0


# The store could not be reached: the gateway's one error, under the name `Ownership` catches.
OwnershipUnavailable = RedisUnavailable


@dataclass(frozen=True, slots=True)
class Owner:
    subject: str
    username: str
    retention_policy: str
    recorded_at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "subject": self.subject,
                "username": self.username,
                "retention_policy": self.retention_policy,
                "recorded_at": self.recorded_at,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Owner:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("subject"), str):
            raise ValueError("not an ownership record")
        return cls(
            subject=data["subject"],
            username=str(data.get("username") or data["subject"]),
            retention_policy=str(data.get("retention_policy") or ""),
            recorded_at=float(data.get("recorded_at") or 0.0),
        )


def retention_s(retention_policy: str, ttl_days: int | None, grace_s: float) -> float:
    """How long the record of a file is kept (see the module's docstring)."""
    if retention_policy == "temporary" and ttl_days:
        return ttl_days * DAY_S + grace_s
    return grace_s


class OwnershipStore(Protocol):
    async def put(self, file_id: str, owner: Owner, *, ttl_s: float) -> None: ...

    async def get(self, file_id: str) -> Owner | None: ...


class MemoryOwnershipStore:
    """Without Redis: the records in this process, bounded, lost with it."""

    def __init__(self, max_records: int) -> None:
        self._max = max_records
        self._records: dict[str, tuple[float, Owner]] = {}
        # (expires_at, file_id), the soonest first; entries of replaced records are stale.
        self._expiry: list[tuple[float, str]] = []

    def _now(self) -> float:
        return time.time()

    async def put(self, file_id: str, owner: Owner, *, ttl_s: float) -> None:
        expires = self._now() + ttl_s
        self._records[file_id] = (expires, owner)
        heapq.heappush(self._expiry, (expires, file_id))
        self._evict()

    async def get(self, file_id: str) -> Owner | None:
        found = self._records.get(file_id)
        if found is None or found[0] <= self._now():
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._records)

    def _evict(self) -> None:
        now = self._now()
        while self._expiry and (len(self._records) > self._max or self._expiry[0][0] <= now):
            expires, file_id = heapq.heappop(self._expiry)
            current = self._records.get(file_id)
            if current is not None and current[0] == expires:
                del self._records[file_id]
        # Stale heap entries (replaced records) are dropped as they surface; keep the heap
        # from growing without bound when one file's record is rewritten often.
        if len(self._expiry) > 2 * max(len(self._records), 1) + 64:
            self._expiry = [(e, f) for f, (e, _) in self._records.items()]
            heapq.heapify(self._expiry)


class RedisOwnershipStore:
    """`ingester:owner:<file_id>` with a time to live; shared by replicas."""

    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway

    async def put(self, file_id: str, owner: Owner, *, ttl_s: float) -> None:
        def call(client: redis.Redis) -> None:
            client.set(KEY_PREFIX + file_id, owner.to_json(), px=max(int(ttl_s * 1000), 1))

        await self._gateway.call(call)

    async def get(self, file_id: str) -> Owner | None:
        def call(client: redis.Redis) -> bytes | None:
            value = client.get(KEY_PREFIX + file_id)
            assert value is None or isinstance(value, bytes)
            return value

        raw = await self._gateway.call(call)
        if raw is None:
            return None
        try:
            return Owner.from_json(raw)
        except (ValueError, TypeError) as exc:
            log.warning("unreadable ownership record of %s: %s", file_id, exc)
            return None


class Ownership:
    """The ingester's record of who uploaded each file."""

    def __init__(self, store: OwnershipStore, *, grace_s: float) -> None:
        self.store = store
        self._grace_s = grace_s

    async def record(
        self,
        file_id: str,
        *,
        subject: str,
        username: str,
        retention_policy: str,
        ttl_days: int | None,
    ) -> bool:
        """Write the owner of a stored file; False (logged) when the store is away: the
        upload is still acknowledged, and the owner check falls back for this file."""
        owner = Owner(subject, username, retention_policy, time.time())
        ttl_s = retention_s(retention_policy, ttl_days, self._grace_s)
        written = await _bounded(
            self.store.put(file_id, owner, ttl_s=ttl_s),
            file_id,
            doing="record",
            event="ownership_unrecorded",
        )
        return written is not _AWAY

    async def owner_of(self, file_id: str) -> str | None:
        """The subject that uploaded `file_id` through an ingester, or None when unknown (not
        recorded, expired, or the store is away: then logged)."""
        owner = await _bounded(
            self.store.get(file_id), file_id, doing="read", event="ownership_unreadable"
        )
        return owner.subject if isinstance(owner, Owner) else None


T = TypeVar("T")

# What `_bounded` answers when the store is away (None is a store's own answer).
_AWAY: Final = object()


async def _bounded(call: Awaitable[T], file_id: str, *, doing: str, event: str) -> T | object:
    """`call` within CALL_TIMEOUT_S; `_AWAY` (logged) when the store is away or slow."""
    try:
        with trio.fail_after(CALL_TIMEOUT_S):
            return await call
    except (OwnershipUnavailable, trio.TooSlowError) as exc:
        log.warning(
            "could not %s the owner of %s: %s",
            doing,
            file_id,
            exc or "timed out",
            extra={"event": event, "file_id": file_id},
        )
        return _AWAY
