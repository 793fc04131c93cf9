"""A breaker that trips cancels the element attempts in flight there, and only there: the
service's wiring between the breaker board and uploads (no I/O: nothing is started)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from ingester.errors import StorageElementRejected, StorageElementUnavailable
from ingester.service import Service
from ingester.settings import Settings


class Attempt:
    """What the service sees of an upload's element attempt: a cancel scope and `trip`."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.tripped = False

    def trip(self) -> None:
        self.tripped = True
        self.scope.cancel()


def cancelled(attempt: Attempt) -> bool:
    """Tripped, and its scope cancelled (the attempt ends, the upload fails over)."""
    return attempt.tripped and attempt.scope.cancel_called


def service(**overrides: Any) -> Service:
    elements = [
        {"id": name, "api_url": f"http://127.0.0.1:{port}", "mode": "edit"}
        for name, port in (("se-a", 1), ("se-b", 2), ("se-c", 3))
    ]
    settings = Settings(
        storage_elements=json.dumps(elements),  # type: ignore[arg-type]
        breaker_failure_threshold=2,
        breaker_max_ejected_share=0.5,
        **overrides,
    )
    return Service(settings)


async def test_the_trip_cancels_attempts_on_that_element_only() -> None:
    with trio.fail_after(5):
        svc = service()
        on_a, also_on_a, on_b = Attempt(), Attempt(), Attempt()
        svc.attempts["se-a"] = {on_a, also_on_a}  # type: ignore[arg-type]
        svc.attempts["se-b"] = {on_b}  # type: ignore[arg-type]
        failure = StorageElementUnavailable("se-a: cannot connect", element_id="se-a")
        svc.note_se_failure("se-a", failure)
        # One failure under the threshold of 2: nothing cancelled yet.
        assert not cancelled(on_a)
        svc.note_se_failure("se-a", failure)
        assert cancelled(on_a)
        assert cancelled(also_on_a)
        assert not on_b.tripped
        assert not on_b.scope.cancel_called
        await svc.http.aclose()


async def test_errors_that_say_nothing_about_the_element_never_trip() -> None:
    with trio.fail_after(5):
        svc = service()
        attempt = Attempt()
        svc.attempts["se-a"] = {attempt}  # type: ignore[arg-type]
        refused = StorageElementRejected("se-a answered 400", element_id="se-a", retryable=False)
        for _ in range(5):
            svc.note_se_failure("se-a", refused)
        assert not attempt.scope.cancel_called
        await svc.http.aclose()


@pytest.mark.parametrize("first", ["se-a", "se-b"])
async def test_the_ejection_cap_keeps_a_second_element_in(first: str) -> None:
    # Three elements, at most half ejected: one may open, a second may not, so the uploads on
    # the second keep going rather than all failing over to the last one.
    with trio.fail_after(5):
        svc = service()
        second = "se-b" if first == "se-a" else "se-a"
        on_first, on_second = Attempt(), Attempt()
        svc.attempts[first] = {on_first}  # type: ignore[arg-type]
        svc.attempts[second] = {on_second}  # type: ignore[arg-type]
        for element_id in (first, first, second, second):
            svc.note_se_failure(
                element_id, StorageElementUnavailable("down", element_id=element_id)
            )
        assert on_first.tripped
        assert not on_second.tripped
        await svc.http.aclose()
