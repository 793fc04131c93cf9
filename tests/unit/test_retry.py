"""Backoff with full jitter, the retry budget, and the retry decision. No clock, no randomness:
both come in as arguments."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ingester.resilience.retry import (
    ERROR_KINDS,
    RetryBudget,
    RetryDecision,
    RetryPolicy,
    backoff_s,
    decide,
)

POLICY = RetryPolicy()  # base 0.1 s, cap 5 s, 5 attempts
# min(cap, base * 2**attempt) for attempts 0..10.
CEILINGS = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]
ALMOST_ONE = 0.999999


def const(value: float) -> Callable[[], float]:
    return lambda: value


def roomy() -> RetryBudget:
    return RetryBudget(ratio=0.0, min_per_s=100.0, window_s=10.0)  # 1000 retries


def empty() -> RetryBudget:
    return RetryBudget(ratio=0.0, min_per_s=0.0, window_s=10.0)


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempt", "ceiling"), list(enumerate(CEILINGS)))
def test_backoff_bounds(attempt: int, ceiling: float) -> None:
    assert backoff_s(attempt, POLICY, const(0.0)) == 0.0
    assert backoff_s(attempt, POLICY, const(0.5)) == ceiling / 2
    near_top = backoff_s(attempt, POLICY, const(ALMOST_ONE))
    assert near_top == ceiling * ALMOST_ONE
    assert near_top < ceiling
    assert backoff_s(attempt, POLICY, const(1.0)) == ceiling


def test_backoff_survives_huge_attempts() -> None:
    assert backoff_s(100_000, POLICY, const(1.0)) == 5.0


def test_backoff_honours_its_own_policy() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=3.0)
    assert [backoff_s(a, policy, const(1.0)) for a in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_backoff_draws_once() -> None:
    draws: list[float] = []

    def rand() -> float:
        draws.append(0.25)
        return 0.25

    assert backoff_s(2, POLICY, rand) == 0.1
    assert draws == [0.25]


def test_backoff_refuses_negative_attempts() -> None:
    with pytest.raises(ValueError, match="attempt counts from 0"):
        backoff_s(-1, POLICY, const(0.5))


@pytest.mark.parametrize(
    "kwargs",
    [{"base_s": -0.1}, {"cap_s": -1.0}, {"max_attempts": 0}, {"base_s": float("nan")}],
)
def test_retry_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


# --- budget -------------------------------------------------------------------------------------


def test_budget_floor_allows_min_per_s_times_window_with_no_requests() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=10.0)
    for _ in range(10):
        assert budget.can_retry(0.0)
        budget.spend(0.0)
    assert not budget.can_retry(0.0)
    assert budget.retries_in_window(0.0) == 10


def test_budget_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0)
    assert not budget.can_retry(0.0)
    for _ in range(4):
        budget.on_request(0.0)
    assert not budget.can_retry(0.0)  # 0.8 of a retry is not one
    budget.on_request(0.0)
    assert budget.can_retry(0.0)
    budget.spend(0.0)
    assert not budget.can_retry(0.0)
    for _ in range(5):
        budget.on_request(1.0)
    assert budget.can_retry(1.0)
    budget.spend(1.0)
    assert not budget.can_retry(1.0)
    assert budget.allowance(1.0) == 2.0


def test_budget_ratio_and_floor_add_up() -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, window_s=10.0)
    for _ in range(10):
        budget.on_request(0.0)
    assert budget.allowance(0.0) == 7.0
    spent = 0
    while budget.can_retry(0.0):
        budget.spend(0.0)
        spent += 1
    assert spent == 7


def test_budget_requests_expire_after_the_window() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10.0)
    budget.on_request(0.0)
    budget.on_request(4.0)
    assert budget.allowance(9.999) == 2.0
    assert budget.allowance(10.0) == 1.0  # the one at 0.0 is exactly window_s old: gone
    assert budget.allowance(14.0) == 0.0
    assert not budget.can_retry(14.0)


def test_budget_retries_expire_after_the_window() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10.0)  # one retry per window
    assert budget.can_retry(0.0)
    budget.spend(0.0)
    assert not budget.can_retry(5.0)
    assert not budget.can_retry(9.999)
    assert budget.can_retry(10.0)
    assert budget.retries_in_window(10.0) == 0


def test_budget_sliding_window_frees_one_retry_at_a_time() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.2, window_s=10.0)  # two per window
    budget.spend(0.0)
    budget.spend(3.0)
    assert not budget.can_retry(9.0)
    assert budget.can_retry(10.0)
    budget.spend(10.0)
    assert not budget.can_retry(12.0)
    assert budget.can_retry(13.0)


def test_budget_ratio_does_not_lose_to_float_rounding() -> None:
    budget = RetryBudget(ratio=0.29, min_per_s=0.0, window_s=10.0)
    for _ in range(100):
        budget.on_request(0.0)
    spent = 0
    while budget.can_retry(0.0):
        budget.spend(0.0)
        spent += 1
    assert spent == 29


def test_budget_defaults() -> None:
    budget = RetryBudget()
    assert (budget.ratio, budget.min_per_s, budget.window_s) == (0.2, 1.0, 10.0)
    assert budget.allowance(0.0) == 10.0


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": -0.1}, {"min_per_s": -1.0}, {"window_s": 0.0}, {"window_s": -5.0}],
)
def test_budget_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each message names its own field
        RetryBudget(**kwargs)


# --- decide -------------------------------------------------------------------------------------


def run(
    *,
    error_kind: str = "connect",
    attempt: int = 0,
    bytes_acknowledged: bool = False,
    now: float = 100.0,
    deadline: float | None = None,
    policy: RetryPolicy = POLICY,
    budget: RetryBudget | None = None,
    rand: float = 0.5,
) -> RetryDecision:
    return decide(
        attempt=attempt,
        error_kind=error_kind,
        bytes_acknowledged=bytes_acknowledged,
        now=now,
        deadline=deadline,
        policy=policy,
        budget=roomy() if budget is None else budget,
        rand=const(rand),
    )


@pytest.mark.parametrize(
    ("error_kind", "bytes_acknowledged", "expected"),
    [
        ("connect", False, RetryDecision(True, 0.05, "retry")),
        ("connect", True, RetryDecision(True, 0.05, "retry")),
        ("5xx", False, RetryDecision(True, 0.05, "retry")),
        ("5xx", True, RetryDecision(True, 0.05, "retry")),
        ("503", False, RetryDecision(True, 0.05, "retry")),
        ("503", True, RetryDecision(True, 0.05, "retry")),
        ("timeout", False, RetryDecision(True, 0.05, "retry")),
        ("timeout", True, RetryDecision(False, 0.0, "timeout_after_bytes")),
        ("507", False, RetryDecision(True, 0.0, "other_element")),
        ("507", True, RetryDecision(True, 0.0, "other_element")),
        ("4xx", False, RetryDecision(False, 0.0, "client_error")),
        ("4xx", True, RetryDecision(False, 0.0, "client_error")),
        ("checksum", False, RetryDecision(False, 0.0, "checksum_mismatch")),
        ("checksum", True, RetryDecision(False, 0.0, "checksum_mismatch")),
    ],
)
def test_every_error_kind(
    error_kind: str, bytes_acknowledged: bool, expected: RetryDecision
) -> None:
    budget = roomy()
    got = run(error_kind=error_kind, bytes_acknowledged=bytes_acknowledged, budget=budget)
    assert got == expected
    # Only a retry on the same element spends the budget.
    assert budget.retries_in_window(100.0) == (1 if got.reason == "retry" else 0)


def test_the_table_covers_every_kind() -> None:
    assert frozenset({"connect", "timeout", "5xx", "503", "507", "4xx", "checksum"}) == ERROR_KINDS


def test_unknown_error_kind_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown error kind 'teapot'"):
        run(error_kind="teapot")


def test_negative_attempt_is_a_bug() -> None:
    with pytest.raises(ValueError, match="attempt counts from 0"):
        run(attempt=-1)


@pytest.mark.parametrize(("attempt", "ceiling"), list(enumerate(CEILINGS[:4])))
def test_wait_is_the_backoff_of_the_failed_attempt(attempt: int, ceiling: float) -> None:
    assert run(attempt=attempt, rand=0.5) == RetryDecision(True, ceiling / 2, "retry")
    assert run(attempt=attempt, rand=0.0) == RetryDecision(True, 0.0, "retry")


@pytest.mark.parametrize("error_kind", ["connect", "5xx", "503", "timeout", "507"])
def test_never_past_max_attempts(error_kind: str) -> None:
    # Five attempts in all: after attempt 3 (the fourth) one more; after attempt 4, none.
    assert run(error_kind=error_kind, attempt=3).retry is True
    budget = roomy()
    assert run(error_kind=error_kind, attempt=4, budget=budget) == RetryDecision(
        False, 0.0, "attempts_exhausted"
    )
    assert run(error_kind=error_kind, attempt=9).reason == "attempts_exhausted"
    assert budget.retries_in_window(100.0) == 0


def test_single_attempt_policy_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert run(policy=policy) == RetryDecision(False, 0.0, "attempts_exhausted")
    assert run(policy=policy, error_kind="507").reason == "attempts_exhausted"


@pytest.mark.parametrize(
    ("deadline", "retry"),
    [
        (None, True),
        (200.0, True),
        (100.06, True),
        (100.05, False),  # the wait would end exactly at the deadline: no time left to try
        (100.04, False),
        (100.0, False),
        (50.0, False),
    ],
)
def test_deadline(deadline: float | None, retry: bool) -> None:
    budget = roomy()
    got = run(now=100.0, deadline=deadline, rand=0.5, budget=budget)  # wait 0.05
    if retry:
        assert got == RetryDecision(True, 0.05, "retry")
    else:
        assert got == RetryDecision(False, 0.0, "deadline")
    assert budget.retries_in_window(100.0) == (1 if retry else 0)


def test_deadline_uses_the_drawn_wait_not_the_ceiling() -> None:
    # Ceiling 0.1 s would miss the deadline, the drawn 0.025 s does not.
    assert run(now=100.0, deadline=100.05, rand=0.25) == RetryDecision(True, 0.025, "retry")


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (None, RetryDecision(True, 0.0, "other_element")),
        (100.001, RetryDecision(True, 0.0, "other_element")),
        (100.0, RetryDecision(False, 0.0, "deadline")),
        (99.0, RetryDecision(False, 0.0, "deadline")),
    ],
)
def test_507_respects_the_deadline(deadline: float | None, expected: RetryDecision) -> None:
    assert run(error_kind="507", now=100.0, deadline=deadline) == expected


@pytest.mark.parametrize("error_kind", ["connect", "5xx", "503", "timeout"])
def test_budget_says_no(error_kind: str) -> None:
    assert run(error_kind=error_kind, budget=empty()) == RetryDecision(
        False, 0.0, "budget_exhausted"
    )


def test_507_ignores_the_budget() -> None:
    assert run(error_kind="507", budget=empty()) == RetryDecision(True, 0.0, "other_element")


def test_decide_spends_until_the_budget_runs_out() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=0.2, window_s=10.0)  # two per window
    reasons = [run(budget=budget, now=0.0).reason for _ in range(3)]
    assert reasons == ["retry", "retry", "budget_exhausted"]
    assert run(budget=budget, now=10.0).reason == "retry"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        # An unsafe kind is named even when everything else would also refuse.
        (
            {"error_kind": "4xx", "attempt": 9, "deadline": 0.0, "budget": empty()},
            "client_error",
        ),
        (
            {"error_kind": "timeout", "bytes_acknowledged": True, "attempt": 9},
            "timeout_after_bytes",
        ),
        # Attempts before the deadline, the deadline before the budget.
        ({"attempt": 4, "deadline": 0.0, "budget": empty()}, "attempts_exhausted"),
        ({"deadline": 0.0, "budget": empty()}, "deadline"),
    ],
)
def test_refusals_name_the_first_reason(kwargs: dict[str, object], reason: str) -> None:
    got = run(**kwargs)  # type: ignore[arg-type]
    assert got == RetryDecision(False, 0.0, reason)
