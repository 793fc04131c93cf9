"""The pipelined store of a resumable upload: while PATCHes keep coming to this replica, the
bytes go on to a Storage Element as they are written, through the same pipeline as a
multipart upload (`ingest`: hashing, compression, failover, saga). The data file stays the
source of truth: the stream reads it (it never sees a byte the file does not hold), and a
failover replays from it.

    PATCH (this replica)   its receiver `advance`s the stream after each batch written
    PATCH ends             `patch_ended`: bytes the offset does not keep (a checksum that
                           failed, a lost lock, a refused chunk) abandon the stream;
                           otherwise the window starts
    window passes          no PATCH came (a pause, or the client went to another replica):
                           the stream is abandoned
    stream falls behind    a PATCH waits (`keep_pace`) while the stream is more than
                           `lag_bytes` behind what was written: a client faster than the
                           element otherwise ends with a final PATCH that waits for the
                           whole lag
    last byte in           the completion `hand_over`s: only then does the file end, so the
                           element commits nothing before the upload's state says `completing`

An abandoned stream's element request is cancelled (the element discards it; the saga
removes any copy), and the completion stores the upload from its data file as before: the
fallback. Streams live only in this process: another replica knows nothing of them.

Who hashes, and where the reader gets its bytes. The stream keeps one sha256 of the file's
bytes from the first, `hashed_to` long. A PATCH's batch written at exactly `hashed_to`
(the reader has hashed everything before it) is hashed in the hop that writes it
(`claim_hash`) and kept in memory for the reader (`advance` with the batch, within the
upload's memory budget): the reader then takes it with no hop and no read-back, so a byte
costs one worker-thread hop, as in a multipart upload. Anything else the reader reads back
from the file: bytes already hashed without hashing them again, the rest hashed in the same
hop (an upload resumed here starts so, behind the file; it goes over to the writer's hashing
once it has caught up). One hop at a time feeds the hasher (`hashing`); a write that fails
after hashing leaves the digest ahead of the file and abandons the stream.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import deque
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from ..saga.commit import ResultCommit
from ..upload.budget import UploadBudget
from .data import READ_CHUNK, pread_and_hash

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)

# The most written bytes a stream holds for its reader. A reader that keeps up (the element
# takes bytes faster than the client sends them, the usual case) trails by a batch or two;
# one further behind reads the file back, as a resumed upload's does. Measured (1 GiB, curl,
# 8 MiB PATCHes): 4 MiB, no read-back at all but the ingester's peak RSS at 101 MB with
# tus-js-client; 2 MiB, about a fifth read back, peak RSS as before holding (96-98 MB).
HELD_MAX_BYTES: Final = 2 * 1024 * 1024


class LiveStream:
    """One upload's pipelined store: what it may read, its window, its outcome."""

    def __init__(
        self,
        upload_id: str,
        path: str,
        length: int,
        readable: int,
        window_s: float,
        lag_bytes: int,
        budget: UploadBudget | None = None,
    ):
        self.upload_id = upload_id
        self.path = path
        self.length = length
        # Bytes of the data file the stream may read: written there by this replica.
        self.readable = readable
        self.window_s = window_s
        # While a PATCH is being received the window does not run (the client's own idle
        # timeout does); after it, the next PATCH must come within the window.
        self.receiving = False
        self.window_ends = trio.current_time() + window_s
        self.abandoned: str | None = None
        self.handed_over = False
        # Set by the hand-over: records the result with the saga's settle.
        self.commit: ResultCommit | None = None
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.result: dict[str, Any] | None = None
        self._changed = trio.Event()
        # Where its reader is (it starts at the file's first byte), and what wakes a PATCH
        # waiting for it. `lag_bytes` is the slack (INGESTER_TUS_PIPELINE_LAG_BYTES): how
        # far the stream may trail the PATCHes before they wait, so the most its catch-up
        # adds to the final PATCH (measured without a bound: 15-48 MiB behind at the
        # hand-over, 0.1-0.25 s more on a final PATCH whose element commit took 0.35-0.45
        # s). A stream that starts behind (an upload resumed here) may stay as far behind
        # as it started, plus the slack: its PATCHes never wait for more. The slack is at
        # least one `READ_CHUNK`: while PATCHes come the reader takes whole chunks only, so
        # a smaller one would have a PATCH wait for a read that waits for that PATCH.
        self.read_to = 0
        self._lag_allowed = readable + max(lag_bytes, READ_CHUNK)
        self._caught_up = trio.Event()
        # The digest of the file's first `hashed_to` bytes; `hashing` while a hop feeds it.
        self.sha256 = hashlib.sha256()
        self.hashed_to = 0
        self.hashing = False
        # Batches the writer hashed, by position, until the reader takes them: at most
        # HELD_MAX_BYTES, within `budget` (None: nothing is held).
        self._budget = budget
        self._held: deque[tuple[int, list[bytes], int]] = deque()
        self._held_bytes = 0

    @property
    def usable(self) -> bool:
        return self.abandoned is None and not self.done.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def patch_started(self) -> None:
        self.receiving = True
        self._wake()

    def claim_hash(self, position: int) -> _Hash | None:
        """The digest, for the hop that hashes bytes from `position` on, when every byte
        before it is hashed and no other hop feeds it; `release_hash` then says how far it
        got. The writer's hop releases through `advance` (or abandons the stream if it
        failed). None: not now (for the writer: the reader hashes the batch)."""
        if not self.usable or self.hashing or self.hashed_to != position:
            return None
        self.hashing = True
        return self.sha256

    def release_hash(self, hashed_to: int) -> None:
        """The hop that claimed the digest is over; it covers the first `hashed_to` bytes."""
        self.hashing = False
        self.hashed_to = hashed_to

    def advance(self, readable: int, hashed: list[bytes] | None = None) -> None:
        """The file holds `readable` bytes. `hashed`: the batch that ends there, which the
        writer hashed (`claim_hash`)."""
        if hashed is not None:
            size = sum(len(chunk) for chunk in hashed)
            self.release_hash(readable)
            self._hold(readable - size, hashed, size)
        if readable > self.readable:
            self.readable = readable
            self._wake()

    def _hold(self, position: int, batch: list[bytes], size: int) -> None:
        budget = self._budget
        if (
            budget is None
            or not self.usable
            or self._held_bytes + size > HELD_MAX_BYTES
            or not budget.try_acquire(size)
        ):
            return
        self._held.append((position, batch, size))
        self._held_bytes += size

    def take_held(self, position: int) -> list[bytes] | None:
        """The held batch that starts at `position` (the reader's), if any; those before it
        are dropped (the reader read them back)."""
        held = self._held
        while held and held[0][0] < position:
            self._drop()
        if not held or held[0][0] != position:
            return None
        batch = held[0][1]
        self._drop()
        return batch

    def held_from(self, position: int) -> int | None:
        """Where the first held batch after `position` starts: a read back stops there."""
        for start, _, _ in self._held:
            if start > position:
                return start
        return None

    def _drop(self) -> None:
        _, _, size = self._held.popleft()
        self._held_bytes -= size
        assert self._budget is not None
        self._budget.release(size)

    def _release_held(self) -> None:
        while self._held:
            self._drop()

    def has_read(self, position: int) -> None:
        self.read_to = position
        if self.readable - position <= self._lag_allowed:
            self._caught_up.set()

    async def keep_pace(self) -> None:
        """Until the stream is within `lag_bytes` of what was written (or of how far
        behind it started), or over (done, abandoned): a PATCH's receiver waits here after
        each batch written, so the client goes no faster than the element takes its bytes,
        plus that slack."""
        while self.usable and self.readable - self.read_to > self._lag_allowed:
            if self._caught_up.is_set():
                self._caught_up = trio.Event()
            # Woken by the reader's progress, an abandonment or the store's end (`finish`).
            # No timeout of its own: the stream cannot stand still, since its element
            # attempts run under the stall watchdog and its end or abandonment wakes this.
            await self._caught_up.wait()

    def patch_ended(self, offset: int, *, kept: bool) -> None:
        """The PATCH is saved: `offset` is the upload's. Bytes the stream may have read but
        the offset does not keep end it."""
        self.receiving = False
        if not kept or self.readable > offset:
            self.abandon("the last PATCH's bytes were not all kept")
            return
        self.window_ends = trio.current_time() + self.window_s
        self._wake()

    def hand_over(self, commit: ResultCommit | None = None) -> None:
        """The upload's state says `completing`: the file may end. `commit` records the
        result (the completion's lock is the one that writes it)."""
        self.commit = commit
        self.handed_over = True
        self._wake()

    def finish(self) -> None:
        """The store ended (stored, failed or abandoned): `done`, and a PATCH waiting for
        the stream goes on."""
        self.done.set()
        self._release_held()
        self._caught_up.set()
        self._wake()

    def abandon(self, reason: str) -> None:
        if self.abandoned is not None or self.done.is_set():
            return
        self.abandoned = reason
        self._release_held()
        self.scope.cancel()
        self._caught_up.set()
        log.info(
            "pipelined store abandoned: %s",
            reason,
            extra={"event": "tus_stream_abandoned", "upload_id": self.upload_id},
        )
        self._wake()

    async def wait_for_change(self) -> None:
        """Until `readable` moves, a hand-over, or the window passes (then abandoned)."""
        changed = self._changed
        deadline = math.inf if self.receiving else self.window_ends
        with trio.move_on_at(deadline):
            await changed.wait()
            return
        self.abandon(f"no PATCH came within {self.window_s:g} s")

    async def outcome(self) -> dict[str, Any] | None:
        """The stored result, or None when the stream was abandoned or failed."""
        await self.done.wait()
        return self.result


class FollowingReader:
    """The data file as the stream may read it: up to `readable`, waiting for more, ending
    at the upload's length once handed over. A batch the writer hashed and the stream holds
    comes from memory; anything else is read back from the file, whole `READ_CHUNK`s while
    PATCHes come (a remainder waits for the next batch or the hand-over), and hashed in the
    hop that read it unless the writer hashed it (`sha256`, the pipeline's `prehashed`, is
    the stream's). A class, not an async generator: the pipeline may stop reading at any
    point, and `aclose` then closes the file."""

    def __init__(self, stream: LiveStream) -> None:
        self._stream = stream
        self._fd: int | None = None
        self.position = 0
        self.sha256 = stream.sha256
        # A held batch's pieces not yet handed on.
        self._pieces: deque[bytes] = deque()

    def __aiter__(self) -> FollowingReader:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        while True:
            if stream.abandoned is not None:
                await self._ended()
            if self._pieces:
                return self._handed(self._pieces.popleft())
            available = stream.readable - self.position
            if available > 0:
                held = stream.take_held(self.position)
                if held is not None:
                    self._pieces.extend(held)
                    continue
            if available >= READ_CHUNK or (
                available > 0 and (stream.handed_over or stream.readable >= stream.length)
            ):
                return await self._read(min(READ_CHUNK, available))
            if self.position >= stream.length and stream.handed_over:
                if stream.hashed_to != self.position:
                    await self._ended("the stream's digest does not cover the file")
                raise StopAsyncIteration
            await stream.wait_for_change()

    async def _ended(self, reason: str | None = None) -> NoReturn:
        """End the store here, abandoning the stream first with `reason`: the stream's scope
        is cancelled, so the next checkpoint ends it (the element discards its request,
        the saga removes any copy)."""
        if reason is not None:
            self._stream.abandon(reason)
        await trio.lowlevel.checkpoint()
        raise AssertionError("an abandoned stream's store was not cancelled")

    def _handed(self, data: bytes) -> bytes:
        self.position += len(data)
        self._stream.has_read(self.position)
        return data

    async def _read(self, size: int) -> bytes:
        stream = self._stream
        if self._fd is None:
            self._fd = await trio.to_thread.run_sync(
                os.open, stream.path, os.O_RDONLY | os.O_CLOEXEC
            )
        position = self.position
        # Up to the next batch held in memory, not into it: the reader then takes it whole.
        held = stream.held_from(position)
        if held is not None:
            size = min(size, held - position)
        if position < stream.hashed_to:
            # The writer hashed these: read back, not hashed again.
            data = await trio.to_thread.run_sync(
                os.pread, self._fd, min(size, stream.hashed_to - position), position
            )
        elif (hasher := stream.claim_hash(position)) is None:
            # Cannot be: the writer hashes only at `hashed_to`, past what may be read.
            await self._ended("the stream's digest lost its place")
        else:
            covered = position
            try:
                data = await trio.to_thread.run_sync(
                    pread_and_hash, self._fd, size, position, hasher
                )
                covered += len(data)
            finally:
                stream.release_hash(covered)
        if not data:
            await self._ended("the data file is shorter than the bytes written to it")
        return self._handed(data)

    async def aclose(self) -> None:
        self._pieces.clear()
        fd, self._fd = self._fd, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)
