"""The bytes of resumable uploads: one file per upload under `<spool_dir>/tus/`, shared by
replicas. Every call that touches the disk runs in a worker thread.

The rule that makes resuming safe: bytes are written, then fsynced, and only then does the
state's offset move. Nothing past the offset is ever read: a file may hold more than the
offset says (a process died between the write and the state update, a chunk failed its
checksum, or the file was an idle one taken over, below), and the next `PATCH` writes over it.

Idle files are reused. A finished upload's data file goes to `<spool_dir>/tus/.reuse/` (while
the idle files stay within `keep_bytes`), and the next upload takes one over by renaming it
to its own name: its `PATCH`es then write over pages the page cache already holds. A page the
page cache must allocate costs the kernel far more than one it holds (measured on this
project's VM: 2.1-2.6 CPU-seconds per GiB written into a new file, 0.15-0.19 into one written
before), and the file system allocates no blocks. The multipart spool does the same with its
unnamed files (`upload.spool.SpoolFiles`). Only files removed under the upload's lock are
kept (stored, terminated, expired): a holder that loses its lock stops writing before another
replica can take it over (the lock's rule), so no old writer is left when a file is reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from ..upload.spool import write_all
from .errors import UploadDataLost
from .protocol import parse_upload_id

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)

# Reads of a data file on its way through the pipeline (the completion's and a pipelined
# store's): one thread hop per MiB, as everywhere else.
READ_CHUNK: Final = 1024 * 1024

# Idle data files, kept for the next upload. Not an upload id: the orphan scan passes it by.
REUSE_DIR: Final = ".reuse"
# An idle file smaller than this saves too little to keep; at most this many are kept.
REUSE_MIN_BYTES: Final = 1024 * 1024
REUSE_MAX_FILES: Final = 16
# A file a process was taking over when it died (renamed, not yet linked) is removed after.
CLAIM_GRACE_S: Final = 60.0
_CLAIMED: Final = "claimed-"


class DataFiles:
    def __init__(self, directory: Path, *, keep_bytes: int = 0) -> None:
        self.directory = directory
        self.reuse_dir = directory / REUSE_DIR
        self.keep_bytes = keep_bytes
        # Off once the file system refused a hard link (reuse needs one to never replace a file).
        self._links = True

    def path(self, upload_id: str) -> Path:
        return self.directory / upload_id

    async def create(self, upload_id: str, length: int | None = None) -> bool:
        """The upload's data file, its directory entry durable: an idle one taken over when
        there is one (cut to `length` when longer), else an empty one. True when reused."""

        def create() -> bool:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.path(upload_id)
            reused = self._take_idle(path, length)
            if not reused:
                with open(path, "xb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(self.directory)
            return reused

        return await trio.to_thread.run_sync(create)

    def _take_idle(self, path: Path, length: int | None) -> bool:
        """Rename an idle file to `path` (blocking). The smallest that holds `length`, else
        the largest. The rename claims it (two replicas cannot take the same file); the link
        to `path` then fails rather than replace a file there."""
        if not self.keep_bytes or not self._links or length == 0:
            return False

        def preference(idle: tuple[str, int, float]) -> tuple[bool, int]:
            size = idle[1]
            fits = length is not None and size >= length
            return (not fits, size if fits else -size)

        for name, size, _ in sorted(self._idle(), key=preference):
            claimed = self.reuse_dir / f"{_CLAIMED}{path.name}"
            try:
                os.rename(self.reuse_dir / name, claimed)
            except FileNotFoundError:
                continue  # another replica took it
            try:
                os.link(claimed, path)
            except FileExistsError:
                os.unlink(claimed)
                raise
            except OSError as exc:
                os.unlink(claimed)
                self._links = False
                log.warning("tus data files are not reused: no hard links here (%s)", exc)
                return False
            os.unlink(claimed)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                if length is not None and size > length:
                    os.ftruncate(fd, length)
                # A fresh time: the orphan scan's grace counts from the take-over.
                os.utime(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        return False

    def _idle(self) -> list[tuple[str, int, float]]:
        """(name, size, change time) of the idle files (blocking)."""
        return [
            (name, stat.st_size, stat.st_ctime)
            for name, stat in _listing(self.reuse_dir)
            if not name.startswith(_CLAIMED)
        ]

    def _keep(self, path: Path, size: int) -> bool:
        """Move a finished upload's file to the idle ones when they have room (blocking)."""
        if not self.keep_bytes or not self._links or size < REUSE_MIN_BYTES:
            return False
        idle = self._idle()
        if len(idle) >= REUSE_MAX_FILES or sum(f[1] for f in idle) + size > self.keep_bytes:
            return False
        self.reuse_dir.mkdir(exist_ok=True)
        os.rename(path, self.reuse_dir / secrets.token_hex(8))
        return True

    async def trim_idle(self, now: float | None = None) -> int:
        """Bring the idle files back within `keep_bytes` and `REUSE_MAX_FILES`, the oldest
        going first (replicas that kept files at the same moment may pass them), and remove
        what a process that died while taking one over left. The number removed."""

        def trim() -> int:
            removed = 0
            at = time.time() if now is None else now
            for name, stat in _listing(self.reuse_dir):
                if name.startswith(_CLAIMED) and at - stat.st_ctime >= CLAIM_GRACE_S:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.reuse_dir / name)
                        removed += 1
            idle = sorted(self._idle(), key=lambda f: f[2])
            total = sum(f[1] for f in idle)
            while idle and (total > self.keep_bytes or len(idle) > REUSE_MAX_FILES):
                name, size, _ = idle.pop(0)
                try:
                    os.unlink(self.reuse_dir / name)
                    removed += 1
                except FileNotFoundError:
                    pass
                total -= size
            return removed

        return await trio.to_thread.run_sync(trim)

    def writer_at(self, upload_id: str, offset: int) -> DataWriter:
        """A writer at `offset`; what lies beyond it (never acknowledged) is written over.
        The file opens in the writer's first hop (one hop less per `PATCH`): a file gone or
        cut short is `UploadDataLost` from that first write or commit."""

        def open_() -> int:
            path = self.path(upload_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                if offset:
                    raise UploadDataLost(
                        f"the data of upload {upload_id} is gone ({offset} bytes were stored)"
                    ) from None
                # Nothing stored yet, and no file (its creation was lost): a new one.
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            if size < offset:
                os.close(fd)
                raise UploadDataLost(
                    f"upload {upload_id} holds {size} bytes, its offset says {offset}"
                )
            return fd

        return DataWriter(open_, offset)

    async def remove(self, upload_id: str, *, reuse: bool = True) -> int:
        """Remove the data file, keeping it for the next upload when `reuse` (its upload's
        lock is held) and the idle files have room; the bytes it held (0 when there was
        none)."""

        def remove() -> int:
            path = self.path(upload_id)
            try:
                size = path.stat().st_size
                if not (reuse and self._keep(path, size)):
                    path.unlink()
            except FileNotFoundError:
                return 0
            return size

        with trio.CancelScope(shield=True):
            freed = await trio.to_thread.run_sync(remove)
        return freed

    async def mtime(self, upload_id: str) -> float | None:
        """When the upload's data file was last written; None when there is none."""

        def mtime() -> float | None:
            try:
                return self.path(upload_id).stat().st_mtime
            except FileNotFoundError:
                return None

        return await trio.to_thread.run_sync(mtime)

    async def scan(self) -> list[tuple[str, int, float]]:
        """(upload id, size, mtime) of every data file."""

        def scan() -> list[tuple[str, int, float]]:
            return [
                (name, stat.st_size, stat.st_mtime)
                for name, stat in _listing(self.directory)
                if parse_upload_id(name) is not None
            ]

        return await trio.to_thread.run_sync(scan)

    def reader(self, parts: Sequence[tuple[str, int]], chunk: int = READ_CHUNK) -> DataReader:
        """The bytes of `parts` ((upload id, length), in order) as one stream."""
        return DataReader(self, list(parts), chunk)


class DataWriter:
    """Appends to one data file. `write` and `commit` are the only ways bytes become stored.

    A raw descriptor and `os.pwritev`: the received pieces go to the kernel as they are, one
    system call per batch, with no buffer in between to copy them into. The file opens in
    the first hop that needs it, and a `PATCH`'s last batch is written, fsynced and closed
    in one: a `PATCH` of one batch costs one hop. Hops never overlap (the caller awaits
    each), so the descriptor is only touched by one thread at a time.
    """

    def __init__(self, open_: Callable[[], int], start: int) -> None:
        self._open: Callable[[], int] | None = open_
        self._fd: int | None = None
        self.start = start
        self.written = 0

    def _descriptor(self) -> int:
        """The open file (in a worker thread: opened here the first time)."""
        if self._fd is None:
            assert self._open is not None, "the writer was closed"
            self._fd = self._open()
        return self._fd

    def _sync_and_close(self) -> None:
        """fsync and close (in a worker thread); closed whatever the fsync did: the
        descriptor is not ours to retry with."""
        fd, self._fd, self._open = self._fd, None, None
        if fd is None:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def write(self, chunks: list[bytes], *hashers: _Hash | None, last: bool = False) -> None:
        """Append `chunks` (and feed them to each of `hashers` that is not None) in one
        worker-thread hop. `last`: nothing more is written, so the same hop fsyncs and
        closes the file (`commit(close=True)` then has nothing left to do)."""
        position = self.start + self.written
        feeding = [hasher for hasher in hashers if hasher is not None]

        def write() -> None:
            fd = self._descriptor()
            for hasher in feeding:
                for chunk in chunks:
                    hasher.update(chunk)
            written = write_all(fd, chunks, position)
            if last:
                self._sync_and_close()
            else:
                # The disk starts on these pages now, while the next batch arrives: the
                # PATCH's fsync then waits for little more than its last batch.
                start_writeback(fd, position, written)

        await trio.to_thread.run_sync(write)
        # Counted once the thread returned: a write that did not finish is not stored.
        self.written += sum(len(c) for c in chunks)

    async def commit(self, *, close: bool = False) -> int:
        """fsync what was written; the bytes now stored past `start`. With `close`, the
        file is closed in the same worker-thread hop (a `PATCH`'s end: one hop less per
        request). Nothing to do when nothing was written or a `last` write closed it."""
        if self._fd is None:
            if close:
                self._open = None
            return self.written
        if close:
            await trio.to_thread.run_sync(self._sync_and_close)
        else:
            await trio.to_thread.run_sync(os.fsync, self._fd)
        return self.written

    def discard(self) -> None:
        """Forget what was written past `start` (a chunk that failed its checksum): the
        offset does not move, so nothing reads it, and the next `PATCH` writes over it."""
        self.written = 0

    async def aclose(self) -> None:
        fd, self._fd, self._open = self._fd, None, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)


class DataReader:
    """Reads the data files of an upload (several for a concatenated one) in order, exactly
    the lengths the state names, and hashes what it reads in the same worker-thread hop
    (`sha256`, the pipeline's `prehashed`). A class, not an async generator: the pipeline
    may stop reading at any point, and `aclose` then closes the open file."""

    def __init__(self, files: DataFiles, parts: list[tuple[str, int]], chunk: int) -> None:
        self._files = files
        self._parts = parts
        self._chunk = chunk
        self._fd: int | None = None
        self._position = 0
        self._left = 0
        self.sha256 = hashlib.sha256()

    def __aiter__(self) -> DataReader:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._fd is None:
                if not self._parts:
                    raise StopAsyncIteration
                upload_id, self._left = self._parts.pop(0)
                path = self._files.path(upload_id)
                try:
                    self._fd = await trio.to_thread.run_sync(
                        os.open, path, os.O_RDONLY | os.O_CLOEXEC
                    )
                except FileNotFoundError:
                    raise UploadDataLost(f"the data of upload {upload_id} is gone") from None
                self._position = 0
            if self._left == 0:
                await self._close_current()
                continue
            data = await trio.to_thread.run_sync(
                pread_and_hash, self._fd, min(self._chunk, self._left), self._position, self.sha256
            )
            if not data:
                raise UploadDataLost("a data file is shorter than its upload's length")
            self._position += len(data)
            self._left -= len(data)
            return data

    async def _close_current(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)

    async def aclose(self) -> None:
        self._parts = []
        await self._close_current()


def _listing(directory: Path) -> list[tuple[str, os.stat_result]]:
    """(name, stat) of what `directory` holds, skipping what goes away meanwhile (blocking);
    nothing when there is no such directory."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        try:
            found.append((entry.name, entry.stat()))
        except FileNotFoundError:
            continue
    return found


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE: Final = _sync_file_range()
_SYNC_FILE_RANGE_WRITE: Final = 2


def start_writeback(fd: int, position: int, size: int) -> None:
    """Have the kernel start writing `size` bytes of `fd` from `position` to the disk, not
    waiting for it (blocking only while the disk's queue is full). A hint: it makes nothing
    durable (the fsync does), and where there is no `sync_file_range` it does nothing."""
    if _SYNC_FILE_RANGE is not None and size > 0:
        _SYNC_FILE_RANGE(fd, position, size, _SYNC_FILE_RANGE_WRITE)


def pread_and_hash(fd: int, size: int, position: int, hasher: _Hash) -> bytes:
    """Up to `size` bytes of `fd` at `position`, fed to `hasher` (blocking: one hop for
    both, for the readers of data files)."""
    data = os.pread(fd, size, position)
    hasher.update(data)
    return data


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
