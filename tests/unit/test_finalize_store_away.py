"""A finalization whose store goes away right after the copy keeps its target (no I/O: an
in-process store that fails as Redis does, a pool that records removals, a mock clock).

The write after the copy (`committed`, or `committing` with an Admin Module) may land with its
reply lost. The move used to remove its target whenever that write could not be confirmed;
had it landed, whoever took the transaction up later would have committed it and deleted the
source: the file on no element. Now the target goes only when the store says another
ingester holds the record (then it said `copying`, and that one rolls back)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from ingester.finalize.finalizer import Finalizer, _Lost
from ingester.finalize.record import SourceFile, Transaction, TxState
from ingester.finalize.store import MemoryFinalizeStore
from ingester.saga.record import Copy
from ingester.settings import Settings
from ingester.storage.pool import ElementPool
from tests.support.lost_replies import fail_as_redis
from tests.support.sagas import Elements

SOURCE = Copy("se-edit", "http://edit")
TARGET = Copy("rw-a", "http://a")


class AwayStore(MemoryFinalizeStore):
    """Once `away`, the first put writes and loses its reply, and every later one finds
    nobody listening. `taken_by` makes the store answer as another owner's record."""

    def __init__(self) -> None:
        super().__init__()
        self.away = False
        self.reply_lost = False
        self.taken_by: str | None = None

    async def put(self, tx: Transaction, *, due: float, retention_s: float) -> bool:
        put = super().put
        if self.taken_by is not None:
            return False
        if self.away:
            landed, self.reply_lost = not self.reply_lost, True
            await fail_as_redis(lambda: put(tx, due=due, retention_s=retention_s), landed=landed)
        return await put(tx, due=due, retention_s=retention_s)


class Pool:
    """What the finalizer asks of the pool on these paths."""

    def __init__(self) -> None:
        self.elements = Elements()

    async def compensate(self, copy: Copy, file_id: str, authorization: str | None) -> bool:
        return await self.elements.compensate(copy, file_id, authorization)

    async def authorization(self, given: str | None) -> str | None:
        return given


def copied(finalizer: Finalizer) -> Transaction:
    """A transaction whose copy to TARGET just finished (saved as `copying`)."""
    tx = Transaction(
        transaction_id="t1",
        file_id="f1",
        owner=finalizer.owner,
        requested_by="alice",
        source=SOURCE,
        file=SourceFile("a.txt", "text/plain", "0" * 64, 10, "d", "1", {}, "alice"),
        created_at=100.0,
        updated_at=100.0,
    )
    tx.move(TxState.COPYING, 101.0)
    tx.sending_to(TARGET)
    return tx


def finalizer_on(store: AwayStore, pool: Pool) -> Finalizer:
    return Finalizer(
        Settings(),
        store=store,
        pool=cast(ElementPool, pool),
        ownership=cast(Any, None),
        metrics=CollectorRegistry(),
        draining=lambda: False,
    )


async def test_the_store_away_after_the_copy_leaves_the_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):  # mock time: the save retries for a whole lease
        store, pool = AwayStore(), Pool()
        finalizer = finalizer_on(store, pool)
        tx = copied(finalizer)
        assert await store.put(tx, due=0.0, retention_s=60.0)
        store.away = True
        # The commit stops the move (the store is away, not another ingester's)...
        with pytest.raises(_Lost) as lost:
            await finalizer._commit(tx)
        assert not lost.value.claimed
        # ... its write in the store, the reply never came: the target must stay, since
        # whoever takes the transaction up deletes the source next.
        stored = await store.get("t1")
        assert stored is not None
        assert stored.state is TxState.COMMITTED
        assert stored.target == TARGET
        assert pool.elements.removed == []


async def test_a_record_another_ingester_holds_gives_the_target_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        store, pool = AwayStore(), Pool()
        finalizer = finalizer_on(store, pool)
        tx = copied(finalizer)
        assert await store.put(tx, due=0.0, retention_s=60.0)
        # Claimed while it said `copying`: the claimant rolls back, and this copy, finished
        # after its removal, would be an orphan.
        store.taken_by = "finalizer-other"
        with pytest.raises(_Lost) as lost:
            await finalizer._commit(tx)
        assert lost.value.claimed
        assert pool.elements.removed == [TARGET]
