"""Chunked request bodies go to elements without a copy of every byte.

httpcore sends each body piece through h11's `Connection.send`, which joins a chunked
frame's three parts (size line, data, CRLF) into one new `bytes`: a memcpy of every byte of
an upload whose length is not known beforehand (a form whose fields may still follow the
file), on the event loop, holding the GIL. py-spy (`python -m bench.profile --gil`, file-only
forms) put 12% of the event loop's GIL samples on that join. Here a large `Data` event's
parts go out as they are, in one `sendmsg` (scatter-gather): the size line and the CRLF
cost a few bytes each, the data none.

Everything else goes httpcore's own way: small pieces, other events, TLS streams (no
`sendmsg`), and any stream that is not trio's. A body may also hand out `Pieces`, several
buffers as one piece, which go out the same way, unjoined. httpcore and h11 are pinned (pyproject);
`tests/integration/test_vectored_send.py` checks the hook over real sockets.
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


async def _send_event(
    self: AsyncHTTP11Connection,
    event: h11.Event,
    timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
) -> None:
    if type(event) is h11.Data:
        data: Any = event.data
        several = type(data) is Pieces
        if several or len(data) >= VECTORED_MIN_BYTES:
            stream = _socket_stream(self)
            if stream is not None:
                parts = self._h11_state.send_with_data_passthrough(event)
                if parts:
                    try:
                        with trio.fail_after(inf if timeout is None else timeout):
                            await send_parts(stream, flat(parts))
                    except trio.TooSlowError as exc:
                        raise httpcore.WriteTimeout(str(exc)) from exc
                return
            if several:
                event = h11.Data(data=data.joined())
    await _original_send_event(self, event, timeout)


def install() -> None:
    """Route httpcore's large body pieces through `send_parts` (idempotent)."""
    AsyncHTTP11Connection._send_event = _send_event  # type: ignore[method-assign]


def installed() -> bool:
    return AsyncHTTP11Connection._send_event is _send_event


# Installed on import: whatever can make `Pieces` (the element body imports them from here)
# has the send that understands them.
install()
