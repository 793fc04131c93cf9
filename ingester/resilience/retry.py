"""When to retry a request to a Storage Element, and after how long. No I/O.

Backoff is "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): a uniform
draw between zero and the capped exponential, which spreads a crowd of retries best. A budget
per element keeps retries to a share of the requests, so a sick element is not buried under
retries of the load it already failed. Randomness and time come in as arguments.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

# Past this many doublings the exponential is far above any sane cap; a bigger exponent would
# overflow a float.
_MAX_DOUBLINGS = 62

# `ratio * requests` in floats can land a hair under a whole number (0.29 * 100 == 28.999...);
# this keeps rounding from refusing a retry the ratio allows.
_SLACK = 1e-9

ErrorKind = Literal["connect", "timeout", "5xx", "503", "507", "4xx", "checksum"]
ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.1
    cap_s: float = 5.0
    # Attempts in all, the first one included.
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if not self.base_s >= 0:
            raise ValueError(f"base_s must not be negative, not {self.base_s}")
        if not self.cap_s >= 0:
            raise ValueError(f"cap_s must not be negative, not {self.cap_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")


def backoff_s(attempt: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """The wait after failed attempt `attempt` (from 0): uniform(0, min(cap, base * 2**attempt)).

    `rand()` returns a float in [0, 1), as `random.random` does; one that returns 1.0 gives
    the ceiling itself (a backoff with no jitter).
    """
    if attempt < 0:
        raise ValueError(f"attempt counts from 0, not {attempt}")
    ceiling = min(policy.cap_s, policy.base_s * 2.0 ** min(attempt, _MAX_DOUBLINGS))
    return rand() * ceiling


class RetryBudget:
    """Retries allowed to one element: a share of its requests, plus a floor per second.

    A token balance over a sliding window (Finagle's retry budget): each request deposits
    `ratio` of a token, each retry withdraws one, and both expire `window_s` after they
    happened. A reserve of `min_per_s * window_s` retries per window lets an element with
    little traffic still retry. So, within any window:

        retries <= ratio * requests + min_per_s * window_s

    Call `on_request` for first attempts only: counting retries as requests would let retries
    fund more retries. Memory is one float per event in the window.
    """

    def __init__(self, ratio: float = 0.2, min_per_s: float = 1.0, window_s: float = 10.0) -> None:
        if not ratio >= 0:
            raise ValueError(f"ratio must not be negative, not {ratio}")
        if not min_per_s >= 0:
            raise ValueError(f"min_per_s must not be negative, not {min_per_s}")
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _expire(self, now: float) -> None:
        # An event counts while less than `window_s` old.
        cutoff = now - self.window_s
        for events in (self._requests, self._retries):
            while events and events[0] <= cutoff:
                events.popleft()

    def on_request(self, now: float) -> None:
        self._expire(now)
        self._requests.append(now)

    def allowance(self, now: float) -> float:
        """Retries the window allows in all, spent ones included."""
        self._expire(now)
        return self.ratio * len(self._requests) + self.min_per_s * self.window_s

    def retries_in_window(self, now: float) -> int:
        self._expire(now)
        return len(self._retries)

    def can_retry(self, now: float) -> bool:
        return self.retries_in_window(now) + 1 <= self.allowance(now) + _SLACK

    def spend(self, now: float) -> None:
        """Record a retry. It does not check: ask `can_retry` first."""
        self._expire(now)
        self._retries.append(now)


class RetryDecision(NamedTuple):
    retry: bool
    wait_s: float
    # A short stable token for logs and metrics.
    reason: str


# Kinds that never go again: the request itself is wrong, or the bytes were.
_FINAL_REASONS: dict[str, str] = {"4xx": "client_error", "checksum": "checksum_mismatch"}


def decide(
    *,
    attempt: int,
    error_kind: str,
    bytes_acknowledged: bool,
    now: float,
    deadline: float | None,
    policy: RetryPolicy,
    budget: RetryBudget,
    rand: Callable[[], float],
) -> RetryDecision:
    """Whether to try again after failed attempt `attempt` (from 0), and after how long.

    Safe to retry: connect errors, 5xx and 503 (the element answered, nothing was stored), and
    timeouts only when no byte was acknowledged (after that the outcome is unknown and a retry
    could store the file twice). 507 means the element is full: retry at once on another
    element ("other_element"), without touching this element's budget. 4xx and checksum
    mismatches never.

    Never past `max_attempts` attempts in all, never when the wait would reach `deadline` (a
    retry with no time left is bound to fail), never when `budget` says no. A same-element
    retry spends one unit of `budget`, so asking and spending cannot drift apart; pass the
    budget of the element the retry will go to.

    Reasons: "retry", "other_element", "client_error", "checksum_mismatch",
    "timeout_after_bytes", "attempts_exhausted", "deadline", "budget_exhausted".
    """
    if error_kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {error_kind!r}")
    if attempt < 0:
        raise ValueError(f"attempt counts from 0, not {attempt}")
    final = _FINAL_REASONS.get(error_kind)
    if final is not None:
        return RetryDecision(False, 0.0, final)
    if error_kind == "timeout" and bytes_acknowledged:
        return RetryDecision(False, 0.0, "timeout_after_bytes")
    if attempt + 1 >= policy.max_attempts:
        return RetryDecision(False, 0.0, "attempts_exhausted")
    if error_kind == "507":
        if deadline is not None and now >= deadline:
            return RetryDecision(False, 0.0, "deadline")
        return RetryDecision(True, 0.0, "other_element")
    wait = backoff_s(attempt, policy, rand)
    if deadline is not None and now + wait >= deadline:
        return RetryDecision(False, 0.0, "deadline")
    if not budget.can_retry(now):
        return RetryDecision(False, 0.0, "budget_exhausted")
    budget.spend(now)
    return RetryDecision(True, wait, "retry")
