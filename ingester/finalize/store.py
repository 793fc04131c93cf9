"""Where finalization transactions live: Redis (`ingester:finalize:*`, shared by replicas) or
this process. The saga store's pattern: each unfinished transaction has an owner and a due time
(the end of its owner's lease); a transaction whose due time passed belongs to no one alive and
any replica's janitor claims it. Every write checks the owner in the same atomic step.

Redis layout:
  ingester:finalize:tx:<transaction_id>   hash {owner, record (JSON)}; expires once finished
  ingester:finalize:file:<file_id>        the transaction moving this file (the 409 lock);
                                          released by a rollback, kept (expiring) when done
  ingester:finalize:due                   sorted set id → lease end (unfinished ones only)
  ingester:finalize:index                 sorted set id → creation time (the admin list);
                                          trimmed of entries past the retention by each create
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING, Final, Protocol

from ..saga.store import CLAIM_DUE, StoreUnavailable
from ..storage.redis_gateway import RedisGateway
from .record import TERMINAL, Transaction, TxState

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

TX_PREFIX: Final = "ingester:finalize:tx:"
FILE_PREFIX: Final = "ingester:finalize:file:"
DUE_KEY: Final = "ingester:finalize:due"
INDEX_KEY: Final = "ingester:finalize:index"

__all__ = ["FinalizeStore", "MemoryFinalizeStore", "RedisFinalizeStore", "StoreUnavailable"]


class FinalizeStore(Protocol):
    async def create(self, tx: Transaction, *, due: float, retention_s: float) -> str | None:
        """Write a new transaction and take its file's lock; the id of the transaction that
        holds the lock instead (nothing written) when the file is taken. What was created
        more than `retention_s` before `tx` leaves the list of transactions."""
        ...

    async def put(self, tx: Transaction, *, due: float, retention_s: float) -> bool:
        """Write `tx` for its owner. False when another owner holds it."""
        ...

    async def renew(self, owner: str, ids: list[str], *, due: float) -> list[str]:
        """Push the lease of `owner`'s transactions; the ids it no longer owns."""
        ...

    async def claim_due(self, owner: str, *, now: float, due: float, limit: int) -> list[str]:
        """Take the unfinished transactions whose lease ran out; their stored JSON."""
        ...

    async def get(self, transaction_id: str) -> Transaction | None: ...

    async def recent(self, limit: int) -> list[Transaction]:
        """The newest transactions still kept, newest first."""
        ...


class MemoryFinalizeStore:
    """Without Redis: the same rules in this process (transactions die with it)."""

    def __init__(self) -> None:
        self._records: dict[str, tuple[str, str]] = {}
        self._files: dict[str, str] = {}
        # Each transaction's file, so an expiry finds the lock it may hold without a scan.
        self._file_of: dict[str, str] = {}
        self._due: dict[str, float] = {}
        self._created: dict[str, float] = {}
        self._expires: dict[str, float] = {}
        # (expiry, id), soonest first; an entry whose time `_expires` no longer holds is
        # stale and skipped.
        self._expiring: list[tuple[float, str]] = []

    def _expire(self, now: float) -> None:
        """Forget what finished more than the retention ago. Runs on the event loop with
        every create: the cost is the expired entries (logarithmic each), never a scan of
        every lock or record (a burst of 10,000 moves ending at once held the loop 1.6 s)."""
        while self._expiring and self._expiring[0][0] <= now:
            at, tx_id = heapq.heappop(self._expiring)
            if self._expires.get(tx_id) != at:
                continue
            self._records.pop(tx_id, None)
            self._created.pop(tx_id, None)
            del self._expires[tx_id]
            file_id = self._file_of.pop(tx_id, None)
            if file_id is not None and self._files.get(file_id) == tx_id:
                del self._files[file_id]

    async def create(self, tx: Transaction, *, due: float, retention_s: float) -> str | None:
        # The list is what is kept: finished transactions leave it as they expire.
        self._expire(tx.created_at)
        holder = self._files.get(tx.file_id)
        if holder is not None:
            return holder
        self._files[tx.file_id] = tx.transaction_id
        self._file_of[tx.transaction_id] = tx.file_id
        self._records[tx.transaction_id] = (tx.owner, tx.to_json())
        self._due[tx.transaction_id] = due
        self._created[tx.transaction_id] = tx.created_at
        return None

    async def put(self, tx: Transaction, *, due: float, retention_s: float) -> bool:
        current = self._records.get(tx.transaction_id)
        if current is not None and current[0] != tx.owner:
            return False
        self._records[tx.transaction_id] = (tx.owner, tx.to_json())
        if tx.state in TERMINAL:
            self._due.pop(tx.transaction_id, None)
            at = tx.updated_at + retention_s
            self._expires[tx.transaction_id] = at
            heapq.heappush(self._expiring, (at, tx.transaction_id))
            if tx.state is TxState.ROLLED_BACK and self._files.get(tx.file_id) == tx.transaction_id:
                del self._files[tx.file_id]
        else:
            self._due[tx.transaction_id] = due
        return True

    async def renew(self, owner: str, ids: list[str], *, due: float) -> list[str]:
        lost = []
        for tx_id in ids:
            current = self._records.get(tx_id)
            if current is not None and current[0] == owner and tx_id in self._due:
                self._due[tx_id] = due
            else:
                lost.append(tx_id)
        return lost

    async def claim_due(self, owner: str, *, now: float, due: float, limit: int) -> list[str]:
        ready = sorted((t, i) for i, t in self._due.items() if t <= now)[:limit]
        out = []
        for _, tx_id in ready:
            _, raw = self._records[tx_id]
            self._records[tx_id] = (owner, raw)
            self._due[tx_id] = due
            out.append(raw)
        return out

    async def get(self, transaction_id: str) -> Transaction | None:
        current = self._records.get(transaction_id)
        return None if current is None else Transaction.from_json(current[1])

    async def recent(self, limit: int) -> list[Transaction]:
        ids = sorted(self._created, key=lambda i: self._created[i], reverse=True)[:limit]
        return [Transaction.from_json(self._records[i][1]) for i in ids if i in self._records]


# KEYS: tx hash, file lock, due zset, index zset. ARGV: owner, record, due, id, created,
# cutoff. The index is trimmed here of what was created before the cutoff (now - retention):
# nothing else removes from it but `recent()`, which only looks at the newest, so without
# this it grew by every transaction ever made (their hashes expire, their index entries did
# not).
_CREATE: Final = """
local holder = redis.call('GET', KEYS[2])
if holder then return holder end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. ARGV[6])
return ''
"""

# KEYS: tx hash, file lock, due zset. ARGV: owner, record, state, due, id, retention (s).
_PUT: Final = """
local current = redis.call('HGET', KEYS[1], 'owner')
if current and current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'record', ARGV[2])
if ARGV[3] == 'done' or ARGV[3] == 'rolled_back' then
  redis.call('ZREM', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
  if redis.call('GET', KEYS[2]) == ARGV[5] then
    if ARGV[3] == 'rolled_back' then
      redis.call('DEL', KEYS[2])
    else
      redis.call('EXPIRE', KEYS[2], ARGV[6])
    end
  end
else
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
end
return 1
"""

# KEYS: due zset, then one hash per id. ARGV: owner, due, then the ids. Not the saga's: a
# finished transaction keeps its hash (expiring) but is out of the due set, and renewing it
# must not put it back there for a janitor to claim.
_RENEW: Final = """
local lost = {}
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  if redis.call('HGET', KEYS[i], 'owner') == ARGV[1] and redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], ARGV[2], id)
  else
    table.insert(lost, id)
  end
end
return lost
"""


class RedisFinalizeStore:
    """Transactions in Redis, through the process's gateway (bounded calls, no retries; a
    dead Redis is `StoreUnavailable`)."""

    def __init__(self, gateway: RedisGateway) -> None:
        self._gateway = gateway
        self._run = gateway.run_script
        self._create = gateway.script(_CREATE)
        self._put = gateway.script(_PUT)
        self._renew = gateway.script(_RENEW)
        self._claim = gateway.script(CLAIM_DUE)

    async def create(self, tx: Transaction, *, due: float, retention_s: float) -> str | None:
        holder = await self._run(
            self._create,
            [TX_PREFIX + tx.transaction_id, FILE_PREFIX + tx.file_id, DUE_KEY, INDEX_KEY],
            [
                tx.owner,
                tx.to_json(),
                repr(due),
                tx.transaction_id,
                repr(tx.created_at),
                repr(tx.created_at - retention_s),
            ],
            durable=True,
        )
        if isinstance(holder, bytes):
            holder = holder.decode()
        return str(holder) if holder else None

    async def put(self, tx: Transaction, *, due: float, retention_s: float) -> bool:
        written = await self._run(
            self._put,
            [TX_PREFIX + tx.transaction_id, FILE_PREFIX + tx.file_id, DUE_KEY],
            [
                tx.owner,
                tx.to_json(),
                tx.state.value,
                repr(due),
                tx.transaction_id,
                str(max(int(retention_s), 1)),
            ],
            # Lost in a failover, `copying` (written before the first byte goes to the
            # target) leaves an orphan, and `committed` turned back into `copying` has a
            # janitor remove the target after the source was deleted: the file is gone.
            # A move writes a handful of states, so all of them wait.
            durable=True,
        )
        return written == 1

    async def renew(self, owner: str, ids: list[str], *, due: float) -> list[str]:
        if not ids:
            return []
        lost = await self._run(
            self._renew, [DUE_KEY, *(TX_PREFIX + i for i in ids)], [owner, repr(due), *ids]
        )
        assert isinstance(lost, list)
        return [x.decode() if isinstance(x, bytes) else str(x) for x in lost]

    async def claim_due(self, owner: str, *, now: float, due: float, limit: int) -> list[str]:
        raw = await self._run(
            self._claim, [DUE_KEY], [repr(now), repr(due), owner, str(limit), TX_PREFIX]
        )
        assert isinstance(raw, list)
        return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]

    async def get(self, transaction_id: str) -> Transaction | None:
        raw = await self._gateway.call(
            lambda client: client.hget(TX_PREFIX + transaction_id, "record")
        )
        if raw is None:
            return None
        assert isinstance(raw, bytes | str)
        return Transaction.from_json(raw)

    async def recent(self, limit: int) -> list[Transaction]:
        def read(client: redis.Redis) -> list[bytes | None]:
            ids: list[bytes] = list(client.zrevrange(INDEX_KEY, 0, max(limit, 1) - 1))  # type: ignore[arg-type]
            if not ids:
                return []
            pipe = client.pipeline(transaction=False)
            for tx_id in ids:
                pipe.hget(TX_PREFIX + tx_id.decode(), "record")
            values = pipe.execute()
            gone = [tx_id for tx_id, value in zip(ids, values, strict=True) if value is None]
            if gone:
                client.zrem(INDEX_KEY, *gone)
            return list(values)

        values = await self._gateway.call(read)
        assert isinstance(values, list)
        out = []
        for value in values:
            if value is None:
                continue
            try:
                out.append(Transaction.from_json(value))
            except ValueError as exc:
                log.error("unreadable finalization record in Redis: %s", exc)
        return out
