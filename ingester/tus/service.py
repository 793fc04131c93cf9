"""Resumable uploads (tus 1.0.0): what each request does, and the janitor.

    request (HEAD, PATCH, DELETE)   lock the upload (asking a holder to let go), read the
                                    state again, act, save, let go
    PATCH                           body → data file (worker threads); every
                                    CHECKPOINT_BYTES and at the end: fsync, then the offset
    PATCHes on this replica         a pipelined store (`pipelined.py`) follows the data file
                                    to the element as the PATCHes write it, until the window
                                    passes with no PATCH or the upload moves on elsewhere
    last byte in                    state `completing`, the lock handed to a completion task
                                    in the service nursery: the pipelined store finishes, or
                                    (the fallback) the data file through `ingest` (the
                                    pipeline multipart uploads take: compression, element
                                    choice, failover from the data file, saga); the request
                                    waits for it, but a client that goes away does not cancel
                                    the store
    janitor (service nursery)       expired uploads and orphaned data files removed; the
                                    spool budget trued up to what the data files hold

The state lives in the `TusStore` (Redis or this process), the bytes in `DataFiles` under
`<spool_dir>/tus/` (shared by replicas).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import trio

from .. import logs
from ..auth.principal import Principal
from ..concurrency import cleanup_scope, collapse
from ..errors import (
    FileTooLarge,
    IdempotencyKeyReused,
    IngesterError,
    InvalidField,
    RequestTimeout,
    SagaOutcomeUnknown,
    ServiceBusy,
    ShuttingDown,
    UploadNotFound,
)
from ..metrics import Metrics
from ..saga.commit import ResultCommit
from ..settings import Settings
from ..upload.budget import MemoryBudget, UploadBudget
from ..upload.digest import update_hash
from ..upload.fields import parse_upload_fields
from ..upload.ingest import Ingest
from ..upload.spool import FileCopy, SpoolBudget
from .data import DataFiles, DataReader, DataWriter
from .errors import (
    ChecksumMismatch,
    ChunkOverrun,
    FinalUploadNotPatchable,
    InvalidTusHeader,
    OffsetMismatch,
    TooManyOpenUploads,
    UploadCompleting,
    UploadDataLost,
    UploadExpired,
    UploadLocked,
    UploadQuotaExceeded,
    WrongContentType,
)
from .guarded_store import GuardedStore
from .locks import Lease, Locks
from .pipelined import FollowingReader, LiveStream
from .protocol import (
    Checksum,
    Concat,
    describe_file,
    encode_metadata,
    http_date,
    is_offset_stream,
    parse_upload_id,
)
from .result import StreamResult, TusResult
from .state import ConcatKind, Phase, TusUpload
from .store import QuotaRefusal, TusStore

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)


def _needs_a_completion(upload: TusUpload) -> bool:
    """Every byte in, not stored: `completing`, or `receiving` at its length. A partial
    upload of a concatenation is never stored on its own; a final one is stored at its
    creation, and restarted only when left `completing` (its replica died, or its saga's
    outcome was unknown and not recorded: found by a review, it stayed so until it expired,
    holding its partial uploads)."""
    if upload.is_partial:
        return False
    if upload.parts:
        return upload.phase is Phase.COMPLETING
    return upload.phase is Phase.COMPLETING or (
        upload.phase is Phase.RECEIVING and upload.all_received
    )


@runtime_checkable
class HoldsUnread(Protocol):
    """A request body that can hand over what arrived and was not read yet
    (`http.body.RequestBody`)."""

    def take_unread(self) -> list[bytes]: ...


# Received bytes are written in batches of about this much (one thread hop each).
WRITE_BATCH: Final = 1024 * 1024
# A long PATCH saves its progress this often (fsync, then the offset): a replica killed
# mid-PATCH loses at most this much, and the final fsync stays short. Not with
# Upload-Checksum, whose chunk is kept whole or not at all.
CHECKPOINT_BYTES: Final = 32 * 1024 * 1024
# How often a request waiting for another's completion looks at the state.
COMPLETION_POLL_S: Final = 0.25
# A data file with no state is removed once it has not changed for this long (a state is
# always written before its file, so this only guards against clock skew between replicas).
ORPHAN_GRACE_S: Final = 300.0
# Expired uploads removed per janitor round.
JANITOR_BATCH: Final = 100
# A pipelined store is started at most this often per upload on one replica: a client that
# pauses past the window before every PATCH would otherwise have each start read the whole
# data file again.
MAX_STREAM_STARTS: Final = 2
# Uploads whose starts are counted (the count is dropped when it grows past this).
STREAM_STARTS_KEPT: Final = 10_000
# How long HEAD waits for a PATCH in progress to let go: a live holder does within about a
# lock renewal interval and a save.
HEAD_WAIT_S: Final = 2.0


def keyed_upload_id(user: str, key: str) -> str:
    """An upload id made from a caller's Idempotency-Key: the same for the same caller and
    key, unrelated across callers (and no raw key or user name in the id)."""
    return hashlib.sha256(f"tus\0{user}\0{key}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class Answer:
    """What a tus request answers: the upload as it now is, and the result when stored."""

    upload: TusUpload
    result: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Unread:
    """The state not read yet (`_patch_held`'s `current`)."""


UNREAD: Final = _Unread()


@dataclass(slots=True, eq=False)
class _Completion:
    done: trio.Event = field(default_factory=trio.Event)
    result: dict[str, Any] | None = None
    error: IngesterError | None = None


class TusService:
    """Resumable uploads; `ingester.service` gives it what it uses.

    `store`: the uploads' state (Redis or in-process). `ingest`: where a completed upload is
    stored. `spool_budget` holds the data files' bytes, `memory` the buffers of PATCHes.
    `draining()`: whether new work is refused.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: TusStore,
        ingest: Ingest,
        metrics: Metrics,
        spool_budget: SpoolBudget,
        memory: MemoryBudget,
        draining: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.metrics = metrics
        self.spool_budget = spool_budget
        self.memory = memory
        self._draining = draining
        # Every use of the state goes through the guard: Redis away is a 503, everywhere.
        self.store = GuardedStore(store)
        self.locks = Locks(
            self.store,
            ttl_s=settings.tus_lock_ttl_s,
            wait_s=settings.tus_lock_wait_s,
            retry_after_s=settings.retry_after_s,
        )
        self.data = DataFiles(settings.spool_dir / "tus", keep_bytes=settings.tus_keep_bytes)
        # Bytes of data files counted in the process's spool budget (trued up by the janitor).
        self.held = 0
        self._nursery: trio.Nursery | None = None
        # Pipelined stores in progress on this replica, and how many each upload started.
        self._streams: dict[str, LiveStream] = {}
        self._stream_starts: dict[str, int] = {}
        # Request bodies (PATCHes, creations with data) being received, and received since
        # the start: the memory trim waits for their end as for multipart uploads'.
        self._receiving = 0
        self.bodies = 0

    def busy(self) -> bool:
        """Whether a request body is being received or a pipelined store is running."""
        return self._receiving > 0 or bool(self._streams)

    @contextlib.contextmanager
    def _counted_body(self) -> Iterator[None]:
        self._receiving += 1
        self.bodies += 1
        try:
            yield
        finally:
            self._receiving -= 1

    @property
    def max_size(self) -> int:
        return min(self.settings.tus_max_size, self.settings.max_file_size)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The janitor, and the nursery completions run in (they outlive their requests)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._janitor)
                task_status.started()
        finally:
            self._nursery = None

    # --- reading state ---------------------------------------------------------------------

    async def load(self, raw_id: str, principal: Principal) -> TusUpload:
        """The caller's upload; someone else's is as missing as an unknown one (404)."""
        upload_id = parse_upload_id(raw_id)
        upload = None if upload_id is None else await self.store.get(upload_id)
        if upload is None or (upload.owner != principal.subject and not principal.is_admin):
            raise UploadNotFound(f"no upload {raw_id[:64]} is known here")
        if upload.expired(time.time()):
            if upload.phase is Phase.DONE:
                raise UploadNotFound(f"no upload {raw_id[:64]} is known here")
            raise UploadExpired(f"upload {upload.id} expired")
        return upload

    def headers_of(self, upload: TusUpload) -> dict[str, str]:
        """What HEAD says about an upload."""
        headers = {"Cache-Control": "no-store"}
        headers["Upload-Offset"] = str(upload.offset)
        if upload.length is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(upload.length)
        if upload.metadata:
            headers["Upload-Metadata"] = encode_metadata(upload.metadata)
        if upload.concat_header is not None:
            headers["Upload-Concat"] = upload.concat_header
        if upload.phase is not Phase.DONE:
            headers["Upload-Expires"] = http_date(upload.expires_at)
        return headers

    async def head(self, raw_id: str, principal: Principal) -> TusUpload:
        upload = await self.load(raw_id, principal)
        if _needs_a_completion(upload):
            return await self._restart_completion(upload, principal)
        if upload.phase is not Phase.RECEIVING or upload.all_received:
            # Nothing can be on its way in (a complete partial upload, say).
            return upload
        # A PATCH in progress (often a dead client's, on another replica) holds bytes its
        # offset does not show yet: ask it to save and let go, so the offset is current. A
        # holder that does not let go soon is storing the upload or dead (its unsaved bytes
        # are lost): the saved state is the answer then.
        lease: Lease | None = None
        with contextlib.suppress(UploadLocked):
            lease = await self.locks.acquire(upload.id, ask=True, wait_s=HEAD_WAIT_S)
        try:
            fresh = await self.store.get(upload.id)
        finally:
            if lease is not None:
                await self.locks.release(lease)
        if fresh is None:
            raise UploadNotFound(f"no upload {upload.id} is known here")
        return fresh

    async def _restart_completion(self, upload: TusUpload, principal: Principal) -> TusUpload:
        """An upload with every byte in and, maybe, no completion running: its completer died,
        a lost Redis reply left it `completing`, or nothing began it. A tus client's HEAD
        then reads the full offset and sends nothing more (tuspy and tus-js-client check
        the offset and stop), so the HEAD starts the store again, in the background, when
        nobody holds the upload's lock. A HEAD sent while a completion runs finds the lock
        held and changes nothing."""
        lease = await self.locks.try_acquire(upload.id)
        if lease is None:
            return upload
        handed_over = False
        parts: list[Lease] = []
        try:
            fresh = await self.store.get(upload.id)
            if fresh is None:
                raise UploadNotFound(f"no upload {upload.id} is known here")
            if not _needs_a_completion(fresh):
                return fresh
            # A final upload reads its partial uploads: their locks too, or none of it.
            for part_id in fresh.parts:
                part = await self.locks.try_acquire(part_id)
                if part is None:
                    return fresh
                parts.append(part)
            # Should a restarted store fail, the offset stays at the length, and the next
            # HEAD (or a final PATCH) tries again.
            completing = fresh.phase is Phase.COMPLETING
            log.warning(
                "upload %s had every byte and no store running; storing it now",
                fresh.id,
                extra={"event": "tus_completion_restarted", "upload_id": fresh.id},
            )
            handed_over = await self._store_unattended(
                fresh, lease, principal, None if completing else fresh.offset, parts
            )
            return fresh
        finally:
            if not handed_over:
                for held in [*parts, lease]:
                    await self.locks.release(held)

    # --- creation --------------------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        *,
        length: int | None,
        defer_length: bool,
        metadata: dict[str, bytes],
        concat: Concat | None,
        concat_header: str | None,
        content_type: str | None,
        content_length: int | None,
        checksum: Checksum | None,
        body: AsyncIterator[bytes],
        idempotency_key: str | None = None,
    ) -> Answer:
        """A new upload. With `idempotency_key`, its id is the key's (per caller): a
        creation whose answer was lost, sent again, gets the upload the first one made
        (`Idempotent-Replayed: true`, its offset now, its file once stored), not a second
        one holding the caller's quota until it expires. A repeat's body adds what the
        upload lacks of it."""
        if self._draining():
            raise ShuttingDown()
        # The fields are checked now: a bad one fails before any byte is sent.
        description = describe_file(metadata)
        parse_upload_fields(
            description.fields, max_description_length=self.settings.max_description_length
        )
        if concat is not None and not concat.partial:
            if length is not None or defer_length:
                raise InvalidTusHeader("a final upload (Upload-Concat: final) takes no length")
            return await self._create_final(principal, metadata, concat, concat_header)
        if length is None and not defer_length:
            raise InvalidTusHeader("send Upload-Length, or Upload-Defer-Length: 1")
        if length is not None and defer_length:
            raise InvalidTusHeader("send Upload-Length or Upload-Defer-Length, not both")
        if length is not None and length > self.max_size:
            raise FileTooLarge(f"Upload-Length {length} exceeds the limit of {self.max_size} bytes")
        with_body = is_offset_stream(content_type)
        if not with_body and content_length:
            raise WrongContentType(
                "a creation request with data must be application/offset+octet-stream"
            )
        upload_id = uuid.uuid4().hex
        held: Lease | None = None
        if idempotency_key is not None:
            upload_id = keyed_upload_id(principal.subject, idempotency_key)
            # The id is known beforehand, so its lock is held from before the look: a
            # repeat sent at the same time waits for this creation, and nothing acts on the
            # id while it is being made. A repeat with a body asks the first to let go, as
            # a new PATCH asks a stalled one: its client sent it again because it gave up
            # on the first, whose body may have stopped mid-way (it then saves what it got).
            held = await self.locks.acquire(upload_id, ask=with_body)
            try:
                replay = await self._created_before(upload_id, length, metadata, concat_header)
            except BaseException:
                await self.locks.release(held)
                raise
            if replay is not None:
                if with_body and self._takes_rest(replay.upload, content_length):
                    return await self._create_again(
                        replay, held, principal, content_length, checksum, body
                    )
                await self.locks.release(held)
                return replay
        now = time.time()
        upload = TusUpload(
            id=upload_id,
            owner=principal.subject,
            length=length,
            created_at=now,
            expires_at=now + self.settings.tus_expiration_s,
            metadata=metadata,
            concat=ConcatKind.PARTIAL if concat is not None else None,
            concat_header=concat_header,
        )
        try:
            if with_body:
                self._check_chunk(upload, 0, content_length)
            logs.bind(upload_id=upload.id)
            await self._reserve(upload, length)
            try:
                if not await self.store.create(upload):  # pragma: no cover - see below
                    # 128 random bits, or a keyed id whose state appeared under our lock.
                    raise InvalidField("upload id collision; try again")
                reused = await self.data.create(upload.id, length)
            except BaseException:
                await self._unreserve(upload)
                raise
        except BaseException:
            if held is not None:
                await self.locks.release(held)
            raise
        self.metrics.tus_events.labels("created").inc()
        log.info(
            "resumable upload created",
            extra={
                "event": "tus_created",
                "upload_id": upload.id,
                "bytes": length,
                "reused_file": reused,
            },
        )
        location = {"Location": f"/api/v1/uploads/{upload.id}"}
        lease = held if held is not None else await self.locks.acquire(upload.id, ask=False)
        handed_over = False
        try:
            if with_body:
                try:
                    await self._receive(upload, lease, body, content_length, checksum)
                except ChunkOverrun:
                    # Refused whole: nothing is created (the client gets no Location).
                    await self._remove_created(upload, lease)
                    raise
                except IngesterError as error:
                    error.headers.update(location)
                    raise
            if upload.all_received and not upload.is_partial:
                upload.begin_completion(offset_before=0)
                await self._save(upload, lease)
                handed_over = True
                result = await self._complete(upload, lease, principal, [], created=True)
                return Answer(upload, result, location)
        finally:
            if not handed_over:
                await self.locks.release(lease)
        return Answer(upload, None, location)

    @staticmethod
    def _takes_rest(upload: TusUpload, content_length: int | None) -> bool:
        """Whether a repeated creation's body (from byte 0) may hold bytes `upload` lacks."""
        if upload.phase is not Phase.RECEIVING:
            return False
        return content_length is None or content_length > upload.offset

    async def _create_again(
        self,
        replay: Answer,
        lease: Lease,
        principal: Principal,
        content_length: int | None,
        checksum: Checksum | None,
        body: AsyncIterator[bytes],
    ) -> Answer:
        """A repeated creation-with-upload whose first request left the upload short (its
        connection broke mid-body): the rest of the repeat's body is taken, as a `PATCH` at
        the upload's offset would take it, so the client's retry loses nothing. The bytes
        the upload holds are skipped (and checked against `Upload-Checksum`, which covers
        the whole body); what is refused before a byte is read is the rest's (the spool
        holds the skipped bytes already). An error, too, names the upload (`Location`)."""
        held = replay.upload.offset
        try:
            answer = await self._patch_held(
                replay.upload.id,
                lease,
                principal,
                offset=held,
                length=None,
                checksum=checksum,
                content_length=None if content_length is None else content_length - held,
                body=body,
                skip=held,
            )
        except IngesterError as error:
            error.headers.update(replay.headers)
            raise
        answer.headers.update(replay.headers)
        return answer

    async def _created_before(
        self,
        upload_id: str,
        length: int | None,
        metadata: dict[str, bytes],
        concat_header: str | None,
    ) -> Answer | None:
        """The upload an earlier creation with the same key made, as its answer; None when
        there is none. Another upload under the key (another length, name or fields) is
        `422`, as a multipart upload's reused key is."""
        existing = await self.store.get(upload_id)
        if existing is None:
            return None
        if existing.expired(time.time()):
            # Its state outlives it a while (until the sweeper's round), and its id stays
            # taken until then: the key cannot make another upload.
            raise UploadExpired(
                "the upload this Idempotency-Key created has expired; create one with a new key"
            )
        same = (
            existing.metadata == metadata
            and existing.concat_header == concat_header
            and (length is None or existing.length == length)
        )
        if not same:
            raise IdempotencyKeyReused(
                "this Idempotency-Key created another upload (its length or metadata differ)"
            )
        log.info(
            "resumable upload creation repeated with its Idempotency-Key",
            extra={"event": "tus_create_replayed", "upload_id": upload_id},
        )
        headers = {"Location": f"/api/v1/uploads/{upload_id}", "Idempotent-Replayed": "true"}
        # A stored upload's answer names its file, as the first one's did.
        return Answer(existing, existing.result if existing.phase is Phase.DONE else None, headers)

    async def _create_final(
        self,
        principal: Principal,
        metadata: dict[str, bytes],
        concat: Concat,
        concat_header: str | None,
    ) -> Answer:
        """A final upload: its partial uploads, complete, joined in order and stored."""
        parts: list[TusUpload] = []
        leases: list[Lease] = []
        try:
            for part_id in concat.parts:
                part = await self.load(part_id, principal)
                if part_id in (p.id for p in parts):
                    raise InvalidTusHeader(f"Upload-Concat names {part_id} twice")
                if not part.is_partial:
                    raise InvalidTusHeader(f"upload {part_id} is not a partial upload")
                lease = await self.locks.acquire(part_id, ask=True)
                leases.append(lease)
                part = await self.load(part_id, principal)
                if not part.all_received:
                    raise InvalidTusHeader(
                        f"partial upload {part_id} is not complete ({part.offset} of "
                        f"{part.length} bytes); concatenation-unfinished is not supported"
                    )
                parts.append(part)
            total = sum(p.length or 0 for p in parts)
            if total > self.max_size:
                raise FileTooLarge(f"the final upload ({total} bytes) exceeds {self.max_size}")
            now = time.time()
            upload = TusUpload(
                id=uuid.uuid4().hex,
                owner=principal.subject,
                length=total,
                offset=total,
                created_at=now,
                expires_at=now + self.settings.tus_expiration_s,
                metadata=metadata,
                concat=ConcatKind.FINAL,
                parts=[p.id for p in parts],
                concat_header=concat_header,
            )
            logs.bind(upload_id=upload.id)
            upload.begin_completion(offset_before=total)
            if not await self.store.create(upload):  # pragma: no cover - 128 random bits
                raise InvalidField("upload id collision; try again")
            lease = await self.locks.acquire(upload.id, ask=False)
        except BaseException:
            for held in leases:
                await self.locks.release(held)
            raise
        location = {"Location": f"/api/v1/uploads/{upload.id}"}
        result = await self._complete(upload, lease, principal, leases, created=True)
        return Answer(upload, result, location)

    # --- PATCH -----------------------------------------------------------------------------

    async def patch(
        self,
        raw_id: str,
        principal: Principal,
        *,
        offset: int,
        length: int | None,
        checksum: Checksum | None,
        content_type: str | None,
        content_length: int | None,
        body: AsyncIterator[bytes],
    ) -> Answer:
        if not is_offset_stream(content_type):
            raise WrongContentType()
        upload = await self.load(raw_id, principal)
        logs.bind(upload_id=upload.id)
        if upload.is_final:
            raise FinalUploadNotPatchable()
        if self._is_final_retry(upload, offset, content_length):
            return await self._finish(upload, principal)
        if upload.phase is not Phase.RECEIVING:
            raise self._offset_error(upload)
        if self._draining():
            raise ShuttingDown()
        # What can be refused before waiting for the lock (the offset only can be checked
        # under it: a holder may still save bytes).
        upload.check_length(length, self.max_size)
        upload.declare_length(length)
        self._check_chunk(upload, offset, content_length)
        # The state under the lock comes with it: one call to the store less per PATCH.
        lease, current = await self.locks.acquire_reading(upload.id, ask=True)
        return await self._patch_held(
            upload.id,
            lease,
            principal,
            offset=offset,
            length=length,
            checksum=checksum,
            content_length=content_length,
            body=body,
            current=current,
        )

    async def _patch_held(
        self,
        upload_id: str,
        lease: Lease,
        principal: Principal,
        *,
        offset: int,
        length: int | None,
        checksum: Checksum | None,
        content_length: int | None,
        body: AsyncIterator[bytes],
        skip: int = 0,
        current: TusUpload | _Unread | None = UNREAD,
    ) -> Answer:
        """A PATCH at `offset` under `lease` (released here, or handed to the completion).
        `skip`: the body's first bytes, which the upload holds already (a repeated
        creation's body starts at 0); `content_length` counts the rest. `current`: the
        state as read when the lease was taken (`Locks.acquire_reading`), nothing written
        since; read here otherwise."""
        handed_over = False
        try:
            fresh = await self.store.get(upload_id) if isinstance(current, _Unread) else current
            if fresh is None:
                raise UploadNotFound(f"no upload {upload_id} is known here")
            upload = fresh
            if self._is_final_retry(upload, offset, content_length):
                await self.locks.release(lease)
                handed_over = True
                return await self._finish(upload, principal)
            upload.check_length(length, self.max_size)
            upload.check_offset(offset)
            declaring = length is not None and upload.length is None
            if declaring:
                await self._reserve(upload, length)
            upload.declare_length(length)
            self._check_chunk(upload, offset, content_length)
            stream = self._stream_for(upload, principal)
            try:
                await self._receive(
                    upload,
                    lease,
                    body,
                    content_length,
                    checksum,
                    stream,
                    declaring=declaring,
                    skip=skip,
                )
            except IngesterError:
                raise
            except BaseException:
                # The client went away, maybe after its last byte: what arrived is saved.
                if upload.all_received and not upload.is_partial and not lease.lost:
                    # Nobody waits for the result, but the client's next HEAD reports every
                    # byte in, and tus clients then send nothing more: left `receiving`, the
                    # upload would never be stored.
                    log.info(
                        "the client went away after the last byte; storing the upload anyway",
                        extra={"event": "tus_completion_unanswered", "upload_id": upload.id},
                    )
                    with trio.CancelScope(shield=True):
                        handed_over = await self._store_unattended(upload, lease, principal, offset)
                raise
            if upload.all_received and not upload.is_partial:
                # Shielded: a client that goes away now must not leave the upload saved as
                # completing with no completion running (nor unsaved with every byte in).
                with trio.CancelScope(shield=True):
                    upload.begin_completion(offset_before=offset)
                    await self._save(upload, lease)
                    handed_over = True
                # Starts the completion before its first checkpoint: it runs whatever the
                # request does next.
                result = await self._complete(upload, lease, principal, [], created=False)
                return Answer(upload, result)
        finally:
            if not handed_over:
                await self.locks.release(lease)
        return Answer(upload)

    async def _store_unattended(
        self,
        upload: TusUpload,
        lease: Lease,
        principal: Principal,
        offset_before: int | None,
        part_leases: list[Lease] | None = None,
    ) -> bool:
        """Store `upload` in a task of the service nursery that nobody waits for, `lease`
        handed to it: its completion begun and saved first (`offset_before`: where the
        offset goes back should the store fail), or, None, already `completing` (then under
        an id of its own: the saga of the store that did not finish, same id, is being
        undone). False, `lease` still the caller's, when the completion could not be saved."""
        nursery = self._nursery
        if nursery is None:  # pragma: no cover - the service runs before requests arrive
            return False
        if offset_before is None:
            upload.attempts += 1
        else:
            try:
                upload.begin_completion(offset_before=offset_before)
                await self._save(upload, lease)
            except IngesterError as exc:
                log.warning(
                    "upload %s has every byte, but its completion could not be saved: %s",
                    upload.id,
                    exc.message,
                    extra={"event": "tus_completion_unsaved", "upload_id": upload.id},
                )
                return False
        nursery.start_soon(
            self._completion_task, upload, lease, principal, part_leases or [], False, _Completion()
        )
        return True

    @staticmethod
    def _is_final_retry(upload: TusUpload, offset: int, content_length: int | None) -> bool:
        """A PATCH for an upload whose bytes are all in (being stored, or stored): at its
        length with no data, or the very chunk that completed it sent again."""
        if upload.phase is Phase.RECEIVING or upload.length is None:
            return False
        if offset == upload.length and not content_length:
            return True
        return (
            offset == upload.offset_before
            and content_length is not None
            and offset + content_length == upload.length
        )

    def _check_chunk(self, upload: TusUpload, offset: int, content_length: int | None) -> None:
        """What a chunk of `content_length` bytes at `offset` (the request's: a stale one is
        a 409 under the lock, not a 413 here) runs into before a byte is read."""
        if content_length is None:
            return
        limit = self.settings.tus_max_chunk_size
        if limit and content_length > limit:
            raise FileTooLarge(
                f"a chunk may carry at most {limit} bytes (INGESTER_TUS_MAX_CHUNK_SIZE)"
            )
        ceiling = upload.length if upload.length is not None else self.max_size
        room = max(ceiling - offset, 0)
        if content_length > room:
            raise FileTooLarge(
                f"the chunk of {content_length} bytes goes past the upload's end "
                f"({room} bytes left)"
            )
        budget = self.spool_budget
        if budget.used + content_length > budget.max_bytes:
            raise ServiceBusy(
                f"the spool is full ({budget.used} of {budget.max_bytes} bytes in use)"
            )

    async def _receive(
        self,
        upload: TusUpload,
        lease: Lease,
        body: AsyncIterator[bytes],
        content_length: int | None,
        checksum: Checksum | None,
        stream: LiveStream | None = None,
        *,
        declaring: bool = False,
        skip: int = 0,
    ) -> None:
        """Store the request body at the upload's offset, saving as it goes and at the end,
        whatever the end is: the body's end, a let-go request, the client gone (then this
        raises `Cancelled` once saved), an idle timeout, a full spool. Raises the error that
        ended it after saving, with the new offset in its headers. The body's first `skip`
        bytes are only hashed for `Upload-Checksum`."""
        receiver = _Receiver(
            self, upload, lease, checksum, content_length, declaring=declaring, skip=skip
        )
        receiver.writer = self.data.writer_at(upload.id, upload.offset)
        receiver.stream = stream
        error: IngesterError | None = None
        gone = False
        async with self.locks.kept(lease):
            try:
                if stream is not None:
                    stream.patch_started()
                with lease.interrupt, self._counted_body():
                    await receiver.pump(body)
            except IngesterError as exc:
                error = exc
            except BaseException:
                # The client went away (its request was cancelled): what arrived is kept,
                # what the server had received and this request not yet read included.
                gone = True
                if isinstance(body, HoldsUnread):
                    receiver.keep_unread(body.take_unread())
                raise
            finally:
                try:
                    with trio.CancelScope(shield=True):
                        saved = await receiver.finish()
                finally:
                    if stream is not None:
                        # What the stream may have read must be what the offset now keeps
                        # (a save that failed keeps less: the stream is abandoned then).
                        stream.patch_ended(upload.offset, kept=not lease.lost)
                self.metrics.tus_received.inc(receiver.received)
                if gone:
                    self.metrics.tus_events.labels("interrupted").inc()
                    log.info(
                        "chunk interrupted: the client went away after %d bytes; offset %d",
                        receiver.received,
                        upload.offset,
                        extra={
                            "event": "tus_chunk_interrupted",
                            "upload_id": upload.id,
                            "bytes": receiver.received,
                            "offset": upload.offset,
                        },
                    )
        if lease.lost:
            error = UploadLocked("this request lost the upload to another one; HEAD and resume")
        if error is None and saved is not None:
            error = saved
        if error is not None:
            error.headers.setdefault("Upload-Offset", str(upload.offset))
            raise error
        log.info(
            "chunk stored",
            extra={
                "event": "tus_chunk",
                "upload_id": upload.id,
                "bytes": receiver.received,
                "offset": upload.offset,
                "let_go": lease.asked,
            },
        )

    async def _remove_created(self, upload: TusUpload, lease: Lease) -> None:
        """Undo a creation whose own request was refused: state and data file."""
        with cleanup_scope(self.settings.tus_lock_ttl_s):
            try:
                await self.store.delete(upload.id, lease.token)
            except IngesterError as exc:
                log.warning("could not remove refused upload %s: %s", upload.id, exc)
            self._give_back(await self.data.remove(upload.id))
            await self._unreserve(upload)
        log.info(
            "resumable upload refused at creation",
            extra={"event": "tus_refused", "upload_id": upload.id},
        )

    # --- per-user caps ---------------------------------------------------------------------

    async def _reserve(self, upload: TusUpload, length: int | None) -> None:
        """Count a new upload (or a deferred length now declared) against its owner's caps;
        429 and nothing changed past one. A deferred length counts as the largest upload."""
        settings = self.settings
        size = length if length is not None else self.max_size
        refusal = await self.store.reserve(
            upload.owner,
            upload.id,
            size,
            max_uploads=settings.tus_max_uploads_per_user,
            max_bytes=settings.tus_max_bytes_per_user,
        )
        if refusal is QuotaRefusal.UPLOADS:
            raise TooManyOpenUploads(
                f"this user has {settings.tus_max_uploads_per_user} unfinished uploads "
                "(INGESTER_TUS_MAX_UPLOADS_PER_USER); finish or terminate one first"
            )
        if refusal is QuotaRefusal.BYTES:
            raise UploadQuotaExceeded(
                f"declaring {size} more bytes would take this user's unfinished uploads past "
                f"{settings.tus_max_bytes_per_user} bytes (INGESTER_TUS_MAX_BYTES_PER_USER)"
            )

    async def _unreserve(self, upload: TusUpload) -> None:
        await self._unreserve_id(upload.owner, upload.id)

    async def _unreserve_id(self, owner: str, upload_id: str) -> None:
        """The upload no longer counts against its owner (stored, removed, expired). Best
        effort: an entry left behind is dropped once its state is gone."""
        with cleanup_scope(self.settings.tus_lock_ttl_s):
            try:
                await self.store.unreserve(owner, upload_id)
            except IngesterError as exc:
                log.warning("could not release the quota of upload %s: %s", upload_id, exc)

    async def _save(self, upload: TusUpload, lease: Lease) -> None:
        if not await self.store.put(upload, lease.token):
            lease.lost = True
            raise UploadLocked("this request lost the upload to another one; HEAD and resume")

    # --- completion ------------------------------------------------------------------------

    async def _finish(self, upload: TusUpload, principal: Principal) -> Answer:
        """The answer for an upload whose bytes are all in: its result once stored. Waits
        for a completion in progress; takes over one whose replica died."""
        deadline = trio.current_time() + self.settings.tus_completion_wait_s
        while True:
            if upload.phase is Phase.DONE:
                return Answer(upload, upload.result)
            if upload.phase is Phase.RECEIVING:
                # Storing failed meanwhile and the offset went back: the client resumes.
                raise self._offset_error(upload)
            lease = await self.locks.try_acquire(upload.id)
            if lease is not None:
                # Nobody holds a completing upload: the replica storing it died.
                fresh = await self.store.get(upload.id)
                if fresh is None or fresh.phase is not Phase.COMPLETING:
                    await self.locks.release(lease)
                    if fresh is None:
                        raise UploadNotFound(f"no upload {upload.id} is known here")
                    upload = fresh
                    continue
                log.warning(
                    "upload %s was left completing; storing it again",
                    upload.id,
                    extra={"event": "tus_completion_taken_over", "upload_id": upload.id},
                )
                # Under an id of its own: the dead replica's saga (same id) is being undone.
                fresh.attempts += 1
                leases = []
                try:
                    for part_id in fresh.parts:
                        leases.append(await self.locks.acquire(part_id, ask=True))
                except BaseException:
                    for held in [*leases, lease]:
                        await self.locks.release(held)
                    raise
                result = await self._complete(fresh, lease, principal, leases, created=False)
                return Answer(fresh, result)
            if trio.current_time() >= deadline:
                raise UploadCompleting()
            await trio.sleep(COMPLETION_POLL_S)
            fresh = await self.store.get(upload.id)
            if fresh is None:
                raise UploadNotFound(f"no upload {upload.id} is known here")
            upload = fresh

    @staticmethod
    def _offset_error(upload: TusUpload) -> IngesterError:
        return OffsetMismatch(
            f"the upload is at {upload.offset}",
            headers={"Upload-Offset": str(upload.offset)},
        )

    async def _complete(
        self,
        upload: TusUpload,
        lease: Lease,
        principal: Principal,
        part_leases: list[Lease],
        *,
        created: bool,
    ) -> dict[str, Any]:
        """Store the complete upload (its state saved as `completing`, `lease` held and
        handed over here) in a task of the service nursery, and wait for the result. The
        request going away does not stop the store."""
        completion = _Completion()
        nursery = self._nursery
        if nursery is None:  # pragma: no cover - the service runs before requests arrive
            raise ShuttingDown()
        nursery.start_soon(
            self._completion_task, upload, lease, principal, part_leases, created, completion
        )
        with trio.move_on_after(self.settings.tus_completion_wait_s):
            await completion.done.wait()
        if not completion.done.is_set():
            # The store goes on; a final PATCH sent again later gets its result.
            raise UploadCompleting()
        if completion.error is not None:
            raise completion.error
        assert completion.result is not None
        return completion.result

    async def _completion_task(
        self,
        upload: TusUpload,
        lease: Lease,
        principal: Principal,
        part_leases: list[Lease],
        created: bool,
        completion: _Completion,
    ) -> None:
        """Never raises (it runs in the service nursery): the outcome goes to `completion`."""
        lease.honour_letgo = False
        # The request's scope was used by its receive step: a scope is entered once.
        lease.interrupt = trio.CancelScope()
        for part in part_leases:
            part.honour_letgo = False
        try:
            result: dict[str, Any] | None = None
            retention_s = self.settings.tus_result_retention_s
            commit = TusResult(self.store, upload, lease, retention_s=retention_s)
            async with self.locks.kept(lease, *part_leases):
                with lease.interrupt:
                    result = await self._store(upload, principal, commit)
                if result is None:
                    raise UploadLocked("the upload's lock was lost while it was stored")
                # The `done` state is recorded: the saga settled with `commit` (a lock lost
                # before that refused the settle).
                upload.completed(result, now=time.time(), retention_s=retention_s)
            completion.result = result
        except IngesterError as error:
            completion.error = error
            await self._completion_failed(upload, lease, error, created)
        except Exception as exc:
            log.exception("completing upload %s failed", upload.id, exc_info=exc)
            internal = IngesterError("storing the finished upload failed")
            completion.error = internal
            await self._completion_failed(upload, lease, internal, created)
        else:
            # Stored and recorded: a clean-up that fails now is no failure of the upload
            # (found by a review: it set the stored upload back to `receiving`, and the
            # client's next final PATCH stored it twice). What it leaves, the janitor takes.
            try:
                await self._forget_data(upload, part_leases)
            except Exception as exc:
                log.exception("cleaning up after upload %s failed", upload.id, exc_info=exc)
        finally:
            for held in [*part_leases, lease]:
                await self.locks.release(held)
            completion.done.set()

    # --- pipelined store -------------------------------------------------------------------

    def _stream_for(self, upload: TusUpload, principal: Principal) -> LiveStream | None:
        """The pipelined store this PATCH feeds (its lock held): the one in progress if it
        has read exactly what the upload holds, else a new one (which first reads what the
        data file holds), or none (off, a length not known yet, a partial upload, started
        too often)."""
        stream = self._streams.get(upload.id)
        if stream is not None:
            if stream.usable and stream.readable == upload.offset:
                return stream
            # Bytes came in through another replica, or the stream ended.
            self._forget_stream(upload.id, "the upload went on without it")
        window = self.settings.tus_pipeline_window_s
        nursery = self._nursery
        if (
            not window
            or nursery is None
            or not upload.length
            or upload.is_partial
            or self._stream_starts.get(upload.id, 0) >= MAX_STREAM_STARTS
        ):
            return None
        if len(self._stream_starts) >= STREAM_STARTS_KEPT:
            self._stream_starts.clear()
        self._stream_starts[upload.id] = self._stream_starts.get(upload.id, 0) + 1
        stream = LiveStream(
            upload.id,
            str(self.data.path(upload.id)),
            upload.length,
            upload.offset,
            window,
            lag_bytes=self.settings.tus_pipeline_lag_bytes,
            budget=UploadBudget(self.memory),
        )
        self._streams[upload.id] = stream
        nursery.start_soon(self._run_stream, stream, upload, principal)
        return stream

    def _forget_stream(self, upload_id: str, reason: str) -> None:
        stream = self._streams.pop(upload_id, None)
        if stream is not None:
            stream.abandon(reason)

    async def _run_stream(
        self, stream: LiveStream, upload: TusUpload, principal: Principal
    ) -> None:
        """The pipelined store, in the service nursery (it outlives each PATCH). Never raises
        but `Cancelled` at shutdown; the outcome goes to `stream`."""
        assert upload.length is not None
        outcome = "failed"
        try:
            with stream.scope:
                copy = FileCopy([(self.data.path(upload.id), upload.length)])
                # An id of its own: a fallback store runs under the upload's id while this
                # one's saga may still be removing its copy.
                result = await self._ingest(
                    upload,
                    principal,
                    str(uuid.uuid4()),
                    FollowingReader(stream),
                    copy,
                    StreamResult(stream),
                )
                stream.result = result
                outcome = "stored"
        except IngesterError as exc:
            log.info(
                "pipelined store failed: %s: %s; the upload will be stored from its data file",
                exc.code,
                exc.message,
                extra={"event": "tus_stream_failed", "upload_id": upload.id},
            )
        except Exception as exc:
            log.exception("pipelined store of %s failed", upload.id, exc_info=exc)
        finally:
            if stream.result is None and stream.abandoned is not None:
                outcome = "abandoned"
            self.metrics.tus_streams.labels(outcome).inc()
            if self._streams.get(upload.id) is stream:
                del self._streams[upload.id]
            stream.finish()

    async def _store(
        self, upload: TusUpload, principal: Principal, commit: TusResult
    ) -> dict[str, Any]:
        """The complete upload stored: by its pipelined store when one has read every byte
        (it only finishes the file now), else from the data files. `commit` records the
        result with the saga's settle."""
        stream = self._streams.pop(upload.id, None)
        self._stream_starts.pop(upload.id, None)
        if stream is not None and stream.usable and stream.readable == upload.length:
            stream.hand_over(commit)
            try:
                result = await stream.outcome()
            finally:
                if not stream.done.is_set():
                    stream.abandon("the completion was interrupted")
            if result is not None:
                return result
            log.info(
                "storing %s from its data file after its pipelined store did not",
                upload.id,
                extra={"event": "tus_stream_fallback", "upload_id": upload.id},
            )
        elif stream is not None:
            stream.abandon("it had not read every byte when the upload completed")
        return await self._store_upload(upload, principal, commit)

    async def _ingest(
        self,
        upload: TusUpload,
        principal: Principal,
        attempt_id: str,
        data: DataReader | FollowingReader,
        copy: FileCopy,
        commit: ResultCommit,
    ) -> dict[str, Any]:
        """`data` (closed here) stored through `ingest` as the upload's file, with the name,
        type and options checked at its creation: no form to write and parse again."""
        assert upload.length is not None
        try:
            description = describe_file(upload.metadata)
            options = parse_upload_fields(
                description.fields, max_description_length=self.settings.max_description_length
            )
            source = self.ingest.bytes_source(
                data,
                options=options,
                filename=description.filename,
                content_type=description.filetype,
                prehashed=data.sha256,
            )
            result = await self.ingest.run(
                principal=principal,
                upload_id=attempt_id,
                source=source,
                content_length=upload.length,
                file_size=upload.length,
                digest=None,
                owner=upload.owner,
                source_copy=copy,
                # Every byte is in and saved: refused during a drain, the upload would wait
                # for a client that may not come back, its bytes held until it expires.
                begun=True,
                commit=commit,
            )
        finally:
            await data.aclose()
        return {**result, "upload_id": upload.id}

    async def _store_upload(
        self, upload: TusUpload, principal: Principal, commit: ResultCommit
    ) -> dict[str, Any]:
        """The data files through `ingest`: the `201` result."""
        assert upload.length is not None
        if upload.is_final:
            parts = []
            for part_id in upload.parts:
                part = await self.store.get(part_id)
                if part is None or part.length is None:
                    raise UploadDataLost(f"partial upload {part_id} is gone")
                parts.append((part_id, part.length))
        else:
            parts = [(upload.id, upload.length)]
        # The data files are the spool: a failover replays from them, no second copy.
        copy = FileCopy([(self.data.path(part_id), length) for part_id, length in parts])
        # The first attempt runs under the upload's own id (progress, logs, saga); a later one
        # under a fresh id, since a failed attempt's saga may still be removing its copies.
        attempt_id = upload.id if upload.attempts == 0 else str(uuid.uuid4())
        return await self._ingest(
            upload, principal, attempt_id, self.data.reader(parts), copy, commit
        )

    async def _completion_failed(
        self, upload: TusUpload, lease: Lease, error: IngesterError, created: bool
    ) -> None:
        if isinstance(error, SagaOutcomeUnknown):
            # The result may be recorded (the state `done`): leave the state and the data
            # as they are. A `completing` state is stored again by the next final PATCH.
            error.headers.setdefault("Upload-Offset", str(upload.offset))
            return
        with cleanup_scope(self.settings.tus_lock_ttl_s):
            try:
                if created:
                    # Its creation request fails with it: the client never learned the
                    # upload exists and will create another.
                    await self.store.delete(upload.id, lease.token)
                    if not upload.is_final:
                        self._give_back(await self.data.remove(upload.id))
                        await self._unreserve(upload)
                    return
                upload.completion_failed(
                    error, now=time.time(), expiration_s=self.settings.tus_expiration_s
                )
                await self.store.put(upload, lease.token)
            except IngesterError as exc:
                log.warning("could not record the failed completion of %s: %s", upload.id, exc)
        error.headers.setdefault("Upload-Offset", str(upload.offset))

    async def _forget_data(self, upload: TusUpload, part_leases: list[Lease]) -> None:
        """After a stored upload: its data file, or a final upload's partial uploads."""
        with trio.CancelScope(shield=True):
            if not upload.is_final:
                self._give_back(await self.data.remove(upload.id))
                await self._unreserve(upload)
            for part in part_leases:
                # Counted against its own uploader, who is not the final upload's when an
                # admin joined another user's partial uploads.
                owner = upload.owner
                with contextlib.suppress(IngesterError):
                    state = await self.store.get(part.upload_id)
                    if state is not None:
                        owner = state.owner
                try:
                    deleted = await self.store.delete(part.upload_id, part.token)
                except IngesterError as exc:
                    log.warning("could not remove partial upload %s: %s", part.upload_id, exc)
                    deleted = False
                if not deleted:
                    # Its lock is not ours (any more), or the store cannot say: another
                    # request may hold the partial and read or write its file, which must
                    # not go to be reused by another upload. It goes with the partial's
                    # state (its holder, or the janitor once that expires).
                    continue
                self._give_back(await self.data.remove(part.upload_id))
                await self._unreserve_id(owner, part.upload_id)

    # --- DELETE ----------------------------------------------------------------------------

    async def terminate(self, raw_id: str, principal: Principal) -> None:
        upload = await self.load(raw_id, principal)
        lease = await self.locks.acquire(upload.id, ask=True)
        self._forget_stream(upload.id, "the upload was terminated")
        try:
            if await self.store.get(upload.id) is None:
                raise UploadNotFound(f"no upload {upload.id} is known here")
            await self.store.delete(upload.id, lease.token)
            self._give_back(await self.data.remove(upload.id))
            await self._unreserve(upload)
        finally:
            await self.locks.release(lease)
        self.metrics.tus_events.labels("terminated").inc()
        log.info("resumable upload terminated", extra={"event": "tus_terminated"})

    # --- janitor ---------------------------------------------------------------------------

    async def _janitor(self) -> None:
        while True:
            try:
                await self.sweep()
            except (IngesterError, OSError) as exc:
                # The store, or the spool's file system: the next round tries again (an
                # OSError raised would end the service nursery, and every completion in it).
                log.warning("tus janitor: %s", exc, extra={"event": "tus_janitor"})
            await trio.sleep(self.settings.tus_janitor_interval_s)

    async def sweep(self) -> int:
        """Remove expired uploads and orphaned data files; true up the spool budget. The
        number of uploads removed."""
        now = time.time()
        removed = 0
        for upload_id in await self.store.due(now, JANITOR_BATCH):
            lease = await self.locks.try_acquire(upload_id)
            if lease is None:
                continue  # someone is working on it: not abandoned
            try:
                upload = await self.store.get(upload_id)
                if upload is None:
                    await self.store.forget(upload_id)
                elif upload.expired(now):
                    await self.store.delete(upload_id, lease.token)
                else:
                    continue
                freed = await self.data.remove(upload_id)
                self._give_back(freed)
                removed += 1
                if upload is not None:
                    await self._unreserve(upload)
                    self.metrics.tus_events.labels("expired").inc()
                log.info(
                    "expired upload removed",
                    extra={"event": "tus_expired", "upload_id": upload_id, "bytes": freed},
                )
            finally:
                await self.locks.release(lease)
        total = 0
        for upload_id, size, mtime in await self.data.scan():
            if now - mtime >= ORPHAN_GRACE_S:
                state = await self.store.get(upload_id)
                if state is None:
                    # Not kept for reuse: no lock says nobody writes to it.
                    await self.data.remove(upload_id, reuse=False)
                    log.info("orphaned data file removed", extra={"event": "tus_orphan"})
                    continue
                if state.phase is Phase.DONE and await self._forget_stored(state, mtime):
                    continue
            total += size
        self._true_up(total)
        await self.data.trim_idle()
        return removed

    async def _forget_stored(self, upload: TusUpload, mtime: float) -> bool:
        """A stored upload's data file, and its place in its owner's quota, which its
        completion did not give up (the process died between the two): both go now, not
        when the state's retention ends. False when someone holds the upload, or when,
        under its lock, the state or the file is not the one seen (a keyed id may have made
        a new upload since: found by a review)."""
        lease = await self.locks.try_acquire(upload.id)
        if lease is None:
            return False
        try:
            fresh = await self.store.get(upload.id)
            if (
                fresh is None
                or fresh.phase is not Phase.DONE
                or fresh.created_at != upload.created_at
                or await self.data.mtime(upload.id) != mtime
            ):
                return False
            await self.data.remove(upload.id)
            await self._unreserve(upload)
        finally:
            await self.locks.release(lease)
        log.info(
            "a stored upload's data file removed",
            extra={"event": "tus_stored_data_removed", "upload_id": upload.id},
        )
        return True

    # --- spool accounting ------------------------------------------------------------------

    def take(self, size: int) -> None:
        self.spool_budget.take(size)
        self.held += size

    def _give_back(self, size: int) -> None:
        size = min(size, self.held)
        if size > 0:
            self.held -= size
            self.spool_budget.give_back(size)

    def _true_up(self, total: int) -> None:
        """The data files of every replica take room on the shared disk: count what they hold."""
        if total > self.held:
            # Counted without the ceiling check: the bytes are there already.
            self.spool_budget.used += total - self.held
            self.held = total
        else:
            self._give_back(self.held - total)


class _Receiver:
    """One request body into one data file: batched writes in threads, checkpoints, the
    checksum, and the final save.

    A batch is written (and hashed) in a worker thread while the next one is read: at most
    one write in flight, in `pump`'s nursery. A checkpoint waits for it, so the offset it
    saves counts only bytes written before its fsync."""

    def __init__(
        self,
        tus: TusService,
        upload: TusUpload,
        lease: Lease,
        checksum: Checksum | None,
        content_length: int | None = None,
        *,
        declaring: bool = False,
        skip: int = 0,
    ) -> None:
        self.tus = tus
        self.upload = upload
        self.lease = lease
        self.checksum = checksum
        # The bytes the body brings past the skipped ones, when it says: its last batch is
        # left for `finish`, whose one hop writes, fsyncs and closes.
        self.expected = content_length
        self.hasher: _Hash | None = checksum.hasher() if checksum else None
        # The body's first bytes, which the upload holds already: hashed, not kept.
        self.skip = skip
        self.writer: DataWriter | None = None
        self.budget = UploadBudget(tus.memory)
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.received = 0
        # Bytes written but not yet counted in the upload's offset.
        self.unsaved = 0
        self.body_complete = False
        # Whether the stored state has the upload's length: not when this request declares
        # a deferred one (`declaring`; the caller has set it on `upload` already), which must
        # then be saved even if no byte of this request is kept.
        self.length_declared = upload.length is not None and not declaring
        # The body went past the upload's end: nothing of this request is kept.
        self.refused = False
        # The pipelined store, told of each batch written.
        self.stream: LiveStream | None = None
        # While the body is read: where a batch's write runs, and whether one is in flight.
        self._writes: trio.Nursery | None = None
        self._written = trio.Event()
        self._written.set()

    async def pump(self, body: AsyncIterator[bytes]) -> None:
        tus = self.tus
        idle_s = tus.settings.client_idle_timeout_s
        room = self.upload.room(tus.max_size)
        try:
            async with trio.open_nursery() as writes:
                self._writes = writes
                # One scope for the whole body, armed only while waiting for the client (a
                # slow disk is not an idle client): a scope per chunk cost more than the rest
                # of the loop.
                with trio.CancelScope() as idle:
                    while True:
                        idle.deadline = trio.current_time() + idle_s
                        try:
                            chunk = await anext(body)
                        except StopAsyncIteration:
                            break
                        idle.deadline = math.inf
                        if self.skip:
                            chunk = await self._skipped(chunk)
                            if not chunk:
                                continue
                        await self._take_checked(chunk, room)
        except BaseExceptionGroup as group:
            # The body's or the write's own error, not wrapped by the nursery (a group of
            # nothing but Cancelled goes on as it is).
            raise collapse(group) from None
        finally:
            self._writes = None
        if idle.cancelled_caught:
            raise RequestTimeout(f"no data from the client for {idle_s:g} s")
        # What is still pending is written by `finish`, in the hop that fsyncs.
        self.body_complete = True

    def keep_unread(self, chunks: list[bytes]) -> None:
        """Bytes a client that went away had sent and this request had not read yet: kept
        like the rest of what arrived (`finish` writes them). Not for a chunk under
        `Upload-Checksum` (it is incomplete, so discarded anyway), nor past the upload's end
        or the spool's room."""
        if self.checksum is not None or self.refused:
            return
        room = self.upload.room(self.tus.max_size)
        for whole in chunks:
            _, chunk = self._split_skip(whole)
            if self.received + len(chunk) > room:
                return
            try:
                self.tus.take(len(chunk))
            except IngesterError:
                return
            # Held by the request body already, outside the memory budget: none taken here.
            self.pending.append(chunk)
            self.pending_size += len(chunk)
            self.received += len(chunk)

    def _split_skip(self, chunk: bytes) -> tuple[bytes, bytes]:
        """`chunk` cut where the bytes to skip end: (skipped, the rest)."""
        if not self.skip:
            return b"", chunk
        head = chunk[: self.skip]
        self.skip -= len(head)
        return head, chunk[len(head) :]

    async def _skipped(self, chunk: bytes) -> bytes:
        """What of `chunk` is past the bytes to skip, which are hashed (in a thread when
        large, as the written bytes are)."""
        head, rest = self._split_skip(chunk)
        if self.hasher is not None:
            await update_hash(self.hasher, head)
        return rest

    async def _take_checked(self, chunk: bytes, room: int) -> None:
        if self.received + len(chunk) > room:
            # Only a body without Content-Length gets here (one over the room left is
            # refused before a byte is read): the whole chunk goes, as it would have.
            self.refused = True
            raise ChunkOverrun(
                f"the chunk goes past the upload's end ({room} bytes were left); "
                "nothing of it was kept"
            )
        await self._take(chunk)

    async def _take(self, chunk: bytes) -> None:
        self.tus.take(len(chunk))
        await self.budget.acquire(len(chunk))
        self.pending.append(chunk)
        self.pending_size += len(chunk)
        self.received += len(chunk)
        if self.pending_size >= WRITE_BATCH and self.received != self.expected:
            # The write before this batch's is done (a failed one has cancelled this).
            await self._written.wait()
            if self.checksum is None and self.unsaved >= CHECKPOINT_BYTES:
                await self._checkpoint()
            # Only `pump` takes chunks, inside the nursery the writes run in.
            assert self._writes is not None
            self._written = trio.Event()
            self._writes.start_soon(self._flush_behind, self._written)
            if self.stream is not None:
                # Not past what the element takes, by more than the stream's slack.
                await self.stream.keep_pace()

    async def _flush_behind(self, written: trio.Event) -> None:
        try:
            await self._flush()
        finally:
            written.set()

    async def _flush(self, *, last: bool = False) -> None:
        """Write what is pending; `last`: and fsync and close the file in the same hop."""
        if not self.pending:
            return
        if self.lease.lost:
            # Another request may own the upload's file now: nothing more is written.
            self.budget.release(self.pending_size)
            self.pending, self.pending_size = [], 0
            return
        assert self.writer is not None
        chunks, self.pending = self.pending, []
        size, self.pending_size = self.pending_size, 0
        writer, stream = self.writer, self.stream
        # The pipelined store's digest, when this batch is the next it needs: hashed in the
        # write's hop, then handed to the stream from memory.
        stream_hash = (
            stream.claim_hash(writer.start + writer.written) if stream is not None else None
        )
        try:
            try:
                # Shielded: the batch left `pending`, so a write cancelled before its hop
                # began (the client gone) would lose it; the hop itself cannot be cancelled.
                with trio.CancelScope(shield=True):
                    await writer.write(chunks, self.hasher, stream_hash, last=last)
            except BaseException:
                if stream is not None and stream_hash is not None:
                    stream.abandon("a write it had hashed failed")
                raise
            self.unsaved += size
            if stream is not None:
                stream.advance(
                    writer.start + writer.written, chunks if stream_hash is not None else None
                )
        finally:
            self.budget.release(size)

    async def _checkpoint(self) -> None:
        assert self.writer is not None
        await self.writer.commit()
        await self._save_accepted()

    async def _save_accepted(self) -> None:
        """Count the bytes written and fsynced in the offset, and save it. A save that fails
        leaves the offset as saved, so no answer (a 503's `Upload-Offset`) and no stream
        counts bytes the state does not hold."""
        before = self.upload.offset
        self.upload.accept(
            self.unsaved, now=time.time(), expiration_s=self.tus.settings.tus_expiration_s
        )
        unsaved, self.unsaved = self.unsaved, 0
        try:
            await self.tus._save(self.upload, self.lease)
        except BaseException:
            self.upload.offset, self.unsaved = before, unsaved
            raise

    async def _take_back(self, writer: DataWriter) -> None:
        """Undo this request's bytes: those written, those checkpointed (the offset goes back
        to where the request began), those still in memory."""
        self.budget.release_all()
        dropped = self.pending_size
        self.pending, self.pending_size = [], 0
        if self.lease.lost:
            # Another request owns the upload and its file now (the janitor trues up the
            # spool count).
            return
        checkpointed = self.upload.offset - writer.start
        self.tus._give_back(checkpointed + self.unsaved + dropped)
        self.unsaved = 0
        writer.discard()
        if checkpointed:
            self.upload.offset = writer.start
            await self.tus._save(self.upload, self.lease)

    async def finish(self) -> IngesterError | None:
        """Save what arrived (called shielded, whatever ended the body). Returns the error to
        answer with, if the chunk was refused (checksum)."""
        error: IngesterError | None = None
        writer = self.writer
        assert writer is not None
        try:
            if self.refused:
                await self._take_back(writer)
                return None
            try:
                # Nothing is written after this: the same hop fsyncs and closes the file.
                await self._flush(last=True)
            finally:
                self.budget.release_all()
            if self.lease.lost:
                return None
            if self.checksum is not None and self.unsaved:
                assert self.hasher is not None
                if not self.body_complete or self.hasher.digest() != self.checksum.digest:
                    # The chunk is kept whole or not at all; an incomplete one cannot be
                    # verified, so it goes too.
                    writer.discard()
                    self.tus._give_back(self.unsaved)
                    self.unsaved = 0
                    if self.body_complete:
                        error = ChecksumMismatch(
                            f"the chunk's {self.checksum.algorithm} does not match "
                            "Upload-Checksum; it was discarded"
                        )
            if self.unsaved:
                # The fsync of batches written behind the body (none when the last write
                # was pending here: it has fsynced and closed the file).
                await writer.commit(close=True)
                await self._save_accepted()
            elif self.upload.length is not None and not self.length_declared:
                # A PATCH that only declared the deferred length.
                await self.tus._save(self.upload, self.lease)
        except IngesterError as exc:
            error = exc
        finally:
            await writer.aclose()
        return error
