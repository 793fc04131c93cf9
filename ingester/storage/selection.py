"""Choosing the Storage Element for an upload. No I/O: the registry supplies the facts."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ..errors import IngesterError, InsufficientStorage, NoStorageAvailable
from ..settings import CompressedNames, SEMode


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    api_url: str
    mode: SEMode
    priority: int
    capacity_bytes: int | None
    used_bytes: int | None
    # False when the registry's status is not online, the element is known to be down, or
    # its own mode (its /api/v1/info) refuses writes.
    available: bool
    # Capabilities, resolved (see `capabilities`): the safe answer when nobody said.
    keeps_metadata: bool = False
    accepts_empty_files: bool = False
    serves_any_name: bool = False
    compressed_names: CompressedNames | None = None

    @property
    def free_bytes(self) -> int | None:
        """Free space when both capacity and use are known (never negative), else None."""
        if self.capacity_bytes is None or self.used_bytes is None:
            return None
        return max(self.capacity_bytes - self.used_bytes, 0)

    def has_room(self, declared_size: int | None) -> bool:
        """Unknown free space counts as room. An unknown size needs at least one free byte:
        an element reporting no free space at all is full whatever comes."""
        free = self.free_bytes
        if free is None:
            return True
        if declared_size is None:
            return free > 0
        return free >= declared_size


def _eligible(
    elements: Iterable[Candidate], mode: SEMode, exclude: Collection[str] = ()
) -> list[Candidate]:
    return [e for e in elements if e.mode == mode and e.available and e.id not in exclude]


def rank_candidates(
    elements: Iterable[Candidate],
    *,
    mode: SEMode,
    declared_size: int | None,
    exclude: Collection[str] = (),
) -> list[Candidate]:
    """The elements that may take this upload, best first.

    Eligible: in `mode`, available, not in `exclude` (already tried), with room for
    `declared_size` (see `Candidate.has_room`). Order: `priority` ascending, since in artStore
    a lower number means preferred; then the most free space (unknown free space after known
    among equal priorities: known room is a promise, unknown room a hope); then `id`,
    so equal elements are always tried in the same order.
    """
    ranked = [e for e in _eligible(elements, mode, exclude) if e.has_room(declared_size)]
    ranked.sort(
        key=lambda e: (
            e.priority,
            e.free_bytes is None,
            -(e.free_bytes or 0),
            e.id,
        )
    )
    return ranked


def no_candidate_error(
    elements: Iterable[Candidate], *, mode: SEMode, declared_size: int | None
) -> IngesterError:
    """Why `rank_candidates` came back empty (507 or 503).

    `InsufficientStorage` when available elements in `mode` exist but none has room;
    `NoStorageAvailable` otherwise (none in that mode, or none available). Exclusions are
    not considered: an element tried and failed that had room is an availability problem.
    """
    eligible = _eligible(elements, mode)
    if eligible and not any(e.has_room(declared_size) for e in eligible):
        size = "" if declared_size is None else f" for {declared_size} bytes"
        return InsufficientStorage(f"no '{mode}' Storage Element has room{size}")
    return NoStorageAvailable(f"no '{mode}' Storage Element is available")
