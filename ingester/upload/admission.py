"""Admission of new uploads: a cap on uploads in flight, overall and per user. No I/O.

Refusing at once (503/429 with Retry-After) is kinder than queueing: a queued upload holds
a client connection and a socket buffer while it waits, and the client can retry elsewhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from ..errors import ServiceBusy, ShuttingDown, TooManyUploads


class Admission:
    def __init__(self, *, max_in_flight: int, max_per_user: int, retry_after_s: int) -> None:
        self.max_in_flight = max_in_flight
        self.max_per_user = max_per_user
        self.retry_after_s = retry_after_s
        self.draining = False
        self._total = 0
        # Uploads admitted since the start (to tell a busy spell from an idle one).
        self.admitted = 0
        self._per_user: Counter[str] = Counter()
        self._idle = trio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._total

    async def wait_idle(self) -> None:
        """Return when no upload is in flight."""
        await self._idle.wait()

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    @contextmanager
    def admit(self, user: str, *, begun: bool = False) -> Iterator[None]:
        """An upload's slot. `begun`: its bytes came before the drain (a resumable upload's
        completion), so the drain lets it run within the grace."""
        if self.draining and not begun:
            raise ShuttingDown(headers=self._retry_after())
        if self._per_user[user] >= self.max_per_user:
            raise TooManyUploads(
                f"{self._per_user[user]} uploads in flight for this user "
                f"(limit {self.max_per_user})",
                headers=self._retry_after(),
            )
        if self._total >= self.max_in_flight:
            raise ServiceBusy(
                f"{self._total} uploads in flight (limit {self.max_in_flight})",
                headers=self._retry_after(),
            )
        self._total += 1
        self.admitted += 1
        self._per_user[user] += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            yield
        finally:
            self._total -= 1
            if self._total == 0:
                self._idle.set()
            self._per_user[user] -= 1
            if self._per_user[user] <= 0:
                del self._per_user[user]
