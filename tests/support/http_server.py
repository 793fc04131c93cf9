"""A tiny real HTTP/1.1 server for tests: `trio.serve_tcp` + h11, on 127.0.0.1, port 0.

    async def handler(request: Request) -> Response:
        return Response.json({"ok": True})

    async with serve_http(handler) as server:
        response = await client.get(server.url + "/x")
        assert server.count("/x") == 1

The handler is an async function, so it can sleep (slow upstream), raise `DropConnection`
(the connection closes without an answer) or change what it serves between requests.
Keep-alive works, so httpx's connection pool behaves as in production. Every request is
recorded in `server.requests` before the handler runs.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import h11
import trio

# Test bodies are small; a bound keeps a runaway client from eating the test's memory.
MAX_BODY: Final = 16 * 1024 * 1024
_READ_SIZE: Final = 64 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    # Lower-case names; a repeated header's values are joined with ", ".
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query))

    def form(self) -> dict[str, str]:
        """The body as `application/x-www-form-urlencoded` fields (last value wins)."""
        return dict(urllib.parse.parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode(), [("content-type", "application/json")])


class DropConnection(Exception):
    """Raised by a handler: close the connection without answering."""


Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class LocalHTTPServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    requests: list[Request] = field(default_factory=list)

    def count(self, path: str | None = None, method: str | None = None) -> int:
        return sum(
            1
            for request in self.requests
            if (path is None or request.path == path)
            and (method is None or request.method == method)
        )


@asynccontextmanager
async def serve_http(handler: Handler) -> AsyncIterator[LocalHTTPServer]:
    """Serve `handler` on a fresh loopback port until the block exits."""
    async with trio.open_nursery() as nursery:
        server = LocalHTTPServer(url="")
        listeners: list[trio.SocketListener] = await nursery.start(
            partial(
                trio.serve_tcp, partial(_serve_connection, handler, server), 0, host="127.0.0.1"
            )
        )
        port = listeners[0].socket.getsockname()[1]
        server.url = f"http://127.0.0.1:{port}"
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def _serve_connection(
    handler: Handler, server: LocalHTTPServer, stream: trio.SocketStream
) -> None:
    conn = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request = await _read_request(conn, stream)
            if request is None:
                return
            server.requests.append(request)
            try:
                response = await handler(request)
            except DropConnection:
                return
            if not await _send_response(conn, stream, response):
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> Request | None:
    start: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return None
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            start = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return None
        elif isinstance(event, h11.EndOfMessage):
            assert start is not None
            headers: dict[str, str] = {}
            for name, value in start.headers:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            return Request(
                method=start.method.decode("ascii"),
                target=start.target.decode("latin-1"),
                headers=headers,
                body=bytes(body),
            )
        else:  # ConnectionClosed, or PAUSED after a protocol switch we never accept
            return None


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: Response
) -> bool:
    headers = [
        (name, value) for name, value in response.headers if name.lower() != "content-length"
    ]
    headers.append(("content-length", str(len(response.body))))
    try:
        for event in (
            h11.Response(status_code=response.status, headers=headers),
            h11.Data(data=response.body),
            h11.EndOfMessage(),
        ):
            data = conn.send(event)
            if data:
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
