"""Spool files: a local copy of an upload's original bytes, so they can be sent again.

An upload is spooled when its file part arrived before the fields that choose where and
how it is stored; if a late field changes that choice, the copy in flight is abandoned and
the spool is sent instead of asking the client to send again. All file I/O runs in
threads; the file is removed when the upload ends, whatever the outcome.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import BinaryIO, Final

import trio

from ..errors import ServiceBusy

log = logging.getLogger(__name__)

# Reads during replay: large enough that thread hops cost little, small enough to stay flat.
REPLAY_CHUNK: Final = 1024 * 1024


class SpoolBudget:
    """Bytes spooled by this process right now, against a ceiling."""

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


class Spool:
    def __init__(self, path: Path, budget: SpoolBudget) -> None:
        self.path = path
        self.size = 0
        self._budget = budget
        self._file: BinaryIO | None = None

    @classmethod
    async def create(cls, directory: Path, name: str, budget: SpoolBudget) -> Spool:
        # A random part: upload ids may come from clients, and replicas may share the directory.
        spool = cls(directory / f"{name}.{secrets.token_hex(4)}.spool", budget)

        def _open() -> BinaryIO:
            directory.mkdir(parents=True, exist_ok=True)
            return open(spool.path, "wb")

        spool._file = await trio.to_thread.run_sync(_open)
        return spool

    def reserve(self, size: int) -> None:
        """Count `size` bytes against the budget before they are written (on the event loop)."""
        self._budget.take(size)
        self.size += size

    def write_sync(self, data: bytes) -> None:
        """Append reserved bytes; called from the transformer's worker thread.

        Flushed at once: a failover replays the spool through another handle while this
        one is still being written."""
        assert self._file is not None
        self._file.write(data)
        self._file.flush()

    async def finish_writing(self) -> None:
        if self._file is not None:
            await trio.to_thread.run_sync(self._file.flush)

    async def replay(self) -> AsyncGenerator[bytes, None]:
        with await trio.to_thread.run_sync(open, self.path, "rb") as reader:
            while chunk := await trio.to_thread.run_sync(reader.read, REPLAY_CHUNK):
                yield chunk

    async def open_reader(self) -> SpoolReader:
        handle = await trio.to_thread.run_sync(open, self.path, "rb")
        return SpoolReader(handle)

    async def discard(self) -> None:
        """Close and remove; safe to call twice and from cancelled code (it shields itself)."""
        with trio.CancelScope(shield=True):
            handle, self._file = self._file, None
            await trio.to_thread.run_sync(_close_and_unlink, handle, self.path)
            self._budget.give_back(self.size)
            self.size = 0


class SpoolReader:
    """Reads a spool from its start, in a worker thread, while it may still grow."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle: BinaryIO | None = handle

    async def read(self, size: int) -> bytes:
        assert self._handle is not None
        return await trio.to_thread.run_sync(self._handle.read, size)

    async def aclose(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.close)


def _close_and_unlink(handle: BinaryIO | None, path: Path) -> None:
    if handle is not None:
        handle.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove spool %s: %s", path, exc)
