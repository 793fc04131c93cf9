"""Waiting for state outside the test's control (files on disk, another process), and for
tasks of the test's own to block."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.testing


async def eventually(
    check: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.02
) -> float:
    """Poll `check` until it is true; return the seconds it took. Raises `trio.TooSlowError`."""
    started = trio.current_time()
    with trio.fail_after(timeout_s):
        while True:
            if check():
                return trio.current_time() - started
            await trio.sleep(interval_s)


async def eventually_async(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.05
) -> None:
    """`eventually` for a check that asks another process (a metric, a status)."""
    with trio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await trio.sleep(interval_s)


async def until_still(read: Callable[[], int], *, interval_s: float, samples: int) -> int:
    """Poll `read` until it gives the same value `samples` times in a row; that value (a
    sender that stopped because every buffer on the way is full)."""
    last, same = -1, 0
    while same < samples:
        value = read()
        same = same + 1 if value == last else 0
        last = value
        await trio.sleep(interval_s)
    return last


async def blocked_task(nursery: trio.Nursery, call: Callable[[], Awaitable[object]]) -> trio.Event:
    """`call` started in `nursery` and run until every task is blocked; the event is set
    once it returns (a waiter the test then checks is still waiting, or lets go)."""
    returned = trio.Event()

    async def run() -> None:
        await call()
        returned.set()

    nursery.start_soon(run)
    await trio.testing.wait_all_tasks_blocked()
    return returned
