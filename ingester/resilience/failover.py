"""Where one upload goes after a failed attempt on a Storage Element. No I/O.

The streamer owns the I/O (the attempt, the saga, metrics, logs, the pool); a `FailoverPlan`
owns the decisions, and the streamer reads as a sequence of them:

    plan = FailoverPlan(mode, declared, policy=..., budget_for=..., deadline=..., rand=...)
    element = pool.next_element(mode, declared, plan.excluded)   # None: plan.nothing_left(...)
    is_retry = plan.attempting(element.id)
    ... the attempt ...
    plan.succeeded(now)          # the failover time to observe, if there was a failure
    plan.failed(error, ...)      # raises, or NextCandidate, or Failover
    plan.copy_removed(id, confirmed=...)   # after a Failover

Within a round an upload goes from candidate to candidate at once. When no candidate is left,
`nothing_left` either gives up with the answer for the client or names the wait before
another round (full-jitter backoff from `retry.decide`, within the best candidate's retry
budget and the upload's deadline). An element that failed before taking a byte may be tried
again in a later round. One that was sent bytes is burned (never tried again by this upload)
unless its copy is confirmed removed: a removal arriving late must not hit a new copy.

Time comes in as `now` and randomness as `rand`, as in `retry.decide`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import (
    IngesterError,
    InsufficientStorage,
    NoStorageAvailable,
    StorageElementError,
    StorageElementFull,
    StorageElementTimeout,
    StorageElementUnavailable,
)
from ..settings import SEMode
from ..storage.refusals import repeated_refusal
from ..storage.selection import Candidate, no_candidate_error, rank_candidates
from .retry import ErrorKind, RetryBudget, RetryPolicy, decide


@dataclass(frozen=True, slots=True)
class NextCandidate:
    """The attempt failed before any byte went out: try the next candidate at once."""


@dataclass(frozen=True, slots=True)
class Failover:
    """Bytes went out to `element_id`: the next element gets them again from the spool.

    The element's copy must go. `remove_now`: it answered (an HTTP status), so it is asked at
    once; otherwise (dead, stalled, tripped) asking now would only wait. The shell reports the
    outcome with `FailoverPlan.copy_removed`.
    """

    element_id: str
    remove_now: bool


@dataclass(frozen=True, slots=True)
class NewRound:
    """Every candidate failed this round: wait `wait_s`, then round `number` (from 1) starts."""

    wait_s: float
    number: int
    # `retry.decide`'s reason, for the log.
    reason: str


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No candidate is left: `error` is the upload's answer.

    `refused`: `retry.decide`'s reason when another round was asked for and refused (the
    shell logs it), None when the failures ruled one out before that.
    """

    error: IngesterError
    refused: str | None = None


class FailoverPlan:
    """One upload's tries: which elements to skip, and what a failure or an empty round means.

    `budget_for(element_id)`: that element's retry budget (the pool keeps them, shared by
    every upload); a new round spends from the best remaining candidate's.
    """

    def __init__(
        self,
        mode: SEMode,
        declared_size: int | None,
        *,
        policy: RetryPolicy,
        budget_for: Callable[[str], RetryBudget],
        deadline: float | None,
        rand: Callable[[], float],
        burned: Sequence[str] = (),
    ) -> None:
        self.mode = mode
        self.declared_size = declared_size
        self.policy = policy
        self.deadline = deadline
        self._budget_for = budget_for
        self._rand = rand
        # Every failure of the upload, in order: repeated refusals and the answer read them.
        self.failures: list[StorageElementError] = []
        # Rounds started after the first: the attempt number `decide` is asked about.
        self.rounds = 0
        # Elements that were sent bytes and whose copy is not known to be gone (`burned`:
        # such elements from before this plan, a pass of the same upload that was given up).
        self._burned: list[str] = list(dict.fromkeys(burned))
        # Elements tried this round, burned ones included (a new round starts from those).
        self._tried: list[str] = list(self._burned)
        self._current: str | None = None
        # When the latest failure the upload went on from happened (None: none yet).
        self._failed_at: float | None = None

    @property
    def excluded(self) -> tuple[str, ...]:
        """What the pool must not offer now: tried this round, or burned."""
        return tuple(self._tried)

    @property
    def burned(self) -> tuple[str, ...]:
        return tuple(self._burned)

    def attempting(self, element_id: str) -> bool:
        """`element_id` is about to be tried. True when this is a retry (any attempt after
        the first round); the shell counts retries, and first attempts as requests."""
        if element_id in self._tried:
            raise ValueError(f"{element_id} is excluded now: the pool must not offer it")
        self._tried.append(element_id)
        self._current = element_id
        return self.rounds > 0

    def record(self, error: StorageElementError) -> bool:
        """Count a failure: True when it is new, False for the error recorded last.

        A breaker trip records its attempt's error as it ends (the trip itself was counted
        against the element), and the failure handling after it must not count it again.
        """
        if self.failures and self.failures[-1] is error:
            return False
        self.failures.append(error)
        return True

    def failed(
        self, error: StorageElementError, *, bytes_sent: bool, spooled: bool, now: float
    ) -> NextCandidate | Failover:
        """The current attempt failed with `error` (recorded here if it is not yet).

        Raises the error that ends the upload: a refusal another element already gave alike
        (`repeated_refusal`), a non-retryable error, or any error after bytes went out with
        no spool to send them again from. Otherwise the upload goes on elsewhere.
        """
        element_id = self._current
        if element_id is None:
            raise ValueError("no attempt is in progress")
        self._current = None
        self.record(error)
        refusal = repeated_refusal(self.failures)
        if refusal is not None:
            raise refusal
        if not error.retryable or (bytes_sent and not spooled):
            raise error
        self._failed_at = now
        if not bytes_sent:
            return NextCandidate()
        # Burned until its copy is confirmed gone (`copy_removed`): whatever happens to the
        # removal, no new copy can meet it.
        self._burned.append(element_id)
        return Failover(element_id, remove_now=error.upstream_status is not None)

    def copy_removed(self, element_id: str, *, confirmed: bool) -> None:
        """What became of the copy a `Failover` left on `element_id`. Confirmed gone: the
        element may be tried again in a later round. Otherwise it stays burned."""
        if element_id not in self._burned:
            raise ValueError(f"{element_id} has no copy waiting for removal")
        if confirmed:
            self._burned.remove(element_id)

    def succeeded(self, now: float) -> float | None:
        """The current attempt stored the file: the failover's duration (since the failure
        it went on from) to observe, or None when nothing failed."""
        self._current = None
        return None if self._failed_at is None else now - self._failed_at

    def nothing_left(self, candidates: Sequence[Candidate], now: float) -> NewRound | GiveUp:
        """The pool has no candidate left this round: give up, or wait and go round again
        (then `excluded` is the burned elements only). `candidates`: the registry's, all."""
        last = self.failures[-1] if self.failures else None
        if last is None or not last.retryable:
            return GiveUp(self._answer(candidates))
        ranked = rank_candidates(
            candidates, mode=self.mode, declared_size=self.declared_size, exclude=self._burned
        )
        # All full: another round would find them full again.
        if not ranked or isinstance(last, StorageElementFull):
            return GiveUp(self._answer(candidates))
        decision = decide(
            attempt=self.rounds,
            error_kind=error_kind(last),
            # With the failover copy nothing is lost by going again: an element that was
            # sent bytes is never retried before its copy is gone.
            bytes_acknowledged=False,
            now=now,
            deadline=self.deadline,
            policy=self.policy,
            budget=self._budget_for(ranked[0].id),
            rand=self._rand,
        )
        if not decision.retry:
            return GiveUp(self._answer(candidates), refused=decision.reason)
        self.rounds += 1
        self._tried = list(self._burned)
        return NewRound(decision.wait_s, number=self.rounds + 1, reason=decision.reason)

    def _answer(self, candidates: Sequence[Candidate]) -> IngesterError:
        """507 when every try found the element full (or the registry says none has room),
        503 with Retry-After otherwise."""
        failures = self.failures
        if failures and all(isinstance(f, StorageElementFull) for f in failures):
            return InsufficientStorage(failures[-1].message)
        if failures:
            return NoStorageAvailable(
                f"no {self.mode.value} Storage Element left after "
                f"{len(failures)} failed: {failures[-1].message}"
            )
        return no_candidate_error(candidates, mode=self.mode, declared_size=self.declared_size)


def error_kind(error: StorageElementError) -> ErrorKind:
    """Our element errors as the retry policy names them."""
    if isinstance(error, StorageElementFull):
        return "507"
    if isinstance(error, StorageElementTimeout):
        return "timeout"
    if not error.retryable:
        return "4xx"
    if error.upstream_status in (429, 503):
        return "503"
    if isinstance(error, StorageElementUnavailable):
        return "connect"
    return "5xx"
