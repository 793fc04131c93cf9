"""The ownership store in Redis (`ingester:owner:<file_id>`), against a real redis-server on a
free port: a record is read back, and lives as long as its file's retention."""

from __future__ import annotations

import trio

from ingester import ownership
from ingester.ownership import DAY_S, Ownership, RedisOwnershipStore
from ingester.storage.redis_gateway import RedisGateway
from tests.support.redis_server import RedisServer

GRACE = 3600.0


async def test_the_redis_store_keeps_a_record_for_its_retention(
    redis_server: RedisServer,
) -> None:
    gateway = RedisGateway(redis_server.url, timeout_s=1.0)
    client = redis_server.client()
    try:
        book = Ownership(RedisOwnershipStore(gateway), grace_s=GRACE)
        with trio.fail_after(10):
            assert await book.record(
                "f1", subject="alice", username="Alice", retention_policy="temporary", ttl_days=2
            )
            assert await book.owner_of("f1") == "alice"
            assert await book.owner_of("f2") is None
        ttl_ms = client.pttl(ownership.KEY_PREFIX + "f1")
        assert 2 * DAY_S * 1000 < ttl_ms <= (2 * DAY_S + GRACE) * 1000
    finally:
        client.close()
        gateway.close()
