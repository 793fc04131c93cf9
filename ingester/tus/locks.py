"""One request at a time per upload, across replicas, without making a reconnecting client
wait for a connection that is already dead.

A request that wants an upload held by another (its client's old connection, often still
open on another replica) sets the let-go flag and tries the lock every `ACQUIRE_POLL_S`.
The holder renews its lock every `KEEP_INTERVAL_S`, sees the flag, stops reading, saves
what it has (fsync, then the offset) and lets go; the waiting request takes the lock within
about a renewal interval plus the save. Only a holder that does not let go within
`wait_s` (it is storing the finished upload, or it died and its lock must run out) makes
the waiter answer `423`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

import trio

from ..boundary import may_have_run
from ..concurrency import cleanup_scope, collapse
from .errors import TusStoreUnavailable, UploadLocked
from .guarded_store import GuardedStore
from .state import TusUpload
from .store import LockState

log = logging.getLogger(__name__)

# How often a waiting request tries the lock: the delay it adds after the holder let go.
ACQUIRE_POLL_S: Final = 0.05
# The let-go flag is set again this often while waiting: a third request that took the
# lock meanwhile cleared it.
ASK_AGAIN_S: Final = 1.0
# How often a holder renews its lock and looks at the let-go flag: the let-go latency, and
# one Redis call per interval per upload being received.
KEEP_INTERVAL_S: Final = 0.2


@dataclass(slots=True, eq=False)
class Lease:
    upload_id: str
    token: str
    # A holder that is storing the finished upload does not let go (it would abandon it).
    honour_letgo: bool = True
    asked: bool = False
    lost: bool = False
    # Cancelled when the holder must stop what it is doing: asked to let go, or lock lost.
    interrupt: trio.CancelScope = field(default_factory=trio.CancelScope)
    # (trio time) Before the store last set or renewed the lock: its time to live runs
    # from no earlier than this.
    confirmed_at: float = field(default_factory=trio.current_time)


class Locks:
    def __init__(self, store: GuardedStore, *, ttl_s: float, wait_s: float, retry_after_s: int):
        self.store = store
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s

    async def try_acquire(self, upload_id: str) -> Lease | None:
        token = secrets.token_hex(16)
        asked_at = trio.current_time()
        taken, _ = await self._try_lock(upload_id, token, read=False)
        if taken:
            return Lease(upload_id, token, confirmed_at=asked_at)
        return None

    async def _try_lock(
        self, upload_id: str, token: str, *, read: bool
    ) -> tuple[bool, TusUpload | None]:
        """Whether the lock was taken, and with `read`, the upload's state as it was then."""
        try:
            if read:
                return await self.store.try_lock_and_get(upload_id, token, self.ttl_s)
            return await self.store.try_lock(upload_id, token, self.ttl_s), None
        except TusStoreUnavailable as exc:
            if may_have_run(exc):
                # The lock may be set with its reply lost: left there, it would hold the
                # upload (`423` to the client's next request) for its whole time to live.
                # The release is this token's only.
                await self.release(Lease(upload_id, token))
            raise
        except trio.Cancelled:
            # The request went away while the call ran in its thread, which goes on
            # without us and may still set the lock under a token nobody else knows: the
            # same release (shielded, bounded), for the same reason.
            await self.release(Lease(upload_id, token))
            raise

    async def acquire(self, upload_id: str, *, ask: bool, wait_s: float | None = None) -> Lease:
        """The upload's lock, asking its holder to let go when `ask`; `UploadLocked` after
        `wait_s` (default: the configured wait)."""
        lease, _ = await self._acquire(upload_id, ask=ask, wait_s=wait_s, read=False)
        return lease

    async def acquire_reading(self, upload_id: str, *, ask: bool) -> tuple[Lease, TusUpload | None]:
        """`acquire`, and the upload's state read in the same step as the lock was taken
        (None: there is none): what a `store.get` right after would read, since only the
        lock's holder writes the state."""
        return await self._acquire(upload_id, ask=ask, wait_s=None, read=True)

    async def _acquire(
        self, upload_id: str, *, ask: bool, wait_s: float | None, read: bool
    ) -> tuple[Lease, TusUpload | None]:
        token = secrets.token_hex(16)
        deadline = trio.current_time() + (self.wait_s if wait_s is None else wait_s)
        next_ask = 0.0
        while True:
            asked_at = trio.current_time()
            taken, state = await self._try_lock(upload_id, token, read=read)
            if taken:
                return Lease(upload_id, token, confirmed_at=asked_at), state
            now = trio.current_time()
            if now >= deadline:
                raise UploadLocked(
                    "another request is working on this upload and did not let go; retry shortly",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            if ask and now >= next_ask:
                await self.store.ask(upload_id, self.ttl_s)
                next_ask = now + ASK_AGAIN_S
            await trio.sleep(ACQUIRE_POLL_S)

    async def keep(self, lease: Lease) -> None:
        """Renew `lease` until cancelled. When asked to let go (and the lease honours it), or
        when the lock is lost (a renewal failed for half its time to live), cancel
        `lease.interrupt`. The half of the time to live a failing store is given counts from
        the lock's last confirmation (its acquisition, the first time), not from the start
        of the keep: a lease kept only once its request reaches the body was taken earlier,
        and its lock runs out as early."""
        while True:
            await trio.sleep(KEEP_INTERVAL_S)
            asked_at = trio.current_time()
            try:
                with trio.fail_after(self.ttl_s / 2):
                    state = await self.store.keep(lease.upload_id, lease.token, self.ttl_s)
            except (TusStoreUnavailable, trio.TooSlowError) as exc:
                if trio.current_time() - lease.confirmed_at < self.ttl_s / 2:
                    continue
                log.warning(
                    "lost the lock of upload %s: %s",
                    lease.upload_id,
                    exc,
                    extra={"event": "tus_lock_lost", "upload_id": lease.upload_id},
                )
                state = LockState.LOST
            else:
                lease.confirmed_at = asked_at
            if state is LockState.LOST:
                lease.lost = True
                lease.interrupt.cancel()
                return
            if state is LockState.ASKED and lease.honour_letgo and not lease.asked:
                log.info(
                    "another request wants upload %s: letting go",
                    lease.upload_id,
                    extra={"event": "tus_let_go", "upload_id": lease.upload_id},
                )
                lease.asked = True
                lease.interrupt.cancel()

    @asynccontextmanager
    async def kept(self, *leases: Lease) -> AsyncIterator[None]:
        """Run `keep` for each lease for the body of the block, whose errors come out as
        they are. The first lease is the one whose `interrupt` the block enters: the loss of
        any other (a final upload's partial uploads) cancels it too, since the block reads
        what they hold (found by a review: a lost partial's lease cancelled a scope no one
        was in, and the store read on while another request had the partial)."""
        for other in leases[1:]:
            other.interrupt = leases[0].interrupt
        try:
            async with trio.open_nursery() as nursery:
                for lease in leases:
                    nursery.start_soon(self.keep, lease)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The block's own error, not wrapped by the keeper's nursery (a group of
            # nothing but Cancelled goes on as it is).
            error = collapse(group)
            if error is group:
                raise
            raise error from None

    async def release(self, lease: Lease) -> None:
        """Shielded and bounded: a release that cannot reach the store leaves the lock to
        run out on its own."""
        with cleanup_scope(self.ttl_s):
            try:
                await self.store.release(lease.upload_id, lease.token)
            except TusStoreUnavailable as exc:
                log.warning("could not release the lock of %s: %s", lease.upload_id, exc)
