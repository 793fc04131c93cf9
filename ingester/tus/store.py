"""Where resumable upload state lives: Redis (shared by replicas) or this process.

Both stores keep the same three things per upload, with the same rules:

- the state (`TusUpload` as JSON), written only by the holder of the upload's lock (each
  write checks the token in the same atomic step: a holder that lost its lock cannot
  overwrite a newer state);
- the lock: a token with a time to live, renewed by its holder while it works;
- the let-go flag: set by a request that wants the upload while someone holds it; the holder
  sees it at its next renewal, saves what it has and lets go. Taking the lock clears it.

Redis layout (one Redis; Lua scripts make each step atomic, like `ingester.saga.store`):
  ingester:tus:<id>          the state (JSON string), expiring a while after the upload does
  ingester:tus:<id>:lock     the holder's token, PX = lock time to live
  ingester:tus:<id>:letgo    present while someone waits for the upload
  ingester:tus:expiring      sorted set id → expires_at (unix seconds), for the janitor
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from typing import Final, Protocol

import redis
import trio
from redis.commands.core import Script

from ..storage.redis_registry import make_client
from .errors import TusStoreUnavailable
from .state import Phase, TusUpload

KEY_PREFIX: Final = "ingester:tus:"
EXPIRING_KEY: Final = "ingester:tus:expiring"
# The state of an unfinished upload outlives its expiry by this much, so the janitor finds
# it (and removes the data file) before Redis drops it; the orphan scan covers the rest.
STATE_GRACE_S: Final = 3600.0


class LockState(Enum):
    HELD = "held"
    # Still held, and another request asked for the upload.
    ASKED = "asked"
    LOST = "lost"


class TusStore(Protocol):
    async def create(self, upload: TusUpload) -> bool:
        """Write a new upload's state; False when the id exists."""
        ...

    async def get(self, upload_id: str) -> TusUpload | None: ...

    async def put(self, upload: TusUpload, token: str) -> bool:
        """Write the state if `token` holds the upload's lock; False otherwise."""
        ...

    async def delete(self, upload_id: str, token: str) -> bool:
        """Remove the state if `token` holds the lock (the lock itself is released apart)."""
        ...

    async def due(self, now: float, limit: int) -> list[str]:
        """Ids whose expiry has passed (unfinished uploads, and finished ones whose result
        was kept long enough)."""
        ...

    async def forget(self, upload_id: str) -> None:
        """Drop an id from the expiry index (its state is gone already)."""
        ...

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool: ...

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        """Renew `token`'s lock; whether someone asked for the upload, or the lock is lost."""
        ...

    async def release(self, upload_id: str, token: str) -> None: ...

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        """Ask the lock's holder to let go (the flag lives `ttl_s`)."""
        ...

    def close(self) -> None: ...


def _state_deadline(upload: TusUpload) -> float:
    """When the state may vanish from the store (unix seconds)."""
    return upload.expires_at + (0.0 if upload.phase is Phase.DONE else STATE_GRACE_S)


class MemoryTusStore:
    """Without Redis: the same rules in this process (state dies with it)."""

    def __init__(self) -> None:
        self._states: dict[str, tuple[str, float]] = {}
        self._expiring: dict[str, float] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._asked: dict[str, float] = {}

    @staticmethod
    def _now() -> float:
        return time.time()

    def _holder(self, upload_id: str) -> str | None:
        entry = self._locks.get(upload_id)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._locks[upload_id]
            return None
        return entry[0]

    def _write(self, upload: TusUpload) -> None:
        self._states[upload.id] = (upload.to_json(), _state_deadline(upload))
        self._expiring[upload.id] = upload.expires_at

    async def create(self, upload: TusUpload) -> bool:
        if await self.get(upload.id) is not None:
            return False
        self._write(upload)
        return True

    async def get(self, upload_id: str) -> TusUpload | None:
        entry = self._states.get(upload_id)
        if entry is None:
            return None
        if entry[1] <= self._now():
            del self._states[upload_id]
            return None
        return TusUpload.from_json(entry[0])

    async def put(self, upload: TusUpload, token: str) -> bool:
        if self._holder(upload.id) != token:
            return False
        self._write(upload)
        return True

    async def delete(self, upload_id: str, token: str) -> bool:
        if self._holder(upload_id) != token:
            return False
        self._states.pop(upload_id, None)
        self._expiring.pop(upload_id, None)
        return True

    async def due(self, now: float, limit: int) -> list[str]:
        ready = sorted((t, u) for u, t in self._expiring.items() if t <= now)
        return [u for _, u in ready[:limit]]

    async def forget(self, upload_id: str) -> None:
        self._expiring.pop(upload_id, None)

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        if self._holder(upload_id) is not None:
            return False
        self._locks[upload_id] = (token, time.monotonic() + ttl_s)
        self._asked.pop(upload_id, None)
        return True

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        if self._holder(upload_id) != token:
            return LockState.LOST
        now = time.monotonic()
        self._locks[upload_id] = (token, now + ttl_s)
        asked = self._asked.get(upload_id)
        if asked is not None and asked > now:
            return LockState.ASKED
        return LockState.HELD

    async def release(self, upload_id: str, token: str) -> None:
        if self._holder(upload_id) == token:
            del self._locks[upload_id]

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        self._asked[upload_id] = time.monotonic() + ttl_s

    def close(self) -> None:
        pass


# KEYS: state, lock, expiring. ARGV: token, json, expires_at, id, state deadline (ms).
_PUT: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# KEYS: state, expiring. ARGV: json, expires_at, id, state deadline (ms).
_CREATE: Final = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: state, lock, expiring. ARGV: token, id.
_DELETE: Final = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: lock, letgo. ARGV: token, ttl (ms).
_LOCK: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS: lock, letgo. ARGV: token, ttl (ms). -1 lost, 0 held, 1 asked to let go.
_KEEP: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('EXISTS', KEYS[2])
"""

# KEYS: lock. ARGV: token.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTusStore:
    """State in Redis. Every call is the sync client in a worker thread, bounded by the
    client's socket timeouts (no retries): a dead Redis costs one timeout, never a hang."""

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._client = make_client(url, timeout_s)
        self._put = self._client.register_script(_PUT)
        self._create = self._client.register_script(_CREATE)
        self._delete = self._client.register_script(_DELETE)
        self._lock = self._client.register_script(_LOCK)
        self._keep = self._client.register_script(_KEEP)
        self._release = self._client.register_script(_RELEASE)

    def close(self) -> None:
        self._client.close()

    async def _call(self, script: Script, keys: list[str], args: list[str]) -> object:
        def call() -> object:
            return script(keys=keys, args=args)

        return await self._run(call)

    async def _run(self, call: Callable[[], object]) -> object:
        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except redis.RedisError as exc:
            raise TusStoreUnavailable(f"Redis: {exc}") from exc

    @staticmethod
    def _keys(upload_id: str) -> tuple[str, str, str]:
        base = KEY_PREFIX + upload_id
        return base, base + ":lock", base + ":letgo"

    async def create(self, upload: TusUpload) -> bool:
        state, _, _ = self._keys(upload.id)
        created = await self._call(
            self._create,
            [state, EXPIRING_KEY],
            [
                upload.to_json(),
                repr(upload.expires_at),
                upload.id,
                str(int(_state_deadline(upload) * 1000)),
            ],
        )
        return created == 1

    async def get(self, upload_id: str) -> TusUpload | None:
        state, _, _ = self._keys(upload_id)
        raw = await self._run(lambda: self._client.get(state))
        if raw is None:
            return None
        assert isinstance(raw, bytes)
        return TusUpload.from_json(raw)

    async def put(self, upload: TusUpload, token: str) -> bool:
        state, lock, _ = self._keys(upload.id)
        written = await self._call(
            self._put,
            [state, lock, EXPIRING_KEY],
            [
                token,
                upload.to_json(),
                repr(upload.expires_at),
                upload.id,
                str(int(_state_deadline(upload) * 1000)),
            ],
        )
        return written == 1

    async def delete(self, upload_id: str, token: str) -> bool:
        state, lock, _ = self._keys(upload_id)
        deleted = await self._call(self._delete, [state, lock, EXPIRING_KEY], [token, upload_id])
        return deleted == 1

    async def due(self, now: float, limit: int) -> list[str]:
        raw = await self._run(
            lambda: self._client.zrangebyscore(EXPIRING_KEY, "-inf", repr(now), start=0, num=limit)
        )
        assert isinstance(raw, list)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]

    async def forget(self, upload_id: str) -> None:
        await self._run(lambda: self._client.zrem(EXPIRING_KEY, upload_id))

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        _, lock, letgo = self._keys(upload_id)
        taken = await self._call(self._lock, [lock, letgo], [token, str(int(ttl_s * 1000))])
        return taken == 1

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        _, lock, letgo = self._keys(upload_id)
        status = await self._call(self._keep, [lock, letgo], [token, str(int(ttl_s * 1000))])
        if status == -1:
            return LockState.LOST
        return LockState.ASKED if status == 1 else LockState.HELD

    async def release(self, upload_id: str, token: str) -> None:
        _, lock, _ = self._keys(upload_id)
        await self._call(self._release, [lock], [token])

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        _, _, letgo = self._keys(upload_id)
        await self._run(lambda: self._client.set(letgo, b"1", px=int(ttl_s * 1000)))
