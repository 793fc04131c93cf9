"""The per-user index of unfinished resumable uploads, the same rules for both stores (Redis
on a free port, and the in-process one): caps on count and declared bytes, re-reserving
replaces, releasing frees, and entries whose upload state is gone heal away."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from ingester.storage.redis_gateway import RedisGateway
from ingester.tus import store as store_module
from ingester.tus.state import TusUpload
from ingester.tus.store import MemoryTusStore, QuotaRefusal, RedisTusStore, TusStore
from tests.support.redis_server import RedisServer


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


def uid(n: int) -> str:
    return f"{n:032x}"


async def create(store: TusStore, upload_id: str) -> None:
    now = time.time()
    upload = TusUpload(id=upload_id, owner="alice", length=10, created_at=now, expires_at=now + 60)
    assert await store.create(upload)


async def test_caps_on_count_and_bytes(store: TusStore) -> None:
    caps = {"max_uploads": 2, "max_bytes": 100}
    with trio.fail_after(10):
        assert await store.reserve("alice", uid(1), 60, **caps) is None
        assert await store.reserve("alice", uid(2), 41, **caps) is QuotaRefusal.BYTES
        assert await store.reserve("alice", uid(2), 40, **caps) is None
        assert await store.reserve("alice", uid(3), 0, **caps) is QuotaRefusal.UPLOADS
        # Per user.
        assert await store.reserve("bob", uid(3), 100, **caps) is None
        # Re-reserving an id replaces its size (a deferred length declared).
        assert await store.reserve("alice", uid(1), 10, **caps) is None
        assert await store.reserve("alice", uid(1), 61, **caps) is QuotaRefusal.BYTES
        # Released: room again.
        await store.unreserve("alice", uid(2))
        assert await store.reserve("alice", uid(4), 90, **caps) is None
        # 0 means no cap.
        assert await store.reserve("carol", uid(5), 10**12, max_uploads=0, max_bytes=0) is None


async def test_entries_whose_state_is_gone_heal_away(
    store: TusStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    caps = {"max_uploads": 2, "max_bytes": 0}
    with trio.fail_after(10):
        assert await store.reserve("alice", uid(1), 1, **caps) is None
        await create(store, uid(1))
        assert await store.reserve("alice", uid(2), 1, **caps) is None
        # uid(2)'s state was never written (its creation crashed): young, it still counts.
        assert await store.reserve("alice", uid(3), 1, **caps) is QuotaRefusal.UPLOADS
        # Past the grace it is dropped; uid(1), whose state exists, stays counted.
        monkeypatch.setattr(store_module, "RESERVATION_GRACE_S", 0.0)
        assert await store.reserve("alice", uid(3), 1, **caps) is None
        await create(store, uid(3))
        assert await store.reserve("alice", uid(4), 1, **caps) is QuotaRefusal.UPLOADS


async def test_a_stored_upload_s_entry_heals_away_too(
    store: TusStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: a stored upload keeps its `done` state for the result's
    retention (24 h); when its release was missed (a crash after the settle, a Redis blip),
    its entry held the user's quota all that time. Past the grace, a `done` upload no longer
    counts; one still completing does."""
    caps = {"max_uploads": 1, "max_bytes": 0}
    monkeypatch.setattr(store_module, "RESERVATION_GRACE_S", 0.0)
    with trio.fail_after(10):
        now = time.time()
        upload = TusUpload(id=uid(1), owner="alice", length=10, created_at=now, expires_at=now + 60)
        assert await store.reserve("alice", upload.id, 10, **caps) is None
        assert await store.create(upload)
        assert await store.try_lock(upload.id, "token", 6)
        upload.offset = 10
        upload.begin_completion(0)
        assert await store.put(upload, "token")
        # Completing: still counted.
        assert await store.reserve("alice", uid(2), 1, **caps) is QuotaRefusal.UPLOADS
        upload.completed({"file_id": "f"}, now=time.time(), retention_s=86400)
        assert await store.put(upload, "token")
        # Stored, its release missed: the user may start another upload.
        assert await store.reserve("alice", uid(2), 1, **caps) is None
