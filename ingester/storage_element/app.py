"""The HTTP surface of the reference Storage Element: artStore's Storage Element API.

Authentication: everything but `/health/*`, `/api/v1/info` and `/api/v1/capacity` needs a
Bearer RS256 access token (401 with `WWW-Authenticate` otherwise). Reads (metadata,
download, gc exists) take any valid token; writes (upload, DELETE, gc DELETE) need one that
may upload (role user or above, or scope `files:write`), else 403.

Modes, answered with 400 as artStore's element does when its mode forbids an operation (403
stays reserved for what the token may not do, so a caller can tell the two apart):

- upload: `edit` and `rw`; `ro`/`ar` → 400 `READ_ONLY_MODE`;
- `DELETE /api/v1/files/{id}`: `edit` only; otherwise → 400 `DELETE_NOT_ALLOWED`;
- metadata and download: every mode but `ar` (archived files are not served online) → 400
  `ARCHIVE_MODE`;
- gc (`DELETE /api/v1/gc/{id}`, `GET /api/v1/gc/{id}/exists`): every mode; it is how the
  ingester compensates a failed upload.

A file id in a path that is not a UUID is a malformed request: 400 `INVALID_FIELD`.

With `--artstore-compat` (`ElementConfig.artstore_compat`) the routes answer as artStore's own
element does where it differs; `compat` lists each difference.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import trio
from quart import Response, request
from quart_trio import QuartTrio

from .. import __version__, logs
from ..auth.principal import Principal
from ..auth.verifier import TokenVerifier, bearer_from_header, require_upload
from ..errors import BadRequest, MissingFile, RequestTimeout
from ..http.base import error_response, make_app
from ..http.body import request_body
from ..http.multipart import (
    BodyEnd,
    MultipartStreamParser,
    PartData,
    PartEnd,
    PartStart,
    parse_boundary,
)
from . import compat
from .config import ElementConfig
from .form import UploadForm
from .store import FileNotFound, FileRecord, FileStore, PendingUpload, parse_file_id

log = logging.getLogger(__name__)

API_VERSION: Final = "v1"
# statvfs is one syscall; a file system that takes longer than this is reported as unknown.
DISK_STAT_TIMEOUT_S: Final = 2.0


class ReadOnlyMode(BadRequest):
    code = "READ_ONLY_MODE"
    default_message = "this Storage Element does not accept uploads in its mode"


class DeleteNotAllowed(BadRequest):
    code = "DELETE_NOT_ALLOWED"
    default_message = "files can be deleted only from a Storage Element in edit mode"


class ArchiveMode(BadRequest):
    code = "ARCHIVE_MODE"
    default_message = "an archive Storage Element does not serve files"


def create_storage_element_app(
    config: ElementConfig, store: FileStore, verifier: TokenVerifier
) -> QuartTrio:
    app = make_app(f"storage-element:{config.element_id}")
    artstore = config.artstore_compat
    if artstore:
        compat.install_error_shape(app)
    temp = compat.TempSpace(config.artstore_tmp_bytes)

    async def authenticate(*, write: bool) -> Principal:
        token = await bearer_from_header(request.headers.get("Authorization"))
        principal = await verifier.verify(token)
        logs.bind(user=principal.username, storage_element_id=config.element_id)
        if write:
            require_upload(principal)
        return principal

    def require_reads() -> None:
        if not config.allows_read:
            raise ArchiveMode(f"{config.element_id} is in {config.mode} mode and serves no files")

    # --- unauthenticated --------------------------------------------------------------------

    @app.get("/health/live")
    async def live() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> Response | dict[str, Any]:
        """Ready while the data directory is writable (gc deletes need it in every mode)."""
        if await store.writable():
            return {"status": "ok", "element_id": config.element_id, "mode": config.mode}
        return error_response(503, "NOT_READY", "the data directory is not writable")

    @app.get("/api/v1/info")
    async def info() -> dict[str, Any]:
        capacity, free = await _capacity(config, store)
        if artstore:
            return compat.info(config, store, capacity, str(store.data_dir))
        return {
            "element_id": config.element_id,
            "name": config.element_id,
            "mode": config.mode,
            "status": "online",
            "api_version": API_VERSION,
            "version": __version__,
            "storage_type": "local",
            "capacity_bytes": capacity,
            "used_bytes": store.used_bytes,
            "free_bytes": free,
            "reserved_bytes": store.reserved_bytes,
            "file_count": store.file_count,
            "priority": config.priority,
            "is_writable": config.allows_upload,
            "is_available": True,
            # What the ingester may rely on (its registry can say otherwise): this element
            # keeps `metadata` and `content_type`, stores empty files, and never stores an
            # upload after its caller hung up or its removal was asked (a gc of an upload
            # in flight dooms it): a removal that finds nothing is final. artStore's writes
            # the file after the last byte and finishes it whoever left.
            "capabilities": {
                "keeps_metadata": True,
                "accepts_empty_files": True,
                "serves_any_name": True,
                "stores_after_hangup": False,
            },
        }

    @app.get("/api/v1/capacity")
    async def capacity() -> dict[str, Any]:
        total, free = await _capacity(config, store)
        used = store.used_bytes
        percent = round(100.0 * used / total, 2) if total else 0.0
        return {
            "capacity_bytes": total,
            "used_bytes": used,
            "free_bytes": free,
            # artStore's own layout of the same numbers.
            "storage_id": config.element_id,
            "mode": config.mode,
            "capacity": {"total": total, "used": used, "available": free, "percent_used": percent},
            "health": "healthy",
            "last_update": datetime.now(UTC).isoformat(),
            "backend": "local",
        }

    # --- files ------------------------------------------------------------------------------

    @app.post("/api/v1/files/upload")
    async def upload() -> tuple[dict[str, Any], int]:
        principal = await authenticate(write=True)
        if artstore:
            boundary = parse_boundary(request.headers.get("Content-Type"))
            body = await compat.upload(
                config, store, principal, aiter(request_body()), boundary, _receive_form, temp
            )
            return body, 201
        if not config.allows_upload:
            raise ReadOnlyMode(f"{config.element_id} is in {config.mode} mode: no uploads")
        boundary = parse_boundary(request.headers.get("Content-Type"))
        async with store.upload(request.content_length) as pending:
            form = UploadForm()
            await _receive_form(
                request_body(), boundary, form, pending, config.client_idle_timeout_s
            )
            if not form.has_file:
                raise MissingFile()
            file_id = form.file_id() or str(uuid.uuid4())
            logs.bind(upload_id=file_id)
            record = await pending.commit(form.new_file(file_id, principal))
        return {
            "file_id": record.file_id,
            "original_filename": record.original_filename,
            "storage_filename": record.storage_filename,
            "file_size": record.file_size,
            "checksum": record.checksum,
            "content_type": record.content_type,
            "created_at": record.created_at,
            "message": "File uploaded successfully",
        }, 201

    @app.get("/api/v1/files/<file_id>")
    async def metadata(file_id: str) -> dict[str, Any]:
        await authenticate(write=False)
        require_reads()
        record = store.get(parse_file_id(file_id))
        return compat.metadata(record) if artstore else record.to_json()

    @app.get("/api/v1/files/<file_id>/download")
    async def download(file_id: str) -> Response:
        await authenticate(write=False)
        require_reads()
        record = store.get(parse_file_id(file_id))
        if artstore:
            compat.check_download_name(record)
        headers = _download_headers(record)
        if request.method == "HEAD":
            # An empty async iterable, not b"" (Quart would set Content-Length to 0) nor a
            # list (Quart iterates sync bodies through asyncio, which fails under trio).
            return Response(_NoBody(), content_type="application/octet-stream", headers=headers)
        stream = await store.open_stream(record)
        return Response(stream, content_type="application/octet-stream", headers=headers)

    @app.delete("/api/v1/files/<file_id>")
    async def delete(file_id: str) -> Response:
        principal = await authenticate(write=True)
        if artstore:
            compat.require_delete_role(principal)
        if not config.allows_delete:
            raise DeleteNotAllowed(
                f"{config.element_id} is in {config.mode} mode; only edit mode deletes files"
            )
        await store.delete(parse_file_id(file_id))
        return Response(b"", status=204)

    # --- gc (compensation) ------------------------------------------------------------------

    @app.delete("/api/v1/gc/<file_id>")
    async def gc_delete(file_id: str) -> dict[str, Any]:
        principal = await authenticate(write=True)
        canonical = parse_file_id(file_id)
        if artstore:
            try:
                found: str | None = await store.gc_delete(canonical, abort_in_flight=False)
            except FileNotFound:
                found = None
            return compat.gc_deleted(canonical, found, principal)
        outcome = await store.gc_delete(canonical)
        return {
            "file_id": canonical,
            "deleted": True,
            "status": outcome,
            "deleted_at": datetime.now(UTC).isoformat(),
            "deleted_by": principal.subject,
        }

    @app.get("/api/v1/gc/<file_id>/exists")
    async def gc_exists(file_id: str) -> dict[str, Any]:
        await authenticate(write=False)
        canonical = parse_file_id(file_id)
        return {"file_id": canonical, "exists": store.exists(canonical)}

    return app


async def _receive_form(
    body: AsyncIterator[bytes],
    boundary: bytes,
    form: UploadForm,
    pending: PendingUpload,
    idle_timeout_s: float,
) -> None:
    """Stream the body through the parser: file bytes to `pending`, fields to `form`."""
    parser = MultipartStreamParser(boundary)
    chunks = aiter(body)
    while not parser.ended:
        with trio.move_on_after(idle_timeout_s) as idle:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
        if idle.cancelled_caught:
            raise RequestTimeout(f"no data from the client for {idle_timeout_s:g} s")
        for event in parser.feed(chunk):
            if isinstance(event, PartData):
                if form.in_file:
                    await pending.write(event.data)
                else:
                    form.add_field_data(event.data)
            elif isinstance(event, PartStart):
                if form.start_part(event):
                    await pending.open_file()
            elif isinstance(event, PartEnd):
                # Fields are checked as soon as they are complete: a field sent before the
                # file fails the upload before its bytes are stored.
                completed = form.end_part()
                if completed == "file_id":
                    file_id = form.file_id()
                    if file_id is not None:
                        pending.claim(file_id)
                elif completed == "metadata":
                    form.metadata()
            elif isinstance(event, BodyEnd):
                pass
    # Bytes after the closing boundary are an epilogue; the connection discards them.
    parser.close()


async def _capacity(config: ElementConfig, store: FileStore) -> tuple[int | None, int | None]:
    """(capacity_bytes, free_bytes).

    With `--capacity-bytes`, capacity is that number and free is what is left of it after
    stored files and uploads in flight, but never more than the disk has. Without it, the
    file system is the limit: capacity is the stored bytes plus the disk's free space, free
    is the disk's free space. Both are None when the disk cannot be asked.
    """
    disk_free: int | None = None
    with trio.move_on_after(DISK_STAT_TIMEOUT_S):
        try:
            disk_free = await store.disk_free()
        except OSError as exc:
            log.warning("statvfs failed: %s", exc)
    used, reserved = store.used_bytes, store.reserved_bytes
    if config.capacity_bytes is not None:
        free = max(config.capacity_bytes - used - reserved, 0)
        if disk_free is not None:
            free = min(free, disk_free)
        return config.capacity_bytes, free
    if disk_free is None:
        return None, None
    return used + disk_free, disk_free


class _NoBody:
    """The body of a HEAD answer: nothing, asynchronously."""

    def __aiter__(self) -> _NoBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


def _download_headers(record: FileRecord) -> dict[str, str]:
    digest = base64.b64encode(bytes.fromhex(record.checksum)).decode("ascii")
    return {
        "Content-Length": str(record.file_size),
        "Content-Disposition": _content_disposition(record.original_filename),
        "ETag": f'"{record.checksum}"',
        # RFC 9530, and its RFC 3230 predecessor that older clients still read.
        "Repr-Digest": f"sha-256=:{digest}:",
        "Digest": f"SHA-256={digest}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def _content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback for old clients, and the exact name as `filename*`."""
    fallback = "".join(
        char if 0x20 <= ord(char) < 0x7F and char not in '"\\%' else "_" for char in filename
    )
    encoded = quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"
