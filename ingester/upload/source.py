"""Where the pipeline's file comes from: a `FileSource` says how the file is to be stored,
then hands over its bytes, then says how it was to be stored once all of them are in.

Two kinds: a multipart form (`form.FormSource`: the fields before the file part settle what
they can, fields after it may change it), and a file whose bytes are the whole stream and
whose options were checked beforehand (`BytesSource`: a finished resumable upload, read from
its data files with no framing to write or scan). Both pull their stream with `BodyReader`:
under the memory budget, and under the idle timeout, so a stream that stops cannot hold an
upload forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import trio

from ..buffers import Buffer
from ..errors import RequestTimeout
from .budget import UploadBudget
from .fields import UploadOptions

if TYPE_CHECKING:
    from hashlib import _Hash

# A partial batch goes out when the stream sends nothing more for this long, so a slow
# client's bytes do not wait for a full batch.
BATCH_WAIT_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class FileStart:
    """What is known when the file's first byte is about to come."""

    # The options as they stand: every field sent so far, defaults for the rest.
    options: UploadOptions
    # No later field can change where or how the file is stored: nothing to spool for that.
    settled: bool
    # As the client gave them (the pipeline sanitizes the name and settles the type).
    filename: str | None
    content_type: str | None
    # No field comes after the file at all: `options` are the upload's, complete (a file
    # whose options were checked beforehand). The element body's tail is known up front.
    final: bool = False


class FileSource(Protocol):
    """The pipeline's input. `begin`, then `read` until the file's end, then `finish`.

    `budget` holds the bytes `read` hands over until whoever consumes them releases them;
    `bytes_read` counts what was pulled from the stream (framing included), for the logs."""

    @property
    def budget(self) -> UploadBudget: ...

    @property
    def bytes_read(self) -> int: ...

    @property
    def prehashed(self) -> _Hash | None:
        """A sha256 of exactly the bytes `read` hands over, in order, kept by the source
        itself (it reads them in a worker thread and hashes them in the same hop), so the
        pipeline need not hash them again; None when it hashes nothing."""
        ...

    async def begin(self) -> FileStart: ...

    async def read(self, *, batch_pending: bool = False) -> Buffer | None:
        """The file's next bytes; an empty piece at its end. With `batch_pending` (the
        caller holds bytes it has not passed on), None instead of waiting: when the memory
        budget has no room now, or nothing comes for BATCH_WAIT_S. The caller then passes
        its batch on (giving budget back) and asks again."""
        ...

    async def finish(self) -> UploadOptions:
        """After the file's end: the options, complete and checked."""
        ...


class BodyReader:
    """Pulls a stream under the idle timeout and the memory budget.

    Before each pull it takes `quantum` bytes of the budget (trued up to what came): the
    chunk and what it holds are the caller's, who gives back what it does not keep.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        idle_timeout_s: float,
        budget: UploadBudget,
        quantum: int,
    ) -> None:
        self._body = body
        self._idle_timeout_s = idle_timeout_s
        self.budget = budget
        self._quantum = quantum
        self.bytes_read = 0
        self.exhausted = False
        # When the current wait for data began (the idle timer's start).
        self._waiting_since: float | None = None

    async def pull(self, *, batch_pending: bool = False) -> tuple[bytes, int] | None:
        """The next chunk and the budget taken for it (at least `quantum`); None at the
        stream's end (then `exhausted`) or, with `batch_pending`, as `FileSource.read`."""
        while not self.exhausted:
            # Waiting for budget is our pace, not the stream's: outside the idle timer.
            if batch_pending:
                if not self.budget.try_acquire(self._quantum):
                    return None
            else:
                await self.budget.acquire(self._quantum)
            now = trio.current_time()
            if self._waiting_since is None:
                self._waiting_since = now
            idle_deadline = self._waiting_since + self._idle_timeout_s
            wait_until = min(idle_deadline, now + BATCH_WAIT_S) if batch_pending else idle_deadline
            with trio.move_on_at(wait_until) as waited:
                try:
                    chunk = await anext(self._body)
                except StopAsyncIteration:
                    self.exhausted = True
                    self.budget.release(self._quantum)
                    continue
            if waited.cancelled_caught:
                self.budget.release(self._quantum)
                if trio.current_time() >= idle_deadline:
                    raise RequestTimeout(f"no data from the client for {self._idle_timeout_s:g} s")
                return None
            self._waiting_since = None
            self.bytes_read += len(chunk)
            if len(chunk) > self._quantum:
                await self.budget.acquire(len(chunk) - self._quantum)
            return chunk, max(self._quantum, len(chunk))
        return None


class BytesSource(BodyReader):
    """A file whose bytes are the whole stream, its description known and checked
    beforehand: nothing to parse, no field can come after it."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        start: FileStart,
        *,
        idle_timeout_s: float,
        budget: UploadBudget,
        quantum: int,
        prehashed: _Hash | None = None,
    ) -> None:
        super().__init__(body, idle_timeout_s, budget, quantum)
        self._start = start
        self._prehashed = prehashed

    @property
    def prehashed(self) -> _Hash | None:
        return self._prehashed

    async def begin(self) -> FileStart:
        return self._start

    async def read(self, *, batch_pending: bool = False) -> Buffer | None:
        while True:
            pulled = await self.pull(batch_pending=batch_pending)
            if pulled is None:
                return b"" if self.exhausted else None
            chunk, held = pulled
            # Only the chunk stays held: a short read gives the rest of the quantum back.
            self.budget.release(held - len(chunk))
            if chunk:
                return chunk

    async def finish(self) -> UploadOptions:
        return self._start.options
