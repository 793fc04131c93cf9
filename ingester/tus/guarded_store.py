"""The tus state store as the tus service uses it.

The stores (`ingester.tus.store`) are adapters: when Redis cannot be reached they raise the
gateway's `RedisUnavailable`, as every store does. What that means to a tus client is the
tus service's business: here it becomes `TusStoreUnavailable`, the 503 (with `Retry-After`)
the tus routes answer, and the error the lock keeper, the result check and the cleanups
already expect of a store. Everything the service, its locks and its results do with the
state goes through this one class, so no path meets an unmapped Redis error.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from ..boundary import RedisUnavailable
from ..saga.commit import ResultWrite
from .errors import TusStoreUnavailable
from .state import TusUpload
from .store import LockState, QuotaRefusal, TusStore

_T = TypeVar("_T")


async def _answered(call: Awaitable[_T]) -> _T:
    try:
        return await call
    except RedisUnavailable as exc:
        raise TusStoreUnavailable(f"Redis: {exc}") from exc


class GuardedStore:
    """A `TusStore` whose unreachability is `TusStoreUnavailable`."""

    def __init__(self, store: TusStore) -> None:
        self.inner = store

    async def create(self, upload: TusUpload) -> bool:
        return await _answered(self.inner.create(upload))

    async def get(self, upload_id: str) -> TusUpload | None:
        return await _answered(self.inner.get(upload_id))

    async def put(self, upload: TusUpload, token: str) -> bool:
        return await _answered(self.inner.put(upload, token))

    def result_write(self, upload: TusUpload, token: str) -> ResultWrite | None:
        return self.inner.result_write(upload, token)

    async def delete(self, upload_id: str, token: str) -> bool:
        return await _answered(self.inner.delete(upload_id, token))

    async def due(self, now: float, limit: int) -> list[str]:
        return await _answered(self.inner.due(now, limit))

    async def forget(self, upload_id: str) -> None:
        await _answered(self.inner.forget(upload_id))

    async def try_lock(self, upload_id: str, token: str, ttl_s: float) -> bool:
        return await _answered(self.inner.try_lock(upload_id, token, ttl_s))

    async def try_lock_and_get(
        self, upload_id: str, token: str, ttl_s: float
    ) -> tuple[bool, TusUpload | None]:
        return await _answered(self.inner.try_lock_and_get(upload_id, token, ttl_s))

    async def keep(self, upload_id: str, token: str, ttl_s: float) -> LockState:
        return await _answered(self.inner.keep(upload_id, token, ttl_s))

    async def release(self, upload_id: str, token: str) -> None:
        await _answered(self.inner.release(upload_id, token))

    async def ask(self, upload_id: str, ttl_s: float) -> None:
        await _answered(self.inner.ask(upload_id, ttl_s))

    async def reserve(
        self, owner: str, upload_id: str, size: int, *, max_uploads: int, max_bytes: int
    ) -> QuotaRefusal | None:
        return await _answered(
            self.inner.reserve(owner, upload_id, size, max_uploads=max_uploads, max_bytes=max_bytes)
        )

    async def unreserve(self, owner: str, upload_id: str) -> None:
        await _answered(self.inner.unreserve(owner, upload_id))
