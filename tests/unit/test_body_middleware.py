"""`BodyMiddleware` with a fake server on one side and a fake app on the other, on trio's mock
clock: what reaches the app, and what reaches the client when the app answers early."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import trio
import trio.testing

from ingester.http.body import LINGER_PAUSE_S, BodyLimits, BodyMiddleware, RequestBody


class Server:
    """The server's side of one request: messages to hand out, and what the app sent."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.scope: dict[str, Any] = {"type": "http", "headers": headers}
        self.incoming: trio.MemorySendChannel[dict[str, Any]]
        self.incoming, self._queue = trio.open_memory_channel[dict[str, Any]](100)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return await self._queue.receive()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def body_part(self, data: bytes, *, more: bool = True) -> None:
        self.incoming.send_nowait({"type": "http.request", "body": data, "more_body": more})

    def disconnect(self) -> None:
        self.incoming.send_nowait({"type": "http.disconnect"})

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return next((v for k, v in start["headers"] if k == name), None)


def early_answer(seen: dict[str, Any]) -> Any:
    """An app that answers 413 at once, without reading the body (as a size check does)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["quart_body"] = await receive()  # what Quart would be handed
        seen["body"] = scope["ingester.body"]
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too large", "more_body": False})

    return app


FRAMED = [(b"content-length", b"100")]


async def serve(app: Any, server: Server) -> None:
    middleware = BodyMiddleware(app, BodyLimits())
    await middleware(cast(Any, server.scope), cast(Any, server.receive), cast(Any, server.send))


async def test_quart_sees_an_empty_body_and_the_handler_reads_the_real_one() -> None:
    server = Server(FRAMED)
    read: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert await receive() == {"type": "http.request", "body": b"", "more_body": False}
        body = scope["ingester.body"]
        assert isinstance(body, RequestBody)
        read.extend([chunk async for chunk in body])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    server.body_part(b"a" * 60)
    server.body_part(b"b" * 40, more=False)
    with trio.fail_after(5):
        await serve(app, server)
    assert b"".join(read) == b"a" * 60 + b"b" * 40
    assert server.header(b"connection") is None  # read to the end: the connection stays
    assert server.sent[-1] == {"type": "http.response.body", "body": b"ok", "more_body": False}


async def answer_early_then(
    clock: trio.testing.MockClock, then: Callable[[Server], None]
) -> tuple[Server, RequestBody]:
    """An early answer to a request whose first 30 of 100 bytes came; once every task
    waits, `then(server)` says what the client does next. The clock stands still until
    then (on a busy machine the real one could run out the linger pause between the
    server's last step and the test's look: a flake seen in CI), and jumps after, so
    `fail_after` still bounds the rest."""
    server = Server(FRAMED)
    seen: dict[str, Any] = {}
    server.body_part(b"x" * 30)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, early_answer(seen), server)
            await trio.testing.wait_all_tasks_blocked()
            # The head went out at once; the end waits while the rest is read and dropped.
            assert [m["type"] for m in server.sent] == ["http.response.start"]
            assert server.header(b"connection") == b"close"
            then(server)
            clock.autojump_threshold = 0
    return server, seen["body"]


async def test_an_early_answer_closes_and_lingers_until_the_body_is_read(
    mock_clock: trio.testing.MockClock,
) -> None:
    server, body = await answer_early_then(
        mock_clock, lambda server: server.body_part(b"y" * 70, more=False)
    )
    assert server.sent[-1]["more_body"] is False
    assert body.discarded == 100  # all of it dropped, none kept


async def test_a_client_that_stops_sending_is_lingered_on_briefly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = Server(FRAMED)
    server.body_part(b"x" * 30)
    started = trio.current_time()
    with trio.fail_after(5):
        await serve(early_answer({}), server)
    assert trio.current_time() - started == LINGER_PAUSE_S
    assert server.sent[-1]["more_body"] is False


async def test_once_the_client_is_gone_nothing_more_is_sent(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The last message would race hypercorn's own close of the connection (its reader may
    be answering the cut body with 400 while its close sends EOF outside its send lock)."""
    server, body = await answer_early_then(mock_clock, Server.disconnect)
    assert [m["type"] for m in server.sent] == ["http.response.start"]
    assert body.disconnected.is_set()


async def test_a_request_without_a_body_gets_no_linger() -> None:
    server = Server([])
    server.body_part(b"", more=False)
    with trio.fail_after(5):
        await serve(early_answer({}), server)
    assert server.header(b"connection") is None
    assert server.sent[-1]["more_body"] is False


async def test_what_arrived_unread_is_handed_over_at_once() -> None:
    """After a disconnect, a reader that keeps what arrived takes the unread chunks without
    waiting; the body then holds nothing and has room again."""
    with trio.fail_after(5):
        body = RequestBody(BodyLimits(buffer_limit=10))
        for chunk in (b"abcd", b"efgh", b"ijkl"):
            body.append(chunk)
        assert await anext(aiter(body)) == b"abcd"
        assert body.take_unread() == [b"efgh", b"ijkl"]
        assert body.take_unread() == []
        await body.wait_for_room()  # at once: nothing is held
