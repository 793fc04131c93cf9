"""`--artstore-compat`: the answers of artStore's own Storage Element where they differ from ours.

artStore's element (BigKAA/artStore, `storage-element/`, FastAPI) was read for this; what it
does and the reference element does not:

- **Upload**: FastAPI reads the whole body before the route runs, so every refusal comes after
  the last byte. It reads only `file, description, version, file_id, finalize_transaction_id,
  retention_policy`: `metadata` and `content_type` are dropped, and the file part's own
  Content-Type is the stored type. An empty file fails its attribute record's `file_size > 0`
  check: `500 {"detail": "Failed to create file"}`. It has no capacity check: a full disk fails
  the write, with the same `500` (never `507`). A `file_id` already stored is `500 {"detail":
  "File with ID <id> already exists"}` (not `409`). A mode without uploads is `400 {"detail":
  "File upload not allowed in <mode> mode"}`. The `201` body is `file_id, original_filename,
  file_size, checksum, message`: no `storage_filename`. The uploader recorded is the token's
  subject.
- **Its temporary disk**: Starlette reads the whole form before the route runs, keeping each
  file part's first MiB in memory and spooling the rest to `TMPDIR` (`/tmp` in its image).
  When that disk cannot take a part, FastAPI answers `400 {"detail": "There was an error
  parsing the body"}` and the route never runs: nothing is stored. `--artstore-tmp-bytes`
  gives the compat element such a disk (`TempSpace`): the body bytes past the first MiB of
  every upload in flight count against it.
- **Its file names** are made of the upload's name (`<stem>_<uploader>_<time>_<hex><ext>`,
  cut to 200 characters), and `<that>.attr.json`: past 255 bytes in UTF-8 the write fails,
  `500 "Failed to create file"` (`check_storage_name`).
- **Download** of a file whose name is not Latin-1 text fails, `500 {"detail": "Failed to
  download file"}`: the name goes raw into Content-Disposition, which Starlette encodes as
  Latin-1 (`check_download_name`).
- **Errors** are FastAPI's `{"detail": "..."}`, not our envelope.
- **`GET /api/v1/files/{id}`** has no `created_by_id`, `metadata` or `retention_policy`.
- **`DELETE /api/v1/files/{id}`** needs the operator or admin role.
- **`DELETE /api/v1/gc/{id}`** answers `200` for an unknown file too (`already_deleted`),
  and for one whose upload is still being written: it knows nothing of uploads in flight.
- **After the last byte** its route writes the file and commits it, and finishes that whether
  or not the client is still there (Starlette does not cancel a route when its client goes):
  an upload abandoned after its last byte is stored all the same, and a gc delete that comes
  first answers `already_deleted`. `--artstore-write-delay-s` makes that write take a while.
- **`GET /api/v1/info`**: `name, display_name, version, mode, storage_type, base_path,
  capacity_bytes, used_bytes, file_count, status` (`operational`, `maintenance` in `ar`),
  `timestamp`; no `element_id`, `priority`, `free_bytes` or capability flags.

The reference element's store does the work either way (data file and attr.json on disk).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, Final

import trio
from quart import Response
from quart_trio import QuartTrio

from .. import __version__
from ..auth.principal import Principal
from ..errors import IngesterError, InvalidField, RequestTimeout
from .config import ElementConfig
from .form import UploadForm
from .store import (
    ElementFull,
    FileExists,
    FileRecord,
    FileStore,
    PendingUpload,
    UploadAborted,
)

log = logging.getLogger(__name__)

# artStore's answer to every failure of its file service (empty file, full disk, I/O error).
CREATE_FAILED: Final = "Failed to create file"
# artStore's answer to any failure of its download route.
DOWNLOAD_FAILED: Final = "Failed to download file"
# FastAPI's answer to a form it could not read before the route ran.
BODY_PARSE_FAILED: Final = "There was an error parsing the body"
# What Starlette keeps of each file part in memory before it spools the rest to `TMPDIR`.
SPOOLED_IN_MEMORY: Final = 1024 * 1024
# Roles artStore's `DELETE /api/v1/files/{id}` takes (its `require_operator_or_admin`).
DELETE_ROLES: Final = frozenset({"operator", "admin", "super_admin"})


class ArtStoreAnswer(Exception):
    """An answer in artStore's (FastAPI's) shape: `{"detail": ...}` with this status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def detail_response(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps({"detail": detail}, ensure_ascii=False),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def install_error_shape(app: QuartTrio) -> None:
    """Every error of the app as FastAPI renders an `HTTPException`: `{"detail": message}`."""

    @app.errorhandler(ArtStoreAnswer)
    async def _answer(error: ArtStoreAnswer) -> Response:
        log.info("%d: %s", error.status, error.detail, extra={"event": "se_refused"})
        return detail_response(error.status, error.detail)

    @app.errorhandler(IngesterError)
    async def _ingester_error(error: IngesterError) -> Response:
        log.info("%s: %s", error.code, error.message, extra={"error_code": error.code})
        return detail_response(error.status, error.message, dict(error.headers))


class TempSpaceFull(Exception):
    """The temporary disk cannot take the next bytes of a form."""


class TempSpace:
    """artStore's temporary disk, shared by the uploads in flight; None: unbounded."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> None:
        if self.limit is not None and self.used + size > self.limit:
            raise TempSpaceFull(f"{self.used + size} bytes of temporary space, {self.limit} free")
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size

    @asynccontextmanager
    async def spooling(self, body: AsyncIterator[bytes]) -> AsyncIterator[_Spooled]:
        """`body` as the form reader sees it, its bytes taking space here; given back when
        the request is answered (Starlette then deletes its spooled parts)."""
        spooled = _Spooled(body, self)
        try:
            yield spooled
        finally:
            self.release(spooled.taken)


class _Spooled:
    """A request body whose bytes past the first MiB take temporary space as they come."""

    def __init__(self, body: AsyncIterator[bytes], space: TempSpace) -> None:
        self._body = body
        self._space = space
        self._seen = 0
        self.taken = 0

    def __aiter__(self) -> _Spooled:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._body)
        self._seen += len(chunk)
        over = max(self._seen - SPOOLED_IN_MEMORY, 0) - self.taken
        if over > 0:
            self._space.take(over)
            self.taken += over
        return chunk


async def drain(body: AsyncIterator[bytes], idle_timeout_s: float) -> None:
    """Read the rest of the body and drop it: artStore answers only after the last byte."""
    while True:
        with trio.move_on_after(idle_timeout_s) as idle:
            try:
                await anext(body)
            except StopAsyncIteration:
                return
        if idle.cancelled_caught:
            raise RequestTimeout(f"no data from the client for {idle_timeout_s:g} s")


async def upload(
    config: ElementConfig,
    store: FileStore,
    principal: Principal,
    body: AsyncIterator[bytes],
    boundary: bytes,
    receive_form: Callable[
        [AsyncIterator[bytes], bytes, UploadForm, PendingUpload, float], Awaitable[None]
    ],
    temp: TempSpace,
) -> dict[str, Any]:
    """`POST /api/v1/files/upload` as artStore answers it (`receive_form` is the app's
    streaming form reader, passed in to keep this module free of the app's internals)."""
    if not config.allows_upload:
        await drain(body, config.client_idle_timeout_s)
        raise ArtStoreAnswer(400, f"File upload not allowed in {config.mode.value} mode")
    form = UploadForm(extras=False)
    try:
        # No declared size: artStore checks no capacity before it writes.
        async with store.upload(None) as pending, temp.spooling(body) as spooled:
            try:
                await receive_form(spooled, boundary, form, pending, config.client_idle_timeout_s)
            except TempSpaceFull as exc:
                log.warning("temporary space full: %s", exc, extra={"event": "se_tmp_full"})
                await drain(body, config.client_idle_timeout_s)
                raise ArtStoreAnswer(400, BODY_PARSE_FAILED) from None
            except InvalidField:
                raw = form.fields.get("file_id")
                if raw is not None and not _is_uuid(raw):
                    await drain(body, config.client_idle_timeout_s)
                    raise ArtStoreAnswer(400, f"Invalid file_id format: {raw}") from None
                raise
            if not form.has_file:
                raise ArtStoreAnswer(422, "Field required: file")
            file_id = form.file_id()
            if pending.size == 0:
                # Its attribute record requires file_size > 0; the file service rolls back.
                raise ArtStoreAnswer(500, CREATE_FAILED)
            # The body is in: its route writes the file and commits it to completion whether
            # or not the client is still there (a gc delete meanwhile finds nothing).
            log.info(
                "body of %d bytes received; writing the file",
                pending.size,
                extra={"event": "se_body_received", "file_id": file_id},
            )
            new = form.new_file(file_id or str(uuid.uuid4()), principal)
            check_storage_name(new.original_filename, principal.username)
            with trio.CancelScope(shield=True):
                await trio.sleep(config.artstore_write_delay_s)
                record = await pending.commit(new)
    except FileExists as exc:
        await drain(body, config.client_idle_timeout_s)
        raise ArtStoreAnswer(
            500, f"File with ID {form.fields.get('file_id')} already exists"
        ) from exc
    except (ElementFull, UploadAborted, OSError) as exc:
        # A full disk, a gc delete in flight, an I/O error: the same answer, after the body.
        log.warning("upload failed: %s", exc, extra={"event": "se_upload_failed"})
        await drain(body, config.client_idle_timeout_s)
        raise ArtStoreAnswer(500, CREATE_FAILED) from exc
    return {
        "file_id": record.file_id,
        "original_filename": record.original_filename,
        "file_size": record.file_size,
        "checksum": record.checksum,
        "message": "File uploaded successfully",
    }


# Its storage names: `<stem>_<uploader>_<YYYYmmddTHHMMSS>_<32 hex><ext>`, the stem cut so that
# the whole is at most 200 characters; `<name>.attr.json` is written beside the file.
STORAGE_NAME_CHARS: Final = 200
FIXED_NAME_CHARS: Final = 1 + 1 + 15 + 1 + 32
NAME_MAX_BYTES: Final = 255


def check_storage_name(filename: str, username: str) -> None:
    """artStore's element names its files after the upload's name; one that passes the file
    system's 255 bytes in UTF-8 (many two-byte letters) fails the write: `500 "Failed to
    create file"`."""
    dot = filename.rfind(".")
    stem, ext = (filename[:dot], filename[dot:]) if dot > 0 else (filename, "")
    keep = STORAGE_NAME_CHARS - FIXED_NAME_CHARS - len(username) - len(ext)
    name = f"{stem[: max(keep, 1)]}_{username}_{'0' * 15}_{'0' * 32}{ext}"
    if len((name + ".attr.json").encode()) > NAME_MAX_BYTES:
        log.warning(
            "the storage name of %r passes %d bytes", filename, NAME_MAX_BYTES,
            extra={"event": "se_upload_failed"},
        )  # fmt: skip
        raise ArtStoreAnswer(500, CREATE_FAILED)


def _is_uuid(raw: str) -> bool:
    try:
        uuid.UUID(raw.strip())
    except ValueError:
        return False
    return True


def metadata(record: FileRecord) -> dict[str, Any]:
    """artStore's `FileMetadataResponse`."""
    return {
        "file_id": record.file_id,
        "original_filename": record.original_filename,
        "storage_filename": record.storage_filename,
        "file_size": record.file_size,
        "content_type": record.content_type,
        "created_at": record.created_at,
        "created_by_username": record.created_by_username,
        "created_by_fullname": None,
        "description": record.description,
        "version": record.version,
        "storage_path": "",
        "checksum": record.checksum,
        "cache_updated_at": record.created_at,
        "cache_ttl_hours": 24,
        "cache_expired": False,
    }


def check_download_name(record: FileRecord) -> None:
    """artStore's download writes the original name raw into Content-Disposition, which
    Starlette encodes as Latin-1: any other character fails the response, and its route
    answers `500 {"detail": "Failed to download file"}` (uploading the name works)."""
    try:
        record.original_filename.encode("latin-1")
    except UnicodeEncodeError:
        raise ArtStoreAnswer(500, DOWNLOAD_FAILED) from None


def require_delete_role(principal: Principal) -> None:
    if not principal.roles & DELETE_ROLES:
        raise ArtStoreAnswer(403, "Operator or admin access required")


def gc_deleted(file_id: str, outcome: str | None, principal: Principal) -> dict[str, Any]:
    """artStore's `GCDeleteResponse`; `outcome` None means the file was not there."""
    return {
        "status": "already_deleted" if outcome is None else "deleted",
        "file_id": file_id,
        "deleted_at": datetime.now(UTC).isoformat(),
        "deleted_by": principal.subject,
        "reason": "gc_cleanup",
    }


def info(
    config: ElementConfig, store: FileStore, capacity_bytes: int | None, data_dir: str
) -> dict[str, Any]:
    """artStore's `StorageElementInfoResponse`: its capacity is the configured maximum."""
    return {
        "name": config.element_id,
        "display_name": config.element_id,
        "version": __version__,
        "mode": config.mode.value,
        "storage_type": "local",
        "base_path": data_dir,
        "capacity_bytes": capacity_bytes or 0,
        "used_bytes": store.used_bytes,
        "file_count": store.file_count,
        "status": "maintenance" if config.mode.value == "ar" else "operational",
        "timestamp": datetime.now(UTC).isoformat(),
    }
