"""The in-process store and the lock protocol on it: exclusive locks with a time to live,
writes fenced by the lock, and a waiting request that makes the holder let go. Time is
trio's `MockClock` (autojump) wherever a lock runs out or a holder is waited for."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from ingester.boundary import RedisUnavailable
from ingester.tus.errors import UploadLocked
from ingester.tus.guarded_store import GuardedStore
from ingester.tus.locks import KEEP_INTERVAL_S, Lease, Locks
from ingester.tus.state import TusUpload
from ingester.tus.store import LockState, MemoryTusStore

UID = "a" * 32


def upload(expires_in: float = 60.0) -> TusUpload:
    now = time.time()
    return TusUpload(id=UID, owner="alice", length=10, created_at=now, expires_at=now + expires_in)


def locks(store: MemoryTusStore, *, ttl_s: float = 2.0, wait_s: float = 2.0) -> Locks:
    return Locks(GuardedStore(store), ttl_s=ttl_s, wait_s=wait_s, retry_after_s=1)


async def test_one_holder_at_a_time_and_only_it_writes() -> None:
    store = MemoryTusStore()
    with trio.fail_after(5):
        assert await store.create(upload())
        assert not await store.create(upload())
        assert await store.try_lock(UID, "t1", 5)
        assert not await store.try_lock(UID, "t2", 5)
        changed = upload()
        changed.offset = 5
        assert not await store.put(changed, "t2")
        assert await store.put(changed, "t1")
        got = await store.get(UID)
        assert got is not None
        assert got.offset == 5
        await store.release(UID, "t2")  # not its lock: nothing happens
        assert not await store.try_lock(UID, "t2", 5)
        await store.release(UID, "t1")
        assert await store.try_lock(UID, "t2", 5)
        assert await store.keep(UID, "t1", 5) is LockState.LOST
        assert not await store.delete(UID, "t1")
        assert await store.delete(UID, "t2")
        assert await store.get(UID) is None


async def test_a_lock_runs_out_when_not_renewed(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryTusStore()
    with trio.fail_after(5):
        assert await store.try_lock(UID, "t1", 0.1)
        await trio.sleep(0.15)
        assert await store.try_lock(UID, "t2", 5)


async def test_asking_shows_at_the_holders_next_renewal_and_taking_clears_it() -> None:
    store = MemoryTusStore()
    with trio.fail_after(5):
        assert await store.try_lock(UID, "t1", 5)
        assert await store.keep(UID, "t1", 5) is LockState.HELD
        await store.ask(UID, 5)
        assert await store.keep(UID, "t1", 5) is LockState.ASKED
        await store.release(UID, "t1")
        assert await store.try_lock(UID, "t2", 5)
        assert await store.keep(UID, "t2", 5) is LockState.HELD


async def test_expired_ids_come_due() -> None:
    store = MemoryTusStore()
    with trio.fail_after(5):
        assert await store.create(upload(expires_in=-1))
        assert await store.due(time.time(), 10) == [UID]
        await store.forget(UID)
        assert await store.due(time.time(), 10) == []


async def test_a_waiting_request_makes_the_holder_let_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryTusStore()
    lock = locks(store)
    with trio.fail_after(5):
        holder = await lock.acquire(UID, ask=False)
        stopped_at: list[float] = []

        async def hold() -> None:
            # A PATCH reading a body that never comes, as a dead client's would.
            async with lock.kept(holder):
                with holder.interrupt:
                    await trio.sleep_forever()
                stopped_at.append(trio.current_time())
            await lock.release(holder)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.sleep(0.05)
            asked_at = trio.current_time()
            waiter = await lock.acquire(UID, ask=True)
        assert holder.asked
        assert not holder.lost
        assert stopped_at[0] - asked_at < KEEP_INTERVAL_S * 3
        assert await store.keep(UID, waiter.token, 5) is LockState.HELD


async def test_a_holder_that_does_not_let_go_makes_the_waiter_423(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryTusStore()
    lock = locks(store, wait_s=0.5)
    with trio.fail_after(5):
        holder = await lock.acquire(UID, ask=False)
        holder.honour_letgo = False  # storing the finished upload

        async def hold() -> None:
            async with lock.kept(holder):
                with holder.interrupt:
                    await trio.sleep(2)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            with pytest.raises(UploadLocked) as caught:
                await lock.acquire(UID, ask=True)
            assert caught.value.status == 423
            assert caught.value.headers["Retry-After"] == "1"
            assert not holder.interrupt.cancel_called
            nursery.cancel_scope.cancel()


async def test_a_holder_that_lost_its_lock_is_interrupted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = MemoryTusStore()
    lock = locks(store)
    with trio.fail_after(5):
        holder = await lock.acquire(UID, ask=False)
        async with lock.kept(holder):
            with holder.interrupt:
                # Someone else's lock now (the holder's ran out, another took it).
                store._locks[UID] = ("other", trio.current_time() + 5)
                await trio.sleep_forever()
        assert holder.lost


async def test_a_final_upload_s_store_stops_when_a_partial_s_lock_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Found by a review: a final upload's store holds its partial uploads' locks too, but
    only its own lease's scope is entered; a lost partial's lock cancelled a scope no one was
    in, and the store read on while another request held the partial."""
    store = MemoryTusStore()
    lock = locks(store)
    part_id = "b" * 32
    with trio.fail_after(5):
        final = await lock.acquire(UID, ask=False)
        part = await lock.acquire(part_id, ask=False)
        final.honour_letgo = part.honour_letgo = False
        async with lock.kept(final, part):
            with final.interrupt:
                store._locks[part_id] = ("other", trio.current_time() + 5)
                await trio.sleep_forever()
        assert part.lost
        assert final.interrupt.cancelled_caught
        assert not final.lost


async def test_try_acquire_does_not_wait() -> None:
    store = MemoryTusStore()
    lock = locks(store)
    with trio.fail_after(5):
        first = await lock.try_acquire(UID)
        assert isinstance(first, Lease)
        assert await lock.try_acquire(UID) is None
        await lock.release(first)
        assert await lock.try_acquire(UID) is not None


class UnreachableOnKeep(MemoryTusStore):
    """A store that set the lock, then cannot be reached to renew it."""

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        raise RedisUnavailable("connection refused")


async def test_a_failing_store_gets_half_the_lock_time_from_its_acquisition(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The holder gives an unreachable store half the lock's time to live before it counts
    the lock lost. That half used to count from the start of the keep, which a creation
    reaches only after making the upload: its lock, set earlier, had run out before the
    holder stopped. It now counts from the acquisition (then from each renewal)."""
    lock = locks(UnreachableOnKeep(), ttl_s=2.0)
    with trio.fail_after(10):
        acquired = trio.current_time()
        holder = await lock.acquire(UID, ask=False)
        await trio.sleep(1.5)  # making the upload, before the body and its keep
        async with lock.kept(holder):
            with holder.interrupt:
                await trio.sleep_forever()
        assert holder.lost
        # Stopped at the keep's first renewal, past half the 2 s from the acquisition; not
        # a second later, half the time from the keep's start.
        assert trio.current_time() - acquired == pytest.approx(1.5 + KEEP_INTERVAL_S)
