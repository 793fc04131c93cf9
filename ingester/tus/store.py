"""Where resumable upload state lives: Redis (shared by replicas) or this process.

Both stores keep the same three things per upload, with the same rules, and one per user:

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
  ingester:tus:owner:<hash>  hash id → "<declared bytes>:<reserved at, ms>": the user's
                             unfinished uploads, for the per-user caps

The per-user index is kept by the service (reserved at creation, released when an upload is
stored, terminated or expires) and heals itself: an entry whose state is gone (a crash
between steps, a state Redis expired) is dropped at the user's next reservation, once it is
older than `RESERVATION_GRACE_S` (a reservation is written just before its state).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from enum import Enum
from typing import Final, Protocol

import trio

from ..saga.commit import ResultWrite
from ..storage.redis_gateway import RedisGateway
from .state import Phase, TusUpload

KEY_PREFIX: Final = "ingester:tus:"
EXPIRING_KEY: Final = "ingester:tus:expiring"
# The state of an unfinished upload outlives its expiry by this much, so the janitor finds
# it (and removes the data file) before Redis drops it; the orphan scan covers the rest.
STATE_GRACE_S: Final = 3600.0
OWNER_PREFIX: Final = "ingester:tus:owner:"
# A reservation without a state yet is its creation in progress, this long at most.
RESERVATION_GRACE_S: Final = 60.0
# An index nobody reserved in for this long goes (its uploads expired long ago).
OWNER_INDEX_TTL_S: Final = 8 * 86400.0


class QuotaRefusal(Enum):
    """Which per-user cap a reservation would go past."""

    UPLOADS = "uploads"
    BYTES = "bytes"


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

    def result_write(self, upload: TusUpload, token: str) -> ResultWrite | None:
        """`put` as a write for a saga's settle script (guarded by the lock); None when the
        state is not in Redis."""
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

    async def try_lock_and_get(
        self, upload_id: str, token: str, ttl_s: float
    ) -> tuple[bool, TusUpload | None]:
        """`try_lock`, and when the lock is taken, the state as it is then, in one step (a
        `PATCH` reads the state under its lock: one call to the store less)."""
        ...

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        """Renew `token`'s lock; whether someone asked for the upload, or the lock is lost."""
        ...

    async def release(self, upload_id: str, token: str) -> None: ...

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        """Ask the lock's holder to let go (the flag lives `ttl_s`)."""
        ...

    async def reserve(
        self, owner: str, upload_id: str, size: int, *, max_uploads: int, max_bytes: int
    ) -> QuotaRefusal | None:
        """Count `upload_id`, declaring `size` bytes, among `owner`'s unfinished uploads
        (again: its size is replaced), unless that goes past a cap (0: none); then the cap,
        and nothing changed. One atomic step."""
        ...

    async def unreserve(self, owner: str, upload_id: str) -> None: ...


def _state_deadline(upload: TusUpload) -> float:
    """When the state may vanish from the store (unix seconds)."""
    return upload.expires_at + (0.0 if upload.phase is Phase.DONE else STATE_GRACE_S)


class MemoryTusStore:
    """Without Redis: the same rules in this process (state dies with it). Locks run out on
    `clock` (trio's, so a test's `MockClock` moves them); states on wall-clock seconds, as
    their expiry dates are."""

    def __init__(self, clock: Callable[[], float] = trio.current_time) -> None:
        self._clock = clock
        self._states: dict[str, tuple[str, float]] = {}
        self._expiring: dict[str, float] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._asked: dict[str, float] = {}
        # owner -> upload id -> (declared bytes, reserved at)
        self._owners: dict[str, dict[str, tuple[int, float]]] = {}

    @staticmethod
    def _now() -> float:
        return time.time()

    def _holder(self, upload_id: str) -> str | None:
        entry = self._locks.get(upload_id)
        if entry is None:
            return None
        if entry[1] <= self._clock():
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

    def result_write(self, upload: TusUpload, token: str) -> ResultWrite | None:
        return None

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
        self._locks[upload_id] = (token, self._clock() + ttl_s)
        self._asked.pop(upload_id, None)
        return True

    async def try_lock_and_get(
        self, upload_id: str, token: str, ttl_s: float
    ) -> tuple[bool, TusUpload | None]:
        if not await self.try_lock(upload_id, token, ttl_s):
            return False, None
        return True, await self.get(upload_id)

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        if self._holder(upload_id) != token:
            return LockState.LOST
        now = self._clock()
        self._locks[upload_id] = (token, now + ttl_s)
        asked = self._asked.get(upload_id)
        if asked is not None and asked > now:
            return LockState.ASKED
        return LockState.HELD

    async def release(self, upload_id: str, token: str) -> None:
        if self._holder(upload_id) == token:
            del self._locks[upload_id]

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        self._asked[upload_id] = self._clock() + ttl_s

    async def reserve(
        self, owner: str, upload_id: str, size: int, *, max_uploads: int, max_bytes: int
    ) -> QuotaRefusal | None:
        entries = self._owners.setdefault(owner, {})
        now = self._now()
        for other, (_, reserved_at) in list(entries.items()):
            stale = other != upload_id and now - reserved_at >= RESERVATION_GRACE_S
            if stale and not _unfinished(await self.get(other)):
                del entries[other]
        others = [declared for other, (declared, _) in entries.items() if other != upload_id]
        if max_uploads and len(others) + 1 > max_uploads:
            return QuotaRefusal.UPLOADS
        if max_bytes and sum(others) + size > max_bytes:
            return QuotaRefusal.BYTES
        entries[upload_id] = (size, entries.get(upload_id, (0, now))[1])
        return None

    async def unreserve(self, owner: str, upload_id: str) -> None:
        entries = self._owners.get(owner, {})
        entries.pop(upload_id, None)
        if not entries:
            self._owners.pop(owner, None)


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

# KEYS: lock, letgo[, state]. ARGV: token, ttl (ms). {0} not taken; {1} taken, and with
# the state's key {1, state (nil: none)}: the state as the lock was taken.
_LOCK: Final = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
redis.call('DEL', KEYS[2])
if KEYS[3] then return {1, redis.call('GET', KEYS[3])} end
return {1}
"""

# KEYS: lock, letgo. ARGV: token, ttl (ms). -1 lost, 0 held, 1 asked to let go.
_KEEP: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('EXISTS', KEYS[2])
"""

# KEYS: the owner's index. ARGV: id, size, max uploads, max bytes (0: no cap), state key
# prefix, grace (ms), index time to live (ms). 0 reserved, 1 too many uploads, 2 too many
# bytes. Entries of other ids whose state is gone or `done` (and older than the grace) are
# dropped: a stored upload keeps its state for the result's retention (24 h), and its entry,
# when its release was missed (a crash after the settle, a Redis blip), would hold the
# user's quota that long.
_RESERVE: Final = """
local function unfinished(id)
  local raw = redis.call('GET', ARGV[5] .. id)
  if not raw then return false end
  local ok, state = pcall(cjson.decode, raw)
  return not ok or type(state) ~= 'table' or state['phase'] ~= 'done'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local entries = redis.call('HGETALL', KEYS[1])
local count, total, born = 0, 0, now
for i = 1, #entries, 2 do
  local id = entries[i]
  local declared, at = string.match(entries[i + 1], '^(%d+):(%d+)$')
  declared, at = tonumber(declared), tonumber(at)
  if id == ARGV[1] then
    born = at
  elseif now - at < tonumber(ARGV[6]) or unfinished(id) then
    count = count + 1
    total = total + declared
  else
    redis.call('HDEL', KEYS[1], id)
  end
end
if tonumber(ARGV[3]) > 0 and count + 1 > tonumber(ARGV[3]) then return 1 end
if tonumber(ARGV[4]) > 0 and total + tonumber(ARGV[2]) > tonumber(ARGV[4]) then return 2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. born)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 0
"""

# KEYS: lock. ARGV: token.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _unfinished(upload: TusUpload | None) -> bool:
    """Whether an upload still counts against its owner's quota: its state is there and it
    is not stored yet (see `_RESERVE`)."""
    return upload is not None and upload.phase is not Phase.DONE


class RedisTusStore:
    """State in Redis, through the process's gateway: a dead Redis costs one timeout, never a
    hang, and is the gateway's `RedisUnavailable` (the tus service answers it: `.guarded_store`)."""

    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway
        self._put = gateway.script(_PUT)
        self._create = gateway.script(_CREATE)
        self._delete = gateway.script(_DELETE)
        self._lock = gateway.script(_LOCK)
        self._keep = gateway.script(_KEEP)
        self._release = gateway.script(_RELEASE)
        self._reserve = gateway.script(_RESERVE)

    @staticmethod
    def _keys(upload_id: str) -> tuple[str, str, str]:
        base = KEY_PREFIX + upload_id
        return base, base + ":lock", base + ":letgo"

    async def create(self, upload: TusUpload) -> bool:
        state, _, _ = self._keys(upload.id)
        created = await self._gateway.run_script(
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
        raw = await self._gateway.call(lambda client: client.get(state))
        if raw is None:
            return None
        assert isinstance(raw, bytes)
        return TusUpload.from_json(raw)

    async def put(self, upload: TusUpload, token: str) -> bool:
        state, lock, _ = self._keys(upload.id)
        written = await self._gateway.run_script(
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

    def result_write(self, upload: TusUpload, token: str) -> ResultWrite | None:
        state, lock, _ = self._keys(upload.id)
        return ResultWrite(
            state,
            upload.to_json(),
            int(_state_deadline(upload) * 1000),
            guard=(lock, token),
            index=(EXPIRING_KEY, upload.expires_at, upload.id),
        )

    async def delete(self, upload_id: str, token: str) -> bool:
        state, lock, _ = self._keys(upload_id)
        deleted = await self._gateway.run_script(
            self._delete, [state, lock, EXPIRING_KEY], [token, upload_id]
        )
        return deleted == 1

    async def due(self, now: float, limit: int) -> list[str]:
        raw = await self._gateway.call(
            lambda client: client.zrangebyscore(EXPIRING_KEY, "-inf", repr(now), start=0, num=limit)
        )
        assert isinstance(raw, list)
        return [item.decode() if isinstance(item, bytes) else str(item) for item in raw]

    async def forget(self, upload_id: str) -> None:
        await self._gateway.call(lambda client: client.zrem(EXPIRING_KEY, upload_id))

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        taken, _ = await self._take_lock(upload_id, token, ttl_s, read=False)
        return taken

    async def try_lock_and_get(
        self, upload_id: str, token: str, ttl_s: float
    ) -> tuple[bool, TusUpload | None]:
        return await self._take_lock(upload_id, token, ttl_s, read=True)

    async def _take_lock(
        self, upload_id: str, token: str, ttl_s: float, *, read: bool
    ) -> tuple[bool, TusUpload | None]:
        state, lock, letgo = self._keys(upload_id)
        reply = await self._gateway.run_script(
            self._lock,
            [lock, letgo, state] if read else [lock, letgo],
            [token, str(int(ttl_s * 1000))],
        )
        assert isinstance(reply, list), reply
        if not reply or reply[0] != 1:
            return False, None
        raw = reply[1] if len(reply) > 1 else None
        if raw is None:
            return True, None
        assert isinstance(raw, bytes)
        return True, TusUpload.from_json(raw)

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        _, lock, letgo = self._keys(upload_id)
        status = await self._gateway.run_script(
            self._keep, [lock, letgo], [token, str(int(ttl_s * 1000))]
        )
        if status == -1:
            return LockState.LOST
        return LockState.ASKED if status == 1 else LockState.HELD

    async def release(self, upload_id: str, token: str) -> None:
        _, lock, _ = self._keys(upload_id)
        await self._gateway.run_script(self._release, [lock], [token])

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        _, _, letgo = self._keys(upload_id)
        await self._gateway.call(lambda client: client.set(letgo, b"1", px=int(ttl_s * 1000)))

    async def reserve(
        self, owner: str, upload_id: str, size: int, *, max_uploads: int, max_bytes: int
    ) -> QuotaRefusal | None:
        status = await self._gateway.run_script(
            self._reserve,
            [_owner_key(owner)],
            [
                upload_id,
                str(size),
                str(max_uploads),
                str(max_bytes),
                KEY_PREFIX,
                str(int(RESERVATION_GRACE_S * 1000)),
                str(int(OWNER_INDEX_TTL_S * 1000)),
            ],
        )
        if status == 1:
            return QuotaRefusal.UPLOADS
        if status == 2:
            return QuotaRefusal.BYTES
        return None

    async def unreserve(self, owner: str, upload_id: str) -> None:
        key = _owner_key(owner)
        await self._gateway.call(lambda client: client.hdel(key, upload_id))


def _owner_key(owner: str) -> str:
    """Hashed: Redis never holds a user name in a key."""
    return OWNER_PREFIX + hashlib.sha256(owner.encode()).hexdigest()[:32]
