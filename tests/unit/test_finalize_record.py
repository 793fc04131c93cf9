"""Finalization transactions: the state machine, the wire format, the in-process store's rules
(the Redis store runs the same rules in Lua, exercised by tests/chaos/test_finalize_chaos.py)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from ingester.finalize.finalizer import multipart_parts
from ingester.finalize.record import (
    TERMINAL,
    InvalidTransition,
    SourceFile,
    Transaction,
    TxState,
)
from ingester.finalize.store import MemoryFinalizeStore
from ingester.saga.record import Copy

SOURCE = Copy("se-edit", "http://edit")
A = Copy("rw-a", "http://a")
B = Copy("rw-b", "http://b")


def tx(tx_id: str = "t1", file_id: str = "f1", owner: str = "me") -> Transaction:
    return Transaction(
        transaction_id=tx_id,
        file_id=file_id,
        owner=owner,
        requested_by="alice",
        source=SOURCE,
        file=SourceFile("a b.txt", "text/plain", "0" * 64, 10, "d", "1", {"k": [1]}, "alice"),
        created_at=100.0,
        updated_at=100.0,
    )


HAPPY = [TxState.COPYING, TxState.COMMITTING, TxState.COMMITTED, TxState.DONE]


def test_happy_path_and_history() -> None:
    t = tx()
    for i, state in enumerate(HAPPY):
        t.move(state, 101.0 + i)
    assert t.state is TxState.DONE
    assert t.terminal
    assert [s for s, _ in t.history] == [s.value for s in HAPPY]


@pytest.mark.parametrize("start", [TxState.PENDING, TxState.COPYING, TxState.COMMITTING])
def test_before_commit_can_roll_back(start: TxState) -> None:
    t = tx()
    for state in HAPPY[: HAPPY.index(start) + 1] if start is not TxState.PENDING else []:
        t.move(state, 1.0)
    t.fail("X", "why", 2.0)
    t.move(TxState.ROLLED_BACK, 3.0)
    assert t.error_code == "X"
    assert t.terminal


def test_committed_never_rolls_back_and_terminal_states_stay() -> None:
    t = tx()
    for state in HAPPY[:3]:
        t.move(state, 1.0)
    with pytest.raises(InvalidTransition):
        t.move(TxState.ROLLING_BACK, 2.0)
    for terminal, target in itertools.product(TERMINAL, TxState):
        done = tx()
        done.state = terminal
        with pytest.raises(InvalidTransition):
            done.move(target, 3.0)


def test_abandoned_copies_follow_the_commit() -> None:
    t = tx()
    t.move(TxState.COPYING, 1.0)
    t.sending_to(A)
    t.sending_to(B)
    t.sending_to(B)
    assert t.copies == [A, B]
    assert t.target == B
    assert t.abandoned() == [A, B]  # before the commit everything goes
    t.move(TxState.COMMITTED, 2.0)
    assert t.abandoned() == [A]


def test_wire_format_round_trip() -> None:
    t = tx()
    t.move(TxState.COPYING, 1.0)
    t.sending_to(A)
    t.authorization = "Bearer x"
    t.landing.note(A, 1700000600.0)
    back = Transaction.from_json(t.to_json())
    assert back == t
    with pytest.raises(ValueError, match="not a finalization record"):
        Transaction.from_json('{"transaction_id": "x"}')


def test_public_view_names_the_location_only_once_committed() -> None:
    t = tx()
    t.move(TxState.COPYING, 1.0)
    t.sending_to(A)
    assert t.public()["storage_element_id"] is None
    t.move(TxState.COMMITTED, 2.0)
    view = t.public()
    assert view["storage_element_id"] == "rw-a"
    assert view["download_url"] == "http://a/api/v1/files/f1/download"
    assert "authorization" not in view


def test_the_target_form_carries_the_source_facts() -> None:
    head, tail = multipart_parts("BND", "f1", tx().file)
    text = head.decode()
    assert 'name="file_id"\r\n\r\nf1\r\n' in text
    assert 'name="retention_policy"\r\n\r\npermanent\r\n' in text
    assert 'name="metadata"\r\n\r\n{"k": [1]}\r\n' in text
    assert 'filename="a b.txt"' in text
    assert text.endswith("Content-Type: text/plain\r\n\r\n")
    assert tail == b"\r\n--BND--\r\n"


async def test_memory_store_lock_lease_and_release() -> None:
    store = MemoryFinalizeStore()
    with trio.fail_after(5):
        first = tx("t1")
        assert await store.create(first, due=200.0, retention_s=60) is None
        assert await store.create(tx("t2"), due=200.0, retention_s=60) == "t1"  # the file is taken
        # Someone else cannot write it; a claim after the lease makes it theirs.
        assert not await store.put(tx("t1", owner="other"), due=300.0, retention_s=60)
        assert await store.claim_due("other", now=150.0, due=400.0, limit=10) == []
        claimed = await store.claim_due("other", now=250.0, due=400.0, limit=10)
        assert [Transaction.from_json(raw).transaction_id for raw in claimed] == ["t1"]
        assert await store.renew("me", ["t1"], due=500.0) == ["t1"]
        assert not await store.put(first, due=500.0, retention_s=60)
        # Rolled back: the lock goes, the record stays readable.
        mine = tx("t1", owner="other")
        mine.fail("X", "why", 260.0)
        mine.move(TxState.ROLLED_BACK, 261.0)
        assert await store.put(mine, due=500.0, retention_s=60)
        assert await store.claim_due("other", now=1000.0, due=2000.0, limit=10) == []
        later = tx("t3")
        later.created_at = 300.0
        assert await store.create(later, due=2000.0, retention_s=60) is None
        got = await store.get("t1")
        assert got is not None
        assert got.state is TxState.ROLLED_BACK
        assert [t.transaction_id for t in await store.recent(10)] == ["t3", "t1"]
        # Finished records expire after their retention.
        later.created_at = 400.0
        later.transaction_id, later.file_id = "t4", "f4"
        assert await store.create(later, due=2000.0, retention_s=60) is None
        assert await store.get("t1") is None


class _Scans(dict[str, Any]):
    """A dict that counts the times it is walked whole."""

    scans = 0

    def __iter__(self) -> Iterator[str]:
        self.scans += 1
        return super().__iter__()

    def items(self) -> Any:
        self.scans += 1
        return super().items()

    def values(self) -> Any:
        self.scans += 1
        return super().values()

    def keys(self) -> Any:
        self.scans += 1
        return super().keys()


async def test_memory_store_expiry_of_a_burst_does_not_hold_the_loop() -> None:
    """10,000 moves that finished together expire in the next create. Each expiry used to
    scan every file lock (1.35 s of the event loop for this burst, quadratic in it); now it
    is a look-up, and nothing is walked whole."""
    store = MemoryFinalizeStore()
    burst = 2_000
    with trio.fail_after(60):
        for i in range(burst):
            finished = tx(f"t{i}", f"f{i}")
            assert await store.create(finished, due=200.0, retention_s=60) is None
            finished.fail("X", "why", 100.0)
            finished.move(TxState.ROLLED_BACK, 100.0)
            finished.state = TxState.DONE  # a done transaction keeps its lock until it expires
            assert await store.put(finished, due=200.0, retention_s=60)
        assert (
            await store.create(tx("late", "f0"), due=200.0, retention_s=60) == "t0"
        )  # still locked
        later = tx("next", "f-next")
        later.created_at = 1000.0
        locks = store._files = _Scans(store._files)
        records = store._records = _Scans(store._records)
        assert await store.create(later, due=2000.0, retention_s=60) is None
        assert (locks.scans, records.scans) == (0, 0)
        # Every lock went with its transaction: each file may be finalized again.
        again = tx("again", "f0")
        again.created_at = 1001.0
        assert await store.create(again, due=2000.0, retention_s=60) is None
        assert await store.get(f"t{burst - 1}") is None
        assert [t.transaction_id for t in await store.recent(5)] == ["again", "next"]
