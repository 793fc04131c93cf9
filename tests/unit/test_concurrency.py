"""collapse(): the one error reported for a nursery's group, and none of the others lost;
cleanup_scope(): a cleanup that runs under cancellation, until its deadline."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from ingester.concurrency import cleanup_scope, collapse
from ingester.errors import NoStorageAvailable, StorageElementError


def cancelled() -> trio.Cancelled:
    # trio.Cancelled has no public constructor; one raised by a cancelled scope is real.
    async def catch() -> trio.Cancelled:
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep_forever()
            except trio.Cancelled as exc:
                return exc
        raise AssertionError("not cancelled")

    return trio.run(catch)


def test_the_project_error_is_reported_and_a_bug_beside_it_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    element = StorageElementError("se-1 went away")
    try:
        raise TypeError("a bug")
    except TypeError as exc:
        bug = exc
    with caplog.at_level(logging.INFO, logger="ingester.concurrency"):
        chosen = collapse(BaseExceptionGroup("g", [bug, element]))
    assert chosen is element
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[1] is bug
    assert "STORAGE_ELEMENT" in record.getMessage()


def test_a_second_project_error_is_logged_as_information(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = StorageElementError("se-1 went away"), NoStorageAvailable()
    with caplog.at_level(logging.INFO, logger="ingester.concurrency"):
        chosen = collapse(BaseExceptionGroup("g", [BaseExceptionGroup("inner", [first]), second]))
    assert chosen is first
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "NO_STORAGE_AVAILABLE" in record.getMessage()


def test_cancellations_are_not_errors_and_only_cancellations_stay_a_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="ingester.concurrency"):
        only = BaseExceptionGroup("g", [cancelled(), cancelled()])
        assert collapse(only) is only
        error = StorageElementError("x")
        assert collapse(BaseExceptionGroup("g", [cancelled(), error])) is error
    assert caplog.records == []


async def test_a_cleanup_scope_runs_under_cancellation_and_stops_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    finished: list[str] = []
    with trio.CancelScope() as caller:
        caller.cancel()  # the caller is cancelled already: a cleanup still runs
        with cleanup_scope(5) as quick:
            await trio.sleep(1)
            finished.append("quick")
        assert not quick.cancelled_caught
        started = trio.current_time()
        with cleanup_scope(5) as stuck:
            await trio.sleep(60)
            finished.append("stuck")
        assert stuck.cancelled_caught
        assert trio.current_time() - started == 5
    assert finished == ["quick"]
