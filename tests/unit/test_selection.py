"""Choosing a Storage Element: filters, ordering and the error when none fits. Pure, no I/O."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from ingester.errors import InsufficientStorage, NoStorageAvailable
from ingester.settings import SEMode
from ingester.storage.selection import Candidate, no_candidate_error, rank_candidates

GB = 10**9


def se(
    id: str,
    *,
    mode: SEMode = SEMode.EDIT,
    priority: int = 100,
    capacity: int | None = None,
    used: int | None = None,
    available: bool = True,
) -> Candidate:
    return Candidate(
        id=id,
        api_url=f"http://{id}:8010",
        mode=mode,
        priority=priority,
        capacity_bytes=capacity,
        used_bytes=used,
        available=available,
    )


def ids(candidates: list[Candidate]) -> list[str]:
    return [candidate.id for candidate in candidates]


def rank(
    elements: list[Candidate],
    *,
    mode: SEMode = SEMode.EDIT,
    declared_size: int | None = None,
    exclude: tuple[str, ...] = (),
) -> list[str]:
    return ids(rank_candidates(elements, mode=mode, declared_size=declared_size, exclude=exclude))


# --- free space -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "used", "free"),
    [
        (None, None, None),
        (10 * GB, None, None),
        (None, 3 * GB, None),
        (10 * GB, 3 * GB, 7 * GB),
        (10 * GB, 10 * GB, 0),
        (10 * GB, 12 * GB, 0),  # over-reported use never yields negative room
        (0, 0, 0),
    ],
)
def test_free_bytes(capacity: int | None, used: int | None, free: int | None) -> None:
    assert se("a", capacity=capacity, used=used).free_bytes == free


def test_candidate_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        se("a").priority = 1  # type: ignore[misc]


# --- filters --------------------------------------------------------------------------------------


def test_mode_filter() -> None:
    elements = [
        se("edit-1", mode=SEMode.EDIT),
        se("rw-1", mode=SEMode.RW),
        se("ro-1", mode=SEMode.RO),
        se("ar-1", mode=SEMode.AR),
        se("edit-2", mode=SEMode.EDIT),
    ]
    assert rank(elements, mode=SEMode.EDIT) == ["edit-1", "edit-2"]
    assert rank(elements, mode=SEMode.RW) == ["rw-1"]


def test_unavailable_elements_are_skipped() -> None:
    elements = [se("down", priority=1, available=False), se("up", priority=9)]
    assert rank(elements) == ["up"]


def test_excluded_elements_are_skipped() -> None:
    elements = [se("a", priority=1), se("b", priority=2), se("c", priority=3)]
    assert rank(elements, exclude=("a",)) == ["b", "c"]
    assert rank(elements, exclude=("a", "c")) == ["b"]
    assert rank(elements, exclude=("a", "b", "c")) == []


def test_exclude_accepts_any_collection() -> None:
    elements = [se("a", priority=1), se("b", priority=2)]
    assert ids(rank_candidates(elements, mode=SEMode.EDIT, declared_size=None, exclude={"a"})) == [
        "b"
    ]
    assert ids(rank_candidates(elements, mode=SEMode.EDIT, declared_size=None, exclude=["b"])) == [
        "a"
    ]


@pytest.mark.parametrize(
    ("declared_size", "expected"),
    [
        (None, ["roomy", "exact", "unknown"]),
        (0, ["roomy", "exact", "full", "unknown"]),
        (5 * GB, ["roomy", "exact", "unknown"]),
        (5 * GB + 1, ["roomy", "unknown"]),
        (9 * GB, ["roomy", "unknown"]),
        (9 * GB + 1, ["unknown"]),
    ],
)
def test_capacity_filter(declared_size: int | None, expected: list[str]) -> None:
    elements = [
        se("exact", capacity=10 * GB, used=5 * GB),
        se("roomy", capacity=10 * GB, used=1 * GB),
        se("full", capacity=10 * GB, used=10 * GB),
        se("unknown"),
    ]
    assert rank(elements, declared_size=declared_size) == expected


@pytest.mark.parametrize(
    "unknown",
    [se("u", capacity=None, used=None), se("u", capacity=10, used=None), se("u", used=10)],
    ids=["nothing", "capacity_only", "used_only"],
)
def test_unknown_free_space_counts_as_room(unknown: Candidate) -> None:
    assert rank([unknown], declared_size=100 * GB) == ["u"]


def test_rank_accepts_a_generator() -> None:
    elements = (se(name, priority=p) for name, p in (("b", 2), ("a", 1)))
    assert ids(rank_candidates(elements, mode=SEMode.EDIT, declared_size=None)) == ["a", "b"]


# --- ordering -------------------------------------------------------------------------------------


def test_lower_priority_number_is_preferred() -> None:
    elements = [se("p10", priority=10), se("p1", priority=1), se("p5", priority=5)]
    assert rank(elements) == ["p1", "p5", "p10"]


def test_priority_beats_free_space() -> None:
    elements = [
        se("big", priority=2, capacity=100 * GB, used=0),
        se("small", priority=1, capacity=2 * GB, used=1 * GB),
    ]
    assert rank(elements) == ["small", "big"]


def test_most_free_space_first_within_a_priority() -> None:
    elements = [
        se("f3", capacity=10 * GB, used=7 * GB),
        se("f9", capacity=10 * GB, used=1 * GB),
        se("f5", capacity=10 * GB, used=5 * GB),
    ]
    assert rank(elements) == ["f9", "f5", "f3"]


def test_unknown_free_space_after_known_within_a_priority() -> None:
    elements = [
        se("unknown"),
        se("tiny", capacity=10, used=9),
        se("other-priority-unknown", priority=1),
    ]
    assert rank(elements) == ["other-priority-unknown", "tiny", "unknown"]


def test_id_breaks_ties() -> None:
    elements = [
        se("c"),
        se("a"),
        se("b"),
        se("z", capacity=GB, used=0),
        se("y", capacity=GB, used=0),
    ]
    assert rank(elements) == ["y", "z", "a", "b", "c"]


def test_order_does_not_depend_on_input_order() -> None:
    elements = [
        se("a", priority=2, capacity=10 * GB, used=5 * GB),
        se("b", priority=1),
        se("c", priority=1, capacity=10 * GB, used=9 * GB),
        se("d", priority=1, capacity=10 * GB, used=1 * GB),
        se("e", priority=2),
        se("f", priority=2),
    ]
    expected = ["d", "c", "b", "a", "e", "f"]
    for permutation in itertools.permutations(elements):
        assert rank(list(permutation)) == expected


def test_failover_walk_with_exclusions() -> None:
    elements = [se("a", priority=1), se("b", priority=2), se("c", priority=3)]
    tried: list[str] = []
    while ranked := rank(elements, exclude=tuple(tried)):
        tried.append(ranked[0])
    assert tried == ["a", "b", "c"]


# --- no_candidate_error ---------------------------------------------------------------------------


def test_no_elements_at_all() -> None:
    error = no_candidate_error([], mode=SEMode.EDIT, declared_size=10)
    assert isinstance(error, NoStorageAvailable)
    assert error.status == 503
    assert error.message == "no 'edit' Storage Element is available"


def test_only_other_modes() -> None:
    elements = [se("rw", mode=SEMode.RW, capacity=GB, used=GB), se("ro", mode=SEMode.RO)]
    error = no_candidate_error(elements, mode=SEMode.EDIT, declared_size=10)
    assert type(error) is NoStorageAvailable


def test_only_unavailable_elements_even_if_full() -> None:
    elements = [se("down", available=False, capacity=GB, used=GB)]
    assert type(no_candidate_error(elements, mode=SEMode.EDIT, declared_size=10)) is (
        NoStorageAvailable
    )


def test_available_but_none_with_room() -> None:
    elements = [
        se("full", capacity=10 * GB, used=10 * GB),
        se("almost", capacity=10 * GB, used=9 * GB),
        se("down-but-roomy", capacity=10 * GB, used=0, available=False),
    ]
    assert rank(elements, declared_size=2 * GB) == []
    error = no_candidate_error(elements, mode=SEMode.EDIT, declared_size=2 * GB)
    assert isinstance(error, InsufficientStorage)
    assert error.status == 507
    assert error.code == "INSUFFICIENT_STORAGE"
    assert error.message == f"no 'edit' Storage Element has room for {2 * GB} bytes"


def test_all_full_with_unknown_size() -> None:
    elements = [se("full", mode=SEMode.RW, capacity=GB, used=GB)]
    assert rank(elements, mode=SEMode.RW) == []
    error = no_candidate_error(elements, mode=SEMode.RW, declared_size=None)
    assert type(error) is InsufficientStorage
    assert error.message == "no 'rw' Storage Element has room"


def test_one_with_room_excluded_is_an_availability_problem() -> None:
    elements = [se("tried", capacity=10 * GB, used=0), se("full", capacity=GB, used=GB)]
    assert rank(elements, declared_size=GB, exclude=("tried",)) == []
    error = no_candidate_error(elements, mode=SEMode.EDIT, declared_size=GB)
    assert type(error) is NoStorageAvailable


def test_unknown_capacity_is_never_insufficient() -> None:
    elements = [se("unknown", available=True)]
    error = no_candidate_error(elements, mode=SEMode.EDIT, declared_size=10**15)
    assert type(error) is NoStorageAvailable
