"""Request bodies with backpressure, for every QuartTrio app of this project.

Quart's ASGI connection copies each `http.request` message into an unbounded buffer as fast
as hypercorn delivers it, so a handler slower than the client lets memory grow without
limit (measured: about 2 GB in 8 s). Here the connection stops pulling `receive()` while
`body_buffer_limit` bytes are unread; hypercorn's bounded app queue then fills, it stops
reading the socket, and the client's TCP window closes. A slow Storage Element thereby slows
the client, not our memory.

Answering before the body is read (413, 415, 400) leaves the rest of the body unread, and
closing a socket with unread input makes the kernel send RST, which can destroy the answer
before the client reads it (a client like httpx reads only after it has sent its body).
Such answers carry `Connection: close`; their bytes are sent at once, but the final ASGI
message (after which hypercorn closes) waits while the rest of the body is read and
discarded: a lingering close, bounded in time and bytes, that ends early when the client
pauses.

A body may also have a minimum rate (`ingester.http.pace`): waiting for the client past it
raises `ClientTooSlow` (408) from the read, whoever reads (the multipart reader, a tus
PATCH), so the upload's slot and memory are freed like after any other error.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart.wrappers import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest

from ..errors import ClientTooSlow
from .pace import ClientPace
from .receive import ReceiveShare

# Defaults for apps built without settings (the reference Storage Element uses these too).
DEFAULT_BUFFER_LIMIT: Final = 1024 * 1024
# The end of a response is sent shielded from cancellation, but not forever.
FINAL_SEND_TIMEOUT_S: Final = 5.0
# Lingering close after an early answer: long enough for a client to finish sending a
# modest body, short enough that a client that never stops costs little.
LINGER_S: Final = 3.0
LINGER_BYTES: Final = 64 * 1024 * 1024
# A client that sends nothing for this long while we linger is not going to.
LINGER_PAUSE_S: Final = 0.25


class BoundedBody(TrioBody):
    """A body buffer that tells the ASGI receiver when it is full.

    It keeps the received chunks as they are instead of Quart's bytearray, which copied
    every byte twice (extend, then bytes()) on the way to the handler.
    """

    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    # When set, the limit shrinks as more connections receive at once (`.receive`).
    receive_share: ReceiveShare | None = None
    # The minimum rate (0: none): bytes per window of waiting for the client.
    min_rate_bytes: int = 0
    min_rate_window_s: float = 60.0

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        # Size limits are the handlers' job (they count bytes and answer 413 themselves).
        super().__init__(expected_content_length, None)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._room = trio.Event()
        self._room.set()
        self._discarding = False
        self._arrived = trio.Event()
        self.discarded = 0
        self.pace = (
            ClientPace(self.min_rate_bytes, self.min_rate_window_s) if self.min_rate_bytes else None
        )

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self._discarding:
            self.discarded += len(data)
            self._arrived.set()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._has_data.set()
        if self._buffered >= self._limit() and self._room.is_set():
            self._room = trio.Event()

    def _limit(self) -> int:
        share = self.receive_share
        return self.buffer_limit if share is None else share.body_limit(self.buffer_limit)

    async def __anext__(self) -> bytes:
        if not self._complete.is_set():
            await self._wait_for_data()
        if self._complete.is_set() and not self._chunks:
            raise StopAsyncIteration
        # One received piece at a time, as hypercorn delivered it: joining them would copy.
        chunk = self._chunks.pop(0)
        self._buffered -= len(chunk)
        if not self._chunks:
            self._has_data.clear()
        if self._buffered < self._limit():
            self._room.set()
        if self.pace is not None:
            self.pace.arrived(len(chunk))
        return chunk

    async def _wait_for_data(self) -> None:
        pace = self.pace
        if pace is None:
            await self._has_data.wait()
            return
        if self._has_data.is_set():
            return  # buffered already: no waiting, and never refused
        started = trio.current_time()
        with trio.move_on_after(pace.wait_left()) as slow:
            await self._has_data.wait()
        pace.waited_for(trio.current_time() - started)
        if slow.cancelled_caught:
            raise ClientTooSlow(
                f"the body came slower than {pace.min_bytes} bytes per {pace.window_s:g} s "
                "(INGESTER_CLIENT_MIN_RATE_BYTES, INGESTER_CLIENT_MIN_RATE_WINDOW_S)"
            )

    def __await__(self) -> Generator[Any, None, bytes]:
        yield from self._complete.wait().__await__()
        return b"".join(self._chunks)

    def clear(self) -> None:
        self._chunks.clear()
        self._buffered = 0

    @property
    def complete(self) -> bool:
        return bool(self._complete.is_set())

    async def wait_for_room(self) -> None:
        while self._buffered >= self._limit() and not self._discarding:
            if self._room.is_set():
                # The limit shrank (more connections receive now) since room was made.
                self._room = trio.Event()
            await self._room.wait()

    def set_complete(self) -> None:
        super().set_complete()
        self._arrived.set()

    async def drain(self) -> None:
        """Read and drop the rest of the body, within the lingering-close bounds."""
        self._discarding = True
        self._chunks.clear()
        self._buffered = 0
        self._room.set()
        with trio.move_on_after(LINGER_S):
            while not self.complete and self.discarded < LINGER_BYTES:
                self._arrived = trio.Event()
                with trio.move_on_after(LINGER_PAUSE_S) as pause:
                    await self._arrived.wait()
                if pause.cancelled_caught:
                    return


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


class BackpressureHTTPConnection(TrioASGIHTTPConnection):
    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, receive: ASGIReceiveCallable
    ) -> None:
        body = request.body
        while True:
            if isinstance(body, BoundedBody):
                await body.wait_for_room()
            message: Any = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Request, send: ASGISendCallable
    ) -> None:
        response = await self.app.handle_request(request)
        body = request.body
        # A request without a body (a probe, a GET) often gets its answer before the ASGI
        # message that ends its empty body arrives: nothing is left to read, so no linger
        # and no `Connection: close` (which cost every probe a new connection).
        linger = isinstance(body, BoundedBody) and not body.complete and _has_body(request)
        if linger:
            response.headers["Connection"] = "close"

        async def send_end_shielded(message: Any) -> None:
            # The last body message makes hypercorn recycle the connection for keep-alive and
            # start its idle timer within this call; the same call delivers http.disconnect,
            # whose cancellation would land inside the recycling. The idle timer then never
            # starts: idle connections are never closed, and shutdown waits its whole grace.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                if linger and isinstance(body, BoundedBody):
                    await body.drain()
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + FINAL_SEND_TIMEOUT_S
                    await send(message)
            else:
                await send(message)

        # Streaming responses (downloads) must not be cut by Quart's RESPONSE_TIMEOUT: the
        # client's own pace decides; hypercorn's keep-alive timeout covers dead peers.
        await self._send_response(send_end_shielded, response)
        nursery.cancel_scope.cancel()


def _has_body(request: Request) -> bool:
    """Whether the request's framing announces body bytes (RFC 9112 section 6.3)."""
    if "Transfer-Encoding" in request.headers:
        return True
    length = request.headers.get("Content-Length")
    return length is not None and length.strip() not in ("", "0")
