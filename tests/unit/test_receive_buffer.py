"""The pass-through receive buffer (ingester/server.py) changes no event h11 produces, and
hands a body read over without copying it. Pure h11, no I/O."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import h11._connection
from hypothesis import given, settings
from hypothesis import strategies as st

from ingester.server import _PassThroughReceiveBuffer

HEAD = b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
CHUNKED_HEAD = b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@contextmanager
def buffer_class(cls: type[Any]) -> Iterator[None]:
    saved = h11._connection.ReceiveBuffer  # type: ignore[attr-defined]
    h11._connection.ReceiveBuffer = cls  # type: ignore[attr-defined]
    try:
        yield
    finally:
        h11._connection.ReceiveBuffer = saved  # type: ignore[attr-defined]


def events(stream: bytes, cuts: list[int], cls: type[Any]) -> list[tuple[str, Any]]:
    """Every event of a server connection fed `stream` in pieces split at `cuts`, with the
    body data joined back (how it is split is the buffer's business)."""
    with buffer_class(cls):
        conn = h11.Connection(h11.SERVER)
    out: list[tuple[str, Any]] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and conn.our_state is h11.SEND_RESPONSE:
                    conn.send(h11.Response(status_code=204, headers=[]))
                    conn.send(h11.EndOfMessage())
                    conn.start_next_cycle()
                    continue
                break
            if isinstance(event, h11.ConnectionClosed):
                out.append(("closed", None))
                break
            if isinstance(event, h11.Data):
                if out and out[-1][0] == "data":
                    out[-1] = ("data", out[-1][1] + bytes(event.data))
                else:
                    out.append(("data", bytes(event.data)))
            elif isinstance(event, h11.Request):
                out.append(("request", (event.method, event.target, list(event.headers))))
            else:
                out.append((type(event).__name__, None))
        if conn.their_state is h11.ERROR:
            break
    return out


def test_a_body_read_is_handed_over_as_the_same_object() -> None:
    body = bytes(range(256)) * 4096
    with buffer_class(_PassThroughReceiveBuffer):
        conn = h11.Connection(h11.SERVER)
    conn.receive_data(HEAD % len(body))
    assert isinstance(conn.next_event(), h11.Request)
    conn.receive_data(body)
    data = conn.next_event()
    assert isinstance(data, h11.Data)
    assert data.data is body
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_a_chunked_body_is_handed_over_without_copies_across_chunk_ends() -> None:
    """Reads that each span a chunk's end (a busy element's reads of the ingester's 1 MiB
    frames): every piece of data is the read itself or a view of it, never a bytearray
    copy, and the bytes are exactly the frames'."""
    frames = [bytes([i]) * 1000 for i in range(1, 6)]
    stream = b"".join(b"%x\r\n%b\r\n" % (len(f), f) for f in frames) + b"0\r\n\r\n"
    reads = [stream[i : i + 1500] for i in range(0, len(stream), 1500)]
    with buffer_class(_PassThroughReceiveBuffer):
        conn = h11.Connection(h11.SERVER)
    conn.receive_data(CHUNKED_HEAD)
    assert isinstance(conn.next_event(), h11.Request)
    received = b""
    kinds: set[type] = set()
    for read in reads:
        conn.receive_data(read)
        while isinstance(event := conn.next_event(), h11.Data):
            kinds.add(type(event.data))
            received += bytes(event.data)
    assert isinstance(event, h11.EndOfMessage)
    assert received == b"".join(frames)
    assert bytearray not in kinds, "a piece of the body was copied into h11's bytearray"


def test_a_read_holding_more_than_the_body_still_splits_where_h11_does() -> None:
    body = b"x" * 1000
    stream = HEAD % len(body) + body + HEAD % 3 + b"abc"
    assert events(stream, [len(HEAD % len(body)) + 10], _PassThroughReceiveBuffer) == events(
        stream, [len(HEAD % len(body)) + 10], h11._receivebuffer.ReceiveBuffer
    )


requests = st.lists(
    st.tuples(st.booleans(), st.binary(min_size=0, max_size=300)), min_size=1, max_size=3
)


def _stream(parts: list[tuple[bool, bytes]]) -> bytes:
    out = b""
    for chunked, body in parts:
        if chunked:
            out += CHUNKED_HEAD
            if body:
                half = len(body) // 2 or len(body)
                for piece in (body[:half], body[half:]):
                    if piece:
                        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
            out += b"0\r\n\r\n"
        else:
            out += HEAD % len(body) + body
    return out


@settings(max_examples=300, deadline=None)
@given(parts=requests, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_events_equal_stock_h11_whatever_the_reads(
    parts: list[tuple[bool, bytes]], cuts: list[int]
) -> None:
    stream = _stream(parts)
    cuts = [c for c in cuts if c < len(stream)]
    assert events(stream, cuts, _PassThroughReceiveBuffer) == events(
        stream, cuts, h11._receivebuffer.ReceiveBuffer
    )


@given(garbage=st.binary(min_size=1, max_size=200))
def test_bad_input_is_refused_as_stock_h11_refuses_it(garbage: bytes) -> None:
    def outcome(cls: type[Any]) -> object:
        try:
            return events(garbage, [len(garbage) // 2], cls)
        except h11.RemoteProtocolError as exc:
            return ("error", str(exc))

    assert outcome(_PassThroughReceiveBuffer) == outcome(h11._receivebuffer.ReceiveBuffer)
