"""Chunked request bodies go to elements without a copy of every byte.

httpcore sends each body piece through h11's `Connection.send`, which joins a chunked
frame's three parts (size line, data, CRLF) into one new `bytes`: a memcpy of every byte of
an upload whose length is not known beforehand (a form whose fields may still follow the
file), on the event loop, holding the GIL. py-spy (`python -m bench.profile --gil`, file-only
forms) put 12% of the event loop's GIL samples on that join. Here a large `Data` event's
parts go out as they are, in one `sendmsg` (scatter-gather): the size line and the CRLF
cost a few bytes each, the data none.

**Small writes are gathered.** httpcore writes a request's head, then each body piece,
then the end of a chunked body, each with its own `sendto`: five for a 4 KiB upload (head,
the form's head, the file, the form's tail, the last chunk), and as many TCP segments for
the element to wake up to. Here the head and small pieces wait in the connection and go
out together with the next large piece or the end of the body, in one `sendmsg`: a small
upload's whole request in one write. Nothing is held past the end of a request, and a
request that fails before its end was never seen by the element.

Everything else goes httpcore's own way: TLS streams (no `sendmsg`), and any stream that
is not trio's. A body may also hand out `Pieces`, several
buffers as one piece, which go out the same way, unjoined. httpcore and h11 are pinned (pyproject);
`tests/integration/test_vectored_send.py` checks the hook over real sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import inf
from typing import Any, Final, cast

import h11
import httpcore
import trio
from httpcore._async.http11 import AsyncHTTP11Connection
from httpcore._backends.trio import TrioStream

from ..buffers import IOV_MAX, Buffer, remaining

# Below this, one joined write costs less than building the vector.
VECTORED_MIN_BYTES: Final = 64 * 1024


class Pieces:
    """Several buffers sent as one body piece: one chunked frame, one `sendmsg`, and no
    join. A batch of socket reads goes to the element this way, where joining it cost a copy
    of every byte. Where no vector can be sent (TLS), the hook joins it first."""

    __slots__ = ("_size", "parts")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts: tuple[Buffer, ...] = tuple(p for p in parts if len(p))
        self._size = sum(len(p) for p in self.parts)

    def __len__(self) -> int:
        return self._size

    def joined(self) -> Buffer:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)

    def simplest(self) -> Buffer | Pieces:
        """Its one buffer as it is (h11 then sends a whole `bytes` without a copy even where
        the vectored send does not apply), else itself."""
        return self.parts[0] if len(self.parts) == 1 else self

    def split(self, size: int) -> tuple[Pieces, Pieces]:
        """The first `size` bytes and the rest (views: no copy)."""
        head: list[Buffer] = []
        rest: list[Buffer] = []
        for part in self.parts:
            if size >= len(part):
                head.append(part)
                size -= len(part)
            elif size:
                view = memoryview(part)
                head.append(view[:size])
                rest.append(view[size:])
                size = 0
            else:
                rest.append(part)
        return Pieces(head), Pieces(rest)


def flat(parts: Sequence[Buffer | Pieces]) -> list[Buffer]:
    """h11's output for one event, with any `Pieces` opened into its buffers (pure)."""
    out: list[Buffer] = []
    for part in parts:
        if type(part) is Pieces:
            out.extend(part.parts)
        else:
            out.append(part)  # type: ignore[arg-type]
    return out


_original_send_event = AsyncHTTP11Connection._send_event


async def send_parts(stream: trio.SocketStream, parts: Sequence[Buffer]) -> None:
    """Every byte of `parts`, in order, with as few `sendmsg` calls as the socket allows;
    a failed socket as httpcore's own `WriteError`, like its `TrioStream.write`."""
    views = remaining(parts, 0)
    try:
        while views:
            # At most IOV_MAX buffers per call (Linux refuses more with EMSGSIZE, and sends
            # nothing): a batch of a slow client's tiny reads holds thousands.
            sent = await stream.socket.sendmsg(views[:IOV_MAX])
            views = remaining(views, sent)
    except (OSError, trio.ClosedResourceError) as exc:
        raise httpcore.WriteError(str(exc)) from exc


def _socket_stream(connection: AsyncHTTP11Connection) -> trio.SocketStream | None:
    stream: Any = connection._network_stream
    if isinstance(stream, TrioStream) and isinstance(stream._stream, trio.SocketStream):
        return stream._stream
    return None


# Where a connection keeps the small writes not sent yet (see the module).
_PENDING: Final = "_ingester_pending"


async def _send_event(
    self: AsyncHTTP11Connection,
    event: h11.Event,
    timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
) -> None:
    stream = _socket_stream(self)
    kind = type(event)
    data: Any = event.data if kind is h11.Data else None  # type: ignore[attr-defined]
    if stream is None:
        if type(data) is Pieces:
            # h11 takes any bytes-like piece (a memoryview too), as it did before the hook.
            event = h11.Data(data=cast(bytes, data.joined()))
        await _original_send_event(self, event, timeout)
        return
    pending: list[Buffer] = getattr(self, _PENDING, None) or []
    if data is not None and (type(data) is Pieces or len(data) >= VECTORED_MIN_BYTES):
        parts = flat(self._h11_state.send_with_data_passthrough(event) or ())
        await _flush(self, stream, [*pending, *parts], timeout)
        return
    out = self._h11_state.send(event)
    if out:
        pending.append(out)
    if kind is h11.Request or (
        kind is h11.Data and sum(len(p) for p in pending) < VECTORED_MIN_BYTES
    ):
        # The head, or a small piece: it waits for the next write.
        setattr(self, _PENDING, pending)
        return
    # The end of the body (or a large enough heap of small pieces): out with all of it.
    await _flush(self, stream, pending, timeout)


async def _flush(
    connection: AsyncHTTP11Connection,
    stream: trio.SocketStream,
    parts: list[Buffer],
    limit_s: float | None,
) -> None:
    setattr(connection, _PENDING, None)
    if not parts:
        return
    try:
        with trio.fail_after(inf if limit_s is None else limit_s):
            await send_parts(stream, parts)
    except trio.TooSlowError as exc:
        raise httpcore.WriteTimeout(str(exc)) from exc


def install() -> None:
    """Route httpcore's large body pieces through `send_parts` (idempotent)."""
    AsyncHTTP11Connection._send_event = _send_event  # type: ignore[method-assign]


def installed() -> bool:
    return AsyncHTTP11Connection._send_event is _send_event


# Installed on import: whatever can make `Pieces` (the element body imports them from here)
# has the send that understands them.
install()
