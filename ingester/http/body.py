"""Request bodies with backpressure, for every QuartTrio app of this project.

Quart's ASGI connection copies each `http.request` message into an unbounded buffer as fast
as hypercorn delivers it, so a handler slower than the client lets memory grow without
limit (measured: about 2 GB in 8 s). Here the connection stops pulling `receive()` while
`body_buffer_limit` bytes are unread; hypercorn's bounded app queue then fills, it stops
reading the socket, and the client's TCP window closes. A slow Storage Element thereby slows
the client, not our memory.

Answering before the body is read (413, 415, 400) has a classic trap: closing a socket with
unread input makes the kernel send RST, which can destroy the response before the client
reads it. After such an early answer the connection drains and discards the rest of the body
for a bounded time ("lingering close", as nginx and Apache do), then lets hypercorn close.
"""

from __future__ import annotations

from typing import Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart.wrappers import Request
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest

# Defaults for apps built without settings (the reference Storage Element uses these too).
DEFAULT_BUFFER_LIMIT: Final = 1024 * 1024
# Long enough for a client to finish sending a modest body and read our early answer.
DEFAULT_LINGER_S: Final = 3.0
# Past this many discarded bytes the client is not listening; stop paying for its upload.
DEFAULT_LINGER_BYTES: Final = 256 * 1024 * 1024


class BoundedBody(TrioBody):
    """A body buffer that tells the ASGI receiver when it is full."""

    buffer_limit: int = DEFAULT_BUFFER_LIMIT

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        # Size limits are the handlers' job (they count bytes and answer 413 themselves).
        super().__init__(expected_content_length, None)
        self._room = trio.Event()
        self._room.set()
        self._discarding = False
        self.received_bytes = 0

    def append(self, data: bytes) -> None:
        self.received_bytes += len(data)
        if self._discarding:
            return
        super().append(data)
        if len(self._data) >= self.buffer_limit and self._room.is_set():
            self._room = trio.Event()

    async def __anext__(self) -> bytes:
        data: bytes = await super().__anext__()
        self._room.set()
        return data

    @property
    def complete(self) -> bool:
        return bool(self._complete.is_set())

    async def wait_for_room(self) -> None:
        while len(self._data) >= self.buffer_limit and not self._discarding:
            await self._room.wait()

    async def wait_complete(self) -> None:
        await self._complete.wait()

    def discard_rest(self) -> None:
        """Drop what is buffered and everything still to come (used after an early answer)."""
        self._discarding = True
        self._data.clear()
        self._room.set()


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


class BackpressureHTTPConnection(TrioASGIHTTPConnection):
    linger_s: float = DEFAULT_LINGER_S
    linger_bytes: int = DEFAULT_LINGER_BYTES

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
        # Streaming responses (downloads) must not be cut by Quart's RESPONSE_TIMEOUT: the
        # client's own pace decides; hypercorn's keep-alive timeout covers dead peers.
        await self._send_response(send, response)
        body = request.body
        if isinstance(body, BoundedBody) and not body.complete:
            body.discard_rest()
            stop_at = body.received_bytes + self.linger_bytes
            with trio.move_on_after(self.linger_s):
                while not body.complete and body.received_bytes < stop_at:
                    with trio.move_on_after(0.1):
                        await body.wait_complete()
        nursery.cancel_scope.cancel()
