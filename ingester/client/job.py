"""One file's upload: what both paths (tus, multipart) share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from .errors import GaveUp, Retryable
from .options import Options
from .progress import Progress
from .resume import ResumeState, ResumeStore
from .retry import Backoff
from .source import SourceFile

# Requests are sent in pieces of this size, so the bar moves while a chunk is on its way.
PIECE: Final = 256 * 1024
# The ingester answers a request that stores the file (a multipart POST, the last tus
# PATCH) only once the Storage Element has it on disk, and it may fail over on the way.
STORE_READ_TIMEOUT_S: Final = 900.0


@dataclass
class Job:
    http: httpx.Client
    options: Options
    source: SourceFile
    name: str  # the path as given on the command line
    key: str  # the state file's key
    store: ResumeStore
    progress: Progress
    backoff: Backoff = field(default_factory=Backoff)
    sleep: Callable[[float], None] = time.sleep

    def pause(self, exc: Retryable) -> None:
        """Wait before the next attempt, or give up when the failures ran out."""
        delay = self.backoff.next_delay(exc.retry_after)
        if delay is None:
            raise GaveUp(
                f"{exc} (gave up after {self.backoff.max_failures} attempts in a row "
                "without progress; run the same command again to resume)"
            )
        self.progress.note(f"{self.name}: {exc}; retrying in {delay:.1f} s")
        self.sleep(delay)

    def resumable(self, state: ResumeState, kind: Literal["tus", "multipart"]) -> bool:
        """Whether an earlier run's state may be resumed: the same kind of upload, made
        with the same choices, and resuming not turned off (`--no-resume`)."""
        return self.options.resume and state.kind == kind and state.options == self.fingerprint

    @property
    def fingerprint(self) -> str:
        return self.options.fingerprint()

    def new_state(self, kind: Literal["tus", "multipart"], **fields: Any) -> ResumeState:
        return ResumeState(
            key=self.key,
            kind=kind,
            path=str(self.source.path),
            size=self.source.size,
            mtime_ns=self.source.mtime_ns,
            target=self.options.url,
            options=self.fingerprint,
            **fields,
        )


def store_timeout(http: httpx.Client) -> httpx.Timeout:
    """The client's timeouts, with the long wait for an answer that comes after the store."""
    base = http.timeout
    return httpx.Timeout(
        connect=base.connect, read=STORE_READ_TIMEOUT_S, write=base.write, pool=base.pool
    )


@dataclass(frozen=True)
class Stored:
    """A file the ingester stored: its `201` record, and how it got there."""

    record: dict[str, Any]
    resumed_at: int | None = None  # the offset a resumed upload went on from
    replayed: bool = False  # an earlier run's request had stored it (Idempotency-Key)
    attempts: int = 1


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
