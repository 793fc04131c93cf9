"""The Redis finalize store on a real redis-server (a free port): what it keeps over time.

The store's rules (lock, lease, claim) are the in-process store's too
(tests/unit/test_finalize_record.py) and are exercised with real ingesters in
tests/chaos/test_finalize_chaos.py; this module checks what only Redis has."""

from __future__ import annotations

import time
from pathlib import Path

import trio

from ingester.finalize.record import SourceFile, Transaction, TxState
from ingester.finalize.store import INDEX_KEY, TX_PREFIX, RedisFinalizeStore
from ingester.saga.record import Copy
from ingester.storage.redis_gateway import RedisGateway
from tests.support.redis_server import RedisServer

RETENTION_S = 3600.0


def move(tx_id: str, created_at: float) -> Transaction:
    return Transaction(
        transaction_id=tx_id,
        file_id="f-" + tx_id,
        owner="one",
        requested_by="alice",
        source=Copy("se-edit", "http://127.0.0.1:1"),
        file=SourceFile("a.txt", "text/plain", "0" * 64, 1),
        created_at=created_at,
        updated_at=created_at,
    )


async def test_the_list_index_forgets_what_is_past_the_retention(tmp_path: Path) -> None:
    """Every transaction went into `ingester:finalize:index` and only `recent()` took any
    out, among the newest it read: the index grew by every move ever made. Each create now
    trims what was created more than the retention ago."""
    now = time.time()
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=2.0)
        client = server.client()
        store = RedisFinalizeStore(gateway)
        try:
            with trio.fail_after(20):
                # A move done half a retention ago, then one past the retention (written late:
                # its create trims nothing newer than itself).
                for tx_id, age_s in (("recent", RETENTION_S / 2), ("old", 3 * RETENTION_S)):
                    done = move(tx_id, now - age_s)
                    created = await store.create(done, due=now + 30, retention_s=RETENTION_S)
                    assert created is None
                    done.move(TxState.COPYING, done.created_at)
                    done.fail("X", "why", done.created_at)
                    done.move(TxState.ROLLED_BACK, done.created_at)
                    assert await store.put(done, due=now + 30, retention_s=RETENTION_S)
                assert client.zcard(INDEX_KEY) == 2
                created = await store.create(
                    move("new", now), due=now + 30, retention_s=RETENTION_S
                )
                assert created is None
                assert sorted(client.zrange(INDEX_KEY, 0, -1)) == [b"new", b"recent"]
                # The admin list shows what is kept; the hashes expire on their own.
                assert [t.transaction_id for t in await store.recent(10)] == ["new", "recent"]
                assert client.ttl(TX_PREFIX + "recent") > 0
        finally:
            client.close()
            gateway.close()
