"""Request bodies with backpressure, for every QuartTrio app of this project, through ASGI.

Quart's ASGI connection copies each `http.request` message into an unbounded buffer as fast
as hypercorn delivers it, so a handler slower than the client would let memory grow without
limit (measured: about 2 GB in 8 s). So Quart never sees a body here: `BodyMiddleware`, an
ASGI middleware (Quart's public `app.asgi_app` wrapping), takes the request body from the
server itself and hands Quart an empty one. Handlers read the real one through
`request_body()`. Its `RequestBody` stops pulling `receive()` while `buffer_limit` bytes are
unread; hypercorn's bounded app queue then fills, it stops reading the socket, and the
client's TCP window closes. A slow Storage Element thereby slows the client, not our memory.

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

A client that goes away cancels its request: the middleware's reader sees `http.disconnect`
and hands it to Quart, whose connection then cancels the handler.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final, cast

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import request

from ..concurrency import cleanup_scope
from ..errors import ClientTooSlow
from .pace import ClientPace
from .receive import ContinueGate, Intake, ReceiveShare

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
# A request id a client may choose: it is echoed into logs and `X-Request-ID`, so short and
# printable; any other gets one of ours.
REQUEST_ID_RE: Final = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Where the middleware leaves the body in the ASGI scope (Quart keeps it as `request.scope`).
SCOPE_KEY: Final = "ingester.body"

_EMPTY_BODY: Final = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT: Final = {"type": "http.disconnect"}


@dataclass(frozen=True)
class BodyLimits:
    # Where the reader pauses (a configured ceiling; `receive_share` may lower it).
    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    # When set, the limit shrinks as more connections receive at once (`.receive`).
    receive_share: ReceiveShare | None = None
    # The minimum rate (0: none): bytes per window of waiting for the client.
    min_rate_bytes: int = 0
    min_rate_window_s: float = 60.0


class RequestBody:
    """One request's body: the chunks the server delivered, as they are (joining them would
    copy), read once by the handler as an async iterator."""

    def __init__(self, limits: BodyLimits = BodyLimits(), intake: Intake | None = None) -> None:
        self._limits = limits
        # Its connection's count in the receive share, told of every byte that leaves.
        self._intake = intake
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._has_data = trio.Event()
        self._room = trio.Event()
        self._room.set()
        self._arrived = trio.Event()
        self._discarding = False
        # The handler has waited for the body (a client's `Expect: 100-continue` is then
        # answered: `ContinueGate`).
        self._asked = False
        self.complete = False
        self.discarded = 0
        # Set when the server says the client is gone (`http.disconnect`: it left, or the
        # response ended and hypercorn recycled or closed the connection).
        self.disconnected = trio.Event()
        self.pace = (
            ClientPace(limits.min_rate_bytes, limits.min_rate_window_s)
            if limits.min_rate_bytes
            else None
        )

    # --- the server's side ---------------------------------------------------------------

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self._discarding:
            self.discarded += len(data)
            self._gone(len(data))
            self._arrived.set()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._has_data.set()
        if self._buffered >= self._limit() and self._room.is_set():
            self._room = trio.Event()

    def set_complete(self) -> None:
        self.complete = True
        self._has_data.set()
        self._arrived.set()

    def _gone(self, size: int) -> None:
        share = self._limits.receive_share
        if share is not None and self._intake is not None:
            share.taken(self._intake, size)

    def _limit(self) -> int:
        share = self._limits.receive_share
        limit = self._limits.buffer_limit
        return limit if share is None else share.body_limit(limit)

    async def wait_for_room(self) -> None:
        while self._buffered >= self._limit() and not self._discarding:
            if self._room.is_set():
                # The limit shrank (more connections receive now) since room was made.
                self._room = trio.Event()
            await self._room.wait()

    async def pump(self, receive: ASGIReceiveCallable) -> None:
        """Move the server's messages into this body, pausing while it is full, until the
        client goes away (after the request, that is how hypercorn ends it)."""
        while True:
            await self.wait_for_room()
            message = await receive()
            if message["type"] == "http.request":
                self.append(message.get("body", b""))
                if not message.get("more_body", False):
                    self.set_complete()
            elif message["type"] == "http.disconnect":
                self.disconnected.set()
                self._arrived.set()
                return

    # --- the handler's side --------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks and not self.complete:
            if not self._asked:
                self._asked = True
                gate = self._gate()
                if gate is not None:
                    await gate.open()
            await self._wait_for_data()
        else:
            # A chunk at hand is still a checkpoint: the reader lets the pump refill
            # between chunks, as the scheduling was before the middleware (measured the same
            # within noise, 256 MiB file-only form, five A/B pairs).
            await trio.lowlevel.checkpoint()
        if not self._chunks:
            raise StopAsyncIteration
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._gone(len(chunk))
        if not self._chunks and not self.complete:
            self._has_data = trio.Event()
        if self._buffered < self._limit():
            self._room.set()
        if self.pace is not None:
            self.pace.arrived(len(chunk))
        return chunk

    def take_unread(self) -> list[bytes]:
        """What arrived and was not read yet, taken at once (no wait): after the client went
        away, for a reader that keeps whatever arrived (a tus `PATCH`). The pump stops at
        the disconnect, which comes after every body message: nothing else will arrive."""
        chunks = list(self._chunks)
        self._chunks.clear()
        size = self._buffered
        self._buffered = 0
        self._gone(size)
        self._room.set()
        return chunks

    async def _wait_for_data(self) -> None:
        # A client that went away leaves this wait to the cancellation Quart then delivers.
        pace = self.pace
        if pace is None:
            await self._has_data.wait()
            return
        started = trio.current_time()
        with trio.move_on_after(pace.wait_left()) as slow:
            await self._has_data.wait()
        pace.waited_for(trio.current_time() - started)
        if slow.cancelled_caught:
            raise ClientTooSlow(
                f"the body came slower than {pace.min_bytes} bytes per {pace.window_s:g} s "
                "(INGESTER_CLIENT_MIN_RATE_BYTES, INGESTER_CLIENT_MIN_RATE_WINDOW_S)"
            )

    def _gate(self) -> ContinueGate | None:
        return None if self._intake is None else self._intake.continue_gate

    async def drain(self) -> None:
        """Read and drop the rest of the body, within the lingering-close bounds (none to
        drain when the client still waits for the `100` it was never sent)."""
        gate = self._gate()
        if gate is not None and gate.shut():
            return
        self._discarding = True
        self._chunks.clear()
        self._gone(self._buffered)
        self._buffered = 0
        self._room.set()
        with trio.move_on_after(LINGER_S):
            while not self.complete and not self.disconnected.is_set():
                if self.discarded >= LINGER_BYTES:
                    return
                self._arrived = trio.Event()
                with trio.move_on_after(LINGER_PAUSE_S) as pause:
                    await self._arrived.wait()
                if pause.cancelled_caught:
                    return


def request_body() -> RequestBody:
    """The current request's body (in a handler of an app built by `make_app`)."""
    body = request.scope.get(SCOPE_KEY)
    if not isinstance(body, RequestBody):  # pragma: no cover - an app without the middleware
        raise RuntimeError("the app has no BodyMiddleware")
    return body


class BodyMiddleware:
    """The ASGI app in front of Quart: it reads request bodies (`RequestBody`), answers Quart's
    `receive()` with an empty body and then the client's disconnect, and ends responses
    (lingering close, a shielded last message)."""

    def __init__(self, app: ASGIFramework, limits: BodyLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket":
            await _refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        share = self.limits.receive_share
        intake = (
            share.intake_for(scope.get("client"), scope.get("server"))
            if share is not None
            else None
        )
        body = RequestBody(self.limits, intake)
        scope = cast(Scope, {**scope, SCOPE_KEY: body})
        framed = _has_body(scope)
        if not framed:
            body.set_complete()
        told_quart = False

        async def quart_receive() -> ASGIReceiveEvent:
            nonlocal told_quart
            if not told_quart:
                told_quart = True
                return cast(ASGIReceiveEvent, _EMPTY_BODY)
            await body.disconnected.wait()
            return cast(ASGIReceiveEvent, _DISCONNECT)

        linger = False

        async def quart_send(message: ASGISendEvent) -> None:
            nonlocal linger
            if body.disconnected.is_set():
                # The client is gone and hypercorn is closing the connection, its reader
                # perhaps answering a cut body with 400: a message sent now would race that
                # close (hypercorn sends its EOF outside its send lock). Quart's cancellation
                # of this request is on its way.
                return
            if message["type"] == "http.response.start":
                # A request without a body (a probe, a GET) often gets its answer before the
                # message that ends its empty body arrives: nothing is left to read, so no
                # linger and no `Connection: close` (which cost every probe a connection).
                linger = framed and not body.complete
                if linger:
                    headers = [h for h in message["headers"] if h[0].lower() != b"connection"]
                    message = cast(
                        ASGISendEvent, {**message, "headers": [*headers, (b"connection", b"close")]}
                    )
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # The last body message makes hypercorn recycle the connection for keep-alive
                # and start its idle timer within this call; the same call delivers
                # http.disconnect, whose cancellation would land inside the recycling. The
                # idle timer then never starts: idle connections are never closed, and
                # shutdown waits its whole grace.
                if linger:
                    await body.drain()
                    if body.disconnected.is_set():
                        return
                with cleanup_scope(FINAL_SEND_TIMEOUT_S):
                    await send(message)
                return
            await send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(body.pump, receive)
            await self.app(scope, quart_receive, quart_send)
            nursery.cancel_scope.cancel()


async def _refuse_websocket(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """No route speaks WebSocket. Quart answered an upgrade request itself (405 or its stock
    400 page), with no `X-Request-ID` and outside our error shape (found by a review): it is
    refused here, `400 BAD_REQUEST` as every answer is shaped, through the ASGI denial
    response hypercorn offers (else a plain close, which hypercorn answers with 403)."""
    await receive()  # websocket.connect
    supplied = next(
        (
            v.decode("latin-1")
            for k, v in cast(Any, scope)["headers"]
            if k.lower() == b"x-request-id"
        ),
        "",
    )
    request_id = supplied if REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
    if "websocket.http.response" not in cast(Any, scope).get("extensions", {}):
        await send(cast(ASGISendEvent, {"type": "websocket.close", "code": 1008}))
        return
    error = {"code": "BAD_REQUEST", "message": "WebSocket is not served here"}
    body = json.dumps({"error": {**error, "request_id": request_id}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    start = {"type": "websocket.http.response.start", "status": 400, "headers": headers}
    await send(cast(ASGISendEvent, start))
    await send(cast(ASGISendEvent, {"type": "websocket.http.response.body", "body": body}))


def _has_body(scope: Scope) -> bool:
    """Whether the request's framing announces body bytes (RFC 9112 section 6.3)."""
    for name, value in cast(Any, scope)["headers"]:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length" and value.strip() not in (b"", b"0"):
            return True
    return False
