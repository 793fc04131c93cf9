"""A tus lock whose `SET NX` reply was lost does not hold the upload (no I/O: the in-process
store failing as Redis does, behind the same guard as the Redis store).

The request answers `503 TUS_STORE_UNAVAILABLE` (the store cannot be trusted now). A lock set
with its reply lost used to stay for its whole time to live: the client's next `PATCH` found
the upload locked by nobody and waited, then got `423`."""

from __future__ import annotations

import functools

import pytest
import trio

from ingester.tus.errors import TusStoreUnavailable
from ingester.tus.guarded_store import GuardedStore
from ingester.tus.locks import Locks
from ingester.tus.store import MemoryTusStore
from tests.support.lost_replies import fail_as_redis


class FlakyLocks(MemoryTusStore):
    """The next `try_lock` fails: having set the lock when `landed` (its reply lost), else
    refused before anything was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False
        self.landed = True

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        try_lock = super().try_lock
        if self.fail_next:
            self.fail_next = False
            await fail_as_redis(lambda: try_lock(upload_id, token, ttl_s), landed=self.landed)
        return await try_lock(upload_id, token, ttl_s)


@pytest.mark.parametrize("landed", [True, False])
async def test_a_failed_lock_leaves_the_upload_free_for_the_next_request(landed: bool) -> None:
    with trio.fail_after(5):
        store = FlakyLocks()
        locks = Locks(GuardedStore(store), ttl_s=30, wait_s=0, retry_after_s=1)
        store.fail_next, store.landed = True, landed
        with pytest.raises(TusStoreUnavailable):
            await locks.acquire("u1", ask=False)
        # The client's next request gets the lock at once.
        assert await locks.try_acquire("u1") is not None


class SlowLocks(MemoryTusStore):
    """`try_lock` sets the lock, then its reply takes a while (Redis busy): a request that
    goes away meanwhile leaves the call behind, lock set."""

    def __init__(self) -> None:
        super().__init__()
        self.slow = True
        self.set_it = trio.Event()

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        got = await super().try_lock(upload_id, token, ttl_s)
        if self.slow:
            self.slow = False
            self.set_it.set()
            await trio.sleep_forever()
        return got


async def test_a_request_gone_while_its_lock_is_set_leaves_the_upload_free() -> None:
    """Found by a review: the client went away during the lock call, which set the lock
    under a token nobody knew; the upload stayed locked for the lock's time to live."""
    with trio.fail_after(5):
        store = SlowLocks()
        locks = Locks(GuardedStore(store), ttl_s=30, wait_s=0, retry_after_s=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(locks.acquire, "u1", ask=False))
            await store.set_it.wait()
            nursery.cancel_scope.cancel()  # the client goes away
        assert await locks.try_acquire("u1") is not None
