"""An upload's result is recorded in the same step as its saga's settle (no I/O: fakes).

The window this closes: a saga settled (the copy kept) and the result for the client's
retries (its `Idempotency-Key` entry, a tus upload's `done` state) written a step later. An
ingester killed between the two, or a Redis failover that lost the second write, left a
stored file no retry knew of, and the retry stored it again (seen in the scale-out chaos).

`AtomicStore` keeps the rules of the Redis scripts (`tests/integration/test_saga_store.py`
runs those against a real redis-server): the record and the result are written together or
not at all, a guard that does not hold refuses both, and a reply can be lost after the write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from ingester.errors import IngesterError, SagaOutcomeUnknown, SagaStoreUnavailable
from ingester.metrics import Metrics
from ingester.resilience.retry import RetryPolicy
from ingester.saga.book import Saga, SagaBook
from ingester.saga.commit import ResultCommit, ResultRefused, ResultUnknown, ResultWrite
from ingester.saga.record import Copy, SagaRecord, SagaState
from ingester.saga.store import MemorySagaStore, StoreUnavailable
from tests.support.sagas import Elements

KEPT = Copy("se-a", "http://127.0.0.1:1")
RESULT = {"file_id": "f1", "checksum": "ab" * 32}


class Refused(IngesterError):
    status = 423
    code = "REFUSED"


class AtomicStore(MemorySagaStore):
    """The in-process store, writing results with the settle as the Redis scripts do."""

    atomic_results = True

    def __init__(self) -> None:
        super().__init__()
        self.strings: dict[str, str] = {}
        # Down: every call fails before it writes. Reply lost: the next settle writes,
        # then fails as if the connection died before its answer came back.
        self.down = False
        self.lose_reply = False

    def _apply(self, result: ResultWrite | None, ours: bool) -> bool:
        if self.down:
            raise StoreUnavailable("down", may_have_run=False)
        if not ours:
            return False
        guard = None if result is None else result.guard
        if guard is not None and self.strings.get(guard[0]) != guard[1]:
            raise ResultRefused("guard")
        return True

    def _done(self, result: ResultWrite | None) -> None:
        if result is not None:
            self.strings[result.key] = result.value
        if self.lose_reply:
            self.lose_reply = False
            raise StoreUnavailable("connection lost before the reply")

    async def put(
        self,
        record: SagaRecord,
        *,
        due: float,
        must_exist: bool,
        result: ResultWrite | None = None,
    ) -> bool:
        current = self._records.get(record.upload_id)
        ours = not (current is None and must_exist) and (
            current is None or current[0] == record.owner
        )
        if not self._apply(result, ours):
            return False
        await super().put(record, due=due, must_exist=must_exist)
        self._done(result)
        return True

    async def delete(
        self, owner: str, upload_id: str, *, result: ResultWrite | None = None
    ) -> bool:
        current = self._records.get(upload_id)
        if not self._apply(result, current is not None and current[0] == owner):
            return False
        await super().delete(owner, upload_id)
        self._done(result)
        return True

    def record(self, upload_id: str) -> SagaRecord | None:
        found = self._records.get(upload_id)
        return None if found is None else SagaRecord.from_json(found[1])


class Commit(ResultCommit):
    """The result under `key` in `store`'s strings; `guard` as the owner's store sets it."""

    def __init__(
        self, store: AtomicStore | None = None, guard: tuple[str, str] | None = None
    ) -> None:
        super().__init__()
        self.store = store
        self.key = "result"
        self.guard = guard
        self.written: list[dict[str, Any]] = []
        self.asked = 0

    def redis_write(self, result: dict[str, Any]) -> ResultWrite | None:
        return ResultWrite(self.key, str(result["file_id"]), 0, guard=self.guard)

    async def write(self, result: dict[str, Any]) -> None:
        self.written.append(result)

    def refusal(self) -> IngesterError:
        return Refused("the lock was lost")

    async def recorded(self, result: dict[str, Any]) -> bool:
        assert self.store is not None
        self.asked += 1
        if self.store.down:
            raise ResultUnknown("down")
        return bool(self.store.strings.get(self.key) == result["file_id"])


class Running:
    """A saga book running in a nursery, with one upload that sent bytes to `KEPT`."""

    def __init__(self, store: MemorySagaStore) -> None:
        self.store = store
        self.elements = Elements()
        self.book = SagaBook(
            store,
            self.elements.remove,
            Metrics(),
            lease_s=30.0,
            janitor_interval_s=10.0,
            backoff=RetryPolicy(),
            compensation_timeout_s=1.0,
        )
        self.saga: Saga


@asynccontextmanager
async def upload_on(store: MemorySagaStore, within_s: float = 5) -> AsyncIterator[Running]:
    """The upload's `receiving` record written (before its first byte), then the test; the
    handler's end (`book.end`) and the book's background work once the test is done."""
    with trio.fail_after(within_s):
        running = Running(store)
        async with trio.open_nursery() as nursery:
            running.book._nursery = nursery
            running.saga = running.book.begin("u1", "f1", user="alice", authorization=None)
            await running.saga.sending_to(KEPT)
            yield running
            running.book.end(running.saga)


async def test_the_result_is_written_in_the_settle() -> None:
    store = AtomicStore()
    commit = Commit(store)
    async with upload_on(store) as up:
        await up.saga.succeeded(KEPT, commit, RESULT)
    assert store.strings == {"result": "f1"}
    assert store.record("u1") is None  # settled: the record went in the same step
    assert commit.applied
    assert commit.written == [], "written a second time, outside the settle"
    assert up.elements.removed == []


async def test_a_guard_that_fails_settles_nothing_and_the_copy_goes() -> None:
    # A tus upload whose lock another replica took meanwhile: that replica stores it.
    store = AtomicStore()
    commit = Commit(store, guard=("lock", "mine"))
    store.strings["lock"] = "someone else"
    async with upload_on(store) as up:
        with pytest.raises(Refused):
            await up.saga.succeeded(KEPT, commit, RESULT)
        left = store.record("u1")
        assert left is not None
        assert left.state is SagaState.RECEIVING
        await up.saga.failed(KEPT)
    assert "result" not in store.strings
    assert not commit.applied
    assert up.elements.removed == [KEPT]
    assert store.record("u1") is None


async def test_a_lost_reply_keeps_the_copy_the_recorded_result_names() -> None:
    # The settle and the result reached Redis; its answer did not (the master died). A
    # retry will read the result, so its file must stay: the result's store is asked first.
    store = AtomicStore()
    commit = Commit(store)
    async with upload_on(store) as up:
        store.lose_reply = True
        with pytest.raises(SagaOutcomeUnknown) as raised:
            await up.saga.succeeded(KEPT, commit, RESULT)
        assert raised.value.code == "SAGA_STORE_UNAVAILABLE"
        await up.saga.failed(KEPT)
    assert commit.asked == 1
    assert store.strings == {"result": "f1"}
    assert up.elements.removed == []
    assert store.record("u1") is None
    assert up.saga.upload_id not in up.book.active


async def test_a_settle_that_never_arrived_removes_the_copy_once_the_store_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The same error, but nothing was written, and the store stays away a while: nothing is
    # removed until it can say the result is not there; then every copy goes.
    store = AtomicStore()
    commit = Commit(store)
    async with upload_on(store, within_s=600) as up:
        store.down = True
        with pytest.raises(SagaOutcomeUnknown):
            await up.saga.succeeded(KEPT, commit, RESULT)
        await up.saga.failed(KEPT)
        up.book.end(up.saga)
        await trio.sleep(30)
        assert commit.asked > 1, "the store was not asked again"
        assert up.elements.removed == [], "a copy was removed before the store answered"
        store.down = False
        # Longer than the backoff's longest wait: the store has been asked again since.
        await trio.sleep(120)
        assert up.saga.upload_id not in up.book.active
    assert up.elements.removed == [KEPT]
    assert store.record("u1") is None
    assert store.strings == {}


async def test_without_a_result_a_lost_reply_fails_the_upload_and_removes_its_copy() -> None:
    # No Idempotency-Key, no tus state: no retry can ever learn of this copy.
    store = AtomicStore()
    async with upload_on(store) as up:
        store.lose_reply = True
        with pytest.raises(SagaStoreUnavailable) as raised:
            await up.saga.succeeded(KEPT)
        assert not isinstance(raised.value, SagaOutcomeUnknown)
        await up.saga.failed(KEPT)
    assert up.elements.removed == [KEPT]


async def test_a_store_without_atomic_results_writes_the_result_after_the_settle() -> None:
    commit = Commit()
    async with upload_on(MemorySagaStore()) as up:
        await up.saga.succeeded(KEPT, commit, RESULT)
    assert commit.written == [RESULT]
    assert commit.applied


async def test_a_record_never_written_gets_its_result_written_on_its_own() -> None:
    # Redis was away for the whole upload: no record to settle, the result is written
    # (or its failure logged) as before.
    store = AtomicStore()
    commit = Commit(store)
    store.down = True
    async with upload_on(store) as up:
        assert not up.saga.written
        await up.saga.succeeded(KEPT, commit, RESULT)
    assert commit.written == [RESULT]
    assert commit.applied
    assert up.elements.removed == []
