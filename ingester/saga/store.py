"""Where saga records live: Redis (`ingester:saga:*`, shared by replicas) or this process.

Each record has an owner and a due time. For a live upload the due time is the end of its
owner's lease, pushed forward by the owner's lease keeper; for a compensation waiting to be
retried it is the end of the same lease. A record whose due time has passed belongs to no one
alive: the janitor of any replica claims it. Claiming, renewing, writing and deleting are each
one atomic step (a Lua script in Redis), and all but claiming check the owner, so two replicas
never work on the same record: the lease is the lock.

Redis layout:
  ingester:saga:<upload_id>       hash {owner, record (JSON)}
  ingester:saga:due               sorted set upload_id → due time (unix seconds)
  ingester:saga:compensating      set of upload ids whose copies are being removed (backlog)
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from ..boundary import RedisUnavailable
from ..storage.redis_gateway import RedisGateway
from .commit import ResultRefused, ResultWrite
from .record import SagaRecord, SagaState

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "ingester:saga:"
DUE_KEY: Final = "ingester:saga:due"
COMPENSATING_KEY: Final = "ingester:saga:compensating"


# The store could not be reached (Redis down or too slow): the gateway's one error, under
# the name the saga book (and finalization) catch.
StoreUnavailable = RedisUnavailable


class SagaStore(Protocol):
    # Whether `put` and `delete` write a `result` in the same atomic step (Redis). A store
    # that does not ignores it: the caller writes the result itself.
    atomic_results: bool

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        """Write `record` for its owner. False when another owner holds it, or when
        `must_exist` and it is gone (taken over and finished by someone else). With
        `result`, written with it; raises `ResultRefused` (nothing written) when its guard
        does not hold."""
        ...

    async def renew(self, owner: str, upload_ids: list[str], *, due: float) -> list[str]:
        """Push the due time of `owner`'s records forward; the ids it no longer owns."""
        ...

    async def claim_due(
        self, owner: str, *, now: float, due: float, limit: int
    ) -> list[SagaRecord]:
        """Take the records due by `now` (their owner's lease ran out) for `owner`, with a
        new lease until `due`. Each returned record still names its previous owner."""
        ...

    async def delete(
        self, owner: str, upload_id: str, *, result: ResultWrite | None = None
    ) -> bool:
        """Delete `owner`'s record. False when it is not `owner`'s (or gone). `result` as
        for `put`."""
        ...

    async def backlog(self) -> int:
        """Records whose copies are waiting to be removed, all owners together."""
        ...


class MemorySagaStore:
    """Without Redis: the same rules in this process (records die with it)."""

    atomic_results = False

    def __init__(self) -> None:
        self._records: dict[str, tuple[str, str]] = {}
        self._due: dict[str, float] = {}
        self._compensating: set[str] = set()

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        current = self._records.get(record.upload_id)
        if current is None and must_exist:
            return False
        if current is not None and current[0] != record.owner:
            return False
        self._records[record.upload_id] = (record.owner, record.to_json())
        self._due[record.upload_id] = due
        if record.state is SagaState.COMPENSATING:
            self._compensating.add(record.upload_id)
        else:
            self._compensating.discard(record.upload_id)
        return True

    async def renew(self, owner: str, upload_ids: list[str], *, due: float) -> list[str]:
        lost = []
        for upload_id in upload_ids:
            current = self._records.get(upload_id)
            if current is not None and current[0] == owner:
                self._due[upload_id] = due
            else:
                lost.append(upload_id)
        return lost

    async def claim_due(
        self, owner: str, *, now: float, due: float, limit: int
    ) -> list[SagaRecord]:
        ready = sorted((t, u) for u, t in self._due.items() if t <= now)[:limit]
        claimed = []
        for _, upload_id in ready:
            _, raw = self._records[upload_id]
            self._records[upload_id] = (owner, raw)
            self._due[upload_id] = due
            claimed.append(SagaRecord.from_json(raw))
        return claimed

    async def delete(
        self, owner: str, upload_id: str, *, result: ResultWrite | None = None
    ) -> bool:
        current = self._records.get(upload_id)
        if current is None or current[0] != owner:
            return False
        del self._records[upload_id]
        self._due.pop(upload_id, None)
        self._compensating.discard(upload_id)
        return True

    async def backlog(self) -> int:
        return len(self._compensating)


# KEYS: hash, due zset, compensating set. ARGV: owner, record JSON, state, due, id, must_exist.
_PUT_CHECK: Final = """
local current = redis.call('HGET', KEYS[1], 'owner')
if not current and ARGV[6] == '1' then return 0 end
if current and current ~= ARGV[1] then return 0 end
"""
_PUT_WRITE: Final = """
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
if ARGV[3] == 'compensating' then
  redis.call('SADD', KEYS[3], ARGV[5])
else
  redis.call('SREM', KEYS[3], ARGV[5])
end
"""
_PUT: Final = _PUT_CHECK + _PUT_WRITE + "return 1"


def _with_result(check: str, write: str, base: int) -> str:
    """A settle script that also writes an upload's result (`commit.ResultWrite`): KEYS[4]
    the result, KEYS[5] its guard, KEYS[6] its index; ARGV after the script's own `base`
    ones: value, expiry (unix ms), guard value ('' for none), index score, index member
    ('' for none). Answers -1, having written nothing, when the guard does not hold."""
    value, expire_at, guard, score, member = (f"ARGV[{base + i}]" for i in range(1, 6))
    return (
        check
        + f"if {guard} ~= '' and redis.call('GET', KEYS[5]) ~= {guard} then return -1 end\n"
        + write
        + f"redis.call('SET', KEYS[4], {value})\n"
        + f"redis.call('PEXPIREAT', KEYS[4], {expire_at})\n"
        + f"if {member} ~= '' then redis.call('ZADD', KEYS[6], {score}, {member}) end\n"
        + "return 1"
    )


_PUT_WITH_RESULT: Final = _with_result(_PUT_CHECK, _PUT_WRITE, 6)

# KEYS: due zset, then one hash per id. ARGV: owner, due, then the ids.
_RENEW: Final = """
local lost = {}
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('HGET', KEYS[i], 'owner') == ARGV[1] then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
  else
    table.insert(lost, id)
  end
end
return lost
"""

# KEYS: due zset. ARGV: now, new due, owner, limit, key prefix. Records are looked up by id
# (the ids are only known once the sorted set is read, so they cannot be passed as KEYS:
# fine on a single Redis, not on a cluster). Finalization claims its transactions with it too.
CLAIM_DUE: Final = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[4])
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[5] .. id
  local record = redis.call('HGET', key, 'record')
  if record then
    redis.call('HSET', key, 'owner', ARGV[3])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, record)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

# KEYS: hash, due zset, compensating set. ARGV: owner, id.
_DELETE_CHECK: Final = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
"""
_DELETE_WRITE: Final = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
"""
_DELETE: Final = _DELETE_CHECK + _DELETE_WRITE + "return 1"
_DELETE_WITH_RESULT: Final = _with_result(_DELETE_CHECK, _DELETE_WRITE, 2)


class RedisSagaStore:
    """Records in Redis, through the process's gateway: a dead Redis costs one timeout, never
    a hang, and comes out as `StoreUnavailable`."""

    atomic_results = True

    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway
        self._run = gateway.run_script
        self._put = gateway.script(_PUT)
        self._renew = gateway.script(_RENEW)
        self._claim = gateway.script(CLAIM_DUE)
        self._delete = gateway.script(_DELETE)
        self._put_result = gateway.script(_PUT_WITH_RESULT)
        self._delete_result = gateway.script(_DELETE_WITH_RESULT)

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        keys, args = _result_args(result)
        written = await self._run(
            self._put if result is None else self._put_result,
            [KEY_PREFIX + record.upload_id, DUE_KEY, COMPENSATING_KEY, *keys],
            [
                record.owner,
                record.to_json(),
                record.state.value,
                repr(due),
                record.upload_id,
                "1" if must_exist else "0",
                *args,
            ],
            # What a failover must not lose (see the README, "Redis with Sentinel"):
            # - a `receiving` record, written before bytes go to a new copy: lost, a dead
            #   owner's copy would be an orphan no janitor knows of;
            # - a record that names the acknowledged copy (`kept`): lost, the earlier
            #   `receiving` one comes back, and a janitor would remove the file the client
            #   was told is stored.
            # - a result written with the settle: lost, a retry would store the file again.
            durable=record.state is SagaState.RECEIVING
            or record.kept is not None
            or result is not None,
        )
        return _answer(written)

    async def renew(self, owner: str, upload_ids: list[str], *, due: float) -> list[str]:
        if not upload_ids:
            return []
        lost = await self._run(
            self._renew,
            [DUE_KEY, *(KEY_PREFIX + u for u in upload_ids)],
            [owner, repr(due), *upload_ids],
        )
        assert isinstance(lost, list)
        return [x.decode() if isinstance(x, bytes) else str(x) for x in lost]

    async def claim_due(
        self, owner: str, *, now: float, due: float, limit: int
    ) -> list[SagaRecord]:
        raw = await self._run(
            self._claim, [DUE_KEY], [repr(now), repr(due), owner, str(limit), KEY_PREFIX]
        )
        assert isinstance(raw, list)
        records = []
        for item in raw:
            try:
                records.append(SagaRecord.from_json(item))
            except ValueError as exc:
                # Claimed, so it will come round again each lease: loud, not fatal.
                log.error("unreadable saga record in Redis: %s", exc, extra={"event": "saga"})
        return records

    async def delete(
        self, owner: str, upload_id: str, *, result: ResultWrite | None = None
    ) -> bool:
        keys, args = _result_args(result)
        deleted = await self._run(
            self._delete if result is None else self._delete_result,
            [KEY_PREFIX + upload_id, DUE_KEY, COMPENSATING_KEY, *keys],
            [owner, upload_id, *args],
            # The delete that acknowledges an upload: lost in a failover, the `receiving`
            # record comes back and a janitor removes the acknowledged copy (found by
            # tests/chaos/test_scale_out.py). Other deletes end a compensation, where the
            # record coming back only has a janitor remove copies already gone.
            durable=True,
        )
        return _answer(deleted)

    async def backlog(self) -> int:
        return await self._gateway.call(lambda client: int(client.scard(COMPENSATING_KEY)))


def _result_args(result: ResultWrite | None) -> tuple[list[str], list[str]]:
    """The extra KEYS and ARGV of a `_with_result` script (none without a result)."""
    if result is None:
        return [], []
    guard_key, guard_value = result.guard or (result.key, "")
    index_key, score, member = result.index or (result.key, 0.0, "")
    return (
        [result.key, guard_key, index_key],
        [result.value, str(result.expire_at_ms), guard_value, repr(score), member],
    )


def _answer(reply: object) -> bool:
    """A write script's reply: 1 written, 0 not this owner's, -1 the result's guard failed."""
    if reply == -1:
        raise ResultRefused("the result's guard does not hold")
    return reply == 1
