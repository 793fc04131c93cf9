"""One upload, end to end: a nursery of four tasks joined by bounded channels.

    reader       request body -> multipart events -> raw file chunks      (+ form fields)
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
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import trio

from .. import logs
from ..auth.principal import Principal
from ..errors import (
    FileTooLarge,
    IngesterError,
    InsufficientStorage,
    IntegrityError,
    InvalidField,
    MalformedMultipart,
    MissingFile,
    NoStorageAvailable,
    RequestTimeout,
    StorageElementError,
    StorageElementFull,
    StorageElementTimeout,
    StorageElementUnavailable,
)
from ..http.multipart import BodyEnd, MultipartStreamParser, PartData, PartEnd, PartStart
from ..resilience.breaker import BreakerState
from ..resilience.retry import ErrorKind, decide
from ..saga.book import Saga
from ..saga.commit import ResultCommit
from ..saga.record import Copy
from ..settings import SEAuthMode, SEMode
from ..storage.capabilities import Fit
from ..storage.client import StoredFile
from ..storage.refusals import repeated_refusal
from ..storage.selection import Candidate, no_candidate_error, rank_candidates
from . import placement
from .budget import UploadBudget
from .compression import (
    Algorithm,
    CompressionDecision,
    decide_compression,
    make_compressor,
    sniff_first_chunk,
)
from .digest import DigestHashing, ExpectedDigest
from .element_body import Encoder, SEUploadBody
from .fields import TRUE_WORDS, RetentionPolicy, UploadOptions, parse_upload_fields
from .filenames import sanitize_filename
from .progress import UploadProgress, UploadState
from .spool import Buffer, Spool

if TYPE_CHECKING:
    from ..service import Service

log = logging.getLogger(__name__)


def plan_is_settled(fields: Mapping[str, str]) -> bool:
    """Whether the fields seen so far fix where and how the bytes are stored.

    Those choices must be made before the first byte leaves for a Storage Element (the other
    fields travel after the file data). When a later field could still change them, the
    upload is teed into a spool so it can be sent again without asking the client.
    """
    policy = "retention_policy" in fields or "storage_mode" in fields
    compress = fields.get("compress")
    if compress is None:
        return False
    algorithm_open = (
        compress.strip().lower() in TRUE_WORDS and "compression_algorithm" not in fields
    )
    return policy and not algorithm_open


# A text field larger than this is not a form field but an attempt to exhaust memory
# (metadata's own limit is 64 KiB).
MAX_FIELD_BYTES: Final = 128 * 1024
MAX_FIELDS_TOTAL: Final = 256 * 1024
# Compression decisions look at this much of the start of the file.
SNIFF_BYTES: Final = 64 * 1024
# File bytes are hashed, spooled and sent in batches of about this much: one worker-thread
# hop per batch (a hop costs about as much as hashing 64 KiB, so per-chunk hops were a
# large share of the CPU), and one chunked frame per batch for the element.
BATCH_BYTES: Final = 1024 * 1024
# A partial batch goes out when the client sends nothing more for this long, so a slow
# client's bytes do not wait for a full batch.
BATCH_WAIT_S: Final = 0.01
# Below this, hashing on the event loop is cheaper than a hop to a worker thread.
INLINE_HASH_BYTES: Final = 64 * 1024
HEARTBEAT_S: Final = 0.5
# Multipart framing and form fields around the file part: allowance over max_file_size
# before a declared Content-Length is refused outright.
FORM_OVERHEAD_ALLOWANCE: Final = 1024 * 1024
VERSION_FIELD: Final = "1"


class _Replan(Exception):
    """A field after the file part changed where or how to store: send again from the spool."""


@dataclass(slots=True)
class UploadRequest:
    upload_id: str
    principal: Principal
    content_type: str | None
    content_length: int | None
    body: AsyncIterator[bytes]
    expected_digest: ExpectedDigest | None
    # The file's bytes already on disk (a resumable upload's data files): the spool then.
    source_copy: Spool | None = None
    # Records the result for the client's retries, with the saga's settle (`saga.commit`).
    commit: ResultCommit | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What must be fixed before the first byte goes out."""

    retention_policy: RetentionPolicy
    compress: bool
    algorithm: Algorithm | None

    @classmethod
    def of(cls, options: UploadOptions) -> Plan:
        return cls(options.retention_policy, options.compress, options.compression_algorithm)


@dataclass(slots=True)
class FileFacts:
    """What the transformer learned about the bytes."""

    original_size: int = 0
    stored_size: int = 0
    sha256: str = ""
    stored_sha256: str = ""
    compressed: bool = False
    algorithm: Algorithm | None = None
    decision_reason: str = "not_requested"
    # Content-Digest's other algorithms (sha-512), hashed in the same pass.
    digests: DigestHashing | None = None


@dataclass(slots=True, eq=False)
class Upload:
    """State shared by the tasks of one upload's nursery (hashed by identity)."""

    request: UploadRequest
    progress: UploadProgress
    file_id: str
    fields: dict[str, str]
    filename: str
    content_type: str
    plan: Plan
    budget: UploadBudget
    fields_complete: trio.Event = field(default_factory=trio.Event)
    options: UploadOptions | None = None
    facts: FileFacts = field(default_factory=FileFacts)
    spool: Spool | None = None
    # Compress or not, settled from the start of the file (None until then).
    compression: CompressionDecision | None = None
    # Original bytes the spool held at the end of the live pass.
    spooled_bytes: int = 0
    element: Candidate | None = None
    # Set while a piece handed to httpx has not been written yet: the stall watchdog's clock.
    in_flight_since: float | None = None
    # The current element attempt, which the stall watchdog or a breaker trip cancels.
    attempt: trio.CancelScope | None = None
    tripped: bool = False
    saga: Saga | None = None
    # trio clock time by which the upload must end (INGESTER_UPLOAD_DEADLINE_S), or None.
    deadline: float | None = None
    # The Authorization header for element calls (None when elements need none).
    authorization: str | None = None
    # Set by the hasher with its first batch (or at its end): the file is then known to be
    # empty or not, compressed or not, and the streamer may choose an element.
    data_ready: trio.Event = field(default_factory=trio.Event)
    # The name and media type the current element is given (`placement.stored_identity`).
    stored_as: tuple[str, str] | None = None

    def trip(self) -> None:
        """The element's breaker opened: end this attempt (the upload fails over)."""
        self.tripped = True
        if self.attempt is not None:
            self.attempt.cancel()


class FormReader:
    """Pulls the request body under the client idle timeout and yields multipart events.

    Before each read it takes `quantum` bytes of the memory budget (trued up to what was
    read); framing is given back at once, part data is held by whoever consumes it.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        boundary: bytes,
        idle_timeout_s: float,
        budget: UploadBudget,
        quantum: int,
    ) -> None:
        self._body = body
        self._parser = MultipartStreamParser(boundary)
        self._idle_timeout_s = idle_timeout_s
        self._pending: list[Any] = []
        self._exhausted = False
        self.budget = budget
        self._quantum = quantum
        self.bytes_read = 0
        # When the current wait for client data began (the idle timer's start).
        self._waiting_since: float | None = None

    async def next_event(self, *, batch_pending: bool = False) -> Any:
        """The next multipart event. With `batch_pending` (the caller holds file bytes it
        has not passed on), None instead of waiting: when the memory budget has no room
        now, or the client sends nothing for BATCH_WAIT_S. The caller then passes its batch
        on (giving budget back) and asks again."""
        while not self._pending:
            if self._exhausted:
                self._parser.close()
                raise MalformedMultipart("the body ended before the form was complete")
            # Waiting for budget is our pace, not the client's: outside the idle timer.
            if batch_pending:
                if not self.budget.try_acquire(self._quantum):
                    return None
            else:
                await self.budget.acquire(self._quantum)
            now = trio.current_time()
            if self._waiting_since is None:
                self._waiting_since = now
            idle_deadline = self._waiting_since + self._idle_timeout_s
            wait_until = min(idle_deadline, now + BATCH_WAIT_S) if batch_pending else idle_deadline
            with trio.move_on_at(wait_until) as waited:
                try:
                    chunk = await anext(self._body)
                except StopAsyncIteration:
                    self._exhausted = True
                    self.budget.release(self._quantum)
                    continue
            if waited.cancelled_caught:
                self.budget.release(self._quantum)
                if trio.current_time() >= idle_deadline:
                    raise RequestTimeout(f"no data from the client for {self._idle_timeout_s:g} s")
                return None
            self._waiting_since = None
            self.bytes_read += len(chunk)
            if len(chunk) > self._quantum:
                await self.budget.acquire(len(chunk) - self._quantum)
            events = self._parser.feed(chunk)
            part_bytes = sum(len(e.data) for e in events if isinstance(e, PartData))
            # The parser may emit a few bytes it held back from the previous chunk (a
            # possible boundary), so part data can exceed this chunk's share.
            self.budget.release(max(self._quantum, len(chunk)) - part_bytes)
            events.reverse()
            self._pending = events
        return self._pending.pop()


async def _read_field(reader: FormReader, budget: list[int]) -> str:
    parts: list[Buffer] = []
    size = 0
    while True:
        event = await reader.next_event()
        if isinstance(event, PartData):
            reader.budget.release(len(event.data))
            size += len(event.data)
            budget[0] -= len(event.data)
            if size > MAX_FIELD_BYTES or budget[0] < 0:
                raise InvalidField("a form field is larger than 128 KiB")
            parts.append(event.data)
        elif isinstance(event, PartEnd):
            try:
                return b"".join(parts).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidField("form fields must be UTF-8 text") from None
        else:  # pragma: no cover - the parser always ends a part before starting another
            raise MalformedMultipart("unexpected multipart structure")


def _add_field(fields: dict[str, str], name: str, value: str) -> None:
    if name in fields:
        raise InvalidField(f"{name} was sent more than once")
    fields[name] = value


class UploadPipeline:
    def __init__(self, service: Service) -> None:
        self.svc = service
        self.settings = service.settings
        self._random = random.Random()

    # --- entry point ------------------------------------------------------------------------

    async def run(
        self, request: UploadRequest, reader: FormReader, progress: UploadProgress
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
        fields: dict[str, str] = {}
        field_budget = [MAX_FIELDS_TOTAL]
        file_part: PartStart | None = None
        while file_part is None:
            event = await reader.next_event()
            if isinstance(event, PartStart):
                if event.name == "file":
                    file_part = event
                else:
                    _add_field(fields, event.name, await _read_field(reader, field_budget))
            elif isinstance(event, BodyEnd):
                raise MissingFile()
        # Validate what is known now: a bad early field fails before any byte goes out.
        early = parse_upload_fields(fields, max_description_length=settings.max_description_length)
        filename = sanitize_filename(file_part.filename, max_length=settings.max_filename_length)
        content_type = _content_type(file_part.content_type, filename)
        upload = Upload(
            request=request,
            progress=progress,
            file_id=str(uuid.uuid4()),
            fields=fields,
            filename=filename,
            content_type=content_type,
            plan=Plan.of(early),
            budget=reader.budget,
        )
        progress.filename = filename
        svc = self.svc
        upload.authorization = await svc.se_auth.authorization(request.principal)
        saga = svc.sagas.begin(
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
            stored = await self._store_all(upload, reader, field_budget)
            result = self._result(upload, stored)
            assert upload.element is not None
            kept = Copy(upload.element.id, upload.element.api_url)
            if svc.admin is not None:
                await saga.stored()
                await self._register(upload, result)
            await saga.succeeded(kept, upload.request.commit, result)
        except BaseException:
            current = upload.element
            with trio.CancelScope(shield=True):
                await saga.failed(None if current is None else Copy(current.id, current.api_url))
            raise
        finally:
            svc.sagas.end(saga)
        return result

    async def _store_all(
        self, upload: Upload, reader: FormReader, field_budget: list[int]
    ) -> StoredFile:
        """Store the file: one pass, or two when a late field changed the plan."""
        settings = self.settings
        if upload.request.source_copy is not None:
            # The bytes are on disk already: a failover replays them from there, and no
            # second copy is written.
            upload.spool = upload.request.source_copy
        elif settings.failover_spool or not plan_is_settled(upload.fields):
            # One copy of the original bytes serves both a failover (a failed element's
            # share is sent again to the next) and a later field that changes the plan.
            upload.spool = Spool(
                settings.spool_dir,
                upload.request.upload_id,
                disk=self.svc.spool_budget,
                memory=self.svc.spool_memory,
                memory_limit=settings.spool_memory_bytes,
                files=self.svc.spool_files,
            )
        try:
            try:
                stored = await self._store(upload, live=(reader, field_budget))
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
                self.svc.metrics.spool_written.inc(upload.spool.bytes_written)
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
        assert self.svc.admin is not None
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
            await self.svc.admin.register(record, authorization=upload.authorization)
        except IngesterError:
            self.svc.metrics.admin_registrations.labels("failed").inc()
            raise
        self.svc.metrics.admin_registrations.labels("ok").inc()

    # --- the nursery -------------------------------------------------------------------------

    async def _store(
        self, upload: Upload, *, live: tuple[FormReader, list[int]] | None
    ) -> StoredFile:
        depth = self.settings.pipeline_queue_depth
        # Batches of original bytes: from the reader to the hasher, then to the element's body.
        raw_send, raw_recv = trio.open_memory_channel[list[Buffer]](depth)
        out_send, out_recv = trio.open_memory_channel[Buffer](depth)
        result: list[StoredFile] = []
        done = trio.Event()
        upload.data_ready = trio.Event()
        async with trio.open_nursery() as nursery:
            if live is not None:
                nursery.start_soon(self._read_live, upload, live[0], live[1], raw_send)
            else:
                nursery.start_soon(self._read_spool, upload, raw_send)
            nursery.start_soon(self._transform, upload, raw_recv, out_send, live is not None)
            nursery.start_soon(self._stream, upload, out_recv, result, done)
            nursery.start_soon(self._heartbeat, upload, done)
        return result[0]

    async def _read_live(
        self,
        upload: Upload,
        reader: FormReader,
        field_budget: list[int],
        raw_send: trio.MemorySendChannel[list[Buffer]],
    ) -> None:
        """The client's file bytes, in batches of about BATCH_BYTES, then the late fields."""
        max_size = self.settings.max_file_size
        progress = upload.progress
        received = self.svc.metrics.bytes_received
        batch: list[Buffer] = []
        batched = 0
        async with raw_send:
            while True:
                event = await reader.next_event(batch_pending=bool(batch))
                if event is None or isinstance(event, PartEnd):
                    if batch:
                        await raw_send.send(batch)
                        batch, batched = [], 0
                    if event is None:
                        continue
                    break
                if isinstance(event, PartData):
                    size = len(event.data)
                    progress.bytes_received += size
                    received.inc(size)
                    if progress.bytes_received > max_size:
                        raise FileTooLarge(f"the file exceeds the limit of {max_size} bytes")
                    batch.append(event.data)
                    batched += size
                    if batched >= BATCH_BYTES:
                        await raw_send.send(batch)
                        batch, batched = [], 0
        # The rest of the form: fields after the file part.
        while True:
            event = await reader.next_event()
            if isinstance(event, PartStart):
                if event.name == "file":
                    raise InvalidField("only one 'file' part is accepted")
                _add_field(upload.fields, event.name, await _read_field(reader, field_budget))
            elif isinstance(event, BodyEnd):
                break
        self._complete_fields(upload)

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

    def _complete_fields(self, upload: Upload) -> None:
        options = parse_upload_fields(
            upload.fields, max_description_length=self.settings.max_description_length
        )
        upload.options = options
        upload.fields_complete.set()

    async def _transform(
        self,
        upload: Upload,
        raw_recv: trio.MemoryReceiveChannel[list[Buffer]],
        out_send: trio.MemorySendChannel[Buffer],
        live: bool,
    ) -> None:
        """Hash the original bytes and keep them in the spool: one worker-thread hop per
        batch for both (small batches are hashed on the loop when they need no disk), and
        the batch joined into one piece for the element. Also settles whether to compress,
        from the start of the file, before the first batch goes on."""
        settings = self.settings
        facts = upload.facts
        original = hashlib.sha256()
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
        decision = placement.compression_decision(self.svc, upload, decision)
        upload.compression = None if decision.compress else decision
        held: list[Buffer] = []
        held_bytes = 0

        def work(pieces: list[Buffer], to_disk: bool) -> Buffer:
            for piece in pieces:
                original.update(piece)
                if digests:
                    digests.update(piece)
            if to_disk:
                assert spool is not None
                spool.write_sync(pieces)
            return _join(pieces)

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
            if to_disk or size >= INLINE_HASH_BYTES:
                joined = await trio.to_thread.run_sync(work, pieces, to_disk)
            else:
                joined = work(pieces, False)
            if spool is not None:
                spool.commit([joined])
            facts.original_size += size
            announce()
            await out_send.send(joined)

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
            self.svc.metrics.compression_skipped.labels(upload.compression.reason).inc()

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
        out_recv: trio.MemoryReceiveChannel[Buffer],
        result: list[StoredFile],
        done: trio.Event,
    ) -> None:
        """Send the upload to the best element; on a safe failure, to the next one.

        An element that fails before taking any byte may be tried again in a later round
        (after a full-jitter backoff, within the retry budget and the upload's deadline); one
        that was sent bytes is never used again by this upload: its copy is being removed,
        and a removal arriving late must not hit a new copy.
        """
        svc = self.svc
        saga = upload.saga
        assert saga is not None
        plan = upload.plan
        mode = plan.retention_policy.target_mode
        declared = upload.request.content_length
        boundary = secrets.token_hex(16)
        # Empty or not, compressed or not: what the element must be able to take.
        await upload.data_ready.wait()
        fit = await placement.fit(svc, upload)
        body = SEUploadBody(
            head=_multipart_head(boundary, upload),
            chunks=out_recv,
            tail=lambda encoder: self._tail(boundary, upload, encoder),
            encoder=lambda: self._encoder(upload),
            on_progress=lambda sent, writing: self._on_progress(upload, sent, writing),
            release=upload.budget.release,
            spool=upload.spool,
        )
        # Elements this round has tried, and elements that were sent bytes (never again).
        tried: list[str] = []
        burned: list[str] = []
        failures: list[StorageElementError] = []
        rounds = 0
        failed_at: float | None = None
        try:
            async with out_recv:
                while True:
                    element = self._next_element(mode, declared, tried, fit)
                    if element is None:
                        if not failures or not failures[-1].retryable:
                            raise self._nothing_left(mode, declared, failures)
                        wait = self._retry_wait(upload, rounds, failures[-1], burned)
                        if wait is None:
                            raise self._nothing_left(mode, declared, failures)
                        rounds += 1
                        await trio.sleep(wait)
                        tried = list(burned)
                        continue
                    took_trial = (
                        svc.breakers.breaker(element.id).state(trio.current_time())
                        is BreakerState.HALF_OPEN
                    )
                    tried.append(element.id)
                    upload.element = element
                    # The head is per attempt: elements of another kind get another name.
                    upload.stored_as = placement.stored_identity(svc, upload, element)
                    body = body.restart(head=_multipart_head(boundary, upload))
                    upload.progress.storage_element_id = element.id
                    logs.bind(storage_element_id=element.id)
                    if rounds and element.id not in burned:
                        svc.metrics.retries.labels(element.id).inc()
                    else:
                        svc.retry_budget(element.id).on_request(trio.current_time())
                    # Written before the first byte leaves: if this process dies, whoever
                    # takes the record over knows where to look.
                    await saga.sending_to(Copy(element.id, element.api_url))
                    error: StorageElementError | None = None
                    # The stall watchdog or a breaker trip cancels this scope: the attempt
                    # ends, the upload goes on elsewhere.
                    in_flight = svc.attempts.setdefault(element.id, set())
                    in_flight.add(upload)
                    reported = False
                    try:
                        with trio.CancelScope() as attempt:
                            upload.attempt = attempt
                            try:
                                stored = await svc.se_client.upload(
                                    element.id,
                                    element.api_url,
                                    body=body,
                                    content_type=f"multipart/form-data; boundary={boundary}",
                                    authorization=upload.authorization,
                                    extra_headers={"X-Request-ID": upload.request.upload_id},
                                )
                            except StorageElementError as exc:
                                error = exc
                        reported = True
                    finally:
                        in_flight.discard(upload)
                        if not reported and took_trial:
                            svc.breakers.breaker(element.id).release_trial(trio.current_time())
                    upload.attempt = None
                    upload.in_flight_since = None
                    if upload.tripped:
                        # Counted by whoever tripped it: this attempt is no new failure.
                        upload.tripped = False
                        error = StorageElementUnavailable(
                            f"the circuit breaker for {element.id} opened",
                            element_id=element.id,
                        )
                        failures.append(error)
                    elif attempt.cancelled_caught:
                        error = StorageElementTimeout(
                            f"{element.id} accepted nothing for "
                            f"{self.settings.se_stall_timeout_s:g} s",
                            element_id=element.id,
                        )
                    if error is None:
                        svc.note_se_success(element.id)
                        if failed_at is not None:
                            svc.metrics.failover_seconds.observe(trio.current_time() - failed_at)
                        break
                    if not failures or failures[-1] is not error:
                        svc.note_se_failure(element.id, error)
                        failures.append(error)
                    if (refusal := repeated_refusal(failures)) is not None:
                        raise refusal
                    if not error.retryable or (body.started and upload.spool is None):
                        raise error
                    failed_at = trio.current_time()
                    if body.started:
                        # Bytes went out; the next element gets the same bytes from the copy.
                        # An element that answered (5xx) is asked to drop what it has now:
                        # once that is confirmed it may be tried again in a later round.
                        # Otherwise its copy is removed in the background, and it is never
                        # used again by this upload (a late removal must not hit a new copy).
                        copy = Copy(element.id, element.api_url)
                        if error.upstream_status is None or not await saga.remove_now(copy):
                            burned.append(element.id)
                            saga.abandoned(copy)
                        svc.metrics.failovers.labels(element.id).inc()
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

    def _next_element(
        self, mode: SEMode, declared: int | None, tried: list[str], fit: Fit | None = None
    ) -> Candidate | None:
        """The best candidate not tried yet that can take the file (`fit`) and whose breaker
        lets a request through."""
        svc = self.svc
        ranked = rank_candidates(
            svc.registry.candidates(), mode=mode, declared_size=declared, exclude=tried
        )
        if fit is not None:
            ranked = [c for c in ranked if fit.takes(c)]
        now = trio.current_time()
        allowed = set(svc.breakers.allowed([c.id for c in ranked], now))
        return next(
            (c for c in ranked if c.id in allowed and svc.breakers.breaker(c.id).allow(now)),
            None,
        )

    def _retry_wait(
        self, upload: Upload, rounds: int, last: StorageElementError, burned: list[str]
    ) -> float | None:
        """Every candidate failed this round: the wait before the next round, or None."""
        svc = self.svc
        now = trio.current_time()
        ranked = rank_candidates(
            svc.registry.candidates(),
            mode=upload.plan.retention_policy.target_mode,
            declared_size=upload.request.content_length,
            exclude=burned,
        )
        if not ranked or isinstance(last, StorageElementFull):
            return None
        decision = decide(
            attempt=rounds,
            error_kind=_error_kind(last),
            # With the failover copy nothing is lost by going again: an element that was
            # sent bytes is never retried, and its copy is compensated.
            bytes_acknowledged=False,
            now=now,
            deadline=upload.deadline,
            policy=svc.retry_policy,
            budget=svc.retry_budget(ranked[0].id),
            rand=self._random.random,
        )
        if not decision.retry:
            log.info("not retrying: %s", decision.reason, extra={"event": "retry_refused"})
            return None
        log.info(
            "every candidate failed; round %d in %.2f s",
            rounds + 2,
            decision.wait_s,
            extra={"event": "retry", "reason": decision.reason},
        )
        return decision.wait_s

    def _nothing_left(
        self, mode: SEMode, declared: int | None, failures: list[StorageElementError]
    ) -> IngesterError:
        """The answer when no candidate is left: 507 when every try found the element full
        (or the registry says none has room), 503 with Retry-After otherwise."""
        if failures and all(isinstance(f, StorageElementFull) for f in failures):
            return InsufficientStorage(failures[-1].message)
        error = (
            NoStorageAvailable(
                f"no {mode.value} Storage Element left after "
                f"{len(failures)} failed: {failures[-1].message}"
            )
            if failures
            else no_candidate_error(
                self.svc.registry.candidates(), mode=mode, declared_size=declared
            )
        )
        return error

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

    async def _verify(self, upload: Upload, stored: StoredFile) -> None:
        facts = upload.facts
        if stored.checksum != facts.stored_sha256 or stored.file_size != facts.stored_size:
            raise IntegrityError(
                f"the Storage Element reports sha256 {stored.checksum} and {stored.file_size} "
                f"bytes; we sent {facts.stored_sha256} and {facts.stored_size} bytes"
            )
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
            progress.updated_at = self.svc.progress.now()
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


def _join(pieces: list[Buffer]) -> Buffer:
    """One piece for the element (one chunked frame); no copy when there is one already."""
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)


def _error_kind(error: StorageElementError) -> ErrorKind:
    """Our element errors as the retry policy names them."""
    if isinstance(error, StorageElementFull):
        return "507"
    if isinstance(error, StorageElementTimeout):
        return "timeout"
    if not error.retryable:
        return "4xx"
    if error.upstream_status in (429, 503):
        return "503"
    if isinstance(error, StorageElementUnavailable):
        return "connect"
    return "5xx"


def _content_type(declared: str | None, filename: str) -> str:
    if declared:
        value = declared.split(";", 1)[0].strip().lower()
        if value and value != "application/octet-stream" and "/" in value:
            return value
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    return guessed or "application/octet-stream"


def _quote(value: str) -> str:
    # RFC 7578 §4.2 as browsers do it: percent-encode the three characters that break quoting.
    return value.replace("\\", "%5C").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _field(boundary: str, name: str, value: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


def _multipart_head(boundary: str, upload: Upload) -> bytes:
    filename, content_type = upload.stored_as or (upload.filename, upload.content_type)
    return b"".join(
        (
            _field(boundary, "file_id", upload.file_id),
            _field(boundary, "retention_policy", upload.plan.retention_policy.value),
            _field(boundary, "version", VERSION_FIELD),
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{_quote(filename)}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode(),
        )
    )


def _multipart_tail(boundary: str, upload: Upload, options: UploadOptions) -> bytes:
    facts = upload.facts
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
    parts = [b"\r\n"]
    if options.description:
        parts.append(_field(boundary, "description", options.description))
    _, content_type = upload.stored_as or (upload.filename, upload.content_type)
    parts.append(_field(boundary, "content_type", content_type))
    parts.append(_field(boundary, "metadata", json.dumps(metadata, ensure_ascii=False)))
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)
