"""The bytes of resumable uploads: one file per upload under `<spool_dir>/tus/`, shared by
replicas. Every call that touches the disk runs in a worker thread.

The rule that makes resuming safe: bytes are written, then fsynced, and only then does the
state's offset move. A file may hold more than the offset says (a process died between the
write and the state update); the next `PATCH` cuts it back to the offset before writing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

import trio

from ..upload.spool import write_all
from .errors import UploadDataLost
from .protocol import parse_upload_id

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)

# Reads when the finished upload is sent through the pipeline.
READ_CHUNK: Final = 1024 * 1024


class DataFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, upload_id: str) -> Path:
        return self.directory / upload_id

    async def create(self, upload_id: str) -> None:
        """An empty data file, its directory entry durable."""

        def create() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.path(upload_id), "xb") as handle:
                os.fsync(handle.fileno())
            _fsync_dir(self.directory)

        await trio.to_thread.run_sync(create)

    async def open_at(self, upload_id: str, offset: int) -> DataWriter:
        """A writer appending at `offset`; what lies beyond it (never acknowledged) is cut."""

        def open_() -> int:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.path(upload_id)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                if offset:
                    raise UploadDataLost(
                        f"the data of upload {upload_id} is gone ({offset} bytes were stored)"
                    ) from None
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            size = os.fstat(fd).st_size
            if size < offset:
                os.close(fd)
                raise UploadDataLost(
                    f"upload {upload_id} holds {size} bytes, its offset says {offset}"
                )
            if size > offset:
                os.ftruncate(fd, offset)
            return fd

        fd = await trio.to_thread.run_sync(open_)
        return DataWriter(fd, offset)

    async def remove(self, upload_id: str) -> int:
        """Remove the data file; the bytes it held (0 when there was none)."""

        def remove() -> int:
            path = self.path(upload_id)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return 0
            return size

        with trio.CancelScope(shield=True):
            freed = await trio.to_thread.run_sync(remove)
        return freed

    async def size(self, upload_id: str) -> int | None:
        def size() -> int | None:
            try:
                return self.path(upload_id).stat().st_size
            except FileNotFoundError:
                return None

        return await trio.to_thread.run_sync(size)

    async def scan(self) -> list[tuple[str, int, float]]:
        """(upload id, size, mtime) of every data file."""

        def scan() -> list[tuple[str, int, float]]:
            found = []
            try:
                entries = list(os.scandir(self.directory))
            except FileNotFoundError:
                return []
            for entry in entries:
                if parse_upload_id(entry.name) is None:
                    continue
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                found.append((entry.name, stat.st_size, stat.st_mtime))
            return found

        return await trio.to_thread.run_sync(scan)

    def reader(self, parts: Sequence[tuple[str, int]], chunk: int = READ_CHUNK) -> DataReader:
        """The bytes of `parts` ((upload id, length), in order) as one stream."""
        return DataReader(self, list(parts), chunk)


class DataWriter:
    """Appends to one data file. `write` and `commit` are the only ways bytes become stored.

    A raw descriptor and `os.pwritev`: the received pieces go to the kernel as they are, one
    system call per batch, with no buffer in between to copy them into.
    """

    def __init__(self, fd: int, start: int) -> None:
        self._fd: int | None = fd
        self.start = start
        self.written = 0

    async def write(self, chunks: list[bytes], hasher: _Hash | None = None) -> None:
        """Append `chunks` (and feed them to `hasher`) in one worker-thread hop."""
        fd = self._fd
        assert fd is not None
        position = self.start + self.written

        def write() -> None:
            if hasher is not None:
                for chunk in chunks:
                    hasher.update(chunk)
            write_all(fd, chunks, position)

        await trio.to_thread.run_sync(write)
        # Counted once the thread returned: a write that did not finish is not stored.
        self.written += sum(len(c) for c in chunks)

    async def commit(self) -> int:
        """fsync what was written; the bytes now stored past `start`."""
        fd = self._fd
        assert fd is not None
        await trio.to_thread.run_sync(os.fsync, fd)
        return self.written

    async def discard(self) -> None:
        """Cut the file back to `start` (a chunk that failed its checksum)."""
        fd = self._fd
        assert fd is not None
        await trio.to_thread.run_sync(os.ftruncate, fd, self.start)
        self.written = 0

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(os.close, fd)


class DataReader:
    """Reads the data files of an upload (several for a concatenated one) in order, exactly
    the lengths the state names. A class, not an async generator: the pipeline may stop
    reading at any point, and `aclose` then closes the open file."""

    def __init__(self, files: DataFiles, parts: list[tuple[str, int]], chunk: int) -> None:
        self._files = files
        self._parts = parts
        self._chunk = chunk
        self._handle: BinaryIO | None = None
        self._left = 0

    def __aiter__(self) -> DataReader:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._handle is None:
                if not self._parts:
                    raise StopAsyncIteration
                upload_id, self._left = self._parts.pop(0)
                path = self._files.path(upload_id)
                try:
                    self._handle = await trio.to_thread.run_sync(open, path, "rb")
                except FileNotFoundError:
                    raise UploadDataLost(f"the data of upload {upload_id} is gone") from None
            if self._left == 0:
                await self._close_current()
                continue
            data = await trio.to_thread.run_sync(self._handle.read, min(self._chunk, self._left))
            if not data:
                raise UploadDataLost("a data file is shorter than its upload's length")
            self._left -= len(data)
            return data

    async def _close_current(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.close)

    async def aclose(self) -> None:
        self._parts = []
        await self._close_current()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
