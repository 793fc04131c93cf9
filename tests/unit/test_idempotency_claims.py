"""An `Idempotency-Key` claim whose reply was lost does not hold the key (no I/O: the
in-process store, failing as Redis does).

A claim that landed with its reply lost answers the upload `503` (the store cannot be
trusted now); left in the store, it would then answer the client's retry `409
IDEMPOTENCY_IN_PROGRESS` until its lease ran out, for an upload nobody runs."""

from __future__ import annotations

import pytest
import trio

from ingester.errors import IdempotencyStoreUnavailable
from ingester.upload.idempotency import Entry, IdempotencyGuard, MemoryIdempotencyStore
from tests.support.lost_replies import fail_as_redis


class FlakyStore(MemoryIdempotencyStore):
    """The next claim fails: having written when `landed` (a reply lost), else refused
    before anything was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False
        self.landed = True
        self.releases = 0

    async def claim(self, key: str, entry: Entry, ttl_s: float) -> Entry | None:
        claim = super().claim
        if self.fail_next:
            self.fail_next = False
            await fail_as_redis(lambda: claim(key, entry, ttl_s), landed=self.landed)
        return await claim(key, entry, ttl_s)

    async def release(self, key: str, owner: str) -> None:
        self.releases += 1
        await super().release(key, owner)


@pytest.mark.parametrize("landed", [True, False])
async def test_a_failed_claim_leaves_the_key_free_for_the_retry(landed: bool) -> None:
    with trio.fail_after(5):
        store = FlakyStore()
        guard = IdempotencyGuard(store, ttl_s=3600, lease_s=30)
        store.fail_next, store.landed = True, landed
        with pytest.raises(IdempotencyStoreUnavailable):
            await guard.claim("k", "request-1")
        # The client's retry runs the upload: no claim of the first request is in the way.
        assert await guard.claim("k", "request-2") is None
        # Nothing to undo when nothing was sent.
        assert store.releases == (1 if landed else 0)
