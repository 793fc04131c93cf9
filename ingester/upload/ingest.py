"""One upload from its file source to a `201` result: admission, progress, the pipeline,
and the bookkeeping of its outcome (logs, metrics). Used by `POST /api/v1/files/upload` (a
multipart form) and by resumable uploads when their last byte has arrived (the file's bytes
read from its data files, its options checked at creation).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio

from .. import logs
from ..auth.principal import Principal
from ..concurrency import collapse, only_cancelled
from ..errors import IngesterError, MissingFile, RequestTimeout
from ..http.multipart import BodyEnd, PartData, PartEnd, PartStart
from ..metrics import Metrics
from ..ownership import Ownership
from ..saga.commit import ResultCommit
from ..settings import Settings
from .admission import Admission
from .budget import MemoryBudget, UploadBudget
from .digest import ExpectedDigest, update_hash
from .fields import UploadOptions
from .filenames import sanitize_filename
from .form import FormReader, FormSource
from .idempotency import fingerprint
from .pipeline import UploadPipeline
from .progress import ProgressBook, UploadState
from .records import UploadRequest
from .source import BytesSource, FileSource, FileStart
from .spool import Spool

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)


class Ingest:
    """Uploads from their file source to their answer; `ingester.service` gives it its parts.

    `memory`: the process's memory budget, of which each file source takes its share.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: UploadPipeline,
        admission: Admission,
        progress: ProgressBook,
        ownership: Ownership,
        metrics: Metrics,
        memory: MemoryBudget,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.admission = admission
        self.progress = progress
        self.ownership = ownership
        self.metrics = metrics
        self.memory = memory

    def form_reader(self, body: AsyncIterator[bytes], boundary: bytes) -> FormReader:
        """A multipart reader of `body` under the client idle timeout, with its own share of the
        memory budget (released by whoever reads it)."""
        settings = self.settings
        return FormReader(
            body,
            boundary,
            settings.client_idle_timeout_s,
            UploadBudget(self.memory),
            quantum=settings.body_buffer_limit,
        )

    def form_source(self, body: AsyncIterator[bytes], boundary: bytes) -> FormSource:
        """The file of a multipart upload form, for `run`."""
        return FormSource(
            self.form_reader(body, boundary),
            max_description_length=self.settings.max_description_length,
        )

    def bytes_source(
        self,
        data: AsyncIterator[bytes],
        *,
        options: UploadOptions,
        filename: str | None,
        content_type: str | None,
        prehashed: _Hash | None = None,
    ) -> BytesSource:
        """A file that is all of `data`, its `options` checked beforehand, for `run`: read
        under the same idle timeout and memory budget as a form, with nothing to parse.
        `prehashed`: the sha256 `data` keeps of what it yields (see `FileSource`)."""
        settings = self.settings
        return BytesSource(
            data,
            FileStart(
                options, settled=True, filename=filename, content_type=content_type, final=True
            ),
            idle_timeout_s=settings.client_idle_timeout_s,
            budget=UploadBudget(self.memory),
            quantum=settings.body_buffer_limit,
            prehashed=prehashed,
        )

    async def run(
        self,
        *,
        principal: Principal,
        upload_id: str,
        source: FileSource,
        content_length: int | None,
        digest: ExpectedDigest | None,
        owner: str | None = None,
        source_copy: Spool | None = None,
        file_size: int | None = None,
        commit: ResultCommit | None = None,
        begun: bool = False,
    ) -> dict[str, Any]:
        """Store the file of `source` (`form_source`, `bytes_source`; `content_length` is
        what it declares it will read); the contract's `201` body. Raises
        `IngesterError`s (and `Cancelled` when the caller goes away). `owner` is who the file is
        recorded as uploaded by (`ingester.ownership`), when not the caller (a resumable upload
        completed by an admin stays its creator's). `source_copy`: the file's bytes already on
        disk, which then serve as the upload's spool. `file_size`: the file's exact size, its
        options complete in `source` from the start (see `UploadRequest`). `commit`: records
        the result for the client's retries in the same step as the saga's settle
        (`saga.commit`). `begun`: the upload's bytes came before a drain began (a resumable
        upload's completion): it runs within the grace (`Admission.admit`)."""
        settings = self.settings
        with self.admission.admit(principal.subject, begun=begun):
            progress = self.progress.start(upload_id, principal.subject, content_length)
            self.metrics.in_flight.inc()
            started = trio.current_time()
            outcome = "cancelled"
            upload_request = UploadRequest(
                upload_id=upload_id,
                principal=principal,
                content_length=content_length,
                expected_digest=digest,
                source_copy=source_copy,
                file_size=file_size,
                commit=commit,
            )
            try:
                try:
                    deadline = settings.upload_deadline_s or float("inf")
                    with trio.fail_after(deadline):
                        try:
                            result = await self.pipeline.run(upload_request, source, progress)
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
                self.progress.finish(progress, UploadState.FAILED, error_code=error.code)
                log.log(
                    logging.WARNING if error.status >= 500 else logging.INFO,
                    "upload failed: %s: %s",
                    error.code,
                    error.message,
                    extra={
                        "event": "upload_failed",
                        "error_code": error.code,
                        "bytes": source.bytes_read,
                    },
                )
                error.logged = True
                raise
            except BaseException as exc:
                if only_cancelled(exc):
                    outcome = "client_disconnected"
                    self.progress.finish(
                        progress, UploadState.CANCELLED, error_code="CLIENT_DISCONNECTED"
                    )
                    log.info(
                        "upload cancelled: the client went away",
                        extra={"event": "upload_cancelled", "bytes": source.bytes_read},
                    )
                else:
                    outcome = "INTERNAL_ERROR"
                    self.progress.finish(progress, UploadState.FAILED, error_code="INTERNAL_ERROR")
                raise
            else:
                outcome = "success"
                # Before the answer goes out, bounded; a client gone by now does not stop it.
                with trio.CancelScope(shield=True):
                    await self.ownership.record(
                        result["file_id"],
                        subject=owner or principal.subject,
                        username=principal.username
                        if owner in (None, principal.subject)
                        else owner,
                        retention_policy=result["retention_policy"],
                        ttl_days=result["ttl_days"],
                    )
                self.progress.finish(progress, UploadState.DONE, result=result)
                self.metrics.bytes_stored.inc(result["stored_size"])
                if result["compressed"]:
                    self.metrics.compression_ratio.labels(result["compression_algorithm"]).observe(
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
                source.budget.release_all()
                self.metrics.in_flight.dec()
                self.metrics.uploads.labels(outcome).inc()
                self.metrics.duration.labels(
                    "success" if outcome == "success" else "failure"
                ).observe(trio.current_time() - started)
        return result

    async def body_fingerprint(self, *, boundary: bytes, body: AsyncIterator[bytes]) -> str:
        """Read a multipart body to its end without storing anything: the fingerprint of its
        file (see `idempotency.fingerprint`), to compare a repeated request with the first."""
        settings = self.settings
        reader = self.form_reader(body, boundary)
        digest = hashlib.sha256()
        filename: str | None = None
        in_file = False
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
                        await update_hash(digest, event.data)
                elif isinstance(event, PartEnd):
                    in_file = False
                elif isinstance(event, BodyEnd):
                    break
        finally:
            reader.budget.release_all()
        if filename is None:
            raise MissingFile()
        return fingerprint(digest.hexdigest(), filename)
