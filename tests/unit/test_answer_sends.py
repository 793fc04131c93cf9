"""What the patched `H11Protocol._send_h11_event` (`ingester.server`) hands the socket: a
short answer to a request read whole goes out in one send, an answer given while the body
still arrives goes out at once, and nothing is sent for nothing. Pure: an h11 connection
and a list for the sends, no socket."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h11
import trio
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

from ingester.server import install_hypercorn_patches


@dataclass
class Protocol:
    """What `_send_h11_event` uses of an `H11Protocol`: its h11 connection and its send."""

    connection: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))
    sent: list[bytes] = field(default_factory=list)

    async def send(self, event: Any) -> None:
        assert isinstance(event, RawData)
        self.sent.append(bytes(event.data))


def received(protocol: Protocol, request: bytes) -> list[Any]:
    """Feed `request`; the events h11 makes of it."""
    protocol.connection.receive_data(request)
    events: list[Any] = []
    while True:
        event = protocol.connection.next_event()
        if event is h11.NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events


async def send(protocol: Protocol, event: Any) -> None:
    install_hypercorn_patches()
    await H11Protocol._send_h11_event(protocol, event)  # type: ignore[arg-type]


def answer(status: int, body: bytes = b"") -> h11.Response:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", b"application/json"))
    return h11.Response(status_code=status, headers=headers)


def parsed(data: bytes) -> tuple[int, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[(b"host", b"t")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            assert isinstance(event, h11.EndOfMessage), event
            return response.status_code, body


async def test_a_json_answer_to_a_whole_request_is_one_send() -> None:
    with trio.fail_after(5):
        protocol = Protocol()
        received(protocol, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert protocol.connection.their_state is h11.DONE
        body = b'{"status": "ok"}'
        await send(protocol, answer(200, body))
        assert protocol.sent == []  # the head waits for what follows it
        await send(protocol, h11.Data(data=body))
        await send(protocol, h11.EndOfMessage())
        assert len(protocol.sent) == 1
        assert parsed(protocol.sent[0]) == (200, body)


async def test_a_204_after_a_body_read_whole_is_one_send() -> None:
    with trio.fail_after(5):
        protocol = Protocol()
        received(
            protocol,
            b"PATCH /api/v1/uploads/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        )
        await send(protocol, answer(204))
        await send(protocol, h11.EndOfMessage())
        assert len(protocol.sent) == 1
        assert parsed(protocol.sent[0]) == (204, b"")
        # The next request on the connection starts clean: nothing is left held.
        protocol.connection.start_next_cycle()
        received(protocol, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        await send(protocol, answer(200, b"{}"))
        await send(protocol, h11.Data(data=b"{}"))
        await send(protocol, h11.EndOfMessage())
        assert len(protocol.sent) == 2
        assert parsed(protocol.sent[1]) == (200, b"{}")


async def test_an_answer_while_the_body_still_arrives_goes_out_at_once() -> None:
    """An early refusal: the client, still sending, must see it before its body is read
    (then drained)."""
    with trio.fail_after(5):
        protocol = Protocol()
        events = received(
            protocol,
            b"POST /api/v1/files/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nab",
        )
        assert not any(isinstance(e, h11.EndOfMessage) for e in events)
        assert protocol.connection.their_state is h11.SEND_BODY
        body = b'{"error": {"code": "UNAUTHORIZED"}}'
        await send(protocol, answer(401, body))
        assert len(protocol.sent) == 1
        assert protocol.sent[0].startswith(b"HTTP/1.1 401 ")
        await send(protocol, h11.Data(data=body))
        await send(protocol, h11.EndOfMessage())
        assert len(protocol.sent) == 2
        assert parsed(b"".join(protocol.sent)) == (401, body)


async def test_a_100_continue_is_never_held() -> None:
    with trio.fail_after(5):
        protocol = Protocol()
        received(
            protocol,
            b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        )
        await send(protocol, h11.InformationalResponse(status_code=100, headers=[]))
        assert protocol.sent == [b"HTTP/1.1 100 \r\n\r\n"]
