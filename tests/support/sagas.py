"""Fakes for saga tests (no I/O)."""

from __future__ import annotations

from ingester.saga.record import Copy, Removal


class Elements:
    """The compensations asked for: copies removed."""

    def __init__(self) -> None:
        self.removed: list[Copy] = []

    async def remove(self, copy: Copy, file_id: str, authorization: str | None) -> Removal:
        self.removed.append(copy)
        return Removal.REMOVED

    async def compensate(self, copy: Copy, file_id: str, authorization: str | None) -> bool:
        return await self.remove(copy, file_id, authorization) is not None
