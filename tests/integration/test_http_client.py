"""The service's httpx client (ingester/storage/http_client.py) over real loopback sockets,
against a server that counts its connections and can close the idle ones: every request
answered, no more connections than the limit, idle ones kept to the keep-alive limit, a
connection the server closed while idle never used again, and no cookie sent back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import httpx
import trio
import trio.testing

from ingester.service import Service
from ingester.settings import Settings
from ingester.storage.http_client import LinearPool, LinearPoolTransport, build_http_client


@dataclass
class CountingServer:
    """HTTP/1.1 keep-alive server: answers `200 ok` once `gate` is set."""

    url: str = ""
    accepted: int = 0
    open_now: int = 0
    most_open: int = 0
    gate: trio.Event = field(default_factory=trio.Event)
    # The connections waiting for their next request, and how to close each.
    idle: dict[int, trio.CancelScope] = field(default_factory=dict)
    cookies_sent: list[bytes] = field(default_factory=list)

    def close_idle(self) -> None:
        for scope in self.idle.values():
            scope.cancel()

    async def serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while await self._one(conn, stream):
                    conn.start_next_cycle()
        finally:
            self.open_now -= 1

    async def _one(self, conn: h11.Connection, stream: trio.SocketStream) -> bool:
        scope = trio.CancelScope()
        self.idle[id(conn)] = scope
        event: object = None  # stays None when closed while idle
        with scope:
            event = await self._next(conn, stream)
        self.idle.pop(id(conn), None)
        if not isinstance(event, h11.Request):
            return False
        self.cookies_sent += [value for name, value in event.headers if name == b"cookie"]
        while not isinstance(await self._next(conn, stream), h11.EndOfMessage):
            pass
        await self.gate.wait()
        for reply in (
            h11.Response(
                status_code=200, headers=[("content-length", "2"), ("set-cookie", "s=1; Path=/")]
            ),
            h11.Data(data=b"ok"),
            h11.EndOfMessage(),
        ):
            await stream.send_all(conn.send(reply) or b"")
        return True

    async def _next(self, conn: h11.Connection, stream: trio.SocketStream) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            if not data:
                return h11.ConnectionClosed()


@asynccontextmanager
async def counting_server() -> AsyncIterator[CountingServer]:
    server = CountingServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
        server.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        yield server
        nursery.cancel_scope.cancel()


def client(max_connections: int, keepalive: int) -> httpx.AsyncClient:
    return build_http_client(max_connections=max_connections, max_keepalive=keepalive)


def pool_of(http: httpx.AsyncClient) -> LinearPool:
    transport = http._transport
    assert isinstance(transport, LinearPoolTransport)
    assert isinstance(transport._pool, LinearPool)
    return transport._pool


async def test_many_requests_share_the_limited_connections_and_keep_the_idle_limit() -> None:
    with trio.fail_after(20):
        async with counting_server() as server, client(4, 2) as http:
            statuses: list[int] = []

            async def get(i: int) -> None:
                statuses.append((await http.get(f"{server.url}/{i}")).status_code)

            async with trio.open_nursery() as nursery:
                for i in range(16):
                    nursery.start_soon(get, i)
                # Every request the pool lets through is at the server; the rest queue.
                await trio.testing.wait_all_tasks_blocked()
                assert server.open_now == 4
                server.gate.set()
            assert statuses == [200] * 16
            assert server.most_open == 4
            assert server.accepted == 4
            # Four were busy to the end; once idle, two stay (the keep-alive limit).
            assert len(pool_of(http).connections) == 2
            await trio.testing.wait_all_tasks_blocked()
            assert server.open_now == 2


async def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    with trio.fail_after(20):
        async with counting_server() as server, client(4, 4) as http:
            server.gate.set()
            assert (await http.get(server.url + "/first")).status_code == 200
            await trio.testing.wait_all_tasks_blocked()
            server.close_idle()
            await trio.testing.wait_all_tasks_blocked()
            assert server.open_now == 0
            # The pool sees the closed socket before handing it out, and opens another.
            assert (await http.get(server.url + "/second")).status_code == 200
            assert server.accepted == 2
            # Each answer set a cookie; none went back.
            assert server.cookies_sent == []
            assert len(http.cookies) == 0


async def test_the_service_talks_to_elements_through_the_linear_pool() -> None:
    with trio.fail_after(10):
        service = Service(Settings())
        try:
            assert isinstance(pool_of(service.http), LinearPool)
        finally:
            await service.http.aclose()
