"""The local file: read by offset, hashed (sha256) as it is read, watched for changes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from .errors import UploadFailed

READ_SIZE: Final = 1024 * 1024


class SourceFile:
    """An open file and the sha256 of its bytes `[0, hashed)`.

    Reads go through `read(offset, n)`; the part of each read beyond `hashed` extends the
    hash, so re-sending a chunk after a failure does not count it twice, and resuming at
    an offset first hashes what the server already has (`hash_up_to`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UploadFailed(f"cannot read the file: {exc.strerror}") from None
        info = os.fstat(self._fd)
        self.size = info.st_size
        self.mtime_ns = info.st_mtime_ns
        self._sha = hashlib.sha256()
        self.hashed = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        os.close(self._fd)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise UploadFailed(f"the file shrank while being read (at byte {offset})")
        end = offset + len(data)
        if offset <= self.hashed < end:
            self._sha.update(memoryview(data)[self.hashed - offset :])
            self.hashed = end
        return data

    def hash_up_to(self, offset: int) -> None:
        while self.hashed < offset:
            self.read(self.hashed, min(READ_SIZE, offset - self.hashed))

    def restart_hash(self) -> None:
        """For a request that sends the whole file again from its first byte."""
        self._sha = hashlib.sha256()
        self.hashed = 0

    def sha256(self) -> str:
        """The hash of the whole file, read by now."""
        self.hash_up_to(self.size)
        return self._sha.hexdigest()

    def check_unchanged(self) -> None:
        """The file is still the one that was read: same size and mtime, not replaced."""
        try:
            now = os.stat(self.path)
        except OSError as exc:
            raise UploadFailed(f"the file went away during the upload: {exc.strerror}") from None
        mine = os.fstat(self._fd)
        if (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev) or (
            now.st_size,
            now.st_mtime_ns,
        ) != (self.size, self.mtime_ns):
            raise UploadFailed("the file changed during the upload; run the command again")
