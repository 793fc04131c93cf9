"""The process-wide memory budget: waits when spent, never deadlocks on an oversized ask."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.upload.budget import MemoryBudget, UploadBudget


async def test_acquire_waits_until_released() -> None:
    budget = MemoryBudget(100)
    with trio.fail_after(2):
        await budget.acquire(60)
        got = trio.Event()

        async def second() -> None:
            await budget.acquire(60)
            got.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not got.is_set()
            budget.release(60)
            await got.wait()
        assert budget.used == 60


async def test_oversized_request_passes_when_nothing_else_holds() -> None:
    budget = MemoryBudget(10)
    with trio.fail_after(1):
        await budget.acquire(50)
    assert budget.used == 50


async def test_upload_share_returns_everything_it_held() -> None:
    budget = MemoryBudget(100)
    share = UploadBudget(budget)
    with trio.fail_after(1):
        await share.acquire(30)
        await share.acquire(20)
    share.release(10)
    assert (budget.used, share.held) == (40, 40)
    share.release(1000)  # never more than held
    assert (budget.used, share.held) == (0, 0)
    share.release_all()
    assert budget.used == 0


def test_releasing_more_than_acquired_is_a_bug() -> None:
    budget = MemoryBudget(10)
    with pytest.raises(AssertionError):
        budget.release(1)


async def test_negative_or_zero_release_changes_nothing() -> None:
    budget = MemoryBudget(100)
    share = UploadBudget(budget)
    with trio.fail_after(1):
        await share.acquire(10)
    share.release(-5)
    share.release(0)
    assert (budget.used, share.held) == (10, 10)
