"""A process-wide budget, in bytes, for file data held between the client and the element.

Per-upload buffers alone make memory grow with concurrency: 64 uploads stalled behind one
slow Storage Element each fill every queue. Readers take budget before pulling more of
their request body and the streamer gives it back once the element's socket has taken the
bytes, so the data in flight stays under `INGESTER_MEMORY_BUDGET_BYTES` whatever the number
of uploads; the ones that wait simply stop reading, which closes their clients' TCP windows.
"""

from __future__ import annotations

import trio


class MemoryBudget:
    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, size: int) -> None:
        # An oversized request is let through when nothing else holds budget, so a single
        # chunk larger than the whole budget cannot wait forever.
        while self.used and self.used + size > self.total:
            await self._changed.wait()
        self.used += size

    def try_acquire(self, size: int, *, ceiling: int | None = None) -> bool:
        """Take `size` now if the total in use stays within `ceiling` (default: the whole
        budget); never waits."""
        if self.used + size > (self.total if ceiling is None else min(ceiling, self.total)):
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        if size <= 0:
            return
        self.used -= size
        assert self.used >= 0, "released more than was acquired"
        self._changed.set()
        self._changed = trio.Event()


class UploadBudget:
    """One upload's share: what it holds, so whatever is left is returned at the end."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self.held = 0

    async def acquire(self, size: int) -> None:
        await self._budget.acquire(size)
        self.held += size

    def try_acquire(self, size: int) -> bool:
        if not self._budget.try_acquire(size):
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        size = min(size, self.held)
        if size <= 0:
            return
        self.held -= size
        self._budget.release(size)

    def release_all(self) -> None:
        self.release(self.held)
