"""The spool: one copy of an upload's original bytes, so they can be sent again.

One spool serves both reasons to send again: a field after the file part that changes where
or how the file is stored (the whole upload is sent again from the spool), and a Storage
Element that fails mid-stream (what it was given is replayed to the next one, transformed
again: failover is rare, writing every byte twice is not).

Small uploads keep their copy in memory, taken from the process's memory budget without
waiting for it (and only while the budget is at most a quarter used), and touch no disk.
Past `memory_limit`, or when the budget has no room, the copy moves to a file under the
spool directory: large appends (a batch of about 1 MiB at a time, in the worker thread that
also hashes the batch), no flush (the file descriptor is unbuffered), never fsynced: a spool
dies with its upload.

The files come from `SpoolFiles`: unlinked as soon as they are opened (nothing is left in the
directory, even by a process that is SIGKILLed), and reused by the next upload, which writes
over the pages the last one left in the page cache instead of having the kernel allocate new
ones (see `SpoolFiles` for what that costs and saves).

The caller appends in three steps so that hashing and spooling share one thread hop:
`reserve(n)` on the event loop (accounting; says whether the bytes go to disk),
`write_sync(pieces)` in the worker thread when they do, then `commit(pieces)` on the loop.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import secrets
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from ..buffers import IOV_MAX, Buffer, remaining
from ..errors import ServiceBusy
from .budget import MemoryBudget

log = logging.getLogger(__name__)

# Reads of a spool file during a replay: large enough that thread hops cost little, small
# enough to keep memory flat.
READ_PIECE: Final = 1024 * 1024

# In-memory copies may use the memory budget only while it is at most 1/MEMORY_SHARE full:
# they are held until their upload ends, and must never starve the readers of uploads in
# flight (which would then wait for budget that only their own progress frees).
MEMORY_SHARE: Final = 4


class SpoolBudget:
    """Bytes spooled to disk by this process right now, against a ceiling."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int) -> None:
        if self.used + size > self.max_bytes:
            raise ServiceBusy(
                f"the spool is full ({self.used} of {self.max_bytes} bytes in use)",
                headers={"Retry-After": "30"},
            )
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size


class SpoolFiles:
    """The spool's files: opened and unlinked at once, and kept open for the next upload.

    Why reuse them: a page the page cache must allocate costs the kernel far more than a page
    it already holds. Measured on this project's VM (free page reporting, nested
    virtualization): writing 1 GiB into a new file costs 1.3-3 CPU-seconds, into the pages
    of a file written before 0.1. Reuse also spares the file system a block allocation per
    upload everywhere. What it costs: an idle file keeps its size on disk (`keep_bytes` in
    all, `INGESTER_SPOOL_KEEP_BYTES`) and its pages in the page cache (reclaimable), and the
    kernel writes dirty pages back to disk in the background, where a file deleted within
    seconds was often never written at all.

    `take` and `give` run in worker threads (they may open or close a file): a lock keeps
    the idle list whole.
    """

    def __init__(self, directory: Path, *, keep_bytes: int) -> None:
        self.directory = directory
        self.keep_bytes = keep_bytes
        self._idle: list[tuple[int, int]] = []
        self._idle_bytes = 0
        self._lock = threading.Lock()
        # A random part: replicas may share the directory.
        self._prefix = f"spool-{os.getpid()}-{secrets.token_hex(4)}"
        self._opened = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self) -> tuple[int, int]:
        """A file for one upload: (descriptor, its size now). Blocking."""
        with self._lock:
            if self._idle:
                fd, size = self._idle.pop()
                self._idle_bytes -= size
                return fd, size
            self._opened += 1
            name = f"{self._prefix}-{self._opened}"
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.unlink(path)
        except BaseException:
            os.close(fd)
            raise
        return fd, 0

    def give(self, fd: int, size: int) -> None:
        """The upload is done with the file (`size` bytes long): kept for the next one while
        the idle files stay within `keep_bytes`, else closed (its blocks freed). Blocking."""
        with self._lock:
            if self._idle_bytes + size <= self.keep_bytes:
                self._idle.append((fd, size))
                self._idle_bytes += size
                return
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self._idle_bytes = self._idle, [], 0
        for fd, _ in idle:
            os.close(fd)


class Spool:
    """The original bytes of one upload, in memory while small, else in a file."""

    def __init__(
        self,
        directory: Path,
        name: str,
        *,
        disk: SpoolBudget,
        memory: MemoryBudget | None,
        memory_limit: int,
        files: SpoolFiles | None = None,
    ) -> None:
        # Without shared files, one of its own, closed when the upload ends.
        self._files = files or SpoolFiles(directory, keep_bytes=0)
        self._disk = disk
        self._memory = memory
        self._memory_limit = memory_limit if memory is not None else 0
        # Committed bytes: what a replay may read.
        self.size = 0
        # Bytes in memory (their starts, for replays that begin mid-way) and the budget they hold.
        self._pieces: list[Buffer] = []
        self._starts: list[int] = []
        self._memory_held = 0
        # Bytes reserved on disk, and the file once it exists (opened in a worker thread).
        self._disk_held = 0
        self._to_disk = False
        # Set once committed bytes are all in the file (reads go there from then on).
        self._in_file = False
        self._fd: int | None = None
        self._written = 0
        # The file's length, bytes of earlier uploads included (a reused file is not cut).
        self._file_size = 0
        self._discarded = False

    @property
    def on_disk(self) -> bool:
        return self._to_disk

    @property
    def bytes_written(self) -> int:
        """Bytes written to the spool file so far (0 while the copy is in memory)."""
        return self._written

    def reserve(self, size: int) -> bool:
        """Account for `size` more bytes before they are appended; True when they (and any
        bytes still in memory) must be written to disk with `write_sync`."""
        if not self._to_disk:
            fits = self._memory_held + size <= self._memory_limit
            if (
                fits
                and self._memory is not None
                and self._memory.try_acquire(size, ceiling=self._memory.total // MEMORY_SHARE)
            ):
                self._memory_held += size
                return False
            # Moving to disk: everything kept so far goes to the file too.
            self._disk.take(self.size + size)
            self._disk_held += self.size + size
            self._to_disk = True
            return True
        self._disk.take(size)
        self._disk_held += size
        return True

    def write_sync(self, pieces: Sequence[Buffer]) -> None:
        """Append reserved bytes to the file (worker thread; only after `reserve` said so).
        The first call also writes what was kept in memory so far."""
        if self._fd is None:
            self._fd, self._file_size = self._files.take()
            if self._pieces:
                self._write_all(self._pieces)
        self._write_all(pieces)

    def _write_all(self, pieces: Sequence[Buffer]) -> None:
        assert self._fd is not None
        # At explicit positions: a reused file's own offset means nothing.
        self._written += write_all(self._fd, pieces, self._written)
        self._file_size = max(self._file_size, self._written)

    def commit(self, pieces: Sequence[Buffer]) -> None:
        """The bytes are appended (on the loop, after `write_sync` when it was needed)."""
        if self._to_disk:
            self._in_file = True
            if self._pieces:
                # They are in the file now: the memory copy and its budget go.
                self._pieces.clear()
                self._starts.clear()
                self._release_memory()
        else:
            for piece in pieces:
                if len(piece):
                    self._starts.append(self.size)
                    self._pieces.append(piece)
                    self.size += len(piece)
            return
        self.size += sum(len(p) for p in pieces)

    def _release_memory(self) -> None:
        if self._memory_held and self._memory is not None:
            self._memory.release(self._memory_held)
        self._memory_held = 0

    def cursor(self, start: int = 0, end: int | None = None) -> SpoolCursor:
        """A reader of the bytes from `start` to `end` (default: what is committed now)."""
        end = self.size if end is None else end
        if end > self.size:
            raise RuntimeError(f"the spool holds {self.size} bytes, not {end}")
        return SpoolCursor(self, start, end)

    async def _read(self, position: int, end: int) -> Buffer:
        if not self._in_file:
            return self._read_memory(position, min(end, position + READ_PIECE))
        # Committed bytes are all in the file once the spool is on disk.
        assert self._fd is not None
        piece: bytes = await trio.to_thread.run_sync(
            os.pread, self._fd, min(READ_PIECE, end - position), position
        )
        if not piece:
            raise RuntimeError("the spool file is shorter than its committed size")
        return piece

    def _read_memory(self, position: int, end: int) -> Buffer:
        """The bytes from `position` to `end` of the copy in memory: a view of the piece
        that holds them, or, spread over several (a slow client's small reads), one buffer
        of them all, so a replay sends one frame per READ_PIECE, not one per read."""
        index = bisect.bisect_right(self._starts, position) - 1
        views: list[memoryview] = []
        while position < end:
            offset = position - self._starts[index]
            view = memoryview(self._pieces[index])[offset : offset + end - position]
            views.append(view)
            position += len(view)
            index += 1
        return views[0] if len(views) == 1 else b"".join(views)

    async def discard(self) -> None:
        """Remove the copy; safe to call twice and from cancelled code (it shields itself)."""
        if self._discarded:
            return
        self._discarded = True
        self._pieces.clear()
        self._starts.clear()
        self._release_memory()
        fd, self._fd = self._fd, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._files.give, fd, self._file_size)
        self._disk.give_back(self._disk_held)
        self._disk_held = 0


class SpoolCursor:
    """Reads a range of a spool in order, in pieces of at most READ_PIECE bytes, while the
    spool may still grow or move to disk. A class, not an async generator, so a cancelled
    read leaves nothing to finalize."""

    def __init__(self, spool: Spool, start: int, end: int) -> None:
        self._spool = spool
        self.position = start
        self.end = end

    async def next(self) -> Buffer | None:
        """The next piece, or None at the end of the range."""
        if self.position >= self.end:
            return None
        piece = await self._spool._read(self.position, self.end)
        self.position += len(piece)
        return piece


def write_all(fd: int, pieces: Sequence[Buffer], position: int) -> int:
    """Write every byte of `pieces` to `fd` from `position` on, in as few system calls as the
    kernel allows (blocking: a worker thread's job). Returns the bytes written."""
    views = remaining(pieces, 0)
    total = 0
    while views:
        # At most IOV_MAX buffers per call; a short write leaves the rest for the next.
        written = os.pwritev(fd, views[:IOV_MAX], position + total)
        if written <= 0:
            raise OSError(errno.EIO, "the file system accepted no bytes")
        total += written
        views = remaining(views, written)
    return total


class FileCopy(Spool):
    """Original bytes that are already in files which outlive the upload: a resumable
    upload's data files, fsynced before the upload is stored. They serve as its spool (a
    failover replays from them) so the store writes no second copy: nothing is written,
    nothing counted against the spool budget, and `discard` only closes the files.

    `parts` are (path, length) in order: a concatenated upload spans several files.
    """

    def __init__(self, parts: Sequence[tuple[Path, int]]) -> None:
        first = parts[0][0] if parts else Path(".")
        super().__init__(first.parent, first.name, disk=SpoolBudget(0), memory=None, memory_limit=0)
        self._parts = [(path, length) for path, length in parts]
        self._part_starts: list[int] = []
        total = 0
        for _, length in self._parts:
            self._part_starts.append(total)
            total += length
        self._total = total
        self._fds: dict[int, int] = {}

    @property
    def on_disk(self) -> bool:
        return True

    def reserve(self, size: int) -> bool:
        if self.size + size > self._total:
            raise RuntimeError(f"the files hold {self._total} bytes, not {self.size + size}")
        return False

    def write_sync(self, pieces: Sequence[Buffer]) -> None:  # pragma: no cover - never asked
        raise RuntimeError("a file copy is never written")

    def commit(self, pieces: Sequence[Buffer]) -> None:
        # The bytes the pipeline has taken so far: what a replay may read.
        self.size += sum(len(p) for p in pieces)

    async def _read(self, position: int, end: int) -> Buffer:
        index = bisect.bisect_right(self._part_starts, position) - 1
        part_start = self._part_starts[index]
        path, length = self._parts[index]
        size = min(READ_PIECE, end - position, part_start + length - position)
        fd = self._fds.get(index)
        if fd is None:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[index] = fd
        piece: bytes = await trio.to_thread.run_sync(os.pread, fd, size, position - part_start)
        if not piece:
            raise RuntimeError(f"{path} is shorter than the {length} bytes it should hold")
        return piece

    async def discard(self) -> None:
        if self._discarded:
            return
        self._discarded = True
        fds, self._fds = list(self._fds.values()), {}
        if fds:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_all, fds)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
