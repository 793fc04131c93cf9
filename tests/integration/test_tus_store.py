"""The resumable-upload store's rules, the same for both stores: Redis (a real redis-server on
a free port) and the in-process one. Only the lock's holder writes or deletes a state; the
lock runs out when not renewed; asking to let go shows at the holder's next renewal; a
dead Redis is a clear 503, never a hang."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from ingester.boundary import RedisUnavailable
from ingester.storage.redis_gateway import RedisGateway
from ingester.tus.errors import TusStoreUnavailable
from ingester.tus.guarded_store import GuardedStore
from ingester.tus.locks import Locks
from ingester.tus.state import Phase, TusUpload
from ingester.tus.store import LockState, MemoryTusStore, RedisTusStore, TusStore
from tests.support.redis_server import RedisServer

UID = "b" * 32


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TusStore]:
    if request.param == "memory":
        yield MemoryTusStore()
        return
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=2.0)
        redis_store = RedisTusStore(gateway)
        try:
            yield redis_store
        finally:
            gateway.close()


def upload(upload_id: str = UID, expires_in: float = 60.0) -> TusUpload:
    now = time.time()
    return TusUpload(
        id=upload_id,
        owner="alice",
        length=10,
        created_at=now,
        expires_at=now + expires_in,
        metadata={"filename": b"a.txt"},
    )


async def test_create_get_and_fenced_writes(store: TusStore) -> None:
    with trio.fail_after(10):
        assert await store.create(upload())
        assert not await store.create(upload())
        assert await store.get("c" * 32) is None
        got = await store.get(UID)
        assert got is not None
        assert (got.owner, got.offset, got.length) == ("alice", 0, 10)
        assert got.metadata == {"filename": b"a.txt"}
        changed = upload()
        changed.offset = 4
        assert not await store.put(changed, "nobody")
        assert await store.try_lock(UID, "t1", 5)
        assert await store.put(changed, "t1")
        fresh = await store.get(UID)
        assert fresh is not None
        assert fresh.offset == 4
        assert not await store.delete(UID, "t2")
        assert await store.delete(UID, "t1")
        assert await store.get(UID) is None


async def test_locks_are_exclusive_and_run_out(store: TusStore) -> None:
    with trio.fail_after(10):
        assert await store.try_lock(UID, "t1", 0.3)
        assert not await store.try_lock(UID, "t2", 5)
        assert await store.keep(UID, "t1", 0.3) is LockState.HELD
        assert await store.keep(UID, "t2", 5) is LockState.LOST
        await store.release(UID, "t2")  # not its lock: no effect
        assert not await store.try_lock(UID, "t2", 5)
        await trio.sleep(0.45)
        assert await store.try_lock(UID, "t2", 5)
        assert await store.keep(UID, "t1", 5) is LockState.LOST


async def test_a_lock_taken_with_its_state_reads_the_state_of_that_moment(
    store: TusStore,
) -> None:
    """`try_lock_and_get` (a `PATCH`'s one call for both): the state only when the lock is
    taken, as the last holder left it; a request to let go is cleared as by `try_lock`."""
    with trio.fail_after(10):
        assert await store.try_lock_and_get(UID, "t0", 5) == (True, None)
        await store.release(UID, "t0")
        assert await store.create(upload())
        await store.ask(UID, 5)
        taken, state = await store.try_lock_and_get(UID, "t1", 5)
        assert taken
        assert state is not None
        assert (state.owner, state.offset, state.metadata) == ("alice", 0, {"filename": b"a.txt"})
        assert await store.keep(UID, "t1", 5) is LockState.HELD
        assert await store.try_lock_and_get(UID, "t2", 5) == (False, None)
        state.offset = 4
        assert await store.put(state, "t1")
        await store.release(UID, "t1")
        taken, after = await store.try_lock_and_get(UID, "t2", 5)
        assert taken
        assert after is not None
        assert after.offset == 4
        assert await store.keep(UID, "t1", 5) is LockState.LOST


async def test_asking_to_let_go(store: TusStore) -> None:
    with trio.fail_after(10):
        assert await store.try_lock(UID, "t1", 5)
        await store.ask(UID, 5)
        assert await store.keep(UID, "t1", 5) is LockState.ASKED
        await store.release(UID, "t1")
        assert await store.try_lock(UID, "t2", 5)
        # Taking the lock cleared the request: the new holder is not asked.
        assert await store.keep(UID, "t2", 5) is LockState.HELD


async def test_expired_uploads_come_due(store: TusStore) -> None:
    with trio.fail_after(10):
        assert await store.create(upload("d" * 32, expires_in=-5))
        assert await store.create(upload("e" * 32, expires_in=60))
        assert await store.due(time.time(), 10) == ["d" * 32]
        await store.forget("d" * 32)
        assert await store.due(time.time(), 10) == []


async def test_a_finished_upload_state_vanishes_when_its_retention_ends(store: TusStore) -> None:
    with trio.fail_after(10):
        done = upload(expires_in=60)
        assert await store.create(done)
        assert await store.try_lock(UID, "t", 5)
        done.offset = 10
        done.begin_completion(offset_before=0)
        done.completed({"file_id": "f"}, now=time.time(), retention_s=0.3)
        assert done.phase is Phase.DONE
        assert await store.put(done, "t")
        assert await store.get(UID) is not None
        await trio.sleep(0.5)
        assert await store.get(UID) is None


async def test_let_go_through_the_store(store: TusStore) -> None:
    locks = Locks(GuardedStore(store), ttl_s=3, wait_s=3, retry_after_s=1)
    with trio.fail_after(10):
        holder = await locks.acquire(UID, ask=False)

        async def hold() -> None:
            async with locks.kept(holder):
                with holder.interrupt:
                    await trio.sleep_forever()
            await locks.release(holder)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.sleep(0.1)
            started = trio.current_time()
            await locks.acquire(UID, ask=True)
            took = trio.current_time() - started
        assert holder.asked
        assert took < 1.0


async def test_a_dead_redis_is_a_503_not_a_hang(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    gateway = RedisGateway(server.url, timeout_s=0.5)
    store = RedisTusStore(gateway)
    guarded = GuardedStore(store)
    try:
        with trio.fail_after(10):
            assert await guarded.create(upload())
            server.kill()
            # The adapter says what happened; the tus service's guard says what it means.
            with pytest.raises(RedisUnavailable):
                await store.get(UID)
            with pytest.raises(TusStoreUnavailable) as caught:
                await guarded.get(UID)
            assert caught.value.status == 503
            assert caught.value.code == "TUS_STORE_UNAVAILABLE"
            with pytest.raises(TusStoreUnavailable):
                await guarded.try_lock(UID, "t", 5)
    finally:
        gateway.close()
        server.kill()
