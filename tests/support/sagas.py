"""Fakes for saga tests (no I/O)."""

from __future__ import annotations

from ingester.saga.record import Copy


class Elements:
    """The compensations asked for: copies removed."""

    def __init__(self) -> None:
        self.removed: list[Copy] = []

    async def compensate(self, copy: Copy, file_id: str, authorization: str | None) -> bool:
        self.removed.append(copy)
        return True
