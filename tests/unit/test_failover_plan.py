"""The failover plan: every way an attempt can end, every answer when no candidate is left, and
that a burned element never comes back. Pure: time is a float, randomness a constant, the
retry budgets plain objects; nothing runs under trio.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ingester.errors import (
    InsufficientStorage,
    NoStorageAvailable,
    StorageElementError,
    StorageElementFull,
    StorageElementModeRefused,
    StorageElementRejected,
    StorageElementTimeout,
    StorageElementUnavailable,
)
from ingester.resilience.failover import (
    Failover,
    FailoverPlan,
    GiveUp,
    NewRound,
    NextCandidate,
    error_kind,
)
from ingester.resilience.retry import ErrorKind, RetryBudget, RetryPolicy
from ingester.settings import SEMode
from ingester.storage.selection import Candidate, no_candidate_error

POLICY = RetryPolicy()  # base 0.1 s, cap 5 s, 5 attempts
MODE = SEMode.RW


def se(id: str, *, priority: int = 100, free: int | None = None, mode: SEMode = MODE) -> Candidate:
    return Candidate(
        id=id,
        api_url=f"http://{id}:8010",
        mode=mode,
        priority=priority,
        capacity_bytes=None if free is None else 100,
        used_bytes=None if free is None else 100 - free,
        available=True,
    )


ELEMENTS = [se("se-a", priority=1), se("se-b", priority=2), se("se-c", priority=3)]


def roomy() -> RetryBudget:
    return RetryBudget(ratio=0.0, min_per_s=100.0, window_s=10.0)


def empty() -> RetryBudget:
    return RetryBudget(ratio=0.0, min_per_s=0.0, window_s=10.0)


class Budgets:
    """The pool's retry budgets as the plan sees them, and which ones it asked for."""

    def __init__(self, make: Callable[[], RetryBudget] = roomy) -> None:
        self.make = make
        self.by_id: dict[str, RetryBudget] = {}
        self.asked: list[str] = []

    def __call__(self, element_id: str) -> RetryBudget:
        self.asked.append(element_id)
        return self.by_id.setdefault(element_id, self.make())


def plan(
    *,
    policy: RetryPolicy = POLICY,
    budgets: Budgets | None = None,
    deadline: float | None = None,
    rand: float = 0.5,
    declared: int | None = None,
) -> FailoverPlan:
    return FailoverPlan(
        MODE,
        declared,
        policy=policy,
        budget_for=Budgets() if budgets is None else budgets,
        deadline=deadline,
        rand=lambda: rand,
    )


# --- element errors, as `storage.client` makes them ------------------------------------------


def connect(element_id: str) -> StorageElementError:
    return StorageElementUnavailable(f"{element_id}: cannot connect", element_id=element_id)


def stalled(element_id: str) -> StorageElementError:
    return StorageElementTimeout(f"{element_id} accepted nothing for 30 s", element_id=element_id)


def answered(element_id: str, status: int, said: str = "boom") -> StorageElementError:
    message = f"{element_id} answered {status}: {said}"
    if status == 507:
        return StorageElementFull(message, element_id=element_id, upstream_status=status)
    if status == 429:
        return StorageElementUnavailable(message, element_id=element_id, upstream_status=status)
    if status >= 500:
        return StorageElementError(message, element_id=element_id, upstream_status=status)
    return StorageElementRejected(
        message, element_id=element_id, upstream_status=status, retryable=False
    )


def mode_refused(element_id: str) -> StorageElementError:
    return StorageElementModeRefused(f"{element_id} answered 400: read-only", element_id=element_id)


# Failures after which the upload goes on elsewhere, with whether the element answered.
RETRYABLE = [
    pytest.param(connect, False, id="connect"),
    pytest.param(stalled, False, id="stall"),
    *(
        pytest.param(lambda e, status=status: answered(e, status), True, id=str(status))
        for status in (500, 502, 503, 429, 507)
    ),
    pytest.param(mode_refused, True, id="mode refused"),
]
NOT_RETRYABLE = [
    pytest.param(lambda e, status=status: answered(e, status), id=str(status))
    for status in (400, 401, 409, 413)
]
BYTES_AND_SPOOL = list(itertools.product([False, True], repeat=2))


def fail(
    p: FailoverPlan,
    error: StorageElementError,
    *,
    bytes_sent: bool = False,
    spooled: bool = True,
    now: float = 0.0,
) -> NextCandidate | Failover:
    assert error.element_id is not None
    p.attempting(error.element_id)
    return p.failed(error, bytes_sent=bytes_sent, spooled=spooled, now=now)


# --- one attempt's failure --------------------------------------------------------------------


def test_a_new_plan_excludes_nothing() -> None:
    p = plan()
    assert p.excluded == ()
    assert p.burned == ()
    assert p.rounds == 0
    assert p.failures == []


def test_an_attempt_is_excluded_for_the_rest_of_the_round() -> None:
    p = plan()
    assert p.attempting("se-a") is False
    assert p.excluded == ("se-a",)
    with pytest.raises(ValueError, match="se-a is excluded now"):
        p.attempting("se-a")


@pytest.mark.parametrize(("make", "has_status"), RETRYABLE)
@pytest.mark.parametrize("spooled", [False, True])
def test_a_failure_before_any_byte_goes_to_the_next_candidate(
    make: Callable[[str], StorageElementError], has_status: bool, spooled: bool
) -> None:
    p = plan()
    error = make("se-a")
    assert fail(p, error, spooled=spooled) == NextCandidate()
    assert p.failures == [error]
    assert p.excluded == ("se-a",)
    assert p.burned == ()


@pytest.mark.parametrize(("make", "has_status"), RETRYABLE)
def test_a_failure_after_bytes_with_a_spool_fails_over(
    make: Callable[[str], StorageElementError], has_status: bool
) -> None:
    p = plan()
    move = fail(p, make("se-a"), bytes_sent=True)
    # Only an element that answered is asked to drop its copy at once.
    assert move == Failover("se-a", remove_now=has_status)
    # Burned until the removal is reported.
    assert p.burned == ("se-a",)
    assert p.excluded == ("se-a",)


@pytest.mark.parametrize(
    ("make", "bytes_sent", "spooled"),
    [
        # Bytes went out and there is nothing to send them again from.
        *(pytest.param(p.values[0], True, False, id=f"{p.id}-no spool") for p in RETRYABLE),
        # The request itself is at fault: another element would say the same.
        *(
            pytest.param(*p.values, sent, spooled, id=f"{p.id}-{sent=}-{spooled=}")
            for p in NOT_RETRYABLE
            for sent, spooled in BYTES_AND_SPOOL
        ),
    ],
)
def test_a_failure_that_cannot_go_elsewhere_ends_the_upload(
    make: Callable[[str], StorageElementError], bytes_sent: bool, spooled: bool
) -> None:
    p = plan()
    error = make("se-a")
    with pytest.raises(StorageElementError) as raised:
        fail(p, error, bytes_sent=bytes_sent, spooled=spooled)
    assert raised.value is error
    assert p.failures == [error]
    assert p.burned == ()


@pytest.mark.parametrize("status", [500, 501])
@pytest.mark.parametrize(("bytes_sent", "spooled"), BYTES_AND_SPOOL)
def test_a_refusal_repeated_by_another_element_ends_the_upload(
    status: int, bytes_sent: bool, spooled: bool
) -> None:
    p = plan()
    said = "Failed to create file"
    assert fail(p, answered("se-a", status, said)) == NextCandidate()
    with pytest.raises(StorageElementRejected) as raised:
        fail(p, answered("se-b", status, said), bytes_sent=bytes_sent, spooled=spooled)
    refusal = raised.value
    assert refusal.message == (
        f"se-a and se-b refused this file alike ({status}: {said}); not retried on other elements"
    )
    assert (refusal.element_id, refusal.upstream_status, refusal.retryable) == (
        "se-b",
        status,
        False,
    )


def test_a_refusal_repeated_by_the_same_element_in_a_later_round_ends_the_upload() -> None:
    p = plan()
    assert fail(p, answered("se-a", 500, "Failed to create file")) == NextCandidate()
    assert isinstance(p.nothing_left(ELEMENTS, now=0.0), NewRound)
    with pytest.raises(StorageElementRejected, match="se-a refused this file twice alike"):
        fail(p, answered("se-a", 500, "Failed to create file"))


def test_different_server_errors_are_no_repeated_refusal() -> None:
    p = plan()
    assert fail(p, answered("se-a", 500, "disk on fire")) == NextCandidate()
    assert fail(p, answered("se-b", 500, "Failed to create file")) == NextCandidate()
    assert fail(p, answered("se-c", 502, "Failed to create file")) == NextCandidate()


def test_an_error_is_recorded_once() -> None:
    p = plan()
    p.attempting("se-a")
    error = StorageElementUnavailable("the circuit breaker for se-a opened", element_id="se-a")
    # A trip records its attempt's error as the attempt ends...
    assert p.record(error) is True
    # ...and the failure handling after it sees it as known.
    assert p.record(error) is False
    assert p.failed(error, bytes_sent=False, spooled=True, now=0.0) == NextCandidate()
    assert p.failures == [error]
    # An equal error is still another failure.
    other = StorageElementUnavailable("the circuit breaker for se-a opened", element_id="se-a")
    assert p.record(other) is True
    assert p.failures == [error, other]


def test_a_failure_needs_an_attempt() -> None:
    p = plan()
    with pytest.raises(ValueError, match="no attempt is in progress"):
        p.failed(connect("se-a"), bytes_sent=False, spooled=True, now=0.0)
    fail(p, connect("se-a"))
    with pytest.raises(ValueError, match="no attempt is in progress"):
        p.failed(connect("se-a"), bytes_sent=False, spooled=True, now=0.0)


# --- removal of a copy left behind ------------------------------------------------------------


@pytest.mark.parametrize("confirmed", [False, True])
def test_a_failed_over_element_comes_back_only_once_its_copy_is_gone(confirmed: bool) -> None:
    p = plan()
    assert fail(p, answered("se-a", 502), bytes_sent=True) == Failover("se-a", remove_now=True)
    p.copy_removed("se-a", confirmed=confirmed)
    burned = () if confirmed else ("se-a",)
    assert p.burned == burned
    # Either way not again this round.
    assert p.excluded == ("se-a",)
    assert fail(p, connect("se-b")) == NextCandidate()
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, NewRound)
    assert p.excluded == burned
    if confirmed:
        assert p.attempting("se-a") is True
    else:
        with pytest.raises(ValueError, match="excluded"):
            p.attempting("se-a")


def test_a_removal_is_reported_for_a_failover_only() -> None:
    p = plan()
    with pytest.raises(ValueError, match="se-a has no copy waiting for removal"):
        p.copy_removed("se-a", confirmed=True)
    fail(p, connect("se-a"))
    with pytest.raises(ValueError, match="se-a has no copy waiting for removal"):
        p.copy_removed("se-a", confirmed=False)


def test_an_element_can_be_burned_again_after_a_confirmed_removal() -> None:
    p = plan()
    fail(p, answered("se-a", 502), bytes_sent=True)
    p.copy_removed("se-a", confirmed=True)
    p.nothing_left(ELEMENTS, now=0.0)
    assert fail(p, stalled("se-a"), bytes_sent=True) == Failover("se-a", remove_now=False)
    p.copy_removed("se-a", confirmed=False)
    p.nothing_left(ELEMENTS, now=0.0)
    assert p.excluded == ("se-a",)


# --- success ----------------------------------------------------------------------------------


def test_success_without_a_failure_has_no_failover_to_observe() -> None:
    p = plan()
    p.attempting("se-a")
    assert p.succeeded(5.0) is None


def test_success_observes_the_time_since_the_failure_it_went_on_from() -> None:
    p = plan()
    fail(p, connect("se-a"), now=10.0)
    fail(p, answered("se-b", 502), bytes_sent=True, now=12.5)
    p.copy_removed("se-b", confirmed=True)
    p.attempting("se-c")
    assert p.succeeded(15.0) == 2.5


def test_a_failure_that_ends_the_upload_sets_no_failover_time() -> None:
    p = plan()
    fail(p, connect("se-a"), now=10.0)
    with pytest.raises(StorageElementError):
        fail(p, connect("se-b"), bytes_sent=True, spooled=False, now=20.0)
    p.attempting("se-c")
    assert p.succeeded(30.0) == 20.0


# --- no candidate left: the answer --------------------------------------------------------------


@pytest.mark.parametrize(
    "elements",
    [
        [],
        [se("se-a", mode=SEMode.EDIT)],
        [se("se-a", free=0), se("se-b", free=5)],
    ],
    ids=["none", "other mode", "no room"],
)
def test_no_candidate_at_all_gives_the_registrys_error(elements: list[Candidate]) -> None:
    p = plan(declared=10)
    verdict = p.nothing_left(elements, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused is None
    expected = no_candidate_error(elements, mode=MODE, declared_size=10)
    assert type(verdict.error) is type(expected)
    assert verdict.error.message == expected.message
    assert p.rounds == 0


@pytest.mark.parametrize("count", [1, 2, 3])
def test_all_full_gives_insufficient_storage_at_once(count: int) -> None:
    p = plan()
    for element in ELEMENTS[:count]:
        assert fail(p, answered(element.id, 507, "disk full")) == NextCandidate()
    # Candidates remain (the registry thinks they have room), but no round is tried.
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused is None
    assert type(verdict.error) is InsufficientStorage
    assert verdict.error.message == f"{ELEMENTS[count - 1].id} answered 507: disk full"


@pytest.mark.parametrize(
    "first", [connect, stalled, lambda e: answered(e, 502)], ids=["connect", "stall", "502"]
)
def test_full_after_another_failure_is_no_storage_available(
    first: Callable[[str], StorageElementError],
) -> None:
    p = plan()
    fail(p, first("se-a"))
    fail(p, answered("se-b", 507, "disk full"))
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert type(verdict.error) is NoStorageAvailable
    assert verdict.error.message == (
        "no rw Storage Element left after 2 failed: se-b answered 507: disk full"
    )


def test_a_recorded_non_retryable_last_failure_gives_up_without_asking() -> None:
    budgets = Budgets()
    p = plan(budgets=budgets)
    fail(p, connect("se-a"))
    p.record(answered("se-b", 400))
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused is None
    assert verdict.error.message == (
        "no rw Storage Element left after 2 failed: se-b answered 400: boom"
    )
    assert budgets.asked == []


def test_nothing_left_but_burned_elements_gives_up() -> None:
    p = plan()
    for element in ELEMENTS:
        fail(p, stalled(element.id), bytes_sent=True)
        p.copy_removed(element.id, confirmed=False)
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused is None
    assert type(verdict.error) is NoStorageAvailable
    assert p.rounds == 0


# --- no candidate left: another round ------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        connect,
        stalled,
        lambda e: answered(e, 502),
        lambda e: answered(e, 503),
        lambda e: answered(e, 429),
    ],
    ids=["connect", "stall", "502", "503", "429"],
)
def test_a_safe_failure_starts_another_round_after_a_backoff(
    make: Callable[[str], StorageElementError],
) -> None:
    budgets = Budgets()
    p = plan(budgets=budgets, rand=0.5)
    for element in ELEMENTS:
        fail(p, make(element.id))
    assert set(p.excluded) == {"se-a", "se-b", "se-c"}
    verdict = p.nothing_left(ELEMENTS, now=100.0)
    # Half of the first ceiling, 0.1 s.
    assert verdict == NewRound(0.05, number=2, reason="retry")
    assert p.rounds == 1
    assert p.excluded == ()
    # The best candidate's budget paid for it.
    assert budgets.asked == ["se-a"]
    assert budgets.by_id["se-a"].retries_in_window(100.0) == 1


def test_the_budget_asked_is_the_best_candidate_not_burned() -> None:
    budgets = Budgets()
    p = plan(budgets=budgets)
    fail(p, stalled("se-a"), bytes_sent=True)
    p.copy_removed("se-a", confirmed=False)
    fail(p, connect("se-b"))
    fail(p, connect("se-c"))
    assert isinstance(p.nothing_left(ELEMENTS, now=0.0), NewRound)
    assert budgets.asked == ["se-b"]
    assert p.excluded == ("se-a",)


def test_rounds_back_off_exponentially_until_attempts_run_out() -> None:
    p = plan(rand=1.0)
    waits = []
    numbers = []
    for _ in range(POLICY.max_attempts - 1):
        for element in ELEMENTS:
            fail(p, connect(element.id))
        verdict = p.nothing_left(ELEMENTS, now=0.0)
        assert isinstance(verdict, NewRound)
        waits.append(verdict.wait_s)
        numbers.append(verdict.number)
    assert waits == [0.1, 0.2, 0.4, 0.8]
    assert numbers == [2, 3, 4, 5]
    for element in ELEMENTS:
        fail(p, connect(element.id))
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused == "attempts_exhausted"
    assert type(verdict.error) is NoStorageAvailable
    assert p.rounds == POLICY.max_attempts - 1


def test_a_single_attempt_policy_never_goes_round_again() -> None:
    p = plan(policy=RetryPolicy(max_attempts=1))
    fail(p, connect("se-a"))
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused == "attempts_exhausted"


@pytest.mark.parametrize(
    ("deadline", "goes_again"),
    [(None, True), (100.06, True), (100.05, False), (100.0, False), (50.0, False)],
)
def test_another_round_must_start_before_the_deadline(
    deadline: float | None, goes_again: bool
) -> None:
    budgets = Budgets()
    p = plan(budgets=budgets, deadline=deadline, rand=0.5)  # the wait: 0.05 s
    fail(p, connect("se-a"))
    verdict = p.nothing_left(ELEMENTS, now=100.0)
    if goes_again:
        assert verdict == NewRound(0.05, number=2, reason="retry")
    else:
        assert isinstance(verdict, GiveUp)
        assert verdict.refused == "deadline"
        assert p.rounds == 0
        assert p.excluded == ("se-a",)
        assert budgets.by_id["se-a"].retries_in_window(100.0) == 0


def test_an_exhausted_budget_ends_the_upload() -> None:
    p = plan(budgets=Budgets(empty))
    fail(p, connect("se-a"))
    verdict = p.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused == "budget_exhausted"
    assert verdict.error.message == (
        "no rw Storage Element left after 1 failed: se-a: cannot connect"
    )


def test_uploads_share_the_elements_budgets() -> None:
    budgets = Budgets(lambda: RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10.0))  # one
    first, second = plan(budgets=budgets), plan(budgets=budgets)
    fail(first, connect("se-a"))
    fail(second, connect("se-a"))
    assert isinstance(first.nothing_left(ELEMENTS, now=0.0), NewRound)
    verdict = second.nothing_left(ELEMENTS, now=0.0)
    assert isinstance(verdict, GiveUp)
    assert verdict.refused == "budget_exhausted"


# --- error kinds --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (answered("se-a", 507), "507"),
        (stalled("se-a"), "timeout"),
        (answered("se-a", 400), "4xx"),
        (answered("se-a", 409), "4xx"),
        (answered("se-a", 429), "503"),
        (answered("se-a", 503), "503"),
        (connect("se-a"), "connect"),
        (answered("se-a", 500), "5xx"),
        (answered("se-a", 502), "5xx"),
        (answered("se-a", 504), "5xx"),
        (mode_refused("se-a"), "5xx"),
        (StorageElementError("se-a: ProtocolError", element_id="se-a"), "5xx"),
    ],
)
def test_error_kinds(error: StorageElementError, kind: ErrorKind) -> None:
    assert error_kind(error) == kind


# --- a whole upload, in random weather ------------------------------------------------------------

# What one attempt does: succeed, fail before any byte, or fail after bytes (the element
# answered or not), and whether a copy left behind is confirmed removed.
OUTCOMES = st.sampled_from(["ok", "connect", "502 before", "502 after", "stall after"])
IDS = [f"se-{n}" for n in range(4)]


@settings(max_examples=300, deadline=None)
@given(
    outcomes=st.lists(st.tuples(OUTCOMES, st.booleans()), max_size=60),
    available=st.lists(st.sampled_from(IDS), min_size=1, max_size=4, unique=True),
    rand=st.floats(min_value=0.0, max_value=1.0),
)
def test_a_burned_element_is_never_offered_again(
    outcomes: list[tuple[str, bool]], available: list[str], rand: float
) -> None:
    elements = [se(element_id, priority=n) for n, element_id in enumerate(available)]
    policy = RetryPolicy(max_attempts=3)
    p = plan(policy=policy, rand=rand)
    burned: set[str] = set()
    offered: list[str] = []
    now = 0.0
    for outcome, confirmed in outcomes:
        # The pool: the best element the plan does not exclude.
        element = next((e.id for e in elements if e.id not in p.excluded), None)
        if element is None:
            verdict = p.nothing_left(elements, now)
            assert p.rounds <= policy.max_attempts - 1
            if isinstance(verdict, GiveUp):
                # Only once every element is burned, or retries are refused.
                assert verdict.refused is not None or burned >= {e.id for e in elements}
                event(f"gave up: {verdict.refused}")
                return
            assert set(p.excluded) == burned
            now += verdict.wait_s
            event("new round")
            continue
        assert element not in burned
        offered.append(element)
        p.attempting(element)
        now += 1.0
        if outcome == "ok":
            assert (p.succeeded(now) is None) == (len(offered) == 1)
            return
        error = {
            "connect": connect,
            "502 before": lambda e: answered(e, 502),
            "502 after": lambda e: answered(e, 502),
            "stall after": stalled,
        }[outcome](element)
        move = p.failed(error, bytes_sent=outcome.endswith("after"), spooled=True, now=now)
        if isinstance(move, Failover):
            assert move == Failover(element, remove_now=outcome == "502 after")
            p.copy_removed(element, confirmed=confirmed)
            event(f"failover, removal confirmed: {confirmed}")
            if not confirmed:
                burned.add(element)
        else:
            assert outcome in ("connect", "502 before")
        assert set(p.burned) == burned
        assert burned <= set(p.excluded)
