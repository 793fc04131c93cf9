"""Progress of uploads in flight and just finished, kept in this process. No I/O.

`GET /api/v1/files/uploads/{upload_id}` reads it. Finished entries stay for
`progress_retention_s` so a client polling after its upload ended sees the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import trio

# How often finished progress entries past their retention are forgotten.
EXPIRE_INTERVAL_S: Final = 30.0


class UploadState(StrEnum):
    RECEIVING = "receiving"
    STORING = "storing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATES = frozenset({UploadState.DONE, UploadState.FAILED, UploadState.CANCELLED})


@dataclass(slots=True)
class UploadProgress:
    upload_id: str
    owner: str
    started_at: float
    state: UploadState = UploadState.RECEIVING
    filename: str | None = None
    # Upper bound from Content-Length; the file part alone is a little smaller.
    expected_bytes: int | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    storage_element_id: str | None = None
    updated_at: float = 0.0
    finished_at: float | None = None
    error_code: str | None = None
    result: dict[str, Any] | None = field(default=None, repr=False)

    def as_json(self, now: float) -> dict[str, Any]:
        elapsed = (self.finished_at or now) - self.started_at
        rate = self.bytes_received / elapsed if elapsed > 0 else 0.0
        percent = None
        if self.expected_bytes:
            percent = min(100.0, round(100.0 * self.bytes_received / self.expected_bytes, 1))
        if self.state is UploadState.DONE:
            percent = 100.0
        return {
            "upload_id": self.upload_id,
            "state": self.state.value,
            "filename": self.filename,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "expected_bytes": self.expected_bytes,
            "percent": percent,
            "bytes_per_second": round(rate),
            "storage_element_id": self.storage_element_id,
            "elapsed_s": round(elapsed, 3),
            "error_code": self.error_code,
            "result": self.result,
        }


class ProgressBook:
    def __init__(self, retention_s: float, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[str, UploadProgress] = {}
        # Caller-chosen ids of requests that have not started their upload yet.
        self._reserved: set[str] = set()
        self._retention_s = retention_s
        self._clock = clock

    def start(self, upload_id: str, owner: str, expected_bytes: int | None) -> UploadProgress:
        now = self._clock()
        entry = UploadProgress(
            upload_id=upload_id,
            owner=owner,
            started_at=now,
            updated_at=now,
            expected_bytes=expected_bytes,
        )
        self._entries[upload_id] = entry
        return entry

    def get(self, upload_id: str) -> UploadProgress | None:
        return self._entries.get(upload_id)

    @contextmanager
    def reserved(self, upload_id: str) -> Iterator[None]:
        """`upload_id` is taken by a request from its check to its end, progress record or
        not yet (a caller-chosen id: its request waits before its upload starts)."""
        self._reserved.add(upload_id)
        try:
            yield
        finally:
            self._reserved.discard(upload_id)

    def is_reserved(self, upload_id: str) -> bool:
        return upload_id in self._reserved

    def finish(
        self,
        entry: UploadProgress,
        state: UploadState,
        *,
        error_code: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        entry.state = state
        entry.error_code = error_code
        entry.result = result
        entry.finished_at = entry.updated_at = self._clock()

    def in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.state not in FINAL_STATES)

    async def run(self, interval_s: float = EXPIRE_INTERVAL_S) -> None:
        """Forget finished entries every `interval_s`, until cancelled (the service nursery)."""
        while True:
            await trio.sleep(interval_s)
            self.expire()

    def expire(self) -> int:
        """Forget finished entries older than the retention; returns how many went."""
        cutoff = self._clock() - self._retention_s
        stale = [
            key
            for key, entry in self._entries.items()
            if entry.finished_at is not None and entry.finished_at < cutoff
        ]
        for key in stale:
            del self._entries[key]
        return len(stale)

    def now(self) -> float:
        return self._clock()
