"""`Idempotency-Key` on `POST /api/v1/files/upload`: a retried request gets the first result.

The first request with a key (per user) claims it while it runs; a repeat meanwhile gets
`409 IDEMPOTENCY_IN_PROGRESS`, with `Retry-After` saying when the claim runs out if nobody
renews it (a first request that died holds the key that long at most). Once it succeeded,
the result is kept for `INGESTER_IDEMPOTENCY_TTL_S` (24 h): a repeat whose file is the same
(same sha256 and file name) gets the same `201` body again, with `Idempotent-Replayed:
true`, and nothing is stored twice; a repeat with another file gets `422
IDEMPOTENCY_KEY_REUSED`. A first request that failed releases the key, so the client can
retry with it.

Entries live in Redis (`ingester:idem:<user hash>:<key hash>`) with INGESTER_REDIS_URL, so
replicas share them, and in the process otherwise. A claim is leased like a saga record
(renewed while the upload runs): a killed ingester does not block its keys for a day. When
Redis cannot be reached the upload goes on without the guarantee (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from ..boundary import RedisUnavailable, may_have_run
from ..errors import IdempotencyStoreUnavailable, IngesterError, InvalidField
from ..saga.commit import ResultCommit, ResultUnknown, ResultWrite
from ..storage.redis_gateway import RedisGateway

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "ingester:idem:"
# Printable ASCII, as HTTP header values are; long enough for a UUID or a content hash.
_KEY_RE: Final = re.compile(r"^[\x21-\x7e]{1,255}$")


def parse_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not _KEY_RE.match(value):
        raise InvalidField("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return value


def fingerprint(checksum: str, filename: str) -> str:
    """What makes two requests "the same upload": the file's bytes and its name."""
    return hashlib.sha256(f"{checksum}\0{filename}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    state: str  # "running" or "done"
    owner: str
    fingerprint: str | None = None
    result: dict[str, Any] | None = None
    # Seconds the entry has left in the store, when read back from it (not stored).
    ttl_s: float | None = None

    def retry_after_s(self, default_s: float) -> int:
        """Whole seconds until a claim nobody renews runs out (at least 1)."""
        left = self.ttl_s if self.ttl_s is not None and self.ttl_s > 0 else default_s
        return max(1, math.ceil(left))

    def to_json(self) -> str:
        return json.dumps(
            {
                "state": self.state,
                "owner": self.owner,
                "fingerprint": self.fingerprint,
                "result": self.result,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Entry:
        data = json.loads(raw)
        return cls(data["state"], data["owner"], data.get("fingerprint"), data.get("result"))


# The store could not be reached: the gateway's one error, under the name the guard catches.
StoreUnavailable = RedisUnavailable


class IdempotencyStore(Protocol):
    async def claim(self, key: str, entry: Entry, ttl_s: float) -> Entry | None:
        """Claim `key` for `entry` (running); the existing entry when someone has it."""
        ...

    async def renew(self, key: str, owner: str, ttl_s: float) -> None: ...

    async def get(self, key: str) -> Entry | None: ...

    async def complete(self, key: str, entry: Entry, ttl_s: float) -> None: ...

    async def release(self, key: str, owner: str) -> None:
        """Drop `owner`'s running claim (never a result: a retry must still find it)."""
        ...

    def result_write(self, key: str, entry: Entry, ttl_s: float) -> ResultWrite | None:
        """`complete` as a write for a saga's settle script; None when not in Redis."""
        ...


class MemoryIdempotencyStore:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[Entry, float]] = {}

    def _get(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        left = found[1] - time.monotonic()
        if left <= 0:
            del self._entries[key]
            return None
        return replace(found[0], ttl_s=left)

    async def claim(self, key: str, entry: Entry, ttl_s: float) -> Entry | None:
        existing = self._get(key)
        if existing is not None:
            return existing
        self._entries[key] = (entry, time.monotonic() + ttl_s)
        # A process-local store grows with keys: drop the expired ones now and then.
        if len(self._entries) % 1024 == 0:
            for k in list(self._entries):
                self._get(k)
        return None

    async def get(self, key: str) -> Entry | None:
        return self._get(key)

    async def renew(self, key: str, owner: str, ttl_s: float) -> None:
        existing = self._get(key)
        if existing is not None and existing.owner == owner and existing.state == "running":
            self._entries[key] = (existing, time.monotonic() + ttl_s)

    async def complete(self, key: str, entry: Entry, ttl_s: float) -> None:
        self._entries[key] = (entry, time.monotonic() + ttl_s)

    async def release(self, key: str, owner: str) -> None:
        existing = self._get(key)
        if existing is not None and existing.owner == owner and existing.state == "running":
            del self._entries[key]

    def result_write(self, key: str, entry: Entry, ttl_s: float) -> ResultWrite | None:
        return None


# KEYS: the entry. ARGV: owner, ttl ms. Extends a running claim of `owner` only: never the
# result the saga's settle wrote under the same owner, which the claim's keeper may renew
# once more before it stops (that cut the result's lifetime down to the lease).
_RENEW: Final = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local entry = cjson.decode(raw)
  if entry['owner'] == ARGV[1] and entry['state'] == 'running' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  end
end
return 1
"""

# KEYS: the entry. ARGV: owner. Deletes a running claim of `owner` only: a result written
# with the saga's settle stays, even when the upload's answer was an error (the settle's
# reply was lost with the Redis master, say) and its claim is let go.
_RELEASE: Final = """
local raw = redis.call('GET', KEYS[1])
if raw then
  local entry = cjson.decode(raw)
  if entry['owner'] == ARGV[1] and entry['state'] == 'running' then
    redis.call('DEL', KEYS[1])
  end
end
return 1
"""


class RedisIdempotencyStore:
    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway
        self._renew = gateway.script(_RENEW)
        self._release = gateway.script(_RELEASE)

    async def claim(self, key: str, entry: Entry, ttl_s: float) -> Entry | None:
        name = KEY_PREFIX + key

        def call(client: redis.Redis) -> tuple[bytes, int] | None:
            # Twice: an entry that expires between SET and GET is claimable again.
            for _ in range(2):
                if client.set(name, entry.to_json(), nx=True, px=int(ttl_s * 1000)):
                    return None
                pipe = client.pipeline(transaction=True)
                pipe.get(name)
                pipe.pttl(name)
                existing, left_ms = pipe.execute()
                if existing is not None:
                    assert isinstance(existing, bytes)
                    return existing, int(left_ms)
            raise StoreUnavailable("the key kept expiring under us")

        found = await self._gateway.call(call)
        if found is None:
            return None
        raw, left_ms = found
        return replace(Entry.from_json(raw), ttl_s=left_ms / 1000 if left_ms > 0 else None)

    async def get(self, key: str) -> Entry | None:
        raw = await self._gateway.call(lambda client: client.get(KEY_PREFIX + key))
        return None if raw is None else Entry.from_json(raw)

    async def renew(self, key: str, owner: str, ttl_s: float) -> None:
        await self._gateway.run_script(
            self._renew, [KEY_PREFIX + key], [owner, str(int(ttl_s * 1000))]
        )

    async def complete(self, key: str, entry: Entry, ttl_s: float) -> None:
        await self._gateway.call(
            lambda client: client.set(KEY_PREFIX + key, entry.to_json(), px=int(ttl_s * 1000))
        )

    async def release(self, key: str, owner: str) -> None:
        await self._gateway.run_script(self._release, [KEY_PREFIX + key], [owner])

    def result_write(self, key: str, entry: Entry, ttl_s: float) -> ResultWrite | None:
        return ResultWrite(KEY_PREFIX + key, entry.to_json(), int((time.time() + ttl_s) * 1000))


def scoped_key(user: str, key: str) -> str:
    """Keys are per user; hashed, so Redis never holds a raw key or user name."""
    user_part = hashlib.sha256(user.encode()).hexdigest()[:16]
    return f"{user_part}:{hashlib.sha256(key.encode()).hexdigest()}"


class IdempotencyGuard:
    """The store, its time limits, and what to do when it is away."""

    def __init__(self, store: IdempotencyStore, *, ttl_s: float, lease_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s

    async def claim(self, key: str, owner: str) -> Entry | None:
        """None when `owner` may run the upload; the entry found otherwise.

        A store that is away refuses the upload (`IdempotencyStoreUnavailable`, 503 with
        `Retry-After`) rather than running it unchecked: the key's first attempt may have
        stored the file, its result waiting in that store (a replica killed between the
        settle and its `201`). Run anyway, a Redis failover in progress made a second copy
        (seen in tests/chaos/test_scale_out.py under load). Without a result in the store the
        upload could not be acknowledged anyway: its saga's settle needs the same Redis."""
        try:
            with trio.fail_after(5):
                return await self.store.claim(key, Entry("running", owner), self.lease_s)
        except (StoreUnavailable, trio.TooSlowError) as exc:
            log.warning(
                "idempotency store unreachable (%s); the upload is refused with 503",
                str(exc) or "timeout",
                extra={"event": "idempotency_store_down"},
            )
            if may_have_run(exc):
                # The claim may have landed with its reply lost: left there, it would answer
                # the client's retry `409` until its lease ran out. Only this owner's running
                # claim is removed, so this cannot drop anyone else's.
                await self.release(key, owner)
            raise IdempotencyStoreUnavailable(
                f"the Idempotency-Key's store cannot be reached ({str(exc) or 'timeout'})"
            ) from exc

    async def keep(self, key: str, owner: str) -> None:
        """Renew the claim while the upload runs (run in a nursery, cancelled after)."""
        while True:
            await trio.sleep(self.lease_s / 3)
            await self._quietly(self.store.renew(key, owner, self.lease_s))

    async def complete(self, key: str, owner: str, result: dict[str, Any]) -> None:
        await self._quietly(self.store.complete(key, self.done(owner, result), self.ttl_s))

    @staticmethod
    def done(owner: str, result: dict[str, Any]) -> Entry:
        return Entry(
            "done",
            owner,
            fingerprint(str(result["checksum"]), str(result["original_filename"])),
            result,
        )

    def commit(self, key: str, owner: str, shown: dict[str, Any]) -> IdempotentResult:
        """The result of `owner`'s upload under `key`, recorded with its saga's settle.
        `shown`: fields the answer has beside the stored file's (its `upload_id`)."""
        return IdempotentResult(self, key, owner, shown)

    async def release(self, key: str, owner: str) -> None:
        with trio.CancelScope(shield=True):
            await self._quietly(self.store.release(key, owner))

    async def _quietly(self, call: Any) -> None:
        try:
            with trio.fail_after(5):
                await call
        except (StoreUnavailable, trio.TooSlowError) as exc:
            log.warning(
                "idempotency store unreachable (%s)",
                exc or "timeout",
                extra={"event": "idempotency_store_down"},
            )


class IdempotentResult(ResultCommit):
    """An upload's `201` body kept under its `Idempotency-Key`, written with the saga's
    settle: a replica killed between the two cannot leave a stored file a repeat misses."""

    def __init__(
        self, guard: IdempotencyGuard, key: str, owner: str, shown: dict[str, Any]
    ) -> None:
        super().__init__()
        self._guard = guard
        self._key = key
        self._owner = owner
        self._shown = shown

    def answer(self, result: dict[str, Any]) -> dict[str, Any]:
        return {**result, **self._shown}

    def redis_write(self, result: dict[str, Any]) -> ResultWrite | None:
        entry = self._guard.done(self._owner, self.answer(result))
        return self._guard.store.result_write(self._key, entry, self._guard.ttl_s)

    async def write(self, result: dict[str, Any]) -> None:
        await self._guard.complete(self._key, self._owner, self.answer(result))

    def refusal(self) -> IngesterError:
        # Never used: the write has no guard.
        return IngesterError("the upload's result could not be recorded")

    async def recorded(self, result: dict[str, Any]) -> bool:
        try:
            entry = await self._guard.store.get(self._key)
        except StoreUnavailable as exc:
            raise ResultUnknown(str(exc)) from exc
        return (
            entry is not None
            and entry.state == "done"
            and entry.result is not None
            and entry.result.get("file_id") == result.get("file_id")
        )
