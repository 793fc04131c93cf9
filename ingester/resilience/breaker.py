"""A circuit breaker per Storage Element, and the board that holds them all. No I/O.

Time comes in as `now` (monotonic seconds) on every call, so the I/O shell owns the clock and the
tests drive it with plain floats.

    CLOSED --threshold consecutive failures--> OPEN --period over--> HALF_OPEN
    HALF_OPEN --trial succeeds--> CLOSED;  HALF_OPEN --any failure--> OPEN (period doubled, capped)

OPEN turning into HALF_OPEN is derived from `now` and the stored end of the open period, never
stored a second time, so there is no timer to run and no state to go stale.

A trip is what the caller acts on: `record_failure` returns True exactly when the reported failure
opened the breaker, and the shell then cancels the uploads in flight to that element. The shell
must not report those cancellations as failures: the element did not fail them, the trip did.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum

# The open period doubles per consecutive trip; past this many doublings it is far above any
# sane cap, and a bigger exponent would overflow a float after about a thousand trips (a dead
# element trips every `open_max_s`, so a few days down would get there).
_MAX_DOUBLINGS = 62

# `share * count` in floats can land a hair under a whole number (0.29 * 100 == 28.999...);
# this keeps the floor from losing an element to rounding.
_FLOOR_SLACK = 1e-9


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    # Consecutive failures that trip it.
    failure_threshold: int = 5
    # The first open period; it doubles per consecutive trip up to `open_max_s`.
    open_base_s: float = 5.0
    open_max_s: float = 120.0
    # At most this share of the known elements may be ejected (OPEN or HALF_OPEN) at once, and
    # never all of them: one bad period on the network must not leave nowhere to store.
    max_ejected_share: float = 0.5

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {self.failure_threshold}")
        if not self.open_base_s > 0:
            raise ValueError(f"open_base_s must be positive, not {self.open_base_s}")
        if not self.open_max_s >= self.open_base_s:
            raise ValueError(
                f"open_max_s ({self.open_max_s}) must be at least open_base_s ({self.open_base_s})"
            )
        if not 0.0 <= self.max_ejected_share <= 1.0:
            raise ValueError(
                f"max_ejected_share must be within [0, 1], not {self.max_ejected_share}"
            )

    def open_period_s(self, trips: int) -> float:
        """The open period after the `trips`-th consecutive trip (counting from 1)."""
        doublings = min(max(trips - 1, 0), _MAX_DOUBLINGS)
        return min(self.open_max_s, self.open_base_s * 2.0**doublings)


class CircuitBreaker:
    """The breaker of one element."""

    def __init__(self, element_id: str, policy: BreakerPolicy) -> None:
        self.element_id = element_id
        self.policy = policy
        # Consecutive failures since the last success; keeps counting while open, for metrics.
        self.failures = 0
        # Consecutive trips since the last success: the exponent of the open period.
        self.trips = 0
        # Every trip ever, for metrics.
        self.total_trips = 0
        # Trips the ejection cap held back (the breaker stayed closed), for metrics.
        self.refused_trips = 0
        # None while closed; otherwise the end of the open period (HALF_OPEN from then on).
        self._open_until: float | None = None
        # Whether the single half-open trial has been handed out and has not reported yet.
        self._trial_taken = False

    def state(self, now: float) -> BreakerState:
        if self._open_until is None:
            return BreakerState.CLOSED
        if now < self._open_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def open_until(self, now: float) -> float | None:
        """The end of the open period while OPEN; None when CLOSED or HALF_OPEN."""
        if self.state(now) is BreakerState.OPEN:
            return self._open_until
        return None

    def would_allow(self, now: float) -> bool:
        """Whether `allow` would say yes now, without taking the half-open trial."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            return not self._trial_taken
        return False

    def trial_available(self, now: float) -> bool:
        """HALF_OPEN with its single trial not yet handed out: it wants a probe."""
        return self.state(now) is BreakerState.HALF_OPEN and not self._trial_taken

    def allow(self, now: float) -> bool:
        """Whether a request may go to this element now. In HALF_OPEN, the first yes is the
        single trial, and every later call says no until that trial reports (or is released)."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._trial_taken:
            self._trial_taken = True
            return True
        return False

    def release_trial(self, now: float) -> None:
        """Give the half-open trial back when it ended with no verdict (cancelled, say).

        Without this a trial that never reports would hold the breaker half-open for good.
        A no-op in any other state.
        """
        if self.state(now) is BreakerState.HALF_OPEN:
            self._trial_taken = False

    def record_success(self, now: float) -> None:
        """Close it, whatever the state: the element has just shown that it works."""
        self.failures = 0
        self.trips = 0
        self._open_until = None
        self._trial_taken = False

    def record_failure(self, now: float, *, may_trip: bool = True) -> bool:
        """Count a failure; True when this very failure tripped the breaker.

        CLOSED: trips on reaching the threshold, unless `may_trip` is False (the board's
        ejection cap), in which case it stays closed and keeps counting, so the first failure
        after the cap allows it again trips at once.
        HALF_OPEN: any failure re-opens it, with the period doubled; `may_trip` does not apply,
        since the element is ejected already and the ejected share does not change.
        OPEN: a late report from before the trip; counted, but the period is not extended.
        """
        self.failures += 1
        state = self.state(now)
        if state is BreakerState.OPEN:
            return False
        if state is BreakerState.CLOSED:
            if self.failures < self.policy.failure_threshold:
                return False
            if not may_trip:
                self.refused_trips += 1
                return False
        self._trip(now)
        return True

    def _trip(self, now: float) -> None:
        self.trips += 1
        self.total_trips += 1
        self._open_until = now + self.policy.open_period_s(self.trips)
        self._trial_taken = False

    def snapshot(self, now: float) -> dict[str, object]:
        return {
            "state": self.state(now).value,
            "failures": self.failures,
            "trips": self.trips,
            "total_trips": self.total_trips,
            "refused_trips": self.refused_trips,
            "open_until": self.open_until(now),
        }


class BreakerBoard:
    """The breakers of all elements, and the cap on how many may be ejected at once.

    Ejected means OPEN or HALF_OPEN: a half-open element takes one trial at most, so counting it
    as usable would let the cap eject every element but one trial's worth.
    """

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, element_id: str) -> CircuitBreaker:
        found = self._breakers.get(element_id)
        if found is None:
            found = self._breakers[element_id] = CircuitBreaker(element_id, self.policy)
        return found

    def _state(self, element_id: str, now: float) -> BreakerState:
        # Peeks without creating a breaker, so a long list of candidates costs no memory.
        found = self._breakers.get(element_id)
        return BreakerState.CLOSED if found is None else found.state(now)

    def max_ejected(self, count: int) -> int:
        """How many of `count` elements may be ejected at once:
        floor(max_ejected_share * count), and never more than count - 1 (so never all of them,
        and a lone element is never ejected)."""
        if count <= 0:
            return 0
        allowed = math.floor(self.policy.max_ejected_share * count + _FLOOR_SLACK)
        return max(0, min(allowed, count - 1))

    def record_failure(self, element_id: str, now: float, *, known: Collection[str]) -> bool:
        """Count a failure; True when it tripped the breaker (the caller then cancels the
        uploads in flight to that element).

        The share is computed over `known` plus `element_id` (a failing element counts even if
        the caller's list has just dropped it): a trip from CLOSED is refused when the others
        already ejected, plus this one, would exceed `max_ejected(len(that set))`. Elements
        outside that set do not count, so a decommissioned element stuck open uses no quota.
        """
        breaker = self.breaker(element_id)
        population = set(known)
        population.add(element_id)
        ejected_others = sum(
            1
            for other in population
            if other != element_id and self._state(other, now) is not BreakerState.CLOSED
        )
        may_trip = ejected_others + 1 <= self.max_ejected(len(population))
        return breaker.record_failure(now, may_trip=may_trip)

    def record_success(self, element_id: str, now: float) -> None:
        self.breaker(element_id).record_success(now)

    def allowed(self, element_ids: Iterable[str], now: float) -> list[str]:
        """Those of `element_ids` that may take a request now, in the caller's order.

        Nothing is consumed: a half-open element with its trial still free is listed, and the
        caller takes that trial by calling `breaker(id).allow(now)` on the one it picks (and
        moves on to the next if that says no).
        """
        result = []
        for element_id in element_ids:
            found = self._breakers.get(element_id)
            if found is None or found.would_allow(now):
                result.append(element_id)
        return result

    def needs_probe(self, now: float) -> list[str]:
        """HALF_OPEN elements whose trial is free, sorted: the shell takes the trial with
        `breaker(id).allow(now)`, probes `/health/ready`, and reports success or failure."""
        return sorted(
            element_id for element_id, found in self._breakers.items() if found.trial_available(now)
        )

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        """For metrics and readiness: each element's state, failures, trips and open_until."""
        return {
            element_id: self._breakers[element_id].snapshot(now)
            for element_id in sorted(self._breakers)
        }
