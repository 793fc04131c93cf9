"""Chunked request bodies go to elements without a copy of every byte.

httpcore sends each body piece through h11's `Connection.send`, which joins a chunked
frame's three parts (size line, data, CRLF) into one new `bytes`: a memcpy of every byte of
an upload whose length is not known beforehand (a form whose fields may still follow the
file), on the event loop, holding the GIL. py-spy (`python -m bench.profile --gil`, file-only
forms) put 12% of the event loop's GIL samples on that join. Here a large `Data` event's
parts go out as they are, in one `sendmsg` (scatter-gather): the size line and the CRLF
cost a few bytes each, the data none.

Everything else goes httpcore's own way: small pieces, other events, TLS streams (no
`sendmsg`), and any stream that is not trio's. httpcore and h11 are pinned (pyproject);
`tests/unit/test_vectored.py` checks the hook still finds what it patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import inf
from typing import Any, Final

import h11
import httpcore
import trio
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._backends.trio import TrioStream

# Below this, one joined write costs less than building the vector.
VECTORED_MIN_BYTES: Final = 64 * 1024

Buffer = bytes | bytearray | memoryview

_original_send_event = AsyncHTTP11Connection._send_event


def remaining(parts: Sequence[Buffer], sent: int) -> list[memoryview]:
    """What is left of `parts` once `sent` bytes of them went out (pure)."""
    views: list[memoryview] = []
    for part in parts:
        view = memoryview(part)
        if sent >= len(view):
            sent -= len(view)
            continue
        views.append(view[sent:] if sent else view)
        sent = 0
    return views


async def send_parts(stream: trio.SocketStream, parts: Sequence[Buffer]) -> None:
    """Every byte of `parts`, in order, with as few `sendmsg` calls as the socket allows;
    a failed socket as httpcore's own `WriteError`, like its `TrioStream.write`."""
    views = remaining(parts, 0)
    try:
        while views:
            sent = await stream.socket.sendmsg(views)
            views = remaining(views, sent)
    except (OSError, trio.ClosedResourceError) as exc:
        raise httpcore.WriteError(str(exc)) from exc


def _socket_stream(connection: AsyncHTTP11Connection) -> trio.SocketStream | None:
    stream: Any = connection._network_stream
    if isinstance(stream, TrioStream) and isinstance(stream._stream, trio.SocketStream):
        return stream._stream
    return None


async def _send_event(
    self: AsyncHTTP11Connection,
    event: h11.Event,
    timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
) -> None:
    if type(event) is h11.Data and len(event.data) >= VECTORED_MIN_BYTES:
        stream = _socket_stream(self)
        if stream is not None:
            parts = self._h11_state.send_with_data_passthrough(event)
            if parts:
                try:
                    with trio.fail_after(inf if timeout is None else timeout):
                        await send_parts(stream, parts)
                except trio.TooSlowError as exc:
                    raise httpcore.WriteTimeout(str(exc)) from exc
            return
    await _original_send_event(self, event, timeout)


def install() -> None:
    """Route httpcore's large body pieces through `send_parts` (idempotent)."""
    AsyncHTTP11Connection._send_event = _send_event  # type: ignore[method-assign]


def installed() -> bool:
    return AsyncHTTP11Connection._send_event is _send_event
