"""Saga records: which copies compensation removes in each state, and the wire format."""

from __future__ import annotations

import pytest

from ingester.saga.record import Copy, SagaRecord, SagaState

A = Copy("se-a", "http://127.0.0.1:1")
B = Copy("se-b", "http://127.0.0.1:2")
C = Copy("se-c", "http://127.0.0.1:3")


def record() -> SagaRecord:
    return SagaRecord(upload_id="u1", file_id="f1", owner="ingester-1", user="alice")


def test_a_new_record_has_nothing_to_undo() -> None:
    r = record()
    assert r.state is SagaState.RECEIVING
    assert r.targets() == []
    assert not r.finished


def test_copies_are_noted_once_in_order() -> None:
    r = record()
    assert r.add_copy(A)
    assert r.add_copy(B)
    assert not r.add_copy(A)
    assert r.copies == [A, B]


@pytest.mark.parametrize("state", [SagaState.RECEIVING, SagaState.STORED])
def test_an_unfinished_upload_undoes_every_copy(state: SagaState) -> None:
    # What a janitor finds when the owner died: the client never got a 201.
    r = record()
    r.add_copy(A)
    r.add_copy(B)
    r.state = state
    assert r.targets() == [A, B]


def test_success_keeps_the_acknowledged_copy_and_undoes_the_abandoned_ones() -> None:
    r = record()
    for copy in (A, B, C):
        r.add_copy(copy)
    r.settle_success(B)
    assert r.kept == B
    assert r.state is SagaState.COMPENSATING
    assert r.targets() == [A, C]
    r.forget(A)
    r.forget(C)
    assert r.finished
    assert r.kept == B


def test_success_on_the_only_copy_leaves_nothing_to_do() -> None:
    r = record()
    r.add_copy(A)
    r.settle_success(A)
    assert r.state is SagaState.DONE
    assert r.targets() == []
    assert not r.finished  # done, not compensated: the owner deletes it


def test_a_done_record_never_targets_its_kept_copy() -> None:
    r = record()
    r.add_copy(A)
    r.state = SagaState.DONE
    r.kept = A
    assert r.targets() == []


def test_failure_undoes_every_copy_until_each_is_confirmed_gone() -> None:
    r = record()
    r.add_copy(A)
    r.add_copy(B)
    r.settle_failure()
    assert r.state is SagaState.COMPENSATING
    assert r.targets() == [A, B]
    r.forget(B)
    assert r.targets() == [A]
    assert not r.finished
    r.forget(A)
    assert r.finished


def test_json_round_trip_keeps_everything() -> None:
    r = record()
    r.add_copy(A)
    r.add_copy(B)
    r.settle_success(B)
    r.attempts = 3
    r.last_error = "se-a: cannot connect"
    r.created_at = 1700000000.5
    r.authorization = "Bearer abc"
    r.landing.note(A, 1700000600.0)
    again = SagaRecord.from_json(r.to_json())
    assert again == r
    assert again.targets() == [A]
    assert again.landing.open_until(A, 1700000000.0) == 1700000600.0


def test_a_copy_that_may_still_land_is_open_until_its_window_closes_or_it_is_gone() -> None:
    r = record()
    r.add_copy(A)
    r.add_copy(B)
    r.landing.note(A, 100.0)
    r.landing.note(A, 90.0)  # an earlier end never shortens a window
    assert r.landing.open_until(A, 99.9) == 100.0
    assert r.landing.open_until(A, 100.0) is None
    assert r.landing.open_until(B, 0.0) is None
    assert r.landing.next_end(r.copies, 40.0) == 60.0
    assert r.landing.next_end(r.copies, 100.0) is None
    r.forget(A)
    assert r.landing.open_until(A, 0.0) is None
    r.landing.note(B, 50.0)
    r.settle_success(B)  # the kept copy is not removed: nothing to watch
    assert r.landing.until == {}


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "[]",
        "{}",
        '{"upload_id": "u", "file_id": "f", "owner": "o", "state": "flying"}',
        '{"upload_id": "u", "file_id": "f", "owner": "o", "state": "receiving", "copies": [1]}',
        b"\xff\xfe",
    ],
)
def test_anything_else_is_refused_with_value_error(raw: str | bytes) -> None:
    with pytest.raises(ValueError, match="not a saga record"):
        SagaRecord.from_json(raw)


def test_a_success_that_could_not_be_confirmed_undoes_the_kept_copy_too() -> None:
    # succeeded() sets the kept copy aside before the store confirms; when the store says
    # no (or is away), the upload fails and that copy must go as well.
    r = record()
    r.add_copy(A)
    r.add_copy(B)
    r.settle_success(B)
    r.settle_failure()
    assert sorted(r.targets(), key=lambda c: c.element_id) == [A, B]
    assert r.kept is None
