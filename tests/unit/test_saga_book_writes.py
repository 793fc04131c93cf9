"""The saga book's writes of one record never overlap (no I/O: an in-memory store).

Found by the Redis failover chaos test: after a store outage the lease keeper writes the
unsynced `receiving` record; if the upload was acknowledged while that write was in flight,
the record landed after the acknowledgement, no one renewed it, and a janitor removed the
acknowledged copy. Now the acknowledgement waits for the write in flight and deletes the
record it wrote.
"""

from __future__ import annotations

import trio
import trio.testing

from ingester.metrics import Metrics
from ingester.resilience.retry import RetryPolicy
from ingester.saga.book import SagaBook
from ingester.saga.commit import ResultWrite
from ingester.saga.record import Copy, SagaRecord
from ingester.saga.store import MemorySagaStore, StoreUnavailable

COPY = Copy("se-a", "http://127.0.0.1:1")


class GatedStore(MemorySagaStore):
    """Down while `down`; with `gate` set, each put waits for it before writing."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.gate: trio.Event | None = None
        self.put_waiting = trio.Event()

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        if self.down:
            raise StoreUnavailable("down")
        if self.gate is not None:
            self.put_waiting.set()
            await self.gate.wait()
        return await super().put(record, due=due, must_exist=must_exist)

    def records(self) -> int:
        return len(self._records)


async def never_compensate(copy: Copy, file_id: str, authorization: str | None) -> bool:
    raise AssertionError("nothing is to be compensated here")


def book_on(store: GatedStore) -> SagaBook:
    return SagaBook(
        store,
        never_compensate,
        Metrics(),
        lease_s=3.0,
        janitor_interval_s=1.0,
        backoff=RetryPolicy(),
        compensation_timeout_s=1.0,
    )


async def test_an_upload_acknowledged_during_a_catch_up_write_leaves_no_record() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        book = book_on(store)
        async with trio.open_nursery() as nursery:
            book._nursery = nursery
            saga = book.begin("u1", "f1", user="alice", authorization=None)
            store.down = True
            await saga.sending_to(COPY)  # the outage: kept in memory, unsynced
            assert store.records() == 0
            assert not saga.synced
            store.down = False
            store.gate = trio.Event()
            nursery.start_soon(book.renew)  # the lease keeper catches up...
            await store.put_waiting.wait()  # ... and its write is in flight
            acknowledged = trio.Event()

            async def acknowledge() -> None:
                await saga.succeeded(COPY)
                book.end(saga)
                acknowledged.set()

            nursery.start_soon(acknowledge)
            await trio.testing.wait_all_tasks_blocked()
            assert not acknowledged.is_set(), "acknowledged with a write of its record in flight"
            store.gate.set()
            await acknowledged.wait()
        # The record the catch-up wrote was deleted by the acknowledgement: no janitor will
        # find a `receiving` record naming the acknowledged copy.
        assert store.records() == 0


async def test_a_record_the_lease_keeper_writes_after_the_upload_ended_is_deleted() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        book = book_on(store)
        async with trio.open_nursery() as nursery:
            book._nursery = nursery
            saga = book.begin("u2", "f2", user="alice", authorization=None)
            store.down = True
            await saga.sending_to(COPY)
            store.down = False
            store.gate = trio.Event()
            nursery.start_soon(book.renew)
            await store.put_waiting.wait()
            # The handler ends with the write in flight (its record, as the book saw it, was
            # never written).
            book.active.pop(saga.upload_id)
            store.gate.set()
        assert store.records() == 0
