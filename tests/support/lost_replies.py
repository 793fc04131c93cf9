"""How a Redis command fails, for in-process fakes of the stores (no I/O)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NoReturn

from ingester.boundary import RedisUnavailable


async def fail_as_redis(write: Callable[[], Awaitable[object]], *, landed: bool) -> NoReturn:
    """Fail as a Redis command does: having run `write` when `landed` (its reply lost, as
    on a read timeout), else refused before anything was sent (nobody listening)."""
    if landed:
        await write()
        raise RedisUnavailable("Timeout reading from socket")
    raise RedisUnavailable("Connection refused", may_have_run=False)
