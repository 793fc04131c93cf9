"""The saga book's writes of one record never overlap, and a write whose reply was lost is
not taken for one that never happened (no I/O: an in-memory store).

Found by the Redis failover chaos test: after a store outage the lease keeper writes the
unsynced `receiving` record; if the upload was acknowledged while that write was in flight,
the record landed after the acknowledgement, no one renewed it, and a janitor removed the
acknowledged copy. Now the acknowledgement waits for the write in flight and deletes the
record it wrote.

Found by the Sentinel failover test (one run in twenty): a `receiving` record written as the
master changed landed, but its reply was lost; the book took it for never written, the
acknowledgement deleted nothing, and 15 s later the janitor removed the acknowledged file.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from ingester.errors import SagaStoreUnavailable, SagaTakenOver
from ingester.metrics import Metrics
from ingester.resilience.retry import RetryPolicy
from ingester.saga.book import CLOCK_MARGIN_S, Saga, SagaBook
from ingester.saga.commit import ResultWrite
from ingester.saga.record import Copy, Removal, SagaRecord
from ingester.saga.store import MemorySagaStore, StoreUnavailable
from tests.support.lost_replies import fail_as_redis
from tests.support.sagas import Elements

COPY = Copy("se-a", "http://127.0.0.1:1")


class GatedStore(MemorySagaStore):
    """Down (never reached) while `down`; with `gate` set, each put waits for it before
    writing. `lost_replies` puts fail as a reply that timed out does: having written when
    `landed`, else not (the command was lost on the way), the same error either way."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.gate: trio.Event | None = None
        self.put_waiting = trio.Event()
        self.lost_replies = 0
        self.landed = True

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        if self.down:
            raise StoreUnavailable("down", may_have_run=False)
        if self.gate is not None:
            self.put_waiting.set()
            await self.gate.wait()
        put = super().put
        if self.lost_replies:
            self.lost_replies -= 1
            await fail_as_redis(
                lambda: put(record, due=due, must_exist=must_exist), landed=self.landed
            )
        return await put(record, due=due, must_exist=must_exist)

    def records(self) -> int:
        return len(self._records)


async def never_compensate(copy: Copy, file_id: str, authorization: str | None) -> Removal | None:
    raise AssertionError("nothing is to be compensated here")


@asynccontextmanager
async def one_saga(
    store: GatedStore, *, lease_s: float = 3.0, elements: Elements | None = None
) -> AsyncIterator[tuple[SagaBook, Saga, trio.Nursery]]:
    """A book over `store` running in a nursery (its background tasks end with the block),
    and one upload's saga."""
    book = SagaBook(
        store,
        never_compensate if elements is None else elements.remove,
        Metrics(),
        lease_s=lease_s,
        janitor_interval_s=1.0,
        backoff=RetryPolicy(),
        compensation_timeout_s=1.0,
    )
    async with trio.open_nursery() as nursery:
        book._nursery = nursery
        yield book, book.begin("u1", "f1", user="alice", authorization=None), nursery


async def janitor_finds(store: GatedStore) -> list[SagaRecord]:
    """What any replica's janitor claims once every lease has run out."""
    later = time.time() + 3600
    return await store.claim_due("another-replica", now=later, due=later + 3, limit=10)


async def test_an_upload_acknowledged_during_a_catch_up_write_leaves_no_record() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        async with one_saga(store) as (book, saga, nursery):
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
        async with one_saga(store) as (book, saga, nursery):
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


async def test_a_record_whose_write_lost_its_reply_goes_when_the_upload_is_acknowledged() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        async with one_saga(store) as (book, saga, _):
            store.lost_replies = 1
            await saga.sending_to(COPY)  # landed, but the book was not told
            assert store.records() == 1
            await saga.succeeded(COPY)
            book.end(saga)
        # Nothing is left for a janitor to undo the acknowledged copy with.
        assert store.records() == 0
        assert await janitor_finds(store) == []


async def test_a_write_lost_on_the_way_does_not_make_the_upload_look_taken_over() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        async with one_saga(store) as (book, saga, _):
            store.lost_replies, store.landed = 1, False
            await saga.sending_to(COPY)
            assert store.records() == 0
            # The settle finds no record: before its due time nobody could have claimed
            # one, so none was written, and the upload is acknowledged.
            await saga.succeeded(COPY)
            book.end(saga)
        assert store.records() == 0


async def test_an_unconfirmed_record_whose_lease_ran_out_fails_the_upload_cleanly() -> None:
    with trio.fail_after(5):
        store = GatedStore()
        elements = Elements()
        # A lease shorter than the clock margin: due as soon as it is written.
        async with one_saga(store, lease_s=CLOCK_MARGIN_S / 2, elements=elements) as (
            book,
            saga,
            _,
        ):
            store.lost_replies = 1
            await saga.sending_to(COPY)
            # Another replica may be undoing it right now: not acknowledged...
            with pytest.raises(SagaStoreUnavailable):
                await saga.succeeded(COPY)
            # ... but failed, its copy removed and its record gone.
            await saga.failed(COPY)
            book.end(saga)
        assert elements.removed == [COPY]
        assert store.records() == 0


async def test_a_record_undone_by_another_replica_is_not_written_back_and_not_acknowledged() -> (
    None
):
    """Found by a review. Cut off from the store past its lease, this process could not
    write its record (unsynced); another replica's janitor claimed it, removed the copy and
    deleted it. With the store back, the lease keeper's catch-up wrote the record again as
    this process's, the renewal found it ours, and the upload was acknowledged on the copy
    that had been removed. A record once written must still be there to be written; gone,
    the saga is lost: never acknowledged, its own copies still removed."""
    with trio.fail_after(5):
        store = GatedStore()
        elements = Elements()
        async with one_saga(store, elements=elements) as (book, saga, _):
            await saga.sending_to(COPY)
            store.down = True
            await saga.stored()  # kept in memory, unsynced
            assert not saga.synced
            # Another replica's janitor undoes the upload: the copy goes, then the record.
            (claimed,) = await janitor_finds(store)
            assert await store.delete("another-replica", claimed.upload_id)
            store.down = False
            await book.renew()  # catch-up, then renewal
            assert store.records() == 0, "the record of an undone upload was written back"
            assert saga.lost
            with pytest.raises(SagaTakenOver):
                await saga.succeeded(COPY)
            await saga.failed(COPY)
            book.end(saga)
            await trio.testing.wait_all_tasks_blocked()
        assert elements.removed == [COPY]
        assert store.records() == 0
