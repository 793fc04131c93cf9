"""The reference Storage Element's files on disk, and the in-memory index over them. No HTTP.

A data directory holds, for each stored file:

    <storage_filename>              the bytes
    <storage_filename>.attr.json    their record (artStore's attribute file)
    .tmp/                           uploads and records being written, nothing else

Commit order is data first, attr.json last. Each is written under `.tmp/`, fsynced and
renamed into place, and the directory is fsynced after each rename, so after a crash an
attr.json proves its data file is complete and durable. Recovery at start-up is then
unambiguous: whatever is in `.tmp/` is unfinished, and a data file without an attr.json
crashed between the two renames, before the client got its `201`; both are removed. The
other order would leave attr.json files naming data that may or may not be whole, which
only re-hashing every file could settle. Deletion runs in reverse (attr.json first) for the
same reason.

All file I/O runs in worker threads; the index and the capacity accounting live on the
event loop, where each change is a synchronous step that no other task can interleave.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import trio

from ..errors import IngesterError, InsufficientStorage, InvalidField, NotFound
from ..upload.filenames import storage_filename

log = logging.getLogger(__name__)

ATTR_SUFFIX: Final = ".attr.json"
TMP_DIR_NAME: Final = ".tmp"
# Held (flock) while an element uses the directory: a second element on it would take the
# first one's uploads in flight for a crash's leftovers and delete them.
LOCK_FILE_NAME: Final = ".lock"
# Writes are batched to this size: a 1 GiB upload costs a thousand thread hops, not a million.
WRITE_BATCH_BYTES: Final = 1024 * 1024
# Downloads read this much per thread hop, for the same reason.
READ_CHUNK_BYTES: Final = 1024 * 1024
# Two access() calls are instant on a healthy disk; slower means not ready.
READY_CHECK_TIMEOUT_S: Final = 2.0
# Clean-up outlives the request it belongs to (it is shielded), but not a disk that hangs.
CLEANUP_TIMEOUT_S: Final = 30.0
# Storage names end in the file id (`<stem>_<file_id>.<ext>`, or `<file_id>.<ext>` when no
# stem survives): only such files are ours to remove as orphans at start-up; anything else an
# operator put in the directory is left alone.
_OWN_NAME_RE: Final = re.compile(
    r"(?:^|_)[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?:\.[A-Za-z0-9_-]*)?$"
)
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# ENOSPC and EDQUOT both mean the same thing to a client: no room here.
_NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class FileNotFound(NotFound):
    code = "FILE_NOT_FOUND"
    default_message = "no file with this id is stored here"


class FileExists(IngesterError):
    status = 409
    code = "FILE_EXISTS"
    default_message = "a file with this id is already stored here"


class UploadAborted(IngesterError):
    status = 409
    code = "UPLOAD_ABORTED"
    default_message = "the file was deleted (gc) while it was being uploaded"


class ElementFull(InsufficientStorage):
    default_message = "this Storage Element is full"


class DirectoryInUse(OSError):
    """Another Storage Element holds the data directory's lock."""


def parse_file_id(raw: str) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID file id; 400 otherwise."""
    try:
        return str(uuid.UUID(raw.strip()))
    except (ValueError, AttributeError):
        raise InvalidField(f"file_id must be a UUID, got {raw[:64]!r}") from None


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One stored file: the content of its attr.json and of `GET /api/v1/files/{id}`."""

    file_id: str
    original_filename: str
    storage_filename: str
    file_size: int
    content_type: str
    created_at: str
    created_by_id: str
    created_by_username: str
    description: str | None
    checksum: str
    metadata: dict[str, Any]
    version: str | None
    retention_policy: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> FileRecord:
        """Parse an attr.json document; `ValueError` says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        text = (
            "original_filename",
            "storage_filename",
            "content_type",
            "created_at",
            "created_by_id",
            "created_by_username",
            "checksum",
        )
        optional = ("description", "version", "retention_policy")
        for name in text:
            if not isinstance(data.get(name), str):
                raise ValueError(f"'{name}' is missing or not a string")
        for name in optional:
            if data.get(name) is not None and not isinstance(data[name], str):
                raise ValueError(f"'{name}' is not a string")
        size = data.get("file_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("'file_size' is missing or not a non-negative integer")
        if not _SHA256_RE.fullmatch(data["checksum"]):
            raise ValueError("'checksum' is not a sha256 hex digest")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise ValueError("'metadata' is not an object")
        try:
            file_id = str(uuid.UUID(str(data.get("file_id"))))
        except ValueError:
            raise ValueError("'file_id' is not a UUID") from None
        return cls(
            file_id=file_id,
            original_filename=data["original_filename"],
            storage_filename=data["storage_filename"],
            file_size=size,
            content_type=data["content_type"],
            created_at=data["created_at"],
            created_by_id=data["created_by_id"],
            created_by_username=data["created_by_username"],
            description=data.get("description"),
            checksum=data["checksum"],
            metadata=metadata,
            version=data.get("version"),
            retention_policy=data.get("retention_policy"),
        )


@dataclass(frozen=True, slots=True)
class NewFile:
    """What the request says about a file; the store adds its name, size, checksum, time."""

    file_id: str
    original_filename: str
    content_type: str
    created_by_id: str
    created_by_username: str
    description: str | None = None
    version: str | None = None
    retention_policy: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Recovery:
    """What start-up found in the data directory."""

    records: dict[str, FileRecord]
    removed_temps: list[str] = field(default_factory=list)
    removed_orphans: list[str] = field(default_factory=list)
    # attr.json files not indexed, and why; left on disk for an operator.
    skipped: dict[str, str] = field(default_factory=dict)
    # Files that are neither ours nor described by an attr.json; left alone.
    foreign: list[str] = field(default_factory=list)


class FileStore:
    """The data directory, its index (file_id → record) and its capacity accounting.

    Capacity: with `capacity_bytes` set, stored bytes plus every upload's reservation stay
    within it. An upload reserves its declared size (the request's Content-Length, an upper
    bound of the file) before a byte is read, and grows the reservation while it writes
    when it declared none; the reservation becomes the file's size on commit and is released
    on failure. So concurrent uploads cannot together overshoot. Counting the whole
    Content-Length is deliberately conservative: a file that would fit only without its
    multipart framing (a few hundred bytes) is refused.

    Without `capacity_bytes` the file system is the limit: a declared size above its free
    space is refused up front, and ENOSPC while writing becomes the same `507`.
    """

    def __init__(self, data_dir: Path, *, capacity_bytes: int | None = None) -> None:
        self.data_dir = data_dir
        self.tmp_dir = data_dir / TMP_DIR_NAME
        self.capacity_bytes = capacity_bytes
        self._index: dict[str, FileRecord] = {}
        self._used = 0
        self._reserved = 0
        self._in_flight: dict[str, PendingUpload] = {}
        self._lock_fd: int | None = None

    @classmethod
    async def open(cls, data_dir: Path, *, capacity_bytes: int | None = None) -> FileStore:
        """Lock the directory, finish what a crash left, and rebuild the index.

        `DirectoryInUse` when another element has it; `close()` releases it.
        """
        store = cls(await trio.to_thread.run_sync(data_dir.absolute), capacity_bytes=capacity_bytes)
        store._lock_fd = await trio.to_thread.run_sync(_lock_directory, store.data_dir)
        try:
            recovery = await trio.to_thread.run_sync(recover, store.data_dir)
        except BaseException:
            store.close()
            raise
        store._index = recovery.records
        store._used = sum(record.file_size for record in recovery.records.values())
        for name, reason in recovery.skipped.items():
            log.warning("not indexed: %s: %s", name, reason, extra={"event": "se_skipped"})
        if recovery.foreign:
            log.warning(
                "%d unknown file(s) in the data directory left alone: %s",
                len(recovery.foreign),
                ", ".join(recovery.foreign[:10]),
                extra={"event": "se_foreign_files"},
            )
        log.info(
            "indexed %d file(s), %d bytes; removed %d unfinished upload file(s) and %d orphan(s)",
            len(store._index),
            store._used,
            len(recovery.removed_temps),
            len(recovery.removed_orphans),
            extra={
                "event": "se_recovered",
                "file_count": len(store._index),
                "used_bytes": store._used,
                "removed_temps": len(recovery.removed_temps),
                "removed_orphans": recovery.removed_orphans,
            },
        )
        return store

    def close(self) -> None:
        """Release the directory (closing a descriptor does not block)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    # --- reading the index -----------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def file_count(self) -> int:
        return len(self._index)

    def get(self, file_id: str) -> FileRecord:
        record = self._index.get(file_id)
        if record is None:
            raise FileNotFound(f"file {file_id} is not stored here")
        return record

    def exists(self, file_id: str) -> bool:
        return file_id in self._index

    async def open_stream(self, record: FileRecord) -> FileStream:
        path = self.data_dir / record.storage_filename
        try:
            handle = await trio.to_thread.run_sync(_open_for_read, path)
        except FileNotFoundError:
            # Deleted between the index lookup and the open.
            raise FileNotFound(f"file {record.file_id} is not stored here") from None
        return FileStream(handle, record.file_size)

    async def disk_free(self) -> int:
        """Bytes an unprivileged writer can still put on the data directory's file system."""
        # Abandoned on cancel: a caller's timeout must not wait for a hung file system.
        stats = await trio.to_thread.run_sync(os.statvfs, self.data_dir, abandon_on_cancel=True)
        return stats.f_bavail * stats.f_frsize

    async def writable(self) -> bool:
        def check() -> bool:
            return os.access(self.tmp_dir, os.W_OK | os.X_OK) and os.access(
                self.data_dir, os.W_OK | os.X_OK
            )

        # A hung file system must fail readiness, not hang it: abandon the thread.
        with trio.move_on_after(READY_CHECK_TIMEOUT_S):
            return await trio.to_thread.run_sync(check, abandon_on_cancel=True)
        return False

    # --- uploading ---------------------------------------------------------------------------

    @asynccontextmanager
    async def upload(self, declared_size: int | None) -> AsyncIterator[PendingUpload]:
        """A new upload; whatever it wrote is removed on exit unless it was committed."""
        if declared_size is not None and self.capacity_bytes is None:
            free = await self.disk_free()
            if declared_size > free:
                raise ElementFull(
                    f"the upload declares {declared_size} bytes; the disk has {free} free"
                )
        pending = PendingUpload(self)
        self._grow(pending, declared_size or 0)
        try:
            yield pending
        finally:
            try:
                if not pending.committed:
                    await pending.discard()
            finally:
                self._release(pending)

    def _grow(self, pending: PendingUpload, total: int) -> None:
        extra = total - pending.reserved
        if extra <= 0:
            return
        if self.capacity_bytes is not None:
            free = self.capacity_bytes - self._used - self._reserved
            if extra > free:
                raise ElementFull(
                    f"this Storage Element has {max(free, 0)} of {self.capacity_bytes} bytes "
                    f"free; the upload needs {total}"
                )
        self._reserved += extra
        pending.reserved = total

    def _claim(self, pending: PendingUpload, file_id: str) -> None:
        if pending.file_id == file_id:
            return
        if pending.file_id is not None:
            raise InvalidField("file_id was given twice")
        owner = self._in_flight.get(file_id)
        if file_id in self._index or owner is not None:
            raise FileExists(f"file {file_id} is already stored here (or being uploaded)")
        self._in_flight[file_id] = pending
        pending.file_id = file_id

    def _commit(self, pending: PendingUpload, record: FileRecord) -> None:
        # One synchronous step: the bytes move from "reserved" to "used" with no gap.
        self._reserved -= pending.reserved
        pending.reserved = 0
        self._used += record.file_size
        self._index[record.file_id] = record
        pending.committed = True

    def _release(self, pending: PendingUpload) -> None:
        self._reserved -= pending.reserved
        pending.reserved = 0
        if pending.file_id is not None and self._in_flight.get(pending.file_id) is pending:
            del self._in_flight[pending.file_id]

    # --- deleting ---------------------------------------------------------------------------

    async def delete(self, file_id: str) -> FileRecord:
        record = self.get(file_id)
        # Out of the index first: concurrent reads and deletes see it gone at once.
        del self._index[file_id]
        self._used -= record.file_size
        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_files, self.data_dir, record.storage_filename)
        except BaseException:
            # Possibly half removed; keeping it indexed lets a retried delete finish the job.
            self._index[file_id] = record
            self._used += record.file_size
            raise
        log.info(
            "deleted %s",
            file_id,
            extra={"event": "se_deleted", "file_id": file_id, "file_size": record.file_size},
        )
        return record

    async def gc_delete(self, file_id: str, *, abort_in_flight: bool = True) -> str:
        """Compensation: `deleted`, or `aborted` for an upload of this id still in flight
        (it will not be committed; unless not `abort_in_flight`, as artStore's element, which
        knows nothing of uploads in flight). `FileNotFound` when neither."""
        if file_id in self._index:
            await self.delete(file_id)
            return "deleted"
        pending = self._in_flight.get(file_id)
        if pending is not None and abort_in_flight:
            pending.doomed = True
            log.info("gc aborted the upload of %s in flight", file_id, extra={"file_id": file_id})
            return "aborted"
        raise FileNotFound(f"file {file_id} is not stored here")


class PendingUpload:
    """One upload being written under `.tmp/`. Made by `FileStore.upload`."""

    def __init__(self, store: FileStore) -> None:
        self._store = store
        self.reserved = 0
        self.size = 0
        self.file_id: str | None = None
        self.committed = False
        # Set by a gc delete of this file id: the upload must not be committed.
        self.doomed = False
        self._hash = hashlib.sha256()
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._handle: io.FileIO | None = None
        self._tmp_path: Path | None = None

    def is_doomed(self) -> bool:
        # A method, not the attribute: its value changes across awaits.
        return self.doomed

    def claim(self, file_id: str) -> None:
        """Reserve the file id for this upload (409 if stored or being uploaded)."""
        self._store._claim(self, file_id)

    async def open_file(self) -> None:
        if self._tmp_path is not None:
            raise InvalidField("only one 'file' part is allowed")
        # Named before the thread creates it, so clean-up finds it whatever happens next.
        self._tmp_path = self._store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._handle = await trio.to_thread.run_sync(_create_exclusive, self._tmp_path)

    async def write(self, data: bytes | memoryview) -> None:
        if self.doomed:
            raise UploadAborted()
        if not data:
            return
        self._store._grow(self, self.size + len(data))
        self.size += len(data)
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= WRITE_BATCH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if not self._batch:
            return
        assert self._handle is not None
        data = self._batch[0] if len(self._batch) == 1 else b"".join(self._batch)
        self._batch.clear()
        self._batched = 0
        try:
            await trio.to_thread.run_sync(_write_and_hash, self._handle, self._hash, data)
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise ElementFull("the Storage Element's disk is full") from exc
            raise

    async def commit(self, new: NewFile) -> FileRecord:
        """Make the file durable under its final name with its attr.json; index it."""
        if self._handle is None or self._tmp_path is None:
            raise InvalidField("the upload has no file")
        self.claim(new.file_id)
        await self._flush()
        if self.is_doomed():
            raise UploadAborted()
        store = self._store
        record = FileRecord(
            file_id=new.file_id,
            original_filename=new.original_filename,
            storage_filename=_storage_name(new.original_filename, new.file_id),
            file_size=self.size,
            content_type=new.content_type,
            created_at=datetime.now(UTC).isoformat(),
            created_by_id=new.created_by_id,
            created_by_username=new.created_by_username,
            description=new.description,
            checksum=self._hash.hexdigest(),
            metadata=new.metadata,
            version=new.version,
            retention_policy=new.retention_policy,
        )
        handle, self._handle = self._handle, None
        # Shielded: once the renames start, a client that hangs up must not leave the files
        # half committed or the index out of step with the disk.
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(
                    _commit_files, handle, self._tmp_path, record, store.data_dir, store.tmp_dir
                )
            except OSError as exc:
                if exc.errno in _NO_SPACE_ERRNOS:
                    raise ElementFull("the Storage Element's disk is full") from exc
                raise
            # A gc delete may have come in while the thread ran.
            if self.is_doomed():
                await trio.to_thread.run_sync(
                    _remove_files, store.data_dir, record.storage_filename
                )
                raise UploadAborted()
            store._commit(self, record)
        log.info(
            "stored %s as %s (%d bytes)",
            record.file_id,
            record.storage_filename,
            record.file_size,
            extra={
                "event": "se_stored",
                "file_id": record.file_id,
                "file_size": record.file_size,
                "checksum": record.checksum,
            },
        )
        return record

    async def discard(self) -> None:
        handle, self._handle = self._handle, None
        path = self._tmp_path
        if handle is None and path is None:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLEANUP_TIMEOUT_S):
            await trio.to_thread.run_sync(_discard, handle, path, abandon_on_cancel=True)


class FileStream:
    """A stored file's bytes, read one chunk per thread hop, exactly `size` of them."""

    def __init__(self, handle: io.FileIO, size: int) -> None:
        self._handle: io.FileIO | None = handle
        self._remaining = size

    def __aiter__(self) -> FileStream:
        return self

    async def __anext__(self) -> bytes:
        if self._remaining <= 0 or self._handle is None:
            await self.aclose()
            raise StopAsyncIteration
        data = await trio.to_thread.run_sync(
            self._handle.read, min(READ_CHUNK_BYTES, self._remaining)
        )
        if not data:
            # The response promised Content-Length bytes: better a broken transfer than a
            # short one that looks complete.
            raise OSError(f"the stored file ended {self._remaining} bytes early")
        self._remaining -= len(data)
        return data

    async def aclose(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handle.close)


# --- blocking helpers (worker threads only) ----------------------------------------------------


def _storage_name(original_filename: str, file_id: str) -> str:
    name = storage_filename(original_filename, file_id)
    # Defence in depth: the name must stay a plain file of ours in the data directory.
    if (
        not name
        or "/" in name
        or "\x00" in name
        or name.startswith(".")
        or name.endswith(ATTR_SUFFIX)
        or not _OWN_NAME_RE.search(name)
    ):
        return f"file_{file_id}"
    return name


def _lock_directory(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUse(
            errno.EBUSY, "another storage element is using this directory", str(data_dir)
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_exclusive(path: Path) -> io.FileIO:
    # Unbuffered: writes arrive in 1 MiB batches already; a buffer would only copy them.
    return io.FileIO(path, "xb")


def _open_for_read(path: Path) -> io.FileIO:
    return io.FileIO(path, "rb")


def _write_and_hash(handle: io.FileIO, hasher: Any, data: bytes | memoryview) -> None:
    # hashlib releases the GIL on large buffers, so this thread hashes while others run.
    hasher.update(data)
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:
            raise OSError(errno.EIO, "the file system accepted no bytes")
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with io.FileIO(path, "xb") as handle:
        _write_and_hash(handle, hashlib.sha256(), data)
        os.fsync(handle.fileno())


def _commit_files(
    handle: io.FileIO, tmp_path: Path, record: FileRecord, data_dir: Path, tmp_dir: Path
) -> None:
    try:
        os.fsync(handle.fileno())
    finally:
        handle.close()
    final = data_dir / record.storage_filename
    attr_final = data_dir / (record.storage_filename + ATTR_SUFFIX)
    if attr_final.exists():
        # A record the index does not know (skipped at start-up): never overwrite it.
        raise FileExists(f"{attr_final.name} already exists in the data directory")
    attr_tmp = tmp_dir / f"{uuid.uuid4().hex}.attr"
    document = json.dumps(record.to_json(), ensure_ascii=False, indent=2).encode("utf-8")
    os.rename(tmp_path, final)
    attr_renamed = False
    try:
        # The data's name must be durable before the record that vouches for it.
        _fsync_dir(data_dir)
        _write_durably(attr_tmp, document)
        os.rename(attr_tmp, attr_final)
        attr_renamed = True
        _fsync_dir(data_dir)
    except BaseException:
        attr_tmp.unlink(missing_ok=True)
        if attr_renamed:
            attr_final.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise


def _discard(handle: io.FileIO | None, path: Path | None) -> None:
    if handle is not None:
        # The file goes away next; a failed close changes nothing.
        with contextlib.suppress(OSError):
            handle.close()
    if path is not None:
        path.unlink(missing_ok=True)


def _remove_files(data_dir: Path, name: str) -> None:
    (data_dir / (name + ATTR_SUFFIX)).unlink(missing_ok=True)
    # Durable before the data goes: a crash in between leaves an orphan, never a record of
    # missing bytes.
    _fsync_dir(data_dir)
    (data_dir / name).unlink(missing_ok=True)
    _fsync_dir(data_dir)


def recover(data_dir: Path) -> Recovery:
    """Make `data_dir` ready and consistent, and read its index. Blocking: use a thread."""
    tmp_dir = data_dir / TMP_DIR_NAME
    tmp_dir.mkdir(parents=True, exist_ok=True)
    recovery = Recovery(records={})
    with os.scandir(tmp_dir) as entries:
        leftovers = list(entries)
    for entry in leftovers:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
        recovery.removed_temps.append(entry.name)

    attr_names: list[str] = []
    data_names: list[str] = []
    with os.scandir(data_dir) as entries:
        for entry in entries:
            # Dot files are the element's own (.lock) or an operator's; never stored files.
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                (attr_names if entry.name.endswith(ATTR_SUFFIX) else data_names).append(entry.name)
    described = {name.removesuffix(ATTR_SUFFIX) for name in attr_names}

    for name in sorted(attr_names):
        try:
            with open(data_dir / name, "rb") as source:
                record = FileRecord.from_json(json.load(source))
        except (OSError, ValueError) as exc:
            recovery.skipped[name] = f"unreadable: {exc}"
            continue
        if record.storage_filename != name.removesuffix(ATTR_SUFFIX):
            recovery.skipped[name] = f"it describes {record.storage_filename!r}"
            continue
        try:
            size = os.stat(data_dir / record.storage_filename).st_size
        except FileNotFoundError:
            recovery.skipped[name] = "its data file is missing"
            continue
        if size != record.file_size:
            recovery.skipped[name] = (
                f"its data file has {size} bytes, the record says {record.file_size}"
            )
            continue
        if record.file_id in recovery.records:
            recovery.skipped[name] = f"file_id {record.file_id} is already indexed"
            continue
        recovery.records[record.file_id] = record

    for name in sorted(data_names):
        if name in described:
            continue
        if _OWN_NAME_RE.search(name):
            os.unlink(data_dir / name)
            recovery.removed_orphans.append(name)
        else:
            recovery.foreign.append(name)
    if recovery.removed_orphans:
        _fsync_dir(data_dir)
    return recovery
