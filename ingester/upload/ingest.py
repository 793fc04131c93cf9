"""One upload from a multipart body to a `201` result: admission, progress, the pipeline,
and the bookkeeping of its outcome (logs, metrics). Used by `POST /api/v1/files/upload` and
by resumable uploads when their last byte has arrived (the body is then read from the spool).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from .. import logs
from ..auth.principal import Principal
from ..errors import IngesterError, MissingFile, RequestTimeout
from ..groups import collapse, only_cancelled
from ..http.multipart import BodyEnd, PartData, PartEnd, PartStart
from ..saga.commit import ResultCommit
from .budget import UploadBudget
from .digest import ExpectedDigest
from .filenames import sanitize_filename
from .idempotency import fingerprint
from .pipeline import FormReader, UploadRequest
from .progress import UploadState
from .spool import Spool

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)


def form_reader(svc: Service, body: AsyncIterator[bytes], boundary: bytes) -> FormReader:
    """A multipart reader of `body` under the client idle timeout, with its own share of the
    memory budget (released by whoever reads it)."""
    settings = svc.settings
    return FormReader(
        body,
        boundary,
        settings.client_idle_timeout_s,
        UploadBudget(svc.memory_budget),
        quantum=settings.body_buffer_limit,
    )


async def ingest(
    svc: Service,
    *,
    principal: Principal,
    upload_id: str,
    boundary: bytes,
    body: AsyncIterator[bytes],
    content_type: str | None,
    content_length: int | None,
    digest: ExpectedDigest | None,
    owner: str | None = None,
    source_copy: Spool | None = None,
    commit: ResultCommit | None = None,
) -> dict[str, Any]:
    """Store the file of a multipart `body`; the contract's `201` body. Raises
    `IngesterError`s (and `Cancelled` when the caller goes away). `owner` is who the file is
    recorded as uploaded by (`ingester.ownership`), when not the caller (a resumable upload
    completed by an admin stays its creator's). `source_copy`: the file's bytes already on
    disk, which then serve as the upload's spool. `commit`: records the result for the client's
    retries in the same step as the saga's settle (`saga.commit`)."""
    settings = svc.settings
    with svc.admission.admit(principal.subject):
        progress = svc.progress.start(upload_id, principal.subject, content_length)
        svc.metrics.in_flight.inc()
        started = trio.current_time()
        outcome = "cancelled"
        reader = form_reader(svc, body, boundary)
        upload_request = UploadRequest(
            upload_id=upload_id,
            principal=principal,
            content_type=content_type,
            content_length=content_length,
            body=body,
            expected_digest=digest,
            source_copy=source_copy,
            commit=commit,
        )
        try:
            try:
                deadline = settings.upload_deadline_s or float("inf")
                with trio.fail_after(deadline):
                    try:
                        result = await svc.pipeline.run(upload_request, reader, progress)
                    finally:
                        # The element was chosen in a child task, whose log context does
                        # not flow back here: bind it for this request's remaining lines.
                        logs.bind(storage_element_id=progress.storage_element_id)
            except BaseExceptionGroup as group:
                raise collapse(group) from None
            except trio.TooSlowError:
                raise RequestTimeout(
                    f"the upload did not finish within {settings.upload_deadline_s:g} s"
                ) from None
        except IngesterError as error:
            outcome = error.code
            svc.progress.finish(progress, UploadState.FAILED, error_code=error.code)
            log.log(
                logging.WARNING if error.status >= 500 else logging.INFO,
                "upload failed: %s: %s",
                error.code,
                error.message,
                extra={
                    "event": "upload_failed",
                    "error_code": error.code,
                    "bytes": reader.bytes_read,
                },
            )
            error.logged = True
            raise
        except BaseException as exc:
            if only_cancelled(exc):
                outcome = "client_disconnected"
                svc.progress.finish(
                    progress, UploadState.CANCELLED, error_code="CLIENT_DISCONNECTED"
                )
                log.info(
                    "upload cancelled: the client went away",
                    extra={"event": "upload_cancelled", "bytes": reader.bytes_read},
                )
            else:
                outcome = "INTERNAL_ERROR"
                svc.progress.finish(progress, UploadState.FAILED, error_code="INTERNAL_ERROR")
            raise
        else:
            outcome = "success"
            # Before the answer goes out, bounded; a client gone by now does not stop it.
            with trio.CancelScope(shield=True):
                await svc.ownership.record(
                    result["file_id"],
                    subject=owner or principal.subject,
                    username=principal.username if owner in (None, principal.subject) else owner,
                    retention_policy=result["retention_policy"],
                    ttl_days=result["ttl_days"],
                )
            svc.progress.finish(progress, UploadState.DONE, result=result)
            svc.metrics.bytes_stored.inc(result["stored_size"])
            if result["compressed"]:
                svc.metrics.compression_ratio.labels(result["compression_algorithm"]).observe(
                    result["compression_ratio"]
                )
            log.info(
                "upload stored",
                extra={
                    "event": "upload_stored",
                    "storage_element_id": result["storage_element_id"],
                    "file_id": result["file_id"],
                    "file_size": result["file_size"],
                    "stored_size": result["stored_size"],
                    "compressed": result["compressed"],
                    "duration_s": round(trio.current_time() - started, 3),
                },
            )
        finally:
            # Whatever the way out (even a bad field before the store began), this
            # upload's share of the memory budget goes back.
            reader.budget.release_all()
            svc.metrics.in_flight.dec()
            svc.metrics.uploads.labels(outcome).inc()
            svc.metrics.duration.labels("success" if outcome == "success" else "failure").observe(
                trio.current_time() - started
            )
    return result


# Hash pieces at least this large in a worker thread; smaller ones on the loop.
_THREAD_HASH_MIN: int = 64 * 1024


async def body_fingerprint(svc: Service, *, boundary: bytes, body: AsyncIterator[bytes]) -> str:
    """Read a multipart body to its end without storing anything: the fingerprint of its
    file (see `idempotency.fingerprint`), to compare a repeated request with the first."""
    settings = svc.settings
    reader = form_reader(svc, body, boundary)
    digest = hashlib.sha256()
    filename: str | None = None
    in_file = False
    size = 0
    try:
        while True:
            event = await reader.next_event()
            if isinstance(event, PartStart):
                in_file = event.name == "file"
                if in_file:
                    filename = sanitize_filename(
                        event.filename, max_length=settings.max_filename_length
                    )
            elif isinstance(event, PartData):
                reader.budget.release(len(event.data))
                if in_file:
                    size += len(event.data)
                    if len(event.data) >= _THREAD_HASH_MIN:
                        await trio.to_thread.run_sync(digest.update, event.data)
                    else:
                        digest.update(event.data)
            elif isinstance(event, PartEnd):
                in_file = False
            elif isinstance(event, BodyEnd):
                break
    finally:
        reader.budget.release_all()
    if filename is None:
        raise MissingFile()
    return fingerprint(digest.hexdigest(), filename)
