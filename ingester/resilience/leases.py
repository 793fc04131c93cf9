"""Records leased in a shared store, and calls tried until they work: what the saga book and
the finalizer both run.

A record in a store that replicas share has an owner and a due time, the end of its owner's
lease. While a process holds records, one lease keeper pushes the due time of all of them
forward every third of the lease, in one call; a record whose due time passed belongs to no
one alive, and any replica's janitor claims it (the store makes that one atomic step: the
lease is the lock). `Leases` runs both loops through callables, so it knows nothing of what
the records are or where they live. A store that is away is never the end of a loop: it is
logged once per outage (`Reachability`) and asked again at the next round.

Sleeps and deadlines are trio's (a `MockClock` drives them in tests); due times are the wall
clock's, which the replicas share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Generic, TypeVar

import trio

from .retry import RetryPolicy, backoff_s

# A store call that takes longer than this is a store that is away.
STORE_CALL_TIMEOUT_S: Final = 5.0
# The shortest wait between two tries: a jitter that draws near zero must not spin.
MIN_WAIT_S: Final = 0.05

R = TypeVar("R")
T = TypeVar("T")

# (ids, due) -> the ids among them the store says are not this process's any more.
Renew = Callable[[list[str], float], Awaitable[list[str]]]


class Reachability:
    """Whether a store answers, as the log tells it: a warning when it goes away and a line
    when it is back, not one per failed call. `errors` are what a call to it raises when it
    is away (its own error, or the `trio.fail_after` around the call)."""

    def __init__(
        self,
        log: logging.Logger,
        unavailable: type[Exception],
        *,
        away: str,
        away_event: str,
        back: str,
        back_event: str,
    ) -> None:
        self.errors: tuple[type[Exception], ...] = (unavailable, trio.TooSlowError)
        self.up = True
        self._log = log
        # `away` has one `%s`: the error.
        self._away = away
        self._away_event = away_event
        self._back = back
        self._back_event = back_event

    def away(self, exc: BaseException) -> None:
        if self.up:
            self._log.warning(self._away, str(exc) or "timeout", extra={"event": self._away_event})
        self.up = False

    def back(self) -> None:
        if not self.up:
            self._log.info(self._back, extra={"event": self._back_event})
        self.up = True

    async def ask(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`await call()`, bounded by `STORE_CALL_TIMEOUT_S`; None when the store is away."""
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                answer = await call()
        except self.errors as exc:
            self.away(exc)
            return None
        self.back()
        return answer


class Leases(Generic[R]):
    """This process's leases on one kind of record: `keep` renews them, `janitor` claims the
    records of owners whose lease ran out. Both run until cancelled.

    - `held()`: the ids whose lease to renew now;
    - `renew(ids, due)`: pushes their due time to `due`; the ids not ours any more, each
      told to `lost(id)`;
    - `claim(now, due)`: the records whose due time passed by `now`, now ours until `due`,
      each handed to `take(record)`, which starts what it needs (in the caller's nursery)
      and returns;
    - `catch_up()`, when given: before each renewal, writes what an outage kept from the
      store, so that `held()` can name it.
    """

    def __init__(
        self,
        reach: Reachability,
        *,
        lease_s: float,
        janitor_interval_s: float,
        held: Callable[[], list[str]],
        renew: Renew,
        lost: Callable[[str], None],
        claim: Callable[[float, float], Awaitable[list[R]]],
        take: Callable[[R], None],
        catch_up: Callable[[], Awaitable[None]] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.reach = reach
        self.lease_s = lease_s
        self.janitor_interval_s = janitor_interval_s
        self._held = held
        self._renew = renew
        self._lost = lost
        self._claim = claim
        self._take = take
        self._catch_up = catch_up
        self._wall = wall

    async def keep(self) -> None:
        """The lease keeper: a renewal every third of the lease."""
        while True:
            await trio.sleep(self.lease_s / 3)
            await self.renew()

    async def renew(self) -> None:
        """One renewal of every lease held."""
        if self._catch_up is not None:
            await self._catch_up()
        ids = self._held()
        if not ids:
            return
        lost = await self.reach.ask(lambda: self._renew(ids, self._wall() + self.lease_s))
        for record_id in lost or ():
            self._lost(record_id)

    async def janitor(self) -> None:
        """A sweep now, then one every `janitor_interval_s`."""
        while True:
            await self.sweep()
            await trio.sleep(self.janitor_interval_s)

    async def sweep(self) -> None:
        """Claim the records whose lease ran out and hand each over."""
        now = self._wall()
        claimed = await self.reach.ask(lambda: self._claim(now, now + self.lease_s))
        for record in claimed or ():
            self._take(record)


class TryAgain(Exception):
    """Raised by a call `retry` runs that is not done yet, when no other error says so;
    `within_s`, when given, bounds the wait before the next call (something is due then)."""

    def __init__(self, message: str = "", *, within_s: float | None = None) -> None:
        super().__init__(message)
        self.within_s = within_s


async def retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    rand: Callable[[], float],
    *,
    retry_on: type[Exception] | tuple[type[Exception], ...] = TryAgain,
    failures: int = 0,
    deadline: float | None = None,
    on_retry: Callable[[Exception, float], None] | None = None,
) -> T:
    """`await call()` until it returns; what it returns. After its n-th failure (it raised
    one of `retry_on`) the wait is `max(backoff_s(n, policy, rand), MIN_WAIT_S)`, or less when
    a `TryAgain` says within how long to call again; n counts on from `failures`, which a
    record may carry over from an earlier owner. `on_retry(error,
    wait)` hears of each failure before the wait (within the `except`, so a log call can
    take `exc_info`).

    For as long as it takes, unless `deadline` (trio time): a failure at or past it is
    raised. `policy.max_attempts` is not read: a loop bounded by attempts is not this one.
    """
    while True:
        try:
            return await call()
        except retry_on as exc:
            if deadline is not None and trio.current_time() >= deadline:
                raise
            failures += 1
            wait = backoff_s(failures, policy, rand)
            if isinstance(exc, TryAgain) and exc.within_s is not None:
                wait = min(wait, exc.within_s)
            wait = max(wait, MIN_WAIT_S)
            if on_retry is not None:
                on_retry(exc, wait)
        await trio.sleep(wait)
