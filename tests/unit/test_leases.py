"""The lease keeper, the janitor and `retry` (`ingester.resilience.leases`), with a fake store.

Rules: no I/O and no real sleeps. Time is trio's `MockClock` (`mock_clock`: the test moves
it; `autojump_clock`: it jumps whenever every task waits), and the wall clock the due times
come from is the same clock, so every time asserted is exact. Every test runs under
`trio.fail_after`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from ingester.resilience.leases import (
    MIN_WAIT_S,
    STORE_CALL_TIMEOUT_S,
    Leases,
    Reachability,
    TryAgain,
    retry,
)
from ingester.resilience.retry import RetryPolicy, backoff_s

log = logging.getLogger(__name__)

LEASE_S = 3.0
JANITOR_S = 2.0


class Unavailable(Exception):
    """The fake store's "cannot reach it"."""


class FakeStore:
    """What the loops ask, when, and with which due time. `away`: every call fails at once;
    `hang`: every call waits forever (a store that does not answer)."""

    def __init__(self) -> None:
        self.renewals: list[tuple[float, list[str], float]] = []
        self.claims: list[tuple[float, float]] = []
        self.not_ours: set[str] = set()
        self.expired: list[str] = []
        self.away = False
        self.hang = False

    async def _answer(self) -> None:
        if self.hang:
            await trio.sleep_forever()
        if self.away:
            raise Unavailable("connection refused")

    async def renew(self, ids: list[str], due: float) -> list[str]:
        await self._answer()
        self.renewals.append((trio.current_time(), ids, due))
        return [i for i in ids if i in self.not_ours]

    async def claim(self, now: float, due: float) -> list[str]:
        await self._answer()
        self.claims.append((now, due))
        claimed, self.expired = self.expired, []
        return claimed


class Held:
    """This process's records, and what the loops told it."""

    def __init__(self, *ids: str) -> None:
        self.ids = list(ids)
        self.lost: list[str] = []
        self.taken: list[str] = []

    def leases_on(
        self, store: FakeStore, catch_up: Callable[[], Awaitable[None]] | None = None
    ) -> Leases[str]:
        return Leases[str](
            Reachability(
                log,
                Unavailable,
                away="test store unreachable (%s)",
                away_event="test_store_down",
                back="test store reachable again",
                back_event="test_store_up",
            ),
            lease_s=LEASE_S,
            janitor_interval_s=JANITOR_S,
            held=lambda: list(self.ids),
            renew=store.renew,
            lost=self.lost.append,
            claim=store.claim,
            take=self.taken.append,
            catch_up=catch_up,
            wall=trio.current_time,
        )


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, str]]:
    return [(r.levelno, getattr(r, "event", ""), r.getMessage()) for r in caplog.records]


# --- the lease keeper --------------------------------------------------------------------------


async def test_leases_are_renewed_every_third_of_the_lease(
    mock_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        store = FakeStore()
        held = Held("a", "b")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(held.leases_on(store).keep)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(LEASE_S / 3 - 0.25)
            await trio.testing.wait_all_tasks_blocked()
            assert store.renewals == [], "renewed before a third of the lease"
            mock_clock.jump(0.25)
            await trio.testing.wait_all_tasks_blocked()
            held.ids.append("c")
            mock_clock.jump(LEASE_S / 3)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        third = LEASE_S / 3
        assert [(round(t, 6), ids, round(due, 6)) for t, ids, due in store.renewals] == [
            (round(third, 6), ["a", "b"], round(third + LEASE_S, 6)),
            (round(2 * third, 6), ["a", "b", "c"], round(2 * third + LEASE_S, 6)),
        ]


async def test_nothing_held_asks_nothing(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        store = FakeStore()
        store.away = True  # would be logged, were it asked
        held = Held()
        with trio.move_on_after(10 * LEASE_S):
            await held.leases_on(store).keep()
        assert store.renewals == []


async def test_a_lost_lease_is_reported_once_per_renewal_that_finds_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        store = FakeStore()
        store.not_ours = {"b"}
        held = Held("a", "b")
        leases = held.leases_on(store)
        await leases.renew()
        assert held.lost == ["b"]
        held.ids.remove("b")
        await leases.renew()
        assert held.lost == ["b"]


async def test_catch_up_runs_before_the_ids_are_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        store = FakeStore()
        held = Held("a")

        async def catch_up() -> None:
            await trio.sleep(0.5)  # a write the outage held back
            held.ids.append("written-late")

        await held.leases_on(store, catch_up).renew()
        assert store.renewals[0][1] == ["a", "written-late"]


@pytest.mark.parametrize("loop", ["keep", "janitor"])
async def test_a_store_away_then_back_is_logged_once_each_way_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, loop: str
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    with trio.fail_after(600):
        store = FakeStore()
        store.away = True
        store.expired = ["dead-1"]
        held = Held("a")
        leases = held.leases_on(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(getattr(leases, loop))
            await trio.sleep(10 * LEASE_S)  # every third of a lease or janitor round failing
            assert (store.renewals, store.claims, held.taken) == ([], [], [])
            store.away = False
            await trio.sleep(2 * LEASE_S)
            assert leases.reach.up
            nursery.cancel_scope.cancel()
    asked = store.renewals if loop == "keep" else store.claims
    assert len(asked) >= 2, "the loop stopped after the outage"
    assert held.taken == ([] if loop == "keep" else ["dead-1"])
    assert events(caplog) == [
        (logging.WARNING, "test_store_down", "test store unreachable (connection refused)"),
        (logging.INFO, "test_store_up", "test store reachable again"),
    ]


async def test_a_store_that_does_not_answer_is_away_after_the_call_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    with trio.fail_after(600):
        store = FakeStore()
        store.hang = True
        leases = Held("a").leases_on(store)
        start = trio.current_time()
        await leases.renew()
        assert trio.current_time() - start == pytest.approx(STORE_CALL_TIMEOUT_S)
        await leases.sweep()
        assert not leases.reach.up
    assert events(caplog) == [
        (logging.WARNING, "test_store_down", "test store unreachable (timeout)"),
    ]


# --- the janitor -------------------------------------------------------------------------------


async def test_the_janitor_sweeps_at_once_then_every_interval_and_hands_each_over(
    mock_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(5):
        store = FakeStore()
        store.expired = ["dead-1", "dead-2"]
        held = Held()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(held.leases_on(store).janitor)
            await trio.testing.wait_all_tasks_blocked()
            assert held.taken == ["dead-1", "dead-2"]
            store.expired = ["dead-3"]
            mock_clock.jump(JANITOR_S - 0.25)
            await trio.testing.wait_all_tasks_blocked()
            assert held.taken == ["dead-1", "dead-2"], "swept before the interval"
            mock_clock.jump(0.25)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert held.taken == ["dead-1", "dead-2", "dead-3"]
        # Claimed until a lease from now.
        assert [(round(now, 6), round(due - now, 6)) for now, due in store.claims] == [
            (0.0, LEASE_S),
            (JANITOR_S, LEASE_S),
        ]


# --- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("hang", [False, True], ids=["waiting", "in-a-store-call"])
async def test_cancelling_ends_both_loops_at_once(
    autojump_clock: trio.testing.MockClock, hang: bool
) -> None:
    with trio.fail_after(60):
        store = FakeStore()
        held = Held("a")
        leases = held.leases_on(store)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(leases.keep)
            nursery.start_soon(leases.janitor)
            await trio.sleep(LEASE_S / 3 + 0.5)  # one renewal and one sweep done
            store.hang = hang
            await trio.sleep(JANITOR_S)  # with `hang`, both now wait on the store
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        assert trio.current_time() == cancelled_at
        assert leases.reach.up, "a cancelled store call was taken for an outage"


# --- retry -------------------------------------------------------------------------------------

POLICY = RetryPolicy(base_s=1.0, cap_s=8.0)


def half() -> float:
    return 0.5


async def test_retry_waits_the_policy_s_backoff_after_each_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        tries: list[float] = []
        heard: list[tuple[str, float]] = []

        async def flaky() -> str:
            tries.append(trio.current_time())
            if len(tries) < 5:
                raise Unavailable(f"try {len(tries)}")
            return "done"

        start = trio.current_time()
        answer = await retry(
            flaky,
            POLICY,
            half,
            retry_on=Unavailable,
            on_retry=lambda exc, wait: heard.append((str(exc), wait)),
        )
        assert answer == "done"
        waits = [backoff_s(n, POLICY, half) for n in range(1, 5)]
        assert waits == [1.0, 2.0, 4.0, 4.0]
        assert heard == [(f"try {n}", w) for n, w in zip(range(1, 5), waits, strict=True)]
        assert [t - start for t in tries] == [0.0, *(sum(waits[:n]) for n in range(1, 5))]


async def test_retry_never_spins_and_goes_on_from_the_failures_given(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        heard: list[float] = []
        left = [TryAgain(), TryAgain()]

        async def round_() -> None:
            if left:
                raise left.pop()

        await retry(round_, POLICY, lambda: 0.0, on_retry=lambda _, wait: heard.append(wait))
        assert heard == [MIN_WAIT_S, MIN_WAIT_S]
        heard.clear()
        left[:] = [TryAgain()]
        await retry(round_, POLICY, half, failures=6, on_retry=lambda _, w: heard.append(w))
        assert heard == [backoff_s(7, POLICY, half)]


async def test_a_round_that_knows_when_it_is_due_is_not_kept_waiting_by_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A saga copy that may still land is checked again as its window closes, however long
    the backoff has grown (`TryAgain(within_s=)`); never sooner than the floor."""
    with trio.fail_after(60):
        heard: list[float] = []
        left = [TryAgain(within_s=0.0), TryAgain(within_s=0.5)]

        async def round_() -> None:
            if left:
                raise left.pop()

        start = trio.current_time()
        await retry(round_, POLICY, half, failures=6, on_retry=lambda _, w: heard.append(w))
        assert backoff_s(7, POLICY, half) > 0.5
        assert heard == [0.5, MIN_WAIT_S]
        assert trio.current_time() - start == pytest.approx(0.5 + MIN_WAIT_S)


async def test_retry_gives_up_with_the_last_error_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(60):
        tries = 0

        async def down() -> None:
            nonlocal tries
            tries += 1
            raise Unavailable(f"try {tries}")

        start = trio.current_time()
        with pytest.raises(Unavailable) as raised:
            await retry(down, POLICY, half, retry_on=Unavailable, deadline=start + 10)
        assert trio.current_time() >= start + 10
        assert str(raised.value) == f"try {tries}"
        assert tries == 5  # at 0, 1, 3, 7 and 11 s: 1 + 2 + 4 + 4


async def test_retry_lets_other_errors_through(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):

        async def broken() -> None:
            raise ValueError("a bug")

        with pytest.raises(ValueError, match="a bug"):
            await retry(broken, POLICY, half, retry_on=Unavailable)
