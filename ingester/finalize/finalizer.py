"""The finalizer: moves temporary files to `rw` elements, in the service nursery.

  finalizer (service nursery)
    ├── movers         one per transaction: copy (source download streamed into a multipart
    │                  upload to the best rw element, failing over), verify, commit, wait the
    │                  safety delay, delete the source
    ├── lease keeper   every lease/3: renews this process's unfinished transactions at once
    └── janitor        claims transactions whose lease ran out (their ingester died, or this
                       one before a restart) and continues or rolls back each

Memory per move is a piece or two of the file (the download is read 1 MiB at a time, only as
fast as the target takes it): nothing is buffered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, Final, cast

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..auth.principal import Principal
from ..boundary import element_error, http_errors
from ..errors import (
    AdminRefused,
    AdminRegistrationFailed,
    ElementChecksumMismatch,
    IngesterError,
    InvalidField,
    NoStorageAvailable,
    ShuttingDown,
    StorageElementError,
    StorageElementUnavailable,
    UpstreamAuthError,
)
from ..http import multipart_writer
from ..ownership import Ownership
from ..resilience.breaker import BreakerState
from ..resilience.leases import STORE_CALL_TIMEOUT_S, Leases, Reachability, TryAgain, retry
from ..resilience.retry import RetryPolicy, backoff_s
from ..saga.record import Copy, Removal
from ..settings import SEAuthMode, SEMode, Settings
from ..storage.admin import AdminRegistry
from ..storage.capabilities import StoredForm, compressed_by_metadata, stored_as
from ..storage.client import StoredFile
from ..storage.pool import ElementPool
from ..storage.selection import Candidate
from ..upload.digest import update_hash
from .errors import (
    AdminCommitFailed,
    AdminLookupFailed,
    AlreadyPermanent,
    FileNotFound,
    FinalizationInProgress,
    FinalizeStoreUnavailable,
    Interrupted,
    SourceChecksumMismatch,
    SourceUnavailable,
)
from .record import SourceFile, Transaction, TxState, iso
from .store import FinalizeStore, StoreUnavailable

log = logging.getLogger(__name__)

CLAIM_BATCH: Final = 20
# The download is read in pieces this large: one chunked frame each to the target (smaller
# frames cost the element CPU, see the pipeline's SEND_PIECE).
PIECE: Final = 1024 * 1024
VERSION_FIELD: Final = "1"


class _Lost(Exception):
    """Another ingester owns the transaction now (`claimed`), or the store stayed away (then
    the last write may or may not have landed): stop here."""

    def __init__(self, message: str, *, claimed: bool) -> None:
        super().__init__(message)
        self.claimed = claimed


class _Permanent(Exception):
    """The file is already permanent. Raised by the look-up, which runs before anyone is
    checked: `begin` answers `AlreadyPermanent` to the file's owner and the 404 of an unknown
    id to anyone else (ids must not tell who stores what)."""

    def __init__(self, message: str, *, uploaded_by: str) -> None:
        super().__init__(message)
        self.message = message
        self.uploaded_by = uploaded_by


class _SourceFailed(Exception):
    """Reading the source failed mid-copy. Not an httpx error on purpose: httpx must not take
    it for a failure of the target request it surfaces through."""

    def __init__(self, error: IngesterError) -> None:
        super().__init__(error.message)
        self.error = error


def _uuid(raw: str) -> str:
    try:
        return str(uuid.UUID(raw.strip()))
    except ValueError:
        raise InvalidField(f"not a UUID: {raw[:64]!r}") from None


class CopyBody(httpx.AsyncByteStream):
    """The multipart body sent to the target: the fields and the file part's head, the source's
    bytes as they arrive (hashed on the way), the closing boundary. A class, not an async
    generator: httpx closes it explicitly when the request is cancelled."""

    def __init__(
        self,
        head: bytes,
        source: AsyncIterator[bytes],
        tail: bytes,
        source_id: str,
        on_bytes: Callable[[int], None],
    ) -> None:
        self._head = head
        self._source = source
        self._tail = tail
        self._source_id = source_id
        self._on_bytes = on_bytes
        self._stage = 0
        self.hasher = hashlib.sha256()
        self.size = 0
        # The head was handed out: bytes of the form (the file id first) may have reached
        # the target.
        self.started = False
        # The tail was handed out: the target may have the whole copy.
        self.ended = False
        # Awaited before the tail is handed out (the move's record says the copy may land).
        self.before_end: Callable[[], Awaitable[None]] | None = None

    def __aiter__(self) -> CopyBody:
        return self

    async def __anext__(self) -> bytes:
        if self._stage == 0:
            self._stage = 1
            self.started = True
            return self._head
        if self._stage == 1:
            try:
                with http_errors(lambda exc: _SourceFailed(element_error(exc, self._source_id))):
                    chunk = await anext(self._source)
            except StopAsyncIteration:
                self._stage = 2
                if self.before_end is not None:
                    await self.before_end()
                self.ended = True
                return self._tail
            await update_hash(self.hasher, chunk)
            self.size += len(chunk)
            self._on_bytes(len(chunk))
            return chunk
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._stage = 3


def multipart_parts(boundary: str, file_id: str, source: SourceFile) -> tuple[bytes, bytes]:
    """Head and tail of the target's form: every field before the file (all are known)."""
    fields = [
        ("file_id", file_id),
        ("retention_policy", "permanent"),
        ("version", source.version or VERSION_FIELD),
        ("content_type", source.content_type),
        ("metadata", json.dumps(source.metadata, ensure_ascii=False)),
    ]
    if source.description:
        fields.append(("description", source.description))
    head = multipart_writer.fields(boundary, fields) + multipart_writer.file_head(
        boundary, "file", source.original_filename, source.content_type
    )
    return head, multipart_writer.tail(boundary)


def as_stored_on(file: SourceFile, target: Candidate) -> SourceFile:
    """The file as `target` is given it: a copy our metadata marks compressed goes to an
    element that drops metadata under a name and type that say so, and a name outside
    Latin-1 to an element whose downloads cannot carry it percent-encoded (`ingester.
    storage.capabilities`); the bytes are copied as they are either way."""
    algorithm = compressed_by_metadata(file.metadata)
    if target.keeps_metadata:
        algorithm = None
    name, media_type = stored_as(
        file.original_filename,
        file.content_type,
        algorithm,
        StoredForm.SUFFIX,
        any_name=target.serves_any_name,
    )
    if (name, media_type) == (file.original_filename, file.content_type):
        return file
    return dataclasses.replace(file, original_filename=name, content_type=media_type)


class Finalizer:
    """Runs moves from temporary to permanent; `ingester.service` gives it what it uses.

    `draining()`: whether the process refuses new work (a new move is then 503).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: FinalizeStore,
        pool: ElementPool,
        ownership: Ownership,
        metrics: CollectorRegistry,
        draining: Callable[[], bool],
        admin: AdminRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.ownership = ownership
        self.admin = admin
        self._draining = draining
        self.store = store
        self.owner = f"finalizer-{uuid.uuid4().hex[:12]}"
        self.lease_s = settings.finalize_lease_s
        self.active: dict[str, Transaction] = {}
        self._limiter = trio.CapacityLimiter(settings.finalize_max_concurrent)
        self._nursery: trio.Nursery | None = None
        self._random = random.Random()
        self._backoff = RetryPolicy(
            base_s=max(settings.retry_base_s, 0.05),
            cap_s=max(settings.retry_cap_s, settings.retry_base_s, 0.05),
            max_attempts=settings.finalize_max_attempts,
        )
        # Between rounds of removals (the source, abandoned copies, a rollback's targets),
        # as the saga book's compensations.
        self._removal_backoff = RetryPolicy(
            base_s=1.0, cap_s=settings.compensation_backoff_max_s, max_attempts=1
        )
        self.leases = Leases[str](
            Reachability(
                log,
                StoreUnavailable,
                away="finalize store unreachable: %s",
                away_event="finalize",
                back="finalize store reachable again",
                back_event="finalize",
            ),
            lease_s=self.lease_s,
            janitor_interval_s=settings.finalize_janitor_interval_s,
            held=lambda: list(self.active),
            renew=lambda ids, due: self.store.renew(self.owner, ids, due=due),
            lost=self._lost,
            claim=lambda now, due: self.store.claim_due(
                self.owner, now=now, due=due, limit=CLAIM_BATCH
            ),
            take=self._take_over,
        )
        registry = metrics
        self.m_total = Counter(
            "ingester_finalizations",
            "Finished finalizations by outcome (done, rolled_back).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("done", "rolled_back"):
            self.m_total.labels(outcome)
        self.m_in_flight = Gauge(
            "ingester_finalizations_in_flight",
            "Finalizations this process is running (any state before done or rolled back).",
            registry=registry,
        )
        self.m_bytes = Counter(
            "ingester_finalize_copied_bytes", "Bytes copied to rw elements.", registry=registry
        )
        self.m_failovers = Counter(
            "ingester_finalize_failovers",
            "Copies moved to another rw element after a failure, by the failed element.",
            ["element_id"],
            registry=registry,
        )
        self.m_takeovers = Counter(
            "ingester_finalize_takeovers",
            "Transactions of a dead ingester taken over by this one.",
            registry=registry,
        )

    # --- service nursery ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.leases.keep)
                nursery.start_soon(self.leases.janitor)
                task_status.started()
        finally:
            self._nursery = None

    def _lost(self, tx_id: str) -> None:
        tx = self.active.get(tx_id)
        if tx is not None and not tx.terminal:
            log.warning(
                "lost the lease on finalization %s",
                tx_id,
                extra={"event": "finalize_lost", "transaction_id": tx_id},
            )

    def _take_over(self, raw: str) -> None:
        """A transaction the janitor claimed (its owner's lease ran out): continue it or roll
        it back."""
        try:
            tx = Transaction.from_json(raw)
        except ValueError as exc:
            log.error("unreadable finalization record: %s", exc)
            return
        if tx.transaction_id in self.active:
            return  # ours and alive: a late renewal
        previous = tx.owner
        tx.owner = self.owner
        if previous != self.owner:
            self.m_takeovers.inc()
        _log(tx, logging.WARNING, f"took over from {previous} in state {tx.state.value}")
        self._spawn(tx, recovered=True)

    def _spawn(self, tx: Transaction, *, recovered: bool) -> None:
        if self._nursery is None:  # pragma: no cover - requests arrive after the service runs
            raise RuntimeError("the finalizer is not running")
        self.active[tx.transaction_id] = tx
        self.m_in_flight.inc()
        self._nursery.start_soon(self._drive, tx, recovered)

    # --- requests ----------------------------------------------------------------------------

    async def begin(self, raw_file_id: str, principal: Principal) -> Transaction:
        """Find the file, check who asks, record the transaction and start it (202)."""
        file_id = _uuid(raw_file_id)
        if self._draining():
            raise ShuttingDown()
        authorization = await self.pool.authorization(principal)
        try:
            source, meta = await self._locate(file_id, authorization)
        except _Permanent as permanent:
            # A 409 says the file exists: only to whoever may finalize it.
            await self._uploader(file_id, permanent.uploaded_by, principal)
            raise AlreadyPermanent(permanent.message) from None
        meta.uploaded_by = await self._uploader(file_id, meta.uploaded_by, principal)
        now = time.time()
        tx = Transaction(
            transaction_id=str(uuid.uuid4()),
            file_id=file_id,
            owner=self.owner,
            requested_by=principal.subject,
            source=source,
            file=meta,
            created_at=now,
            updated_at=now,
            history=[(TxState.PENDING.value, now)],
            authorization=authorization if self.settings.se_auth is SEAuthMode.FORWARD else None,
        )
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                holder = await self.store.create(
                    tx, due=now + self.lease_s, retention_s=self.settings.finalize_retention_s
                )
        except (StoreUnavailable, trio.TooSlowError) as exc:
            raise FinalizeStoreUnavailable() from exc
        if holder is not None:
            raise FinalizationInProgress(
                f"file {file_id} is being (or was just) finalized by transaction {holder}"
            )
        _log(tx, logging.INFO, f"finalizing {file_id} from {source.element_id}")
        self._spawn(tx, recovered=False)
        return tx

    async def status(self, transaction_id: str) -> Transaction | None:
        try:
            transaction_id = _uuid(transaction_id)
        except InvalidField:
            return None
        mine = self.active.get(transaction_id)
        if mine is not None:
            return mine
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                return await self.store.get(transaction_id)
        except (StoreUnavailable, trio.TooSlowError) as exc:
            raise FinalizeStoreUnavailable() from exc

    async def recent(self, limit: int) -> list[Transaction]:
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                stored = await self.store.recent(limit)
        except (StoreUnavailable, trio.TooSlowError) as exc:
            raise FinalizeStoreUnavailable() from exc
        # This process's view of its own transactions is the freshest.
        return [self.active.get(tx.transaction_id, tx) for tx in stored]

    async def _uploader(self, file_id: str, recorded: str, principal: Principal) -> str:
        """Who uploaded the file; `FileNotFound` unless that is who asks, or an admin. Who
        uploaded it through an ingester comes first: the element may have recorded the
        ingester's service account, or nobody it tells (see `ingester.ownership`)."""
        uploaded_by = await self.ownership.owner_of(file_id) or recorded
        if principal.subject != uploaded_by and not principal.is_admin:
            raise FileNotFound(f"no temporary file {file_id} is known")
        return uploaded_by

    async def _locate(self, file_id: str, authorization: str | None) -> tuple[Copy, SourceFile]:
        """The temporary copy: where the Admin Module says (with INGESTER_ADMIN_URL), else the
        first `edit` element that has it. `_Permanent` when it is already permanent, 404 when
        unknown. Who asks is not checked here."""
        pool = self.pool
        elements = {e.id: e for e in pool.registry.elements}
        uploaded_by = ""
        if self.admin is not None:
            try:
                record = await self.admin.lookup(file_id, authorization=authorization)
            except AdminRegistrationFailed as exc:
                raise AdminLookupFailed(exc.message) from exc
            if record is None:
                raise FileNotFound(f"the Admin Module knows no file {file_id}")
            uploaded_by = str(record.get("uploaded_by") or "")
            if str(record.get("retention_policy", "")).lower() == "permanent":
                raise _Permanent(f"file {file_id} is already permanent", uploaded_by=uploaded_by)
            element_id = str(record.get("storage_element_id") or "")
            known = elements.get(element_id)
            api_url = (
                known.api_url if known else str(record.get("storage_element_url") or "")
            ).rstrip("/")
            if not element_id or not api_url:
                raise FileNotFound(f"the Admin Module names no element for {file_id}")
            places = [(element_id, api_url, SEMode.EDIT)]
        else:
            places = [(e.id, e.api_url, e.mode) for e in pool.registry.elements]
        found: tuple[Copy, dict[str, Any]] | None = None
        # The metadata of an rw element's copy: the file is already permanent.
        permanent: dict[str, Any] | None = None
        errors: list[str] = []
        for mode in (SEMode.EDIT, SEMode.RW):
            for element_id, api_url, element_mode in places:
                if element_mode is not mode:
                    continue
                try:
                    meta = await pool.client.metadata(
                        element_id, api_url, file_id, authorization=authorization
                    )
                except StorageElementError as exc:
                    # An edit element that does not answer may hold the file: not a 404. An
                    # rw one that does not answer only leaves "already permanent" unknown.
                    if mode is SEMode.EDIT:
                        errors.append(exc.message)
                    continue
                if meta is None:
                    continue
                if mode is SEMode.RW:
                    permanent = meta
                else:
                    found = (Copy(element_id, api_url), meta)
                break
            if found is not None or permanent is not None:
                break
        if found is None:
            if permanent is not None:
                raise _Permanent(
                    f"file {file_id} is already on an rw element",
                    uploaded_by=str(permanent.get("created_by_id") or ""),
                )
            if errors:
                raise NoStorageAvailable(
                    f"file {file_id} not found; some elements did not answer: {errors[-1]}"
                )
            raise FileNotFound(f"no temporary file {file_id} is known")
        copy, meta = found
        if str(meta.get("retention_policy") or "").lower() == "permanent":
            raise _Permanent(
                f"file {file_id} is already permanent",
                uploaded_by=uploaded_by or str(meta.get("created_by_id") or ""),
            )
        try:
            source = SourceFile(
                original_filename=str(meta["original_filename"]),
                content_type=str(meta.get("content_type") or "application/octet-stream"),
                checksum=str(meta["checksum"]).lower(),
                file_size=int(meta["file_size"]),
                description=meta.get("description"),
                version=meta.get("version"),
                metadata=dict(meta.get("metadata") or {}),
                uploaded_by=uploaded_by or str(meta.get("created_by_id") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StorageElementError(
                f"{copy.element_id} answered unusable metadata for {file_id}: {exc}",
                element_id=copy.element_id,
            ) from exc
        return copy, source

    # --- the move ----------------------------------------------------------------------------

    async def _drive(self, tx: Transaction, recovered: bool) -> None:
        """Run `tx` to done or rolled back. Never raises (it runs in the service nursery)."""
        outcome = "stopped"
        try:
            try:
                if recovered:
                    await self._recover(tx)
                else:
                    async with self._limiter:
                        await self._copy(tx)
                    await self._commit(tx)
                if tx.state is TxState.COMMITTED:
                    await self._finish(tx)
            except IngesterError as exc:
                if tx.state in (TxState.COMMITTED, TxState.DONE):  # pragma: no cover
                    raise
                _log(tx, logging.WARNING, f"rolling back: {exc.code}: {exc.message}")
                if tx.state is not TxState.ROLLING_BACK:
                    tx.fail(exc.code, exc.message, time.time())
                    await self._save(tx)
                await self._rollback(tx)
            outcome = tx.state.value if tx.terminal else outcome
        except _Lost:
            _log(tx, logging.WARNING, "another ingester took this finalization over")
        except Exception:
            log.exception(
                "finalization %s failed unexpectedly; its lease will run out and it is "
                "taken up again",
                tx.transaction_id,
                extra={"event": "finalize_error", "transaction_id": tx.transaction_id},
            )
        finally:
            self.active.pop(tx.transaction_id, None)
            self.m_in_flight.dec()
            if outcome in ("done", "rolled_back"):
                self.m_total.labels(outcome).inc()

    async def _recover(self, tx: Transaction) -> None:
        state = tx.state
        if state in (TxState.PENDING, TxState.COPYING):
            tx.fail(Interrupted.code, Interrupted.default_message, time.time())
            await self._save(tx)
            await self._rollback(tx)
        elif state is TxState.COMMITTING:
            await self._commit(tx)
        elif state is TxState.ROLLING_BACK:
            await self._rollback(tx)

    async def _authorization(self, tx: Transaction) -> str | None:
        """What the move's next request carries; asked for each request, never kept. With
        INGESTER_SE_AUTH=forward, the caller's token (in the record: another replica acts
        with it too). Otherwise the service's own credential, from the pool each time: a
        `client_credentials` token is refreshed there before it expires, and one read at the
        request outlived its token in a long move (the source delete, five minutes on, was
        refused for good)."""
        if tx.authorization is not None:
            return tx.authorization
        return await self.pool.authorization(None)

    async def _authorization_for_round(self, tx: Transaction) -> str | None:
        """`_authorization` for a round of removals: no credential now (the token endpoint
        is away) is one more round to retry, as an element that is away is."""
        try:
            return await self._authorization(tx)
        except UpstreamAuthError as exc:
            raise TryAgain(f"no credential for the removals: {exc.message}") from exc

    async def _save(self, tx: Transaction) -> None:
        """Write `tx` before going on. A store that is away is tried again (with backoff)
        for up to the lease; a record that is not ours any more stops the move."""

        async def put() -> bool:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                return await self.store.put(
                    tx,
                    due=time.time() + self.lease_s,
                    retention_s=self.settings.finalize_retention_s,
                )

        try:
            ok = await retry(
                put,
                self._backoff,
                self._random.random,
                retry_on=(StoreUnavailable, trio.TooSlowError),
                deadline=trio.current_time() + self.lease_s,
            )
        except (StoreUnavailable, trio.TooSlowError) as exc:
            raise _Lost(f"store unreachable: {exc}", claimed=False) from exc
        if not ok:
            raise _Lost("the record is another ingester's", claimed=True)

    async def _copy(self, tx: Transaction) -> None:
        """Copy to the best rw element, failing over; `tx` ends `copying` with a verified
        target. Raises what ends the move (the caller rolls back)."""
        pool = self.pool
        tx.move(TxState.COPYING, time.time())
        failures: list[IngesterError] = []
        for round_ in range(self.settings.finalize_max_attempts):
            if round_:
                await trio.sleep(backoff_s(round_ - 1, self._backoff, self._random.random))
            tried: list[str] = []
            # An element whose copy is not confirmed gone (still in `tx.copies`) is not tried
            # again by this move, in any round: a removal that lands late would delete the
            # new copy, the committed one included (the upload pipeline's "burned" elements,
            # `ingester.resilience.failover`).
            while (
                element := pool.next_element(
                    SEMode.RW, tx.file.file_size, [*tried, *(c.element_id for c in tx.copies)]
                )
            ) is not None:
                tried.append(element.id)
                # A half-open element's single trial is this attempt's now. It goes back
                # unless the attempt reports a verdict on the element (a success, or a failure
                # that counts): ended by the source, a refusal of the request, a lost record
                # or a cancellation, kept it would shut the element out until a restart, the
                # prober included (the upload pipeline's rule).
                took_trial = (
                    pool.breakers.breaker(element.id).state(trio.current_time())
                    is BreakerState.HALF_OPEN
                )
                reported = False
                try:
                    copy = Copy(element.id, element.api_url)
                    # Written before the first byte leaves: whoever continues knows where to
                    # look.
                    tx.sending_to(copy)
                    tx.move(TxState.COPYING, time.time())
                    await self._save(tx)
                    try:
                        stored, sha256 = await self._copy_to(tx, element)
                    except StorageElementError as exc:
                        pool.note_failure(element.id, exc)
                        reported = exc.retryable
                        failures.append(exc)
                        self.m_failovers.labels(element.id).inc()
                        _log(tx, logging.WARNING, f"copy to {element.id} failed: {exc.message}")
                        if copy in tx.copies:
                            await self._remove_target(tx, copy)
                        else:
                            await self._save(tx)  # never reached: out of the record
                        continue
                    mismatch: ElementChecksumMismatch | None = None
                    if stored.checksum != sha256 or stored.file_size != tx.file.file_size:
                        # The element keeps other bytes than it was sent (whatever the
                        # source's were: a bad source is told apart below).
                        mismatch = ElementChecksumMismatch(
                            f"{element.id} reports sha256 {stored.checksum} and "
                            f"{stored.file_size} bytes; we sent {sha256} and "
                            f"{tx.file.file_size} bytes",
                            element_id=element.id,
                        )
                        pool.note_failure(element.id, mismatch)
                    else:
                        pool.note_success(element.id)
                    reported = True
                finally:
                    if took_trial and not reported:
                        pool.breakers.breaker(element.id).release_trial(trio.current_time())
                if sha256 != tx.file.checksum:
                    await self._remove_target(tx, copy)
                    raise SourceChecksumMismatch(
                        f"read sha256 {sha256} from {tx.source.element_id}, "
                        f"which reports {tx.file.checksum}"
                    )
                if mismatch is not None:
                    failures.append(mismatch)
                    self.m_failovers.labels(element.id).inc()
                    _log(tx, logging.WARNING, f"copy to {element.id} failed: {mismatch.message}")
                    await self._remove_target(tx, copy)
                    continue
                # It answered: nothing more of this copy can land later.
                tx.landing.closed(copy)
                _log(tx, logging.INFO, f"copied to {element.id}, sha256 verified")
                return
        if failures:
            raise NoStorageAvailable(
                f"no rw Storage Element took the copy after {len(failures)} failures: "
                f"{failures[-1].message}"
            )
        raise NoStorageAvailable("no rw Storage Element is available")

    def _may_land(self, tx: Transaction, copy: Copy) -> None:
        """`copy`'s element may store it whatever happens next: a removal finding nothing is
        checked again until the window closes (`Landing`)."""
        tx.landing.note(copy, time.time() + self.settings.saga_recheck_s)

    async def _may_land_saved(self, tx: Transaction, copy: Copy) -> None:
        """Before the copy's last piece goes to an element that may store it whoever hangs up
        (artStore's): the record says the copy may land, so that an ingester taking the move
        over after this one dies asks again when a removal finds nothing (the upload saga's
        rule). A record that is not ours any more stops the move here."""
        self._may_land(tx, copy)
        await self._save(tx)

    async def _copy_to(self, tx: Transaction, element: Candidate) -> tuple[StoredFile, str]:
        """Stream the source into an upload to `element`: what it stored, and the sha256 of
        the bytes read. An attempt that ends before the form's first byte was handed out
        drops its copy from the record."""
        client = self.pool.client
        target = Copy(element.id, element.api_url)
        body: CopyBody | None = None
        try:
            authorization = await self._authorization(tx)
            boundary = secrets.token_hex(16)
            head, tail = multipart_parts(boundary, tx.file_id, as_stored_on(tx.file, element))
            try:
                async with client.download(
                    tx.source.element_id,
                    tx.source.api_url,
                    tx.file_id,
                    authorization=authorization,
                ) as response:
                    pieces = cast(AsyncGenerator[bytes, None], response.aiter_raw(PIECE))
                    body = CopyBody(head, pieces, tail, tx.source.element_id, self.m_bytes.inc)
                    if self.pool.registry.stores_after_hangup(element.id):
                        body.before_end = partial(self._may_land_saved, tx, target)
                    try:
                        stored = await client.upload(
                            element.id,
                            element.api_url,
                            body=body,
                            content_type=multipart_writer.form_content_type(boundary),
                            authorization=authorization,
                            extra_headers={"X-Request-ID": tx.transaction_id},
                        )
                    except StorageElementError as exc:
                        if (
                            body.ended
                            and exc.upstream_status is None
                            and exc.element_id == element.id
                        ):
                            # The target may be writing the copy still.
                            self._may_land(tx, target)
                        else:
                            # It answered, or never got the whole copy: nothing lands later
                            # (a window `_may_land` wrote before the last piece closes).
                            tx.landing.closed(target)
                        raise
                    finally:
                        await pieces.aclose()
            except _SourceFailed as exc:
                raise SourceUnavailable(exc.error.message) from exc
            except StorageElementError as exc:
                if exc.element_id == tx.source.element_id and exc.element_id != element.id:
                    raise SourceUnavailable(exc.message) from exc
                raise
        except BaseException:
            if body is None or not body.started:
                # Not one byte of the form went out: nothing of the move can be there (the
                # file id travels in the form), so the copy leaves the record. Kept, an
                # element never reached (down, decommissioned) held the move's end, or a
                # rollback's release of the file, until it answered. Never an earlier
                # attempt's copy: an element with one is not tried again (`_copy`). A copy
                # whose form went out, whole or in part, stays, answered or not (`Landing`).
                tx.forget(target)
            raise
        if body.size != tx.file.file_size:
            raise SourceUnavailable(
                f"{tx.source.element_id} sent {body.size} of {tx.file.file_size} bytes"
            )
        return stored, body.hasher.hexdigest()

    async def _removed(self, tx: Transaction, copy: Copy, authorization: str | None) -> bool:
        """Remove a target copy (bounded): True when it is confirmed gone. Finding nothing on
        an element that may still write the copy confirms nothing (`Transaction.landing`)."""
        removal = await self.pool.remove(copy, tx.file_id, authorization)
        gone = tx.landing.confirms(copy, removal, time.time())
        if not gone and removal is Removal.ABSENT:
            _log(
                tx,
                logging.INFO,
                f"nothing on {copy.element_id} yet, but it got the whole copy and never "
                "answered: it may still store it, and is checked again",
            )
        return gone

    def _recheck_within(self, tx: Transaction) -> float | None:
        return tx.landing.next_end(tx.copies, time.time())

    async def _remove_target(self, tx: Transaction, copy: Copy) -> None:
        """Remove a failed or partial copy now (bounded); one that cannot be removed now stays
        in the record and goes with the rollback or after the commit."""
        if await self._removed(tx, copy, await self._authorization(tx)):
            tx.forget(copy)
            await self._save(tx)

    async def _commit(self, tx: Transaction) -> None:
        admin = self.admin
        now = time.time()
        target = tx.target
        assert target is not None
        if admin is not None:
            if tx.state is not TxState.COMMITTING:
                tx.move(TxState.COMMITTING, now)
                await self._save_past_copying(tx, target)
            await self._commit_to_admin(tx, admin, target, now)
        was = tx.state
        tx.finalized_at = now
        # The safety delay counts from the commit's confirmation, however long it took.
        committed_at = time.time()
        tx.delete_after = committed_at + self.settings.finalize_source_delete_delay_s
        tx.move(TxState.COMMITTED, committed_at)
        if was is TxState.COPYING:
            await self._save_past_copying(tx, target)
        else:
            await self._save(tx)
        _log(
            tx,
            logging.INFO,
            f"committed on {target.element_id}; the source goes after "
            f"{self.settings.finalize_source_delete_delay_s:g} s",
        )

    async def _commit_to_admin(
        self, tx: Transaction, admin: AdminRegistry, target: Copy, now: float
    ) -> None:
        """Tell the Admin Module the new location; returns once it took it, and raises
        `AdminCommitFailed` (the move rolls back) only when it refused it.

        A refusal is a `4xx` whose record does not show the commit (an earlier attempt's
        answer may have been lost after it was applied). A timeout, a connection error or a
        `5xx` tell nothing: the Admin Module may have applied the `PUT`, and removing the
        target then would leave it pointing at no copy once the source goes (every failure
        used to roll back). Then the move stays `committing`, reads the Admin Module's
        record (a commit applied whose answers keep coming late shows there) and sends the
        commit again, with backoff, for as long as the transaction is ours: the lease keeper
        renews it meanwhile, and each round's write finds out when another ingester took it
        over."""
        changes = {
            "retention_policy": "permanent",
            "storage_element_id": target.element_id,
            "storage_element_url": target.api_url,
            "finalized_at": iso(now),
            "checksum": tx.file.checksum,
            "transaction_id": tx.transaction_id,
        }

        async def attempt() -> None:
            authorization = await self._authorization_for_round(tx)
            try:
                await admin.commit(tx.file_id, changes, authorization=authorization)
                return
            except AdminRefused as exc:
                recorded = await self._admin_recorded(tx, admin, target, authorization)
                if recorded is False:
                    raise AdminCommitFailed(exc.message) from exc
                failure = exc.message
            except AdminRegistrationFailed as exc:
                recorded = await self._admin_recorded(tx, admin, target, authorization)
                failure = exc.message
            if recorded:
                _log(tx, logging.INFO, f"the Admin Module has the commit ({failure})")
                return
            _log(
                tx,
                logging.WARNING,
                f"the commit's outcome is unknown ({failure}); the target stays and the "
                "commit is sent again",
            )
            await self._save(tx)  # still ours?
            raise TryAgain(failure)

        await retry(attempt, self._removal_backoff, self._random.random)

    async def _admin_recorded(
        self, tx: Transaction, admin: AdminRegistry, target: Copy, authorization: str | None
    ) -> bool | None:
        """Whether the Admin Module's record has this commit (the file permanent on
        `target`); None when it cannot say now."""
        try:
            record = await admin.lookup(tx.file_id, authorization=authorization)
        except AdminRegistrationFailed:
            return None
        return (
            record is not None
            and str(record.get("retention_policy", "")).lower() == "permanent"
            and str(record.get("storage_element_id") or "") == target.element_id
        )

    async def _save_past_copying(self, tx: Transaction, target: Copy) -> None:
        """The first write after the copy. Claimed by another ingester, the record said
        `copying` (the write is refused whole), so the claimant rolls it back: a copy that
        finished after its removal would be an orphan, and is removed now.

        With the store away the target stays: the write (`committing`, `committed`) may have
        landed with its reply lost, and then whoever takes the transaction up commits it and
        deletes the source, which must leave the target whole. If it did not land, the record
        says `copying` with this target among its copies, and the rollback removes it."""
        try:
            await self._save(tx)
        except _Lost as lost:
            if lost.claimed:
                await self.pool.compensate(target, tx.file_id, await self._authorization(tx))
            else:
                _log(
                    tx,
                    logging.WARNING,
                    f"the store stayed away after the copy to {target.element_id}: the "
                    "target is left to whoever takes the transaction up",
                )
            raise

    async def _finish(self, tx: Transaction) -> None:
        """After the commit: wait the safety delay, delete the source, remove copies left on
        elements the copy failed over from. Retried with backoff until done."""
        assert tx.delete_after is not None
        wait = tx.delete_after - time.time()
        if wait > 0:
            await trio.sleep(wait)

        async def remove() -> None:
            authorization = await self._authorization_for_round(tx)
            if not tx.source_deleted:
                tx.source_deleted = await self._delete_source(tx, authorization)
            for copy in tx.abandoned():
                if await self._removed(tx, copy, authorization):
                    tx.forget(copy)
            if not tx.source_deleted or tx.abandoned():
                await self._save(tx)
                raise TryAgain(
                    "the source or an abandoned copy is still there",
                    within_s=self._recheck_within(tx),
                )

        await retry(remove, self._removal_backoff, self._random.random)
        tx.move(TxState.DONE, time.time())
        await self._save(tx)
        _log(tx, logging.INFO, f"done: source copy on {tx.source.element_id} deleted")

    async def _delete_source(self, tx: Transaction, authorization: str | None) -> bool:
        client = self.pool.client
        source = tx.source
        timeout_s = self.settings.compensation_timeout_s
        with trio.move_on_after(timeout_s):
            try:
                return await client.delete(
                    source.element_id, source.api_url, tx.file_id, authorization=authorization
                )
            except StorageElementUnavailable as exc:
                _log(tx, logging.WARNING, f"source delete failed: {exc.message}")
                return False
            except StorageElementError as exc:
                # Not an edit element after all (or it refuses DELETE): the gc route removes
                # a copy in any mode.
                _log(tx, logging.WARNING, f"source delete refused ({exc.message}); using gc")
            return await self.pool.compensate(source, tx.file_id, authorization)
        return False

    async def _rollback(self, tx: Transaction) -> None:
        """Remove every target copy (retried until done); the source is not touched."""

        async def remove() -> None:
            authorization = await self._authorization_for_round(tx)
            for copy in list(tx.copies):
                if await self._removed(tx, copy, authorization):
                    tx.forget(copy)
            if tx.copies:
                await self._save(tx)
                raise TryAgain(
                    f"{len(tx.copies)} copies are still there", within_s=self._recheck_within(tx)
                )

        await retry(remove, self._removal_backoff, self._random.random)
        tx.target = None
        tx.move(TxState.ROLLED_BACK, time.time())
        await self._save(tx)
        _log(tx, logging.WARNING, f"rolled back ({tx.error_code}); the source is intact")


def _log(tx: Transaction, level: int, message: str) -> None:
    log.log(
        level,
        "finalization %s: %s",
        tx.transaction_id,
        message,
        extra={
            "event": "finalize",
            "transaction_id": tx.transaction_id,
            "file_id": tx.file_id,
            "state": tx.state.value,
        },
    )
