"""`ElementPool`: which element next, what failures do to breakers and the attempts in flight,
and bounded, shielded compensation. Built from its parts with no service around it; time is
trio's `MockClock`, and the elements are an httpx transport answering in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
import trio.testing

from ingester.errors import StorageElementRejected, StorageElementUnavailable
from ingester.metrics import Metrics
from ingester.resilience.breaker import BreakerBoard, BreakerPolicy, BreakerState
from ingester.resilience.retry import RetryPolicy
from ingester.saga.record import Copy
from ingester.settings import SEMode, Settings
from ingester.storage.client import StorageElementClient
from ingester.storage.pool import ElementPool
from ingester.storage.registry import Registry, configured_elements
from ingester.storage.se_auth import build_se_token_provider

OPEN_S = 5.0
COMPENSATION_TIMEOUT_S = 10.0

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


async def _not_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no element call expected, got {request.method} {request.url}")


@asynccontextmanager
async def pool_of(
    handler: Handler = _not_called, *, threshold: int = 2
) -> AsyncIterator[ElementPool]:
    """A pool of three edit elements (se-a preferred, then se-b, se-c); its HTTP client is
    closed on the way out."""
    elements = [
        {"id": name, "api_url": f"http://127.0.0.1:{port}", "mode": "edit", "priority": port}
        for name, port in (("se-a", 1), ("se-b", 2), ("se-c", 3))
    ]
    settings = Settings(storage_elements=json.dumps(elements))  # type: ignore[arg-type]
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = StorageElementClient(
        http,
        stall_timeout_s=30,
        response_timeout_s=30,
        connect_timeout_s=5,
        probe_timeout_s=5,
    )
    yield ElementPool(
        Registry(configured_elements(settings.storage_elements)),
        BreakerBoard(
            BreakerPolicy(
                failure_threshold=threshold,
                open_base_s=OPEN_S,
                open_max_s=4 * OPEN_S,
                max_ejected_share=0.5,
            )
        ),
        client,
        build_se_token_provider(settings, http),
        Metrics(),
        retry_policy=RetryPolicy(base_s=0.1, cap_s=1.0, max_attempts=3),
        retry_budget_ratio=0.2,
        compensation_timeout_s=COMPENSATION_TIMEOUT_S,
    )
    await http.aclose()


class Attempt:
    """What the pool sees of an upload's element attempt: `trip` cancels its scope."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.tripped = False

    def trip(self) -> None:
        self.tripped = True
        self.scope.cancel()


def cancelled(attempt: Attempt) -> bool:
    """Tripped, and its scope cancelled (the attempt ends, the upload fails over)."""
    return attempt.tripped and attempt.scope.cancel_called


def down(element_id: str) -> StorageElementUnavailable:
    return StorageElementUnavailable(f"{element_id}: cannot connect", element_id=element_id)


def next_id(pool: ElementPool, tried: tuple[str, ...] = ()) -> str | None:
    element = pool.next_element(SEMode.EDIT, None, tried)
    return None if element is None else element.id


def chosen(pool: ElementPool) -> str | None:
    """What the compression decision peeks at: the first choice, no trial taken."""
    element = pool.first_choice(SEMode.EDIT, None)
    return None if element is None else element.id


async def test_the_trip_cancels_attempts_on_that_element_only() -> None:
    with trio.fail_after(5):
        async with pool_of() as pool:
            on_a, also_on_a, on_b = Attempt(), Attempt(), Attempt()
            with (
                pool.attempt("se-a", on_a),
                pool.attempt("se-a", also_on_a),
                pool.attempt("se-b", on_b),
            ):
                pool.note_failure("se-a", down("se-a"))
                # One failure under the threshold of 2: nothing cancelled yet.
                assert not cancelled(on_a)
                pool.note_failure("se-a", down("se-a"))
            assert cancelled(on_a)
            assert cancelled(also_on_a)
            assert not on_b.tripped
            assert not on_b.scope.cancel_called
            # The attempts left the pool with their blocks.
            assert pool.in_flight("se-a") == pool.in_flight("se-b") == 0


async def test_an_attempt_that_ended_is_not_tripped_later() -> None:
    with trio.fail_after(5):
        async with pool_of(threshold=1) as pool:
            ended = Attempt()
            with pool.attempt("se-a", ended):
                pass
            pool.note_failure("se-a", down("se-a"))
            assert not ended.tripped


async def test_errors_that_say_nothing_about_the_element_never_trip() -> None:
    with trio.fail_after(5):
        async with pool_of() as pool:
            attempt = Attempt()
            refused = StorageElementRejected(
                "se-a answered 400", element_id="se-a", retryable=False
            )
            with pool.attempt("se-a", attempt):
                for _ in range(5):
                    pool.note_failure("se-a", refused)
            assert not attempt.tripped
            assert next_id(pool) == "se-a"


@pytest.mark.parametrize("first", ["se-a", "se-b"])
async def test_the_ejection_cap_keeps_a_second_element_in(first: str) -> None:
    # Three elements, at most half ejected: one may open, a second may not, so the uploads on
    # the second keep going rather than all failing over to the last one.
    with trio.fail_after(5):
        async with pool_of() as pool:
            second = "se-b" if first == "se-a" else "se-a"
            on_first, on_second = Attempt(), Attempt()
            with pool.attempt(first, on_first), pool.attempt(second, on_second):
                for element_id in (first, first, second, second):
                    pool.note_failure(element_id, down(element_id))
            assert on_first.tripped
            assert not on_second.tripped


async def test_choice_follows_priority_then_skips_an_open_breaker_until_its_trial(
    mock_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        async with pool_of() as pool:
            assert next_id(pool) == "se-a"
            assert next_id(pool, ("se-a",)) == "se-b"
            pool.note_failure("se-a", down("se-a"))
            pool.note_failure("se-a", down("se-a"))
            # Open: the next upload goes to the second choice, and so does the one after it.
            assert next_id(pool) == "se-b"
            mock_clock.jump(OPEN_S - 0.1)
            assert next_id(pool) == "se-b"
            mock_clock.jump(0.2)
            # Half open: one trial request is let through, not two at once.
            assert (
                pool.breakers.breaker("se-a").state(trio.current_time()) is BreakerState.HALF_OPEN
            )
            assert next_id(pool) == "se-a"
            assert next_id(pool) == "se-b"
            pool.note_success("se-a")
            assert next_id(pool) == "se-a"


async def test_the_first_choice_takes_no_trial(mock_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(5):
        async with pool_of() as pool:
            pool.note_failure("se-a", down("se-a"))
            pool.note_failure("se-a", down("se-a"))
            assert chosen(pool) == "se-b"
            mock_clock.jump(OPEN_S + 0.1)
            # Half open: peeking (the compression decision) names it twice and takes nothing...
            for _ in range(2):
                assert chosen(pool) == "se-a"
            # ...so the trial is still there for the upload itself.
            assert next_id(pool) == "se-a"


async def test_compensation_asks_the_element_and_reports_gone() -> None:
    calls: list[str] = []

    async def element(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.method} {request.url.path}")
        return httpx.Response(204)

    with trio.fail_after(5):
        async with pool_of(element) as pool:
            assert await pool.compensate(Copy("se-b", "http://127.0.0.1:2"), "f-1", None)
            assert calls == ["DELETE /api/v1/gc/f-1"]


async def test_a_hanging_element_costs_one_compensation_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    asked = trio.Event()

    async def hangs(request: httpx.Request) -> httpx.Response:
        asked.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    with trio.fail_after(10 * COMPENSATION_TIMEOUT_S):
        async with pool_of(hangs) as pool:
            start = trio.current_time()
            gone = await pool.compensate(Copy("se-a", "http://127.0.0.1:1"), "f-1", None)
            assert asked.is_set()
            assert gone is False
            assert trio.current_time() - start == pytest.approx(COMPENSATION_TIMEOUT_S)


async def test_compensation_outlives_the_cancellation_of_its_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(3)
        return httpx.Response(204)

    with trio.fail_after(10 * COMPENSATION_TIMEOUT_S):
        async with pool_of(slow) as pool:
            start = trio.current_time()
            outcome: list[bool] = []
            with trio.move_on_after(1) as caller:
                outcome.append(await pool.compensate(Copy("se-a", "http://127.0.0.1:1"), "f", None))
            # The caller's deadline passed meanwhile, yet the removal finished and said so.
            assert caller.cancel_called
            assert outcome == [True]
            assert trio.current_time() - start == pytest.approx(3)


async def test_retry_budgets_are_per_element_and_kept() -> None:
    with trio.fail_after(5):
        async with pool_of() as pool:
            assert pool.retry_budget("se-a") is pool.retry_budget("se-a")
            assert pool.retry_budget("se-a") is not pool.retry_budget("se-b")
