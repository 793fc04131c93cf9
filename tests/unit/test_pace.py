"""The minimum body rate: the pure rule (`ClientPace`), and the body that applies it while
the server waits for the client (`RequestBody`), on trio's mock clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.errors import ClientTooSlow
from ingester.http.body import BodyLimits, RequestBody
from ingester.http.pace import ClientPace

# --- the rule ------------------------------------------------------------------------------


def test_the_first_window_is_a_grace_period() -> None:
    pace = ClientPace(min_bytes=100, window_s=10)
    assert pace.deadline() == 10
    pace.waited_for(4)
    pace.arrived(5)
    assert pace.wait_left() == pytest.approx(6)


def test_the_deadline_is_when_the_oldest_needed_bytes_leave_the_window() -> None:
    pace = ClientPace(min_bytes=100, window_s=10)
    pace.arrived(60)  # at 0
    pace.waited_for(3)
    pace.arrived(50)  # at 3: 110 in the window
    assert pace.deadline() == 10  # when the 60 leave, 50 remain
    pace.waited_for(2)
    pace.arrived(100)  # at 5: the 100 alone suffice
    assert pace.deadline() == 15
    pace.waited_for(10)
    assert pace.wait_left() == 0


def test_a_trickle_below_the_rate_runs_out_at_the_end_of_the_first_window() -> None:
    pace = ClientPace(min_bytes=10, window_s=5)
    for _ in range(5):
        pace.waited_for(1)
        pace.arrived(1)
    assert pace.wait_left() <= 0


def test_a_steady_client_at_the_rate_never_runs_out() -> None:
    pace = ClientPace(min_bytes=10, window_s=5)
    for _ in range(1000):
        pace.waited_for(0.5)
        pace.arrived(1)
        assert pace.wait_left() > 0


def test_memory_is_bounded_by_the_bytes_needed() -> None:
    pace = ClientPace(min_bytes=100, window_s=10)
    for _ in range(10_000):
        pace.arrived(1)
    assert len(pace._arrivals) == 100
    pace.arrived(1_000_000)
    assert len(pace._arrivals) == 1


def test_a_zero_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        ClientPace(0, 10)


# --- the body ------------------------------------------------------------------------------


def paced_body(min_bytes: int = 100, window_s: float = 10) -> RequestBody:
    return RequestBody(BodyLimits(min_rate_bytes=min_bytes, min_rate_window_s=window_s))


async def feed(body: RequestBody, piece: bytes, every_s: float, count: int) -> None:
    for _ in range(count):
        await trio.sleep(every_s)
        body.append(piece)
    body.set_complete()


async def read_all(body: RequestBody, pause_s: float = 0.0) -> int:
    total = 0
    async for chunk in body:
        total += len(chunk)
        if pause_s:
            await trio.sleep(pause_s)
    return total


async def test_a_body_trickling_below_the_rate_is_cut_after_the_first_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = paced_body(min_bytes=100, window_s=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, body, b"x", 1.0, 1000)
        started = trio.current_time()
        with pytest.raises(ClientTooSlow) as caught:
            await read_all(body)
        assert trio.current_time() - started == pytest.approx(10)
        assert caught.value.status == 408
        assert caught.value.code == "CLIENT_TOO_SLOW"
        nursery.cancel_scope.cancel()


async def test_time_the_server_does_not_read_is_not_the_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow server (a stalled element, backpressure) reads rarely: the client, which sent
    everything at once, is not cut however long the server takes."""
    body = paced_body(min_bytes=100, window_s=10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, body, b"y" * 50, 0.1, 40)
        assert await read_all(body, pause_s=60) == 2000


async def test_a_stall_after_data_is_cut_a_window_after_the_last_bytes_that_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = paced_body(min_bytes=100, window_s=10)
    body.append(b"z" * 500)
    assert len(await body.__anext__()) == 500
    started = trio.current_time()
    with pytest.raises(ClientTooSlow):
        await body.__anext__()
    assert trio.current_time() - started == pytest.approx(10)


async def test_without_a_minimum_a_trickle_is_read_to_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    body = paced_body(min_bytes=0)
    assert body.pace is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed, body, b"x", 5.0, 30)
        assert await read_all(body) == 30
