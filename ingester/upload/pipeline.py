"""One upload, end to end: a nursery of four tasks joined by bounded channels.

    reader       file source (a form, or a file's bytes) -> raw file chunks  (+ late fields)
    transformer  raw chunks -> sha256 (+ gzip/brotli), in a worker thread  (+ spool tee)
    streamer     transformed chunks -> streaming multipart POST to a Storage Element
    heartbeat    progress record, stall watchdog

The channels hold a few chunks each, so a slow Storage Element stops the streamer, which
stops the transformer, which stops the reader, which stops pulling the request body, which
closes the client's TCP window. Memory per upload stays at a few chunks whatever the size.

The Storage Element request is completed (its closing boundary sent) only after the client's
form has been read to its end and checked: size, Content-Digest, late fields. Until then any
failure abandons the element's request, and an element never commits a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import random
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import logs
from ..buffers import Buffer
from ..errors import (
    ElementChecksumMismatch,
    FileTooLarge,
    IngesterError,
    IntegrityError,
    StorageElementError,
    StorageElementTimeout,
    StorageElementUnavailable,
)
from ..http import multipart_writer
from ..metrics import Metrics
from ..resilience.breaker import BreakerState
from ..resilience.failover import Failover, FailoverPlan, GiveUp
from ..saga.book import SagaBook
from ..saga.record import Copy
from ..settings import SEAuthMode, Settings
from ..storage.admin import AdminRegistry
from ..storage.client import StoredFile
from ..storage.pool import ElementPool
from ..storage.vectored import Pieces
from . import placement
from .compression import (
    CompressionDecision,
    decide_compression,
    make_compressor,
    sniff_first_chunk,
)
from .digest import INLINE_HASH_BYTES
from .element_body import Chunk, Encoder, SEUploadBody
from .fields import RetentionPolicy, UploadOptions
from .filenames import sanitize_filename
from .progress import UploadProgress, UploadState
from .records import FileFacts, Plan, Upload, UploadRequest
from .source import FileSource
from .spool import Spool

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)


# Compression decisions look at this much of the start of the file.
SNIFF_BYTES: Final = 64 * 1024
# File bytes are hashed, spooled and sent in batches of about this much: one worker-thread
# hop per batch (a hop costs about as much as hashing 64 KiB, so per-chunk hops were a
# large share of the CPU), and one chunked frame per batch for the element.
BATCH_BYTES: Final = 1024 * 1024
HEARTBEAT_S: Final = 0.5
# Multipart framing and form fields around the file part: allowance over max_file_size
# before a declared Content-Length is refused outright.
FORM_OVERHEAD_ALLOWANCE: Final = 1024 * 1024
VERSION_FIELD: Final = "1"


class _Replan(Exception):
    """A field after the file part changed where or how to store: send again from the spool."""


class UploadPipeline:
    """Stores uploads: what it needs is given, nothing else (`ingester.service` wires it).

    `spool_for(upload_id)`: a new spool (the failover and re-plan copy) for an upload.
    `admin`: the Admin Module's registry, the saga's second step, when there is one.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pool: ElementPool,
        sagas: SagaBook,
        metrics: Metrics,
        spool_for: Callable[[str], Spool],
        admin: AdminRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.sagas = sagas
        self.metrics = metrics
        self.admin = admin
        self._spool_for = spool_for
        self._clock = clock
        self._random = random.Random()

    # --- entry point ------------------------------------------------------------------------

    async def run(
        self, request: UploadRequest, source: FileSource, progress: UploadProgress
    ) -> dict[str, Any]:
        settings = self.settings
        if (
            request.content_length is not None
            and request.content_length > settings.max_file_size + FORM_OVERHEAD_ALLOWANCE
        ):
            raise FileTooLarge(
                f"declared body of {request.content_length} bytes exceeds the limit of "
                f"{settings.max_file_size} bytes"
            )
        start = await source.begin()
        filename = sanitize_filename(start.filename, max_length=settings.max_filename_length)
        content_type = _content_type(start.content_type, filename)
        upload = Upload(
            request=request,
            progress=progress,
            file_id=str(uuid.uuid4()),
            settled=start.settled,
            filename=filename,
            content_type=content_type,
            plan=Plan.of(start.options),
            budget=source.budget,
        )
        if start.final:
            # With the file's size, the element body's length is known before its first
            # byte (`_declared_length`).
            upload.options = start.options
        progress.filename = filename
        upload.authorization = await self.pool.authorization(request.principal)
        saga = self.sagas.begin(
            request.upload_id,
            upload.file_id,
            user=request.principal.subject,
            # Another replica undoing this upload needs a credential: the caller's, when
            # elements see callers' tokens.
            authorization=upload.authorization if settings.se_auth is SEAuthMode.FORWARD else None,
        )
        upload.saga = saga
        if settings.upload_deadline_s:
            upload.deadline = trio.current_time() + settings.upload_deadline_s
        try:
            stored = await self._store_all(upload, source)
            result = self._result(upload, stored)
            assert upload.element is not None
            kept = Copy(upload.element.id, upload.element.api_url)
            if self.admin is not None:
                await saga.stored()
                await self._register(upload, result)
            await saga.succeeded(kept, upload.request.commit, result)
        except BaseException:
            current = upload.element
            with trio.CancelScope(shield=True):
                await saga.failed(None if current is None else Copy(current.id, current.api_url))
            raise
        finally:
            self.sagas.end(saga)
        return result

    async def _store_all(self, upload: Upload, source: FileSource) -> StoredFile:
        """Store the file: one pass, or two when a late field changed the plan."""
        settings = self.settings
        if upload.request.source_copy is not None:
            # The bytes are on disk already: a failover replays them from there, and no
            # second copy is written.
            upload.spool = upload.request.source_copy
        elif settings.failover_spool or not upload.settled:
            # One copy of the original bytes serves both a failover (a failed element's
            # share is sent again to the next) and a later field that changes the plan.
            upload.spool = self._spool_for(upload.request.upload_id)
        try:
            try:
                stored = await self._store(upload, live=source)
            except* _Replan:
                stored = None
            if stored is None:
                assert upload.options is not None
                assert upload.spool is not None
                log.info(
                    "fields after the file part changed the storage plan; sending the spool",
                    extra={"event": "replan"},
                )
                upload.plan = Plan.of(upload.options)
                upload.facts = FileFacts()
                # What the abandoned pass still held died with its channels.
                upload.budget.release_all()
                await self._new_file_id_for_replay(upload)
                stored = await self._store(upload, live=None)
        finally:
            # The budget goes back in the request handler, which owns it.
            if upload.spool is not None:
                self.metrics.spool_written.inc(upload.spool.bytes_written)
                await upload.spool.discard()
        return stored

    async def _new_file_id_for_replay(self, upload: Upload) -> None:
        """An element of the abandoned pass may hold its aborted request, and with it the
        file id, a moment longer (until it notices the abort): the spool sent to it under
        the same id would meet `409 FILE_EXISTS`. So the spool goes out under a new id, once
        every copy under the old one is confirmed gone (the saga's record names one id for
        all its copies); while one cannot be removed, the old id stays."""
        saga = upload.saga
        assert saga is not None
        for copy in list(saga.record.copies):
            await saga.remove_now(copy)
        if not saga.record.copies:
            # Written with the next element's copy, before its first byte (`sending_to`).
            saga.record.file_id = upload.file_id = str(uuid.uuid4())

    async def _register(self, upload: Upload, result: dict[str, Any]) -> None:
        """The saga's second step: the Admin Module's file registry."""
        assert self.admin is not None
        options = upload.options
        assert options is not None
        principal = upload.request.principal
        record = {
            **result,
            "description": options.description,
            "metadata": options.metadata,
            "uploaded_by": principal.subject,
            "uploaded_by_username": principal.username,
            # Whatever the element kept: how to read the stored bytes back.
            "compression": placement.compression_facts(upload),
        }
        try:
            await self.admin.register(record, authorization=upload.authorization)
        except IngesterError:
            self.metrics.admin_registrations.labels("failed").inc()
            raise
        self.metrics.admin_registrations.labels("ok").inc()

    # --- the nursery -------------------------------------------------------------------------

    async def _store(self, upload: Upload, *, live: FileSource | None) -> StoredFile:
        depth = self.settings.pipeline_queue_depth
        if live is not None and live.prehashed is not None:
            # A file read from disk (it hashes as it reads) is never late: a batch waiting
            # in each channel is enough, and each more is a MiB of memory per upload.
            depth = 1
        # Batches of original bytes: from the reader to the hasher, then to the element's body.
        raw_send, raw_recv = trio.open_memory_channel[list[Buffer]](depth)
        out_send, out_recv = trio.open_memory_channel[Chunk](depth)
        result: list[StoredFile] = []
        done = trio.Event()
        upload.data_ready = trio.Event()
        async with trio.open_nursery() as nursery:
            if live is not None:
                nursery.start_soon(self._read_live, upload, live, raw_send)
            else:
                nursery.start_soon(self._read_spool, upload, raw_send)
            nursery.start_soon(
                self._transform,
                upload,
                raw_recv,
                out_send,
                live is not None,
                live.prehashed if live is not None else None,
            )
            nursery.start_soon(self._stream, upload, out_recv, result, done)
            nursery.start_soon(self._heartbeat, upload, done)
        return result[0]

    async def _read_live(
        self,
        upload: Upload,
        source: FileSource,
        raw_send: trio.MemorySendChannel[list[Buffer]],
    ) -> None:
        """The file's bytes, in batches of about BATCH_BYTES, then the options complete."""
        max_size = self.settings.max_file_size
        progress = upload.progress
        received = self.metrics.bytes_received
        batch: list[Buffer] = []
        batched = 0
        async with raw_send:
            while True:
                piece = await source.read(batch_pending=bool(batch))
                if not piece:
                    if batch:
                        await raw_send.send(batch)
                        batch, batched = [], 0
                    if piece is None:
                        continue
                    break
                size = len(piece)
                progress.bytes_received += size
                received.inc(size)
                if progress.bytes_received > max_size:
                    raise FileTooLarge(f"the file exceeds the limit of {max_size} bytes")
                batch.append(piece)
                batched += size
                if batched >= BATCH_BYTES:
                    await raw_send.send(batch)
                    batch, batched = [], 0
        # A form's fields after the file part.
        upload.options = await source.finish()
        upload.fields_complete.set()

    async def _read_spool(
        self, upload: Upload, raw_send: trio.MemorySendChannel[list[Buffer]]
    ) -> None:
        """The second pass after a replan: the original bytes again, from the spool."""
        assert upload.spool is not None
        budget = upload.budget
        cursor = upload.spool.cursor()
        async with raw_send:
            while (piece := await cursor.next()) is not None:
                await budget.acquire(len(piece))
                await raw_send.send([piece])

    async def _transform(
        self,
        upload: Upload,
        raw_recv: trio.MemoryReceiveChannel[list[Buffer]],
        out_send: trio.MemorySendChannel[Chunk],
        live: bool,
        prehashed: _Hash | None = None,
    ) -> None:
        """Hash the original bytes and keep them in the spool: one worker-thread hop per
        batch for both (small batches are hashed on the loop when they need no disk), and
        the batch on to the element as one piece, its reads unjoined (`Pieces`). Also
        settles whether to compress, from the start of the file, before the first batch goes
        on.

        `prehashed`: the source hashed its bytes itself, in the hop that read them (a file
        read from disk); then a batch of one piece that needs no spool write and no other
        digest takes no hop here at all."""
        settings = self.settings
        facts = upload.facts
        original = prehashed if prehashed is not None else hashlib.sha256()
        expected = upload.request.expected_digest
        facts.digests = digests = expected.hashing() if expected is not None else None
        # The live pass fills the spool; a replay reads from it.
        spool = upload.spool if live else None
        decision = decide_compression(
            requested=upload.plan.compress,
            algorithm=upload.plan.algorithm,
            declared_size=None,
            content_type=upload.content_type,
            filename=upload.filename,
            min_size=settings.compression_min_size,
        )
        decision = placement.compression_decision(self.pool, self.settings, upload, decision)
        upload.compression = None if decision.compress else decision
        held: list[Buffer] = []
        held_bytes = 0

        def work(pieces: list[Buffer], to_disk: bool) -> None:
            for piece in pieces:
                if prehashed is None:
                    original.update(piece)
                if digests:
                    digests.update(piece)
            if to_disk:
                assert spool is not None
                spool.write_sync(pieces)

        def announce() -> None:
            # Before the first batch goes to the streamer, which then chooses the element.
            if not upload.data_ready.is_set():
                compression = upload.compression
                facts.compressed = compression is not None and compression.compress
                facts.algorithm = (
                    compression.algorithm if facts.compressed and compression else None
                )
                upload.data_ready.set()

        async def process(pieces: list[Buffer]) -> None:
            size = sum(len(p) for p in pieces)
            to_disk = spool.reserve(size) if spool is not None else False
            # Work for a thread: the spool write or hashing.
            busy = prehashed is None or digests is not None
            if to_disk or (busy and size >= INLINE_HASH_BYTES):
                await trio.to_thread.run_sync(work, pieces, to_disk)
            else:
                work(pieces, False)
            if spool is not None:
                spool.commit(pieces)
            facts.original_size += size
            announce()
            # The batch's reads as they are: one frame for the element, never joined.
            await out_send.send(Pieces(pieces).simplest())

        async with out_send, raw_recv:
            async for batch in raw_recv:
                if upload.compression is None:
                    # Compress or not is settled on the start of the file, before it goes on.
                    held += batch
                    held_bytes += sum(len(p) for p in batch)
                    if held_bytes < SNIFF_BYTES:
                        continue
                    upload.compression = await self._decide(decision, b"".join(held), False)
                    batch, held = held, []
                await process(batch)
            if upload.compression is None:
                upload.compression = await self._decide(decision, b"".join(held), True)
                if held:
                    await process(held)
            if spool is not None:
                upload.spooled_bytes = spool.size
            # Set before the channel closes: the element body's tail reads them.
            facts.sha256 = original.hexdigest()
            announce()
        facts.decision_reason = (
            upload.compression.reason if upload.plan.compress else "not_requested"
        )
        if upload.plan.compress and not upload.compression.compress:
            self.metrics.compression_skipped.labels(upload.compression.reason).inc()

    async def _decide(
        self, decision: CompressionDecision, sample: bytes, is_last: bool
    ) -> CompressionDecision:
        settings = self.settings
        return await trio.to_thread.run_sync(
            lambda: sniff_first_chunk(
                sample,
                decision,
                is_last=is_last,
                min_size=settings.compression_min_size,
                min_gain=settings.compression_min_gain,
                gzip_level=settings.gzip_level,
                brotli_quality=settings.brotli_quality,
            )
        )

    def _encoder(self, upload: Upload) -> Encoder:
        """A fresh encoder for one attempt, from the upload's compression decision."""
        decision = upload.compression
        if decision is None or not decision.compress or decision.algorithm is None:
            return Encoder(None)
        settings = self.settings
        return Encoder(
            make_compressor(
                decision.algorithm,
                gzip_level=settings.gzip_level,
                brotli_quality=settings.brotli_quality,
            )
        )

    async def _stream(
        self,
        upload: Upload,
        out_recv: trio.MemoryReceiveChannel[Chunk],
        result: list[StoredFile],
        done: trio.Event,
    ) -> None:
        """Send the upload to the best element; on a safe failure, to the next one.

        An element that fails before taking any byte may be tried again in a later round
        (after a full-jitter backoff, within the retry budget and the upload's deadline); one
        that was sent bytes only once its copy is confirmed removed: a removal arriving late
        must not hit a new copy. What to do after each failure is `FailoverPlan`'s to say.
        """
        pool = self.pool
        saga = upload.saga
        assert saga is not None
        mode = upload.plan.retention_policy.target_mode
        declared = upload.request.content_length
        boundary = secrets.token_hex(16)
        # Empty or not, compressed or not: what the element must be able to take.
        await upload.data_ready.wait()
        fit = await placement.fit(pool, self.settings, upload)
        body = SEUploadBody(
            head=_multipart_head(boundary, upload),
            chunks=out_recv,
            tail=lambda encoder: self._tail(boundary, upload, encoder),
            encoder=lambda: self._encoder(upload),
            on_progress=lambda sent, writing: self._on_progress(upload, sent, writing),
            release=upload.budget.release,
            spool=upload.spool,
        )
        failover = FailoverPlan(
            mode,
            declared,
            policy=pool.retry_policy,
            budget_for=pool.retry_budget,
            deadline=upload.deadline,
            rand=self._random.random,
            # A pass given up for a changed plan may have left copies that could not be
            # removed; the replay keeps their file id (`_new_file_id_for_replay`), so their
            # elements get no new copy under it: a late removal would delete the stored file.
            burned=[copy.element_id for copy in saga.record.copies],
        )
        # The checksums elements reported that were not ours, and which elements did.
        misreports: dict[str, set[str]] = {}
        try:
            async with out_recv:
                while True:
                    element = pool.next_element(mode, declared, failover.excluded, fit)
                    if element is None:
                        verdict = failover.nothing_left(pool.candidates(), trio.current_time())
                        if isinstance(verdict, GiveUp):
                            if verdict.refused is not None:
                                log.info(
                                    "not retrying: %s",
                                    verdict.refused,
                                    extra={"event": "retry_refused"},
                                )
                            raise verdict.error
                        log.info(
                            "every candidate failed; round %d in %.2f s",
                            verdict.number,
                            verdict.wait_s,
                            extra={"event": "retry", "reason": verdict.reason},
                        )
                        await trio.sleep(verdict.wait_s)
                        continue
                    took_trial = (
                        pool.breakers.breaker(element.id).state(trio.current_time())
                        is BreakerState.HALF_OPEN
                    )
                    is_retry = failover.attempting(element.id)
                    upload.element = element
                    # The head is per attempt: elements of another kind get another name.
                    upload.stored_as = placement.stored_identity(self.settings, upload, element)
                    head = _multipart_head(boundary, upload)
                    body = body.restart(head=head)
                    body.declared = _declared_length(boundary, upload, head)
                    upload.progress.storage_element_id = element.id
                    logs.bind(storage_element_id=element.id)
                    if is_retry:
                        self.metrics.retries.labels(element.id).inc()
                    else:
                        pool.retry_budget(element.id).on_request(trio.current_time())
                    error: StorageElementError | None = None
                    # The stall watchdog or a breaker trip cancels this scope: the attempt
                    # ends, the upload goes on elsewhere.
                    reported = answered = False
                    copy = Copy(element.id, element.api_url)
                    try:
                        # Written before the first byte leaves: if this process dies, whoever
                        # takes the record over knows where to look. Inside the `try`: a
                        # half-open trial taken above must go back if this fails.
                        await saga.sending_to(copy)
                        body.before_end = partial(saga.landing_before_end, copy)
                        with pool.attempt(element.id, upload), trio.CancelScope() as attempt:
                            upload.attempt = attempt
                            try:
                                stored = await pool.client.upload(
                                    element.id,
                                    element.api_url,
                                    body=body,
                                    content_type=multipart_writer.form_content_type(boundary),
                                    authorization=upload.authorization,
                                    extra_headers={"X-Request-ID": upload.request.upload_id},
                                    content_length=body.declared,
                                )
                                answered = True
                            except StorageElementError as exc:
                                error = exc
                                answered = exc.upstream_status is not None
                        reported = True
                    finally:
                        if not reported and took_trial:
                            pool.breakers.breaker(element.id).release_trial(trio.current_time())
                        if body.ended and not answered:
                            # Its element may be writing the file still (artStore's writes
                            # it after the last byte, and finishes whoever hung up): a
                            # removal that finds nothing now is checked again later.
                            saga.may_land(copy)
                        else:
                            saga.cannot_land(copy)
                    upload.attempt = None
                    upload.in_flight_since = None
                    if upload.tripped and error is None and answered:
                        # The breaker opened as the element's 201 came in: the file is stored
                        # there (and is checked below). Failing over would remove it and send
                        # it all again.
                        upload.tripped = False
                    elif upload.tripped:
                        # Counted by whoever tripped it: this attempt is no new failure.
                        upload.tripped = False
                        error = StorageElementUnavailable(
                            f"the circuit breaker for {element.id} opened",
                            element_id=element.id,
                        )
                        failover.record(error)
                    elif attempt.cancelled_caught:
                        error = StorageElementTimeout(
                            f"{element.id} accepted nothing for "
                            f"{self.settings.se_stall_timeout_s:g} s",
                            element_id=element.id,
                        )
                    if error is None:
                        mismatch = self._mismatch(upload, stored)
                        if mismatch is None:
                            pool.note_success(element.id)
                            took = failover.succeeded(trio.current_time())
                            if took is not None:
                                self.metrics.failover_seconds.observe(took)
                            break
                        # An element that keeps other bytes than it was sent is failing: its
                        # copy goes and the upload fails over, as from a 5xx. Unless another
                        # element reported the same bytes: then what we sent was not what we
                        # hashed (a spool read back wrong), and no element can fix that.
                        agreeing = misreports.setdefault(stored.checksum, set())
                        agreeing.add(element.id)
                        if len(agreeing) > 1:
                            pool.note_success(element.id)
                            failover.succeeded(trio.current_time())
                            raise IntegrityError(
                                f"{mismatch}, as {', '.join(sorted(agreeing - {element.id}))} "
                                "did: the bytes sent were not the bytes hashed"
                            )
                        error = ElementChecksumMismatch(
                            mismatch, element_id=element.id, upstream_status=201
                        )
                    if failover.record(error):
                        pool.note_failure(element.id, error)
                    if took_trial and not error.retryable:
                        # The element answered and the request was at fault: no verdict on
                        # the element, so its half-open trial goes back (kept, nothing would
                        # ever try the element again, the prober included).
                        pool.breakers.breaker(element.id).release_trial(trio.current_time())
                    move = failover.failed(
                        error,
                        bytes_sent=body.started,
                        spooled=upload.spool is not None,
                        now=trio.current_time(),
                    )
                    if isinstance(move, Failover):
                        # Bytes went out; the next element gets the same bytes from the copy.
                        # An element that answered (5xx) is asked to drop what it has now:
                        # once that is confirmed it may be tried again in a later round.
                        # Otherwise its copy is removed in the background, and it is never
                        # used again by this upload (a late removal must not hit a new copy).
                        removed = move.remove_now and await saga.remove_now(copy)
                        # An element that stored other bytes is not tried again by this
                        # upload, its copy gone or not.
                        lied = isinstance(error, ElementChecksumMismatch)
                        failover.copy_removed(element.id, confirmed=removed and not lied)
                        if not removed:
                            saga.abandoned(copy)
                        self.metrics.failovers.labels(element.id).inc()
                        log.warning(
                            "failing over from %s after %d bytes: %s",
                            element.id,
                            body.taken,
                            error.message,
                            extra={"event": "failover", "bytes": body.taken},
                        )
                        body = body.restart()
                    else:
                        log.warning("%s; trying the next Storage Element", error.message)
            await self._verify(upload, stored)
            result.append(stored)
        finally:
            done.set()

    async def _tail(self, boundary: str, upload: Upload, encoder: Encoder) -> bytes:
        """The closing fields; sent only once the client's form is complete and checked."""
        facts = upload.facts
        compression = upload.compression
        # What this attempt sent is what the element stores.
        facts.compressed = encoder.compressing
        facts.algorithm = compression.algorithm if encoder.compressing and compression else None
        facts.stored_sha256 = encoder.sha256() or facts.sha256
        facts.stored_size = encoder.size if encoder.compressing else facts.original_size
        await upload.fields_complete.wait()
        options = upload.options
        assert options is not None
        if Plan.of(options) != upload.plan:
            if upload.spool is None:  # pragma: no cover - every plan field came first
                raise AssertionError("plan changed without a spool")
            raise _Replan()
        expected = upload.request.expected_digest
        if expected is not None:
            expected.verify(bytes.fromhex(upload.facts.sha256), upload.facts.digests)
        upload.progress.state = UploadState.STORING
        return _multipart_tail(boundary, upload, options)

    def _on_progress(self, upload: Upload, sent: int, writing: bool) -> None:
        upload.progress.bytes_sent = sent
        upload.in_flight_since = trio.current_time() if writing else None

    @staticmethod
    def _mismatch(upload: Upload, stored: StoredFile) -> str | None:
        """How the element's account of what it stored differs from what was sent."""
        facts = upload.facts
        if stored.checksum != facts.stored_sha256 or stored.file_size != facts.stored_size:
            return (
                f"the Storage Element reports sha256 {stored.checksum} and {stored.file_size} "
                f"bytes; we sent {facts.stored_sha256} and {facts.stored_size} bytes"
            )
        return None

    async def _verify(self, upload: Upload, stored: StoredFile) -> None:
        # Its checksum and size were checked in the attempt loop (`_mismatch`).
        if stored.file_id != upload.file_id:
            raise IntegrityError(
                f"the Storage Element stored the file as {stored.file_id}, not {upload.file_id}"
            )

    async def _heartbeat(self, upload: Upload, done: trio.Event) -> None:
        stall_s = self.settings.se_stall_timeout_s
        progress = upload.progress
        while not done.is_set():
            with trio.move_on_after(HEARTBEAT_S):
                await done.wait()
            progress.updated_at = self._clock()
            since = upload.in_flight_since
            if since is not None and trio.current_time() - since > stall_s:
                upload.in_flight_since = None
                if upload.attempt is not None:
                    upload.attempt.cancel()

    # --- the answer --------------------------------------------------------------------------

    def _result(self, upload: Upload, stored: StoredFile) -> dict[str, Any]:
        options = upload.options
        assert options is not None
        assert upload.element is not None
        facts = upload.facts
        now = datetime.now(UTC)
        ttl_expires = (
            (now + timedelta(days=options.ttl_days)).isoformat().replace("+00:00", "Z")
            if options.retention_policy is RetentionPolicy.TEMPORARY and options.ttl_days
            else None
        )
        ratio = round(facts.original_size / facts.stored_size, 3) if facts.stored_size else 1.0
        return {
            "file_id": upload.file_id,
            "upload_id": upload.request.upload_id,
            "original_filename": upload.filename,
            # The element's own name for it; None when it does not say (never invented).
            "storage_filename": stored.storage_filename,
            "content_type": upload.content_type,
            "file_size": facts.original_size,
            "stored_size": facts.stored_size,
            "compressed": facts.compressed,
            "compression_algorithm": facts.algorithm.value if facts.algorithm else None,
            "compression_ratio": ratio if facts.compressed else 1.0,
            "compression_decision": facts.decision_reason,
            "checksum": facts.sha256,
            "uploaded_at": now.isoformat().replace("+00:00", "Z"),
            "retention_policy": options.retention_policy.value,
            "ttl_days": options.ttl_days,
            "ttl_expires_at": ttl_expires,
            "storage_element_id": upload.element.id,
            "storage_element_url": upload.element.api_url,
        }


def _content_type(declared: str | None, filename: str) -> str:
    if declared:
        value = declared.split(";", 1)[0].strip().lower()
        if value and value != "application/octet-stream" and "/" in value:
            return value
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _multipart_head(boundary: str, upload: Upload) -> bytes:
    filename, content_type = upload.stored_as or (upload.filename, upload.content_type)
    plan_fields = [
        ("file_id", upload.file_id),
        ("retention_policy", upload.plan.retention_policy.value),
        ("version", VERSION_FIELD),
    ]
    return multipart_writer.fields(boundary, plan_fields) + multipart_writer.file_head(
        boundary, "file", filename, content_type
    )


def _declared_length(boundary: str, upload: Upload, head: bytes) -> int | None:
    """The element body's length, when it is known before its first byte: the file's size
    known and its options final from the start (a finished resumable upload), and nothing
    compressed.
    The tail is measured with a stand-in checksum (a sha256 is always 64 hex digits).
    None: a chunked body."""
    size = upload.request.file_size
    compression = upload.compression
    if size is None or upload.options is None or compression is None or compression.compress:
        return None
    facts = FileFacts(original_size=size, sha256="0" * 64)
    return len(head) + size + len(_multipart_tail(boundary, upload, upload.options, facts))


def _multipart_tail(
    boundary: str, upload: Upload, options: UploadOptions, facts: FileFacts | None = None
) -> bytes:
    facts = facts or upload.facts
    metadata = dict(options.metadata)
    # Facts a reader of the stored copy needs to restore the original.
    metadata["_ingester"] = {
        "upload_id": upload.request.upload_id,
        "original_size": facts.original_size,
        "original_checksum": facts.sha256,
        "compressed": facts.compressed,
        "compression_algorithm": facts.algorithm.value if facts.algorithm else None,
        "ttl_days": options.ttl_days,
    }
    after = []
    if options.description:
        after.append(("description", options.description))
    _, content_type = upload.stored_as or (upload.filename, upload.content_type)
    after.append(("content_type", content_type))
    # Compact, as the limit on the client's metadata is counted (`upload.fields`).
    after.append(("metadata", json.dumps(metadata, ensure_ascii=False, separators=(",", ":"))))
    return multipart_writer.tail(boundary, after)
