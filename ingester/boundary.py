"""Where the errors of the libraries we call become the project's, in one place to read
(as httpcore's `map_exceptions` does for its transports).

- **Storage Elements** (httpx): `element_error` maps httpx's exception tree onto ours
  (connect failures and resets are `StorageElementUnavailable`, stalls
  `StorageElementTimeout`), so failover, breakers and retries see one vocabulary.
- **Other HTTP services** (the JWKS endpoint, the token endpoint, the Admin Module): each
  has an error of its own that callers act on; `http_errors(to)` turns any httpx error
  into it, and `describe` is the one way their messages name the cause.
- **Redis** (redis-py): `redis_errors()` turns every `redis.RedisError` (and a socket error
  a path of redis-py leaves unwrapped) into `RedisUnavailable`. redis-py itself is loaded
  only when the first Redis call fails or a client is made (see `storage.redis_gateway`).

Nothing here does I/O.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from .errors import StorageElementError, StorageElementTimeout, StorageElementUnavailable


class RedisUnavailable(Exception):
    """Redis could not be reached, did not answer in time, or refused the command.

    `may_have_run`: False only when the command never left (no connection could be made:
    refused, unreachable, a Sentinel that names no master). Otherwise a write that fails
    this way may or may not have taken effect: a reply that times out or a connection lost
    after the send says nothing of what Redis did (measured: a `SET` to a frozen Redis times
    out, and the key is there once Redis resumes)."""

    def __init__(self, message: str, *, may_have_run: bool = True) -> None:
        super().__init__(message)
        self.may_have_run = may_have_run


def may_have_run(exc: BaseException) -> bool:
    """Whether a Redis call that failed with `exc` may still have taken effect. Only a
    `RedisUnavailable` raised before anything was sent says it did not, as itself or as
    the cause of a store's own error; anything else (a timeout's call is abandoned, not
    stopped) may have."""
    cause = exc if isinstance(exc, RedisUnavailable) else exc.__cause__
    return not isinstance(cause, RedisUnavailable) or cause.may_have_run


def describe(exc: BaseException) -> str:
    """`Type: message`, or the type alone when the exception says nothing more."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextmanager
def http_errors(to: Callable[[httpx.HTTPError], Exception]) -> Iterator[None]:
    """Inside the block, an httpx error is raised as `to(error)` (chained to it)."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise to(exc) from exc


def element_error(exc: httpx.HTTPError, element_id: str) -> StorageElementError:
    """httpx's exception tree onto ours, for a call to Storage Element `element_id`."""
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return StorageElementUnavailable(f"{element_id}: connect timeout", element_id=element_id)
    if isinstance(exc, httpx.WriteTimeout):
        return StorageElementTimeout(
            f"{element_id} stopped accepting data (write timeout)", element_id=element_id
        )
    if isinstance(exc, httpx.TimeoutException):
        return StorageElementTimeout(f"{element_id}: {type(exc).__name__}", element_id=element_id)
    if isinstance(exc, httpx.ConnectError):
        return StorageElementUnavailable(f"{element_id}: cannot connect", element_id=element_id)
    if isinstance(exc, httpx.TransportError):
        return StorageElementUnavailable(
            f"{element_id}: connection failed ({type(exc).__name__}: {exc})",
            element_id=element_id,
        )
    return StorageElementError(f"{element_id}: {type(exc).__name__}", element_id=element_id)


@contextmanager
def element_errors(element_id: str) -> Iterator[None]:
    """`http_errors` for a call to Storage Element `element_id`."""
    with http_errors(lambda exc: element_error(exc, element_id)):
        yield


@contextmanager
def redis_errors() -> Iterator[None]:
    """Inside the block, redis-py's errors are raised as `RedisUnavailable`."""
    import redis  # the gateway's callers have loaded it already

    try:
        yield
    # OSError too: a socket error a path of redis-py leaves unwrapped is the same outage.
    except (redis.RedisError, OSError) as exc:
        raise RedisUnavailable(
            str(exc) or type(exc).__name__, may_have_run=not _while_connecting(exc)
        ) from exc


# redis-py's functions that make a connection: a command is sent only once they returned.
_CONNECTING = frozenset({"connect", "connect_check_health"})


def _while_connecting(exc: BaseException) -> bool:
    """Whether redis-py raised `exc` while making a connection (every command sends on a
    connected socket, so none of the call's commands left). Read from the traceback, the
    one place that says where it was raised: redis-py's connect errors are the same types
    as its read errors."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _CONNECTING and f"{os.sep}redis{os.sep}" in code.co_filename:
            return True
        tb = tb.tb_next
    return False
