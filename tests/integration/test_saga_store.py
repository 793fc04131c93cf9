"""The saga store's rules, the same for both stores: Redis (a real redis-server on a free
port) and the in-process one. The lease is the lock: only the owner writes, renews or deletes
a record, and only a record whose lease ran out can be claimed, by one claimant."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from ingester.saga.commit import ResultRefused, ResultWrite
from ingester.saga.record import Copy, SagaRecord, SagaState
from ingester.saga.store import (
    KEY_PREFIX,
    MemorySagaStore,
    RedisSagaStore,
    SagaStore,
    StoreUnavailable,
)
from ingester.storage.redis_gateway import RedisGateway
from tests.support.redis_server import RedisServer

A = Copy("se-a", "http://127.0.0.1:1")
NOW = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SagaStore]:
    if request.param == "memory":
        yield MemorySagaStore()
        return
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=2.0)
        redis_store = RedisSagaStore(gateway)
        try:
            yield redis_store
        finally:
            gateway.close()


def rec(
    upload_id: str = "u1", owner: str = "one", state: SagaState = SagaState.RECEIVING
) -> SagaRecord:
    r = SagaRecord(upload_id=upload_id, file_id="f-" + upload_id, owner=owner, state=state)
    r.add_copy(A)
    return r


async def test_owner_writes_and_others_cannot(store: SagaStore) -> None:
    with trio.fail_after(10):
        assert await store.put(rec(owner="one"), due=NOW + 30, must_exist=False)
        assert await store.put(
            rec(owner="one", state=SagaState.STORED), due=NOW + 30, must_exist=True
        )
        assert not await store.put(rec(owner="two"), due=NOW + 30, must_exist=False)
        # Nothing of "two" got in: the record is still one's.
        claimed = await store.claim_due("three", now=NOW + 31, due=NOW + 60, limit=10)
        assert [(r.owner, r.state) for r in claimed] == [("one", SagaState.STORED)]


async def test_must_exist_refuses_to_recreate_a_record(store: SagaStore) -> None:
    # An owner that lost its record (taken over and finished) must not write it back.
    with trio.fail_after(10):
        assert not await store.put(rec(), due=NOW + 30, must_exist=True)
        assert await store.claim_due("x", now=NOW + 100, due=NOW + 200, limit=10) == []


async def test_only_due_records_are_claimed_and_only_once(store: SagaStore) -> None:
    with trio.fail_after(10):
        await store.put(rec("early"), due=NOW + 10, must_exist=False)
        await store.put(rec("late"), due=NOW + 50, must_exist=False)
        assert await store.claim_due("two", now=NOW + 5, due=NOW + 35, limit=10) == []
        claimed = await store.claim_due("two", now=NOW + 20, due=NOW + 50, limit=10)
        assert [r.upload_id for r in claimed] == ["early"]
        assert claimed[0].owner == "one"  # the previous owner, for the takeover log
        # Claimed with a new lease: a second janitor at the same moment gets nothing.
        assert await store.claim_due("three", now=NOW + 20, due=NOW + 50, limit=10) == []
        # The new owner holds it now: the old one can neither write nor delete it.
        assert not await store.put(rec("early", owner="one"), due=NOW + 99, must_exist=True)
        assert not await store.delete("one", "early")
        assert await store.delete("two", "early")


async def test_claims_are_limited_per_round(store: SagaStore) -> None:
    with trio.fail_after(10):
        for i in range(5):
            await store.put(rec(f"u{i}"), due=NOW + i, must_exist=False)
        first = await store.claim_due("two", now=NOW + 10, due=NOW + 60, limit=3)
        second = await store.claim_due("two", now=NOW + 10, due=NOW + 60, limit=3)
        assert [r.upload_id for r in first] == ["u0", "u1", "u2"]
        assert [r.upload_id for r in second] == ["u3", "u4"]


async def test_renewal_keeps_a_live_owner_s_records_and_reports_lost_ones(
    store: SagaStore,
) -> None:
    with trio.fail_after(10):
        await store.put(rec("kept"), due=NOW + 50, must_exist=False)
        await store.put(rec("taken"), due=NOW + 10, must_exist=False)
        claimed = await store.claim_due("two", now=NOW + 20, due=NOW + 500, limit=10)
        assert [r.upload_id for r in claimed] == ["taken"]
        lost = await store.renew("one", ["kept", "taken", "gone"], due=NOW + 100)
        assert sorted(lost) == ["gone", "taken"]
        # "kept" is leased until NOW + 100 now.
        assert await store.claim_due("three", now=NOW + 99, due=NOW + 200, limit=10) == []
        assert [
            r.upload_id
            for r in await store.claim_due("three", now=NOW + 101, due=NOW + 200, limit=10)
        ] == ["kept"]


async def test_backlog_counts_records_being_compensated(store: SagaStore) -> None:
    with trio.fail_after(10):
        await store.put(rec("a"), due=NOW, must_exist=False)
        await store.put(rec("b", state=SagaState.COMPENSATING), due=NOW, must_exist=False)
        await store.put(rec("c", state=SagaState.COMPENSATING), due=NOW, must_exist=False)
        assert await store.backlog() == 2
        await store.put(rec("c", state=SagaState.DONE), due=NOW, must_exist=True)
        await store.delete("one", "b")
        assert await store.backlog() == 0


async def test_redis_away_is_a_prompt_store_unavailable(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=0.5)
        store = RedisSagaStore(gateway)
        server.kill()
        try:
            with trio.fail_after(5):
                for call in (
                    lambda: store.put(rec(), due=NOW, must_exist=False),
                    lambda: store.renew("one", ["u1"], due=NOW),
                    lambda: store.claim_due("one", now=NOW, due=NOW, limit=1),
                    lambda: store.delete("one", "u1"),
                    store.backlog,
                ):
                    with pytest.raises(StoreUnavailable):
                        await call()
        finally:
            gateway.close()


# --- results written with the settle (Redis only: the in-process store has no second
# process to race, and writes results apart; see tests/unit/test_saga_commit.py) ---------


@pytest.fixture
async def redis_store(tmp_path: Path) -> AsyncIterator[tuple[RedisSagaStore, redis.Redis]]:
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=2.0)
        store = RedisSagaStore(gateway)
        client = redis.Redis.from_url(server.url)
        try:
            yield store, client
        finally:
            client.close()
            gateway.close()


def result(guard: tuple[str, str] | None = None) -> ResultWrite:
    expire_at_ms = int((time.time() + 600) * 1000)
    return ResultWrite(
        "res:u1", '{"file_id": "f-u1"}', expire_at_ms, guard=guard, index=("idx", 42.0, "u1")
    )


async def test_a_settle_writes_its_result_in_the_same_step(
    redis_store: tuple[RedisSagaStore, redis.Redis],
) -> None:
    store, client = redis_store
    with trio.fail_after(10):
        assert await store.put(rec(), due=NOW + 30, must_exist=False)
        done = rec(state=SagaState.COMPENSATING)  # abandoned copies left: a put
        assert await store.put(done, due=NOW + 30, must_exist=True, result=result())
        assert client.get("res:u1") == b'{"file_id": "f-u1"}'
        assert 0 < client.pttl("res:u1") <= 600_000
        assert client.zscore("idx", "u1") == 42.0
        client.delete("res:u1")
        # Nothing left: a delete, with the result.
        assert await store.delete("one", "u1", result=result())
        assert client.get("res:u1") == b'{"file_id": "f-u1"}'
        assert client.exists(KEY_PREFIX + "u1") == 0


async def test_a_settle_that_is_not_the_owners_writes_no_result(
    redis_store: tuple[RedisSagaStore, redis.Redis],
) -> None:
    store, client = redis_store
    with trio.fail_after(10):
        assert await store.put(rec(owner="one"), due=NOW + 30, must_exist=False)
        assert not await store.delete("two", "u1", result=result())
        assert not await store.put(rec(owner="two"), due=NOW + 30, must_exist=True, result=result())
        assert client.get("res:u1") is None
        assert client.zscore("idx", "u1") is None


async def test_a_guard_that_does_not_hold_refuses_the_settle_and_the_result(
    redis_store: tuple[RedisSagaStore, redis.Redis],
) -> None:
    store, client = redis_store
    with trio.fail_after(10):
        assert await store.put(rec(), due=NOW + 30, must_exist=False)
        client.set("lock:u1", "someone else")
        with pytest.raises(ResultRefused):
            await store.delete("one", "u1", result=result(guard=("lock:u1", "mine")))
        with pytest.raises(ResultRefused):
            await store.put(
                rec(state=SagaState.DONE),
                due=NOW + 30,
                must_exist=True,
                result=result(guard=("lock:u1", "mine")),
            )
        assert client.get("res:u1") is None
        claimed = await store.claim_due("x", now=NOW + 31, due=NOW + 60, limit=10)
        assert [(r.upload_id, r.state) for r in claimed] == [("u1", SagaState.RECEIVING)]
        # The lock back in our hands: the guard holds.
        client.set("lock:u1", "mine")
        assert await store.delete("x", "u1", result=result(guard=("lock:u1", "mine")))
        assert client.get("res:u1") is not None
