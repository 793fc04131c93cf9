"""collapse(): the one error reported for a nursery's group, and none of the others lost."""

from __future__ import annotations

import logging

import pytest
import trio

from ingester.errors import NoStorageAvailable, StorageElementError
from ingester.groups import collapse


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
    with caplog.at_level(logging.INFO, logger="ingester.groups"):
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
    with caplog.at_level(logging.INFO, logger="ingester.groups"):
        chosen = collapse(BaseExceptionGroup("g", [BaseExceptionGroup("inner", [first]), second]))
    assert chosen is first
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "NO_STORAGE_AVAILABLE" in record.getMessage()


def test_cancellations_are_not_errors_and_only_cancellations_stay_a_group(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="ingester.groups"):
        only = BaseExceptionGroup("g", [cancelled(), cancelled()])
        assert collapse(only) is only
        error = StorageElementError("x")
        assert collapse(BaseExceptionGroup("g", [cancelled(), error])) is error
    assert caplog.records == []
