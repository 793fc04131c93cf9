"""Sagas of this process: written before bytes go out, leased while alive, compensated until done.

  saga book (service nursery)
    ├── lease keeper   every lease/3: renews the leases of this process's records in one call,
    │                  and writes those a Redis outage kept from being written
    ├── janitor        every INGESTER_SAGA_JANITOR_INTERVAL_S: claims records whose lease ran
    │                  out (their ingester died) and compensates them
    └── compensators   one per saga with copies to remove: retries with full-jitter backoff
                       until every copy is gone, then deletes the record

An upload's saga is only as durable as its store: with Redis, a killed ingester's copies are
removed by another replica (or by itself after a restart) once the lease runs out. A store
that cannot be reached does not fail the upload; the record is written when it is back.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from ..boundary import may_have_run
from ..errors import SagaOutcomeUnknown, SagaStoreUnavailable, SagaTakenOver
from ..metrics import Metrics
from ..resilience.leases import STORE_CALL_TIMEOUT_S, Leases, Reachability, TryAgain, retry
from ..resilience.retry import RetryPolicy
from .commit import ResultCommit, ResultRefused, ResultUnknown, ResultWrite
from .record import Copy, Removal, SagaRecord, SagaState
from .store import SagaStore, StoreUnavailable

log = logging.getLogger(__name__)

# Records claimed per janitor round.
CLAIM_BATCH: Final = 50
# How far ahead of this process's clock another replica's may run: a record whose due time is
# nearer than this may already have been claimed by that replica's janitor.
CLOCK_MARGIN_S: Final = 1.0

# Remove one copy: whether its element held something, None when the removal could not be
# carried out now. Raises nothing: failures are logged and return None.
Compensate = Callable[[Copy, str, str | None], Awaitable[Removal | None]]


class Saga:
    """One upload's saga, as its owner sees it."""

    def __init__(self, book: SagaBook, record: SagaRecord) -> None:
        self.book = book
        self.record = record
        # The last write reached the store; and some write ever did (then the record may
        # have been claimed by another replica, and acknowledging needs it to still be ours).
        self.synced = False
        self.written = False
        # A write whose outcome is unknown (its reply was lost: it may have landed) carried
        # this due time; None once a write or delete is confirmed. Such a record may be in
        # the store with no one renewing it: settling must remove it, or a janitor would
        # undo the upload once the due time passes (found by the Sentinel failover test: an
        # acknowledged file removed 15 s after its `201`).
        self.unconfirmed_due: float | None = None
        self.lost = False
        self.settled = False
        # The settle's write may or may not have happened (the store went away while it
        # ran), and it carried a result a retry may read: the result's store decides
        # (`SagaBook.resolve`), with this commit and result.
        self.unresolved: tuple[ResultCommit, dict[str, Any]] | None = None
        self._compensating = False
        # One write of this record at a time. The lease keeper writes a record a store
        # outage kept unsynced; without this, that write (of the record as it was) could
        # land after the upload's own later one, or still be in flight when the upload is
        # acknowledged and ended, leaving a `receiving` record no one renews: a janitor
        # would then remove the acknowledged copy.
        self.lock = trio.Lock()

    @property
    def upload_id(self) -> str:
        return self.record.upload_id

    @property
    def maybe_stored(self) -> bool:
        """Whether the store may hold this saga's record: a write was confirmed, or one's
        outcome is unknown."""
        return self.written or self.unconfirmed_due is not None

    def claimable(self) -> bool:
        """Whether an unconfirmed record may already have been claimed by a janitor (its
        due time is here, give or take the replicas' clocks): then it may have been undone,
        and nothing this saga does now can tell."""
        due = self.unconfirmed_due
        return not self.written and due is not None and time.time() >= due - CLOCK_MARGIN_S

    async def sending_to(self, copy: Copy) -> None:
        """Before the first byte goes to `copy`'s element: from now on it may hold a copy."""
        async with self.lock:
            if self.record.add_copy(copy):
                await self.book.write(self)

    async def landing_before_end(self, copy: Copy) -> None:
        """The last piece of the body is about to go to `copy`'s element, which may store
        the file whatever happens next (artStore's writes it after the last byte, and
        finishes it for a caller long gone). Written first, so that a replica taking this
        record over after this process dies knows to ask again if a removal finds nothing.
        A body that never ends costs no such write, and its copy no wait; nor does an
        element that never stores an upload its caller left (`stores_late`).

        Raises `SagaTakenOver` when the record is no longer this process's: the replica
        that claimed it is undoing the upload, and the last piece must not go."""
        if not self.book.stores_late(copy.element_id):
            return
        async with self.lock:
            self.may_land(copy)
            await self.book.write(self)
            if self.lost or self.claimable():
                raise SagaTakenOver("this upload was taken over by another ingester; retry it")

    def cannot_land(self, copy: Copy) -> None:
        """`copy`'s element answered, or never got the whole body: it stores nothing later.
        Written with the record's next write."""
        self.record.landing.closed(copy)

    async def stored(self) -> None:
        async with self.lock:
            self.record.state = SagaState.STORED
            await self.book.write(self)

    async def succeeded(
        self,
        kept: Copy,
        commit: ResultCommit | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """The upload is about to be acknowledged on `kept`. Acknowledging needs the store to
        confirm the record is still ours (a replica that claimed it would undo the upload):
        raises `SagaTakenOver`, or `SagaStoreUnavailable` when a record that was written
        cannot be confirmed now (`SagaOutcomeUnknown` when the store went away during the
        write itself). Then `failed` must follow.

        `commit` records `result` for the client's retries, in the same atomic step as the
        settle when the store can (see `saga.commit`); its refusal is raised when its guard
        does not hold, and nothing is settled."""
        async with self.lock:
            await self._succeeded(kept, commit, result or {})

    async def _succeeded(
        self, kept: Copy, commit: ResultCommit | None, result: dict[str, Any]
    ) -> None:
        if self.lost:
            raise SagaTakenOver("this upload was taken over by another ingester; retry it")
        if self.claimable():
            # A record that may be in the store, due, and never renewed: another replica may
            # be removing this upload's copies (its own janitor is kept off while it is active).
            raise SagaStoreUnavailable(
                "the upload's saga record could not be confirmed before its lease ran out"
            )
        self.record.settle_success(kept)
        write = None
        if commit is not None and self.book.store.atomic_results:
            write = commit.redis_write(result)
        # In the settle's own script only when the settle reaches the store (a record never
        # written with nothing left to do is not sent): else written on its own after.
        atomic = write is not None and (bool(self.record.copies) or self.written)
        try:
            if self.record.copies:
                ok = await self.book.write(self, must_exist=self.written, strict=True, result=write)
            else:
                ok = await self.book.finish(self, result=write)
        except ResultRefused:
            self.record.state = SagaState.STORED
            assert commit is not None
            raise commit.refusal() from None
        except StoreUnavailable as exc:
            self.record.state = SagaState.STORED
            atomic = False
            if not self.maybe_stored:
                # Never in the store: no one else can know of it, no one can undo it.
                ok = True
            elif write is not None and commit is not None:
                # The script may have run, and its result reached a replica a retry will
                # read: undoing the upload now could remove the file that result names.
                self.unresolved = (commit, result)
                raise SagaOutcomeUnknown(
                    f"the upload's saga record could not be confirmed: {exc}"
                ) from exc
            else:
                # No result rides on it: whatever the store holds, no retry can learn of
                # this copy, so the upload fails and its copies go.
                raise SagaStoreUnavailable(
                    f"the upload's saga record could not be confirmed: {exc}"
                ) from exc
        if not ok:
            self.record.state = SagaState.STORED
            self.lost = True
            raise SagaTakenOver("this upload was taken over by another ingester; retry it")
        self.settled = True
        if commit is not None:
            if not atomic:
                await commit.write(result)
            commit.mark_applied()
        self.book.compensate_in_background(self)

    async def failed(self, current: Copy | None) -> None:
        """The upload failed: remove every copy. `current` (the element the upload was on)
        is tried at once, bounded, so the answer can say nothing is left; the rest, and a
        `current` that cannot be reached now, go on in the background until done."""
        async with self.lock:
            await self._failed(current)

    async def _failed(self, current: Copy | None) -> None:
        self.settled = True
        if self.unresolved is not None:
            log.warning(
                "the outcome of saga %s is unknown (the store went away while it was "
                "settled): asking the result's store before removing anything",
                self.upload_id,
                extra={"event": "saga_unresolved", "file_id": self.record.file_id},
            )
            self.book.resolve_in_background(self)
            return
        self.record.settle_failure()
        if (
            current is not None
            and current in self.record.copies
            and await self.book.compensate_now(self, current)
        ):
            self.record.forget(current)
        if self.record.copies:
            await self.book.write(self)
        self.book.compensate_in_background(self)

    async def remove_now(self, copy: Copy) -> bool:
        """Remove `copy` before going on (bounded): True when it is confirmed gone."""
        if await self.book.compensate_now(self, copy):
            self.record.forget(copy)
            return True
        return False

    def may_land(self, copy: Copy) -> None:
        """`copy`'s element was sent the whole body and did not answer: it may still store
        the file, for up to the book's `recheck_s`, and a removal finding nothing before
        then is checked again. Written with the record's next write. Not for an element
        that says it never stores an upload its caller left (`stores_late`)."""
        if self.book.stores_late(copy.element_id):
            self.record.landing.note(copy, self.book._wall_clock() + self.book.recheck_s)

    def abandoned(self, copy: Copy) -> None:
        """The upload moved on from `copy`'s element (failover): remove what it got, now, in
        the background; a copy that cannot be removed now stays in the record."""
        self.book.compensate_one_soon(self, copy)


class SagaBook:
    def __init__(
        self,
        store: SagaStore,
        compensate: Compensate,
        metrics: Metrics,
        *,
        lease_s: float,
        janitor_interval_s: float,
        backoff: RetryPolicy,
        compensation_timeout_s: float,
        recheck_s: float = 600.0,
        owner: str | None = None,
        wall_clock: Callable[[], float] = time.time,
        stores_late: Callable[[str], bool] = lambda _element_id: True,
    ) -> None:
        self.store = store
        # How long an element sent a whole body it never answered may still commit it.
        self.recheck_s = recheck_s
        # Whether an element may store an upload after its caller hung up (artStore's
        # does; the registry's `stores_after_hangup`): only such copies get a window.
        self.stores_late = stores_late
        self._wall_clock = wall_clock
        self.metrics = metrics
        self.owner = owner or f"ingester-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s
        self.backoff = backoff
        self.compensation_timeout_s = compensation_timeout_s
        self._compensate = compensate
        self.active: dict[str, Saga] = {}
        self._nursery: trio.Nursery | None = None
        self._random = random.Random()
        self.reach = Reachability(
            log,
            StoreUnavailable,
            away="saga store unreachable (%s); sagas are kept in memory until it is back",
            away_event="saga_store_down",
            back="saga store reachable again",
            back_event="saga_store_up",
        )
        self.leases = Leases[SagaRecord](
            self.reach,
            lease_s=lease_s,
            janitor_interval_s=janitor_interval_s,
            held=lambda: [u for u, s in self.active.items() if s.synced],
            renew=lambda ids, due: self.store.renew(self.owner, ids, due=due),
            lost=self._lost,
            claim=self._claim,
            take=self._take_over,
            catch_up=self._catch_up,
        )

    def begin(self, upload_id: str, file_id: str, *, user: str, authorization: str | None) -> Saga:
        """A saga for a new upload; written to the store with its first copy."""
        record = SagaRecord(
            upload_id=upload_id,
            file_id=file_id,
            owner=self.owner,
            user=user,
            created_at=time.time(),
            authorization=authorization,
        )
        saga = Saga(self, record)
        self.active[upload_id] = saga
        return saga

    def in_use(self, upload_id: str) -> bool:
        """Whether a saga of `upload_id` is alive here: its upload running, or its copies
        still being removed (records are keyed by upload id: a second upload under it
        would take the first one's record and lease)."""
        return upload_id in self.active

    def _forget(self, saga: Saga) -> None:
        if self.active.get(saga.upload_id) is saga:
            del self.active[saga.upload_id]

    def end(self, saga: Saga) -> None:
        """The upload's handler is done with it. A saga with nothing to compensate is
        forgotten here; one with copies left stays until its compensator finishes."""
        if not saga._compensating:
            self._forget(saga)
            if saga.maybe_stored:
                self._spawn(self._delete, saga)

    # --- store calls ------------------------------------------------------------------------

    async def write(
        self,
        saga: Saga,
        *,
        must_exist: bool | None = None,
        strict: bool = False,
        result: ResultWrite | None = None,
    ) -> bool:
        """Write the record (with `result`, see `SagaStore.put`). False only when the store
        says it is not ours: then the saga is lost. A store that is away raises
        `StoreUnavailable` when `strict`; otherwise it leaves the saga unsynced (the lease
        keeper writes it later) and returns True.

        A record once written must still be there (`must_exist`, by default whether one
        was): gone, another replica's janitor claimed it and undid the upload while this
        process could not reach the store. Written again, it would be this process's once
        more, the renewal that follows would find it ours, and the upload would be
        acknowledged on a copy that was removed (found by a review)."""
        if must_exist is None:
            must_exist = saga.written
        due = time.time() + self.lease_s
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                ok = await self.store.put(
                    saga.record, due=due, must_exist=must_exist, result=result
                )
        except (StoreUnavailable, trio.TooSlowError) as exc:
            self.reach.away(exc)
            saga.synced = False
            if may_have_run(exc):
                saga.unconfirmed_due = max(due, saga.unconfirmed_due or 0.0)
            if strict:
                raise StoreUnavailable(str(exc) or "timeout") from exc
            return True
        self.reach.back()
        if ok:
            saga.synced = saga.written = True
            saga.unconfirmed_due = None
        elif not saga.lost:
            saga.lost = True
            log.warning(
                "saga %s is no longer this process's: another ingester took it over",
                saga.upload_id,
                extra={"event": "saga_lost"},
            )
        return ok

    async def finish(self, saga: Saga, *, result: ResultWrite | None = None) -> bool:
        """Delete a written record that has nothing left to do (with `result`, see
        `SagaStore.delete`). False when it was not ours any more; raises
        `StoreUnavailable`. A record whose only write's outcome is unknown is deleted if it is
        there, without `result` (the caller writes that on its own): not there, before its
        due time, it never landed."""
        if not saga.maybe_stored:
            return True
        unconfirmed = not saga.written
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                deleted = await self.store.delete(
                    self.owner, saga.upload_id, result=None if unconfirmed else result
                )
        except (StoreUnavailable, trio.TooSlowError) as exc:
            self.reach.away(exc)
            raise StoreUnavailable(str(exc) or "timeout") from exc
        self.reach.back()
        claimable = saga.claimable()
        saga.written = saga.synced = False
        saga.unconfirmed_due = None
        return deleted or (unconfirmed and not claimable)

    async def _delete(self, saga: Saga) -> None:
        try:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                await self.store.delete(self.owner, saga.upload_id)
        except (StoreUnavailable, trio.TooSlowError) as exc:
            # Left behind, its lease runs out and a janitor finds nothing to do.
            self.reach.away(exc)
            return
        saga.written = saga.synced = False
        saga.unconfirmed_due = None

    # --- compensation -----------------------------------------------------------------------

    async def compensate_now(self, saga: Saga, copy: Copy) -> bool:
        """Remove `copy` (bounded): True when it is confirmed gone. A removal that found
        nothing on an element that may still commit the upload confirms nothing: the copy
        stays, to be checked again (`SagaRecord.landing`)."""
        record = saga.record
        removal = await self._compensate(copy, record.file_id, record.authorization)
        gone = record.landing.confirms(copy, removal, self._wall_clock())
        if not gone and removal is Removal.ABSENT:
            until = record.landing.until[copy.element_id]
            log.info(
                "%s on %s: not there (yet), but its element got the whole body and never "
                "answered, so it may still store it; checked again until %s",
                record.file_id,
                copy.element_id,
                time.strftime("%H:%M:%S", time.gmtime(until)),
                extra={"event": "compensation_recheck", "file_id": record.file_id},
            )
        self.metrics.compensations.labels("done" if gone else "retry").inc()
        return gone

    def compensate_one_soon(self, saga: Saga, copy: Copy) -> None:
        async def one() -> None:
            if await self.compensate_now(saga, copy):
                saga.record.forget(copy)

        self._spawn_fn(one)

    def resolve_in_background(self, saga: Saga) -> None:
        saga._compensating = True
        self.active[saga.upload_id] = saga
        self._spawn(self.resolve, saga)

    async def resolve(self, saga: Saga) -> None:
        """A settle whose outcome is unknown: ask the result's store (with backoff, for as
        long as it cannot answer) whether the result is there. There: the upload happened,
        a retry will be told of its copy, which stays (abandoned copies go). Not there: no
        retry can learn of any copy, and every one goes. The saga's lock is held meanwhile,
        so the lease keeper does not write the record as it stands."""
        assert saga.unresolved is not None
        commit, result = saga.unresolved
        record = saga.record

        async def ask() -> bool:
            with trio.fail_after(STORE_CALL_TIMEOUT_S):
                return await commit.recorded(result)

        def cannot_say(exc: Exception, wait: float) -> None:
            # A store that cannot answer, or a bug: never the end of the saga book (it runs
            # in the service nursery), and never a guess.
            bug = not isinstance(exc, ResultUnknown | trio.TooSlowError)
            log.log(
                logging.ERROR if bug else logging.INFO,
                "saga %s: the result's store cannot say yet (%s); again in %.1f s",
                saga.upload_id,
                exc or "timeout",
                wait,
                exc_info=bug,
                extra={"event": "saga_unresolved"},
            )

        async with saga.lock:
            recorded = await retry(
                ask, self.backoff, self._random.random, retry_on=Exception, on_retry=cannot_say
            )
            saga.unresolved = None
            # Whatever the lease keeper saw meanwhile, this process finishes the record.
            saga.lost = False
            if recorded:
                assert record.kept is not None
                record.settle_success(record.kept)
            else:
                record.settle_failure()
        log.warning(
            "saga %s resolved: the result %s; %s",
            saga.upload_id,
            "was recorded" if recorded else "was not recorded",
            "its copy stays" if recorded else "every copy goes",
            extra={"event": "saga_resolved", "file_id": record.file_id},
        )
        saga._compensating = False
        if record.copies:
            self.compensate_in_background(saga)
        else:
            self._forget(saga)
            await self._delete(saga)

    def compensate_in_background(self, saga: Saga) -> None:
        if not saga.record.copies:
            return
        saga._compensating = True
        self.active[saga.upload_id] = saga
        self._spawn(self._compensator, saga)

    async def _compensator(self, saga: Saga) -> None:
        """Remove every copy left, with backoff between rounds, until done. A saga this
        process lost goes on too: its record may be gone because the store lost it, not
        because a replica took it over, and removing a copy twice does no harm (a lost saga
        is never acknowledged, so none of its copies is kept; its record writes and its
        delete change nothing that is not this process's)."""
        record = saga.record

        async def round_() -> None:
            for copy in record.targets():
                if await self.compensate_now(saga, copy):
                    record.forget(copy)
            if not record.targets():
                return
            record.attempts += 1
            record.last_error = f"{len(record.copies)} copies could not be removed yet"
            async with saga.lock:
                await self.write(saga)
            # A copy that may still land is checked once more as its window closes, however
            # long the backoff has grown.
            within_s = record.landing.next_end(record.copies, self._wall_clock())
            raise TryAgain(record.last_error, within_s=within_s)

        try:
            # The backoff goes on from the attempts the record carries (a claimed one's too).
            await retry(round_, self.backoff, self._random.random, failures=record.attempts)
            log.info(
                "saga %s compensated after %d retries",
                saga.upload_id,
                record.attempts,
                extra={"event": "saga_compensated", "file_id": record.file_id},
            )
            await self._delete(saga)
        finally:
            saga._compensating = False
            self._forget(saga)

    # --- background tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.leases.keep)
            nursery.start_soon(self.leases.janitor)
            task_status.started()

    def _spawn(self, fn: Callable[[Saga], Awaitable[None]], saga: Saga) -> None:
        self._spawn_fn(lambda: fn(saga))

    def _spawn_fn(self, fn: Callable[[], Awaitable[None]]) -> None:
        if self._nursery is None:  # pragma: no cover - uploads start after the service
            raise RuntimeError("the saga book is not running")
        self._nursery.start_soon(fn)

    async def renew(self) -> None:
        """One round of the lease keeper (`Leases.renew`)."""
        await self.leases.renew()

    async def _catch_up(self) -> None:
        """Before a renewal: write the records a store outage kept from being written."""
        for saga in [s for s in self.active.values() if s.record.copies and not s.synced]:
            try:
                # Held: its owner is writing it right now, which syncs it.
                saga.lock.acquire_nowait()
            except trio.WouldBlock:
                continue
            try:
                if saga.record.copies and not saga.synced:
                    await self.write(saga)
            finally:
                saga.lock.release()
            if saga.maybe_stored and saga.upload_id not in self.active:
                # Ended while this write was in flight: nothing will renew it, so it goes.
                self._spawn(self._delete, saga)

    def _lost(self, upload_id: str) -> None:
        mine = self.active.get(upload_id)
        if mine is not None and mine.written:
            log.warning(
                "lost the lease on saga %s: another ingester took it over",
                upload_id,
                extra={"event": "saga_lost"},
            )
            mine.lost = True

    async def _claim(self, now: float, due: float) -> list[SagaRecord]:
        claimed = await self.store.claim_due(self.owner, now=now, due=due, limit=CLAIM_BATCH)
        self.metrics.compensation_backlog.set(await self.store.backlog())
        return claimed

    def _take_over(self, record: SagaRecord) -> None:
        """A record the janitor claimed (its owner's lease ran out): compensate it."""
        if record.upload_id in self.active:
            # Ours and alive: a late renewal, not a dead owner.
            return
        previous = record.owner
        record.owner = self.owner
        if previous != self.owner:
            self.metrics.saga_takeovers.inc()
        was = record.state.value
        if record.state in (SagaState.RECEIVING, SagaState.STORED):
            record.settle_failure()
        log.warning(
            "took over saga %s of %s (%s): removing %d copies",
            record.upload_id,
            previous,
            was,
            len(record.targets()),
            extra={"event": "saga_takeover", "file_id": record.file_id},
        )
        saga = Saga(self, record)
        saga.written = saga.synced = True
        saga.settled = True
        if record.targets():
            self.compensate_in_background(saga)
        else:
            self._spawn(self._delete, saga)
