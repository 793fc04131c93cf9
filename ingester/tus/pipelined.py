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
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

import trio

from ..saga.commit import ResultCommit
from .data import READ_CHUNK, pread_and_hash

log = logging.getLogger(__name__)


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

    @property
    def usable(self) -> bool:
        return self.abandoned is None and not self.done.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def patch_started(self) -> None:
        self.receiving = True
        self._wake()

    def advance(self, readable: int) -> None:
        if readable > self.readable:
            self.readable = readable
            self._wake()

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
        self._caught_up.set()
        self._wake()

    def abandon(self, reason: str) -> None:
        if self.abandoned is not None or self.done.is_set():
            return
        self.abandoned = reason
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
    at the upload's length once handed over. Reads whole `READ_CHUNK`s while PATCHes come
    (a remainder waits for the next batch or the hand-over), and hashes each in the hop
    that read it (`sha256`, the pipeline's `prehashed`): one thread hop per MiB. A class,
    not an async generator: the pipeline may stop reading at any point, and `aclose` then
    closes the file."""

    def __init__(self, stream: LiveStream) -> None:
        self._stream = stream
        self._fd: int | None = None
        self.position = 0
        self.sha256 = hashlib.sha256()

    def __aiter__(self) -> FollowingReader:
        return self

    async def __anext__(self) -> bytes:
        stream = self._stream
        while True:
            if stream.abandoned is not None:
                # The stream's scope is cancelled: this ends the store (the element discards
                # its request, the saga removes any copy).
                await trio.lowlevel.checkpoint()
                raise AssertionError("an abandoned stream's store was not cancelled")
            available = stream.readable - self.position
            if available >= READ_CHUNK or (
                available > 0 and (stream.handed_over or stream.readable >= stream.length)
            ):
                return await self._read(min(READ_CHUNK, available))
            if self.position >= stream.length and stream.handed_over:
                raise StopAsyncIteration
            await stream.wait_for_change()

    async def _read(self, size: int) -> bytes:
        if self._fd is None:
            self._fd = await trio.to_thread.run_sync(
                os.open, self._stream.path, os.O_RDONLY | os.O_CLOEXEC
            )
        data = await trio.to_thread.run_sync(
            pread_and_hash, self._fd, size, self.position, self.sha256
        )
        if not data:
            self._stream.abandon("the data file is shorter than the bytes written to it")
            await trio.lowlevel.checkpoint()
            raise AssertionError("an abandoned stream's store was not cancelled")
        self.position += len(data)
        self._stream.has_read(self.position)
        return data

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)
