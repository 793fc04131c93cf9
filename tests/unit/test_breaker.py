"""The circuit breaker and the board: every transition, the ejection cap, probes and snapshots.

The clock is a plain float passed to each call; nothing sleeps.
"""

from __future__ import annotations

import pytest

from ingester.resilience.breaker import BreakerBoard, BreakerPolicy, BreakerState, CircuitBreaker

POLICY = BreakerPolicy()  # threshold 5, open 5 s doubling to 120 s, at most half ejected
PERIODS = [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 120.0, 120.0]


def tripped(policy: BreakerPolicy = POLICY, now: float = 0.0) -> CircuitBreaker:
    breaker = CircuitBreaker("se-a", policy)
    results = [breaker.record_failure(now) for _ in range(policy.failure_threshold)]
    assert results == [False] * (policy.failure_threshold - 1) + [True]
    return breaker


def trip_on_board(board: BreakerBoard, element_id: str, now: float, known: list[str]) -> bool:
    """Report threshold failures; True when the last one tripped."""
    results = [
        board.record_failure(element_id, now, known=known)
        for _ in range(board.policy.failure_threshold)
    ]
    assert not any(results[:-1])
    return results[-1]


# --- policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"failure_threshold": -1},
        {"open_base_s": 0.0},
        {"open_base_s": -1.0},
        {"open_base_s": 10.0, "open_max_s": 5.0},
        {"max_ejected_share": -0.1},
        {"max_ejected_share": 1.1},
        {"max_ejected_share": float("nan")},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("trips", "period"), list(enumerate(PERIODS, start=1)))
def test_open_period_doubles_up_to_the_cap(trips: int, period: float) -> None:
    assert POLICY.open_period_s(trips) == period


def test_open_period_survives_thousands_of_trips() -> None:
    assert POLICY.open_period_s(10_000) == 120.0


def test_open_period_cap_need_not_be_a_doubling() -> None:
    policy = BreakerPolicy(open_base_s=3.0, open_max_s=10.0)
    assert [policy.open_period_s(t) for t in range(1, 5)] == [3.0, 6.0, 10.0, 10.0]


# --- one breaker: closed -> open ---------------------------------------------------------------


def test_new_breaker_is_closed_and_allows() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    assert breaker.state(0.0) is BreakerState.CLOSED
    assert breaker.allow(0.0)
    assert breaker.allow(0.0)
    assert breaker.open_until(0.0) is None
    assert (breaker.failures, breaker.trips, breaker.total_trips) == (0, 0, 0)


def test_trips_at_the_threshold_and_not_before() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    for count in range(1, 5):
        assert breaker.record_failure(float(count)) is False
        assert breaker.state(float(count)) is BreakerState.CLOSED
        assert breaker.allow(float(count))
        assert breaker.failures == count
    assert breaker.record_failure(5.0) is True
    assert breaker.state(5.0) is BreakerState.OPEN
    assert breaker.open_until(5.0) == 10.0
    assert not breaker.allow(5.0)
    assert (breaker.failures, breaker.trips, breaker.total_trips) == (5, 1, 1)


def test_threshold_of_one_trips_on_the_first_failure() -> None:
    breaker = CircuitBreaker("se-a", BreakerPolicy(failure_threshold=1))
    assert breaker.record_failure(0.0) is True
    assert breaker.state(0.0) is BreakerState.OPEN


def test_success_in_between_resets_the_count() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    for _ in range(4):
        assert not breaker.record_failure(0.0)
    breaker.record_success(0.0)
    assert breaker.failures == 0
    for _ in range(4):
        assert not breaker.record_failure(1.0)
    assert breaker.state(1.0) is BreakerState.CLOSED
    assert breaker.record_failure(1.0) is True


def test_only_the_tripping_failure_returns_true() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    results = [breaker.record_failure(0.0) for _ in range(9)]
    assert results == [False, False, False, False, True, False, False, False, False]


# --- open ---------------------------------------------------------------------------------------


def test_open_refuses_until_its_period_ends_then_half_opens() -> None:
    breaker = tripped(now=100.0)
    for now in (100.0, 102.5, 104.999):
        assert breaker.state(now) is BreakerState.OPEN
        assert breaker.open_until(now) == 105.0
        assert not breaker.would_allow(now)
        assert not breaker.allow(now)
    assert breaker.state(105.0) is BreakerState.HALF_OPEN
    assert breaker.open_until(105.0) is None
    assert breaker.state(1e9) is BreakerState.HALF_OPEN


def test_late_failure_while_open_counts_but_does_not_extend() -> None:
    breaker = tripped(now=0.0)
    assert breaker.record_failure(3.0) is False
    assert breaker.open_until(3.0) == 5.0
    assert breaker.failures == 6
    assert (breaker.trips, breaker.total_trips) == (1, 1)
    assert breaker.state(5.0) is BreakerState.HALF_OPEN


def test_success_while_open_closes() -> None:
    # An upload from before the trip that still succeeded: the element works.
    breaker = tripped(now=0.0)
    breaker.record_success(1.0)
    assert breaker.state(1.0) is BreakerState.CLOSED
    assert breaker.allow(1.0)
    assert (breaker.failures, breaker.trips, breaker.total_trips) == (0, 0, 1)


# --- half-open ----------------------------------------------------------------------------------


def test_half_open_grants_exactly_one_trial() -> None:
    breaker = tripped(now=0.0)
    assert breaker.trial_available(5.0)
    assert breaker.would_allow(5.0)
    assert breaker.would_allow(5.0)  # peeking takes nothing
    assert breaker.allow(5.0) is True
    assert not breaker.trial_available(5.0)
    assert not breaker.would_allow(6.0)
    assert [breaker.allow(t) for t in (5.0, 6.0, 1000.0)] == [False, False, False]
    assert breaker.state(1000.0) is BreakerState.HALF_OPEN


def test_trial_success_closes() -> None:
    breaker = tripped(now=0.0)
    assert breaker.allow(5.0)
    breaker.record_success(6.0)
    assert breaker.state(6.0) is BreakerState.CLOSED
    assert [breaker.allow(6.0) for _ in range(3)] == [True, True, True]
    assert (breaker.failures, breaker.trips, breaker.total_trips) == (0, 0, 1)


def test_trial_failure_reopens_with_doubled_period_up_to_the_cap() -> None:
    breaker = tripped(now=0.0)
    now = 0.0
    for trips, period in enumerate(PERIODS, start=1):
        assert breaker.trips == trips
        assert breaker.open_until(now) == now + period
        now += period
        assert breaker.state(now) is BreakerState.HALF_OPEN
        assert breaker.allow(now)
        assert breaker.record_failure(now) is True
        assert breaker.state(now) is BreakerState.OPEN
        assert not breaker.allow(now)
    assert breaker.trips == len(PERIODS) + 1
    assert breaker.total_trips == len(PERIODS) + 1
    assert breaker.open_until(now) == now + 120.0


def test_failure_in_half_open_without_the_trial_reopens() -> None:
    # A failed probe reported straight away, or a straggler: either re-opens it.
    breaker = tripped(now=0.0)
    assert breaker.record_failure(5.0) is True
    assert breaker.open_until(5.0) == 15.0
    assert breaker.trips == 2


def test_reopened_breaker_offers_a_fresh_trial() -> None:
    breaker = tripped(now=0.0)
    assert breaker.allow(5.0)
    assert breaker.record_failure(5.0)
    assert not breaker.trial_available(14.9)
    assert breaker.trial_available(15.0)
    assert breaker.allow(15.0)


def test_trip_count_resets_after_close() -> None:
    breaker = tripped(now=0.0)
    assert breaker.allow(5.0)
    assert breaker.record_failure(5.0)  # trips == 2, open for 10 s
    assert breaker.allow(15.0)
    assert breaker.record_failure(15.0)  # trips == 3, open for 20 s
    assert breaker.allow(35.0)
    breaker.record_success(35.0)
    assert (breaker.trips, breaker.total_trips) == (0, 3)
    results = [breaker.record_failure(40.0) for _ in range(5)]
    assert results == [False, False, False, False, True]
    assert breaker.open_until(40.0) == 45.0  # back to the base period
    assert (breaker.trips, breaker.total_trips) == (1, 4)


def test_release_trial_gives_it_back_only_in_half_open() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    breaker.release_trial(0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED
    assert not breaker.record_failure(0.0)
    for _ in range(4):
        breaker.record_failure(0.0)
    breaker.release_trial(1.0)
    assert breaker.state(1.0) is BreakerState.OPEN
    assert not breaker.allow(1.0)
    assert breaker.allow(5.0)
    assert not breaker.allow(5.0)
    breaker.release_trial(6.0)
    assert breaker.allow(6.0)
    assert not breaker.allow(6.0)


def test_trial_taken_then_reopened_does_not_leak_into_the_next_half_open() -> None:
    breaker = tripped(now=0.0)
    assert breaker.allow(5.0)
    assert breaker.record_failure(5.0)
    assert breaker.trial_available(15.0)


# --- may_trip (the board's ejection cap) ---------------------------------------------------------


def test_refused_trip_stays_closed_and_keeps_counting() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    results = [breaker.record_failure(0.0, may_trip=False) for _ in range(7)]
    assert results == [False] * 7
    assert breaker.state(0.0) is BreakerState.CLOSED
    assert breaker.allow(0.0)
    assert (breaker.failures, breaker.trips, breaker.refused_trips) == (7, 0, 3)
    assert breaker.record_failure(1.0, may_trip=True) is True
    assert breaker.open_until(1.0) == 6.0
    assert (breaker.trips, breaker.total_trips, breaker.refused_trips) == (1, 1, 3)


def test_refusal_below_threshold_is_not_counted_as_refused() -> None:
    breaker = CircuitBreaker("se-a", POLICY)
    for _ in range(4):
        assert not breaker.record_failure(0.0, may_trip=False)
    assert breaker.refused_trips == 0


def test_may_trip_does_not_hold_back_a_half_open_failure() -> None:
    breaker = tripped(now=0.0)
    assert breaker.record_failure(5.0, may_trip=False) is True
    assert breaker.state(5.0) is BreakerState.OPEN
    assert breaker.refused_trips == 0


def test_breaker_snapshot() -> None:
    breaker = tripped(now=10.0)
    assert breaker.snapshot(11.0) == {
        "state": "open",
        "failures": 5,
        "trips": 1,
        "total_trips": 1,
        "refused_trips": 0,
        "open_until": 15.0,
    }
    assert breaker.snapshot(15.0) == {
        "state": "half_open",
        "failures": 5,
        "trips": 1,
        "total_trips": 1,
        "refused_trips": 0,
        "open_until": None,
    }


# --- board: the ejection cap --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "count", "expected"),
    [
        (0.5, 0, 0),
        (0.5, 1, 0),
        (0.5, 2, 1),
        (0.5, 3, 1),
        (0.5, 4, 2),
        (0.5, 5, 2),
        (0.5, 10, 5),
        (1.0, 1, 0),
        (1.0, 2, 1),
        (1.0, 10, 9),
        (0.0, 10, 0),
        (0.3, 10, 3),
        (0.29, 100, 29),  # 0.29 * 100 == 28.999... in floats
        (0.1, 5, 0),
    ],
)
def test_max_ejected_is_a_floor_and_never_all(share: float, count: int, expected: int) -> None:
    board = BreakerBoard(BreakerPolicy(max_ejected_share=share))
    assert board.max_ejected(count) == expected


@pytest.mark.parametrize(("count", "cap"), [(2, 1), (3, 1), (4, 2), (10, 5)])
def test_cap_holds_then_lets_the_next_failure_trip_once_another_closes(
    count: int, cap: int
) -> None:
    board = BreakerBoard(POLICY)
    known = [f"se-{i}" for i in range(count)]
    for element_id in known[:cap]:
        assert trip_on_board(board, element_id, 0.0, known) is True
    refused = known[cap]
    assert trip_on_board(board, refused, 1.0, known) is False
    assert board.record_failure(refused, 1.0, known=known) is False
    assert board.breaker(refused).state(1.0) is BreakerState.CLOSED
    assert board.breaker(refused).failures == POLICY.failure_threshold + 1
    assert board.breaker(refused).refused_trips == 2
    # Still capped once the first ones go half-open: they are not usable yet.
    assert board.record_failure(refused, 5.0, known=known) is False
    assert board.breaker(refused).state(5.0) is BreakerState.CLOSED
    # One of them passes its probe and closes: the very next failure trips.
    board.record_success(known[0], 6.0)
    assert board.record_failure(refused, 6.0, known=known) is True
    assert board.breaker(refused).state(6.0) is BreakerState.OPEN
    assert board.breaker(refused).open_until(6.0) == 11.0
    ejected = [e for e in known if board.breaker(e).state(6.0) is not BreakerState.CLOSED]
    assert len(ejected) == cap


@pytest.mark.parametrize("count", [2, 3, 4, 10])
def test_never_all_ejected_even_with_a_share_of_one(count: int) -> None:
    board = BreakerBoard(BreakerPolicy(max_ejected_share=1.0))
    known = [f"se-{i}" for i in range(count)]
    for element_id in known[:-1]:
        assert trip_on_board(board, element_id, 0.0, known) is True
    last = known[-1]
    assert trip_on_board(board, last, 0.0, known) is False
    assert board.allowed(known, 0.0) == [last]


def test_lone_element_is_never_ejected() -> None:
    board = BreakerBoard(POLICY)
    for _ in range(20):
        assert board.record_failure("se-a", 0.0, known=["se-a"]) is False
    assert board.breaker("se-a").state(0.0) is BreakerState.CLOSED
    assert board.breaker("se-a").failures == 20


def test_share_of_zero_ejects_nothing() -> None:
    board = BreakerBoard(BreakerPolicy(max_ejected_share=0.0))
    known = [f"se-{i}" for i in range(10)]
    assert trip_on_board(board, "se-0", 0.0, known) is False


def test_half_open_failure_is_never_refused_by_the_cap() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-a", "se-b"]
    assert trip_on_board(board, "se-a", 0.0, known)
    assert board.breaker("se-a").allow(5.0)
    assert board.record_failure("se-a", 5.0, known=known) is True
    assert board.breaker("se-a").open_until(5.0) == 15.0


def test_failing_element_counts_even_when_not_in_known() -> None:
    # known == ["se-b"] alone would allow 0; with se-a added the population is 2, cap 1.
    board = BreakerBoard(POLICY)
    assert trip_on_board(board, "se-a", 0.0, ["se-b"]) is True


def test_open_elements_outside_known_use_no_quota() -> None:
    board = BreakerBoard(POLICY)
    assert trip_on_board(board, "se-old", 0.0, ["se-old", "se-x"]) is True
    assert trip_on_board(board, "se-a", 0.0, ["se-a", "se-b"]) is True


def test_duplicates_in_known_do_not_inflate_the_share() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-a", "se-b", "se-b", "se-b"]
    assert trip_on_board(board, "se-a", 0.0, known) is True
    assert trip_on_board(board, "se-b", 0.0, known) is False


def test_board_hands_out_one_breaker_per_element() -> None:
    board = BreakerBoard(POLICY)
    first = board.breaker("se-a")
    assert board.breaker("se-a") is first
    assert board.breaker("se-b") is not first
    assert first.element_id == "se-a"
    assert first.policy is POLICY


def test_board_record_success_closes() -> None:
    board = BreakerBoard(POLICY)
    assert trip_on_board(board, "se-a", 0.0, ["se-a", "se-b"])
    board.record_success("se-a", 1.0)
    assert board.breaker("se-a").state(1.0) is BreakerState.CLOSED


# --- board: allowed and needs_probe -------------------------------------------------------------


def test_allowed_keeps_order_and_skips_open_ones() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-d", "se-c", "se-b", "se-a"]
    assert trip_on_board(board, "se-b", 0.0, known)
    assert board.allowed(known, 1.0) == ["se-d", "se-c", "se-a"]
    assert board.allowed([], 1.0) == []


def test_allowed_creates_no_breakers() -> None:
    board = BreakerBoard(POLICY)
    assert board.allowed(["se-x", "se-y"], 0.0) == ["se-x", "se-y"]
    assert board.snapshot(0.0) == {}


def test_allowed_lists_a_free_trial_without_taking_it() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-a", "se-b"]
    assert trip_on_board(board, "se-a", 0.0, known)
    assert board.allowed(known, 5.0) == ["se-a", "se-b"]
    assert board.allowed(known, 5.0) == ["se-a", "se-b"]
    assert board.breaker("se-a").allow(5.0)
    assert board.allowed(known, 5.0) == ["se-b"]
    board.record_success("se-a", 6.0)
    assert board.allowed(known, 6.0) == ["se-a", "se-b"]


def test_needs_probe_follows_the_trial() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-a", "se-b", "se-c", "se-d"]
    assert board.needs_probe(0.0) == []
    assert trip_on_board(board, "se-c", 0.0, known)
    assert trip_on_board(board, "se-a", 1.0, known)
    assert board.needs_probe(4.9) == []
    assert board.needs_probe(5.0) == ["se-c"]
    assert board.needs_probe(6.0) == ["se-a", "se-c"]
    assert board.breaker("se-a").allow(6.0)  # the shell takes the trial, then probes
    assert board.needs_probe(6.0) == ["se-c"]
    board.breaker("se-a").release_trial(6.5)  # the probe was cancelled
    assert board.needs_probe(6.5) == ["se-a", "se-c"]
    assert board.breaker("se-c").allow(7.0)
    assert board.record_failure("se-c", 7.0, known=known) is True  # probe failed
    assert board.needs_probe(7.0) == ["se-a"]
    board.record_success("se-a", 8.0)  # probe passed
    assert board.needs_probe(8.0) == []
    assert board.needs_probe(17.0) == ["se-c"]


def test_board_snapshot() -> None:
    board = BreakerBoard(POLICY)
    known = ["se-a", "se-b", "se-c"]
    assert board.snapshot(0.0) == {}
    assert trip_on_board(board, "se-b", 0.0, known)
    board.record_failure("se-a", 1.0, known=known)
    assert trip_on_board(board, "se-c", 2.0, known) is False
    assert board.snapshot(3.0) == {
        "se-a": {
            "state": "closed",
            "failures": 1,
            "trips": 0,
            "total_trips": 0,
            "refused_trips": 0,
            "open_until": None,
        },
        "se-b": {
            "state": "open",
            "failures": 5,
            "trips": 1,
            "total_trips": 1,
            "refused_trips": 0,
            "open_until": 5.0,
        },
        "se-c": {
            "state": "closed",
            "failures": 5,
            "trips": 0,
            "total_trips": 0,
            "refused_trips": 1,
            "open_until": None,
        },
    }
    assert list(board.snapshot(3.0)) == ["se-a", "se-b", "se-c"]
    assert board.snapshot(5.0)["se-b"]["state"] == "half_open"
    assert board.snapshot(5.0)["se-b"]["open_until"] is None
