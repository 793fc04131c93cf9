"""The ingester's own record of who uploaded a file: retention, the in-process store's bound
and expiry, and a store that is away. In memory (the Redis store, against a real
redis-server: `tests/integration/test_ownership_store.py`)."""

from __future__ import annotations

import pytest
import trio

from ingester import ownership
from ingester.ownership import (
    DAY_S,
    MemoryOwnershipStore,
    Owner,
    Ownership,
    OwnershipUnavailable,
    retention_s,
)

GRACE = 3600.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr("ingester.ownership.time.time", clock)
    return clock


def test_retention_follows_the_file_s_own() -> None:
    assert retention_s("temporary", 30, GRACE) == 30 * DAY_S + GRACE
    assert retention_s("temporary", None, GRACE) == GRACE
    assert retention_s("permanent", None, GRACE) == GRACE


async def test_a_record_is_read_back_until_it_expires(clock: Clock) -> None:
    book = Ownership(MemoryOwnershipStore(10), grace_s=GRACE)
    assert await book.record(
        "f1", subject="alice", username="Alice", retention_policy="temporary", ttl_days=1
    )
    assert await book.owner_of("f1") == "alice"
    assert await book.owner_of("f2") is None
    clock.now += DAY_S + GRACE - 1
    assert await book.owner_of("f1") == "alice"
    clock.now += 2
    assert await book.owner_of("f1") is None


async def test_the_in_process_store_keeps_at_most_its_bound_soonest_expiry_first(
    clock: Clock,
) -> None:
    store = MemoryOwnershipStore(3)
    for n, ttl in enumerate([50.0, 10.0, 40.0, 30.0, 20.0]):
        await store.put(f"f{n}", Owner(f"u{n}", f"u{n}", "temporary", clock.now), ttl_s=ttl)
        assert len(store) <= 3
    kept = {f"f{n}" for n in range(5) if await store.get(f"f{n}") is not None}
    # f1 (10 s) went first, then f4 (20 s): the ones with the most time left stay.
    assert kept == {"f0", "f2", "f3"}
    # Rewriting one record many times leaves no stale entries piling up.
    for _ in range(1000):
        await store.put("f0", Owner("u0", "u0", "temporary", clock.now), ttl_s=50.0)
    assert len(store._expiry) < 100


class AwayStore:
    async def put(self, file_id: str, owner: Owner, *, ttl_s: float) -> None:
        raise OwnershipUnavailable("connection refused")

    async def get(self, file_id: str) -> Owner | None:
        raise OwnershipUnavailable("connection refused")


class HangingStore:
    async def put(self, file_id: str, owner: Owner, *, ttl_s: float) -> None:
        await trio.sleep_forever()

    async def get(self, file_id: str) -> Owner | None:
        await trio.sleep_forever()
        raise AssertionError


@pytest.mark.parametrize("store", [AwayStore(), HangingStore()])
async def test_a_store_that_is_away_is_logged_and_nothing_more(
    store: AwayStore | HangingStore,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    book = Ownership(store, grace_s=GRACE)
    with trio.fail_after(ownership.CALL_TIMEOUT_S * 3):
        assert not await book.record(
            "f1", subject="alice", username="alice", retention_policy="temporary", ttl_days=1
        )
        assert await book.owner_of("f1") is None
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events == ["ownership_unrecorded", "ownership_unreadable"]
