"""The Idempotency-Key stores, Redis (a real redis-server on a free port) and in-process: a
claim read back says how long it has left, which becomes `Retry-After` on the 409."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from ingester.storage.redis_gateway import RedisGateway
from ingester.upload.idempotency import (
    Entry,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
)
from tests.support.redis_server import RedisServer


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdempotencyStore]:
    if request.param == "memory":
        yield MemoryIdempotencyStore()
        return
    with RedisServer(tmp_path / "redis") as server:
        gateway = RedisGateway(server.url, timeout_s=2.0)
        redis_store = RedisIdempotencyStore(gateway)
        try:
            yield redis_store
        finally:
            gateway.close()


async def test_a_held_claim_says_how_long_it_has_left(store: IdempotencyStore) -> None:
    with trio.fail_after(10):
        assert await store.claim("k", Entry("running", "first"), ttl_s=30) is None
        held = await store.claim("k", Entry("running", "second"), ttl_s=30)
        assert held is not None
        assert held.owner == "first"
        assert held.ttl_s is not None
        assert 25 < held.ttl_s <= 30
        assert held.retry_after_s(default_s=99) == 30
        # Renewed by its owner: the time left is the whole lease again.
        await store.renew("k", "first", 60)
        renewed = await store.claim("k", Entry("running", "second"), ttl_s=30)
        assert renewed is not None
        assert renewed.ttl_s is not None
        assert renewed.ttl_s > 55


async def test_releasing_a_claim_keeps_a_result_written_meanwhile(
    store: IdempotencyStore,
) -> None:
    # The result was written with the saga's settle, whose reply was lost: the request
    # answers an error and lets its claim go, but a repeat must still find the result.
    with trio.fail_after(10):
        assert await store.claim("k", Entry("running", "first"), ttl_s=30) is None
        done = Entry("done", "first", "fp", {"file_id": "f1"})
        await store.complete("k", done, ttl_s=600)
        await store.release("k", "first")
        read = await store.get("k")
        assert read is not None
        assert (read.state, read.result) == ("done", {"file_id": "f1"})
        assert await store.get("nothing") is None
        kept = await store.claim("k", Entry("running", "second"), ttl_s=30)
        assert kept is not None
        assert (kept.state, kept.result) == ("done", {"file_id": "f1"})
        # A running claim is let go.
        assert await store.claim("j", Entry("running", "first"), ttl_s=30) is None
        await store.release("j", "first")
        assert await store.claim("j", Entry("running", "second"), ttl_s=30) is None


async def test_a_renewal_after_the_result_was_written_keeps_the_result_s_lifetime(
    store: IdempotencyStore,
) -> None:
    """Found by a review: the claim's keeper can renew once more after the saga's settle
    wrote the result (it stops when the request ends, later). The Redis renewal checked
    the owner only, and cut the result's 24 h down to the lease: a retry with the same key
    a minute later stored the file again."""
    with trio.fail_after(10):
        assert await store.claim("k", Entry("running", "first"), ttl_s=30) is None
        await store.complete("k", Entry("done", "first", "fp", {"file_id": "f1"}), ttl_s=86400)
        await store.renew("k", "first", 30)
        kept = await store.claim("k", Entry("running", "second"), ttl_s=30)
        assert kept is not None
        assert (kept.state, kept.result) == ("done", {"file_id": "f1"})
        assert kept.ttl_s is not None
        assert kept.ttl_s > 86000


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert Entry("running", "a", ttl_s=0.2).retry_after_s(default_s=30) == 1
    assert Entry("running", "a", ttl_s=12.1).retry_after_s(default_s=30) == 13
    # Not known (never read back from a store): the lease, the longest a dead owner holds it.
    assert Entry("running", "a").retry_after_s(default_s=30) == 30
