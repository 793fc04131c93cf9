"""The two results a saga's settle writes, asked afterwards whether they are there (what
`SagaBook.resolve` does after a settle whose answer was lost). In-process stores, no I/O:
the Redis forms of `get` are covered in tests/integration/test_*_store.py."""

from __future__ import annotations

import time

import trio

from ingester.tus.guarded_store import GuardedStore
from ingester.tus.locks import Lease
from ingester.tus.result import TusResult
from ingester.tus.state import Phase, TusUpload
from ingester.tus.store import MemoryTusStore
from ingester.upload.idempotency import IdempotencyGuard, MemoryIdempotencyStore

RESULT = {"file_id": "f1", "checksum": "ab" * 32, "original_filename": "a.txt"}


async def test_an_idempotency_result_is_recorded_only_with_its_own_file() -> None:
    with trio.fail_after(5):
        guard = IdempotencyGuard(MemoryIdempotencyStore(), ttl_s=600, lease_s=30)
        commit = guard.commit("k", "upload-1", {"upload_id": "shown"})
        assert not await commit.recorded(RESULT)
        await commit.write(RESULT)
        assert await commit.recorded(RESULT)
        assert not await commit.recorded({**RESULT, "file_id": "another"})
        entry = await guard.store.get("k")
        assert entry is not None
        assert entry.result == {**RESULT, "upload_id": "shown"}


async def test_a_tus_result_is_recorded_once_the_state_is_done_with_its_file() -> None:
    with trio.fail_after(5):
        store = MemoryTusStore()
        now = time.time()
        upload = TusUpload(
            id="0" * 32, owner="alice", length=3, created_at=now, expires_at=now + 60
        )
        assert await store.create(upload)
        lease = Lease(upload.id, "token")
        assert await store.try_lock(upload.id, lease.token, 30)
        commit = TusResult(GuardedStore(store), upload, lease, retention_s=600)
        assert not await commit.recorded(RESULT)  # receiving, no result
        await commit.write(RESULT)
        state = await store.get(upload.id)
        assert state is not None
        assert state.phase is Phase.DONE
        assert await commit.recorded(RESULT)
        assert not await commit.recorded({**RESULT, "file_id": "another"})
        # The upload's own state object is left as it was: the completion updates it.
        assert upload.phase is not Phase.DONE
