"""Chunked element bodies sent without h11's copy (`ingester.storage.vectored`), through the
element client's real `upload` over loopback sockets: the bytes a server receives are the
bytes given, in order, and a failed or stalled peer is the element error the pipeline fails
over on, as it was through httpcore's own write."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import h11
import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ingester.buffers import Buffer, remaining
from ingester.errors import StorageElementTimeout, StorageElementUnavailable
from ingester.storage import vectored
from ingester.storage.client import StorageElementClient, StoredFile
from tests.support.http_server import Request, Response, serve_http

MIB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


Piece = bytes | memoryview


def test_importing_the_module_installs_the_send() -> None:
    # Whatever can make `Pieces` imports them from there, so it has the send they need.
    assert vectored.installed()


class Body(httpx.AsyncByteStream):
    """Pieces as the pipeline's element body hands them out."""

    def __init__(self, parts: Sequence[Piece | vectored.Pieces]) -> None:
        self._parts = iter(parts)

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        # An object, not an async generator: one left unfinished by a failed request
        # would be reported when collected.
        for part in self._parts:
            return part  # type: ignore[return-value]
        raise StopAsyncIteration


def pieces() -> list[Piece]:
    big = bytes(range(256)) * (4 * 1024)  # 1 MiB
    return [
        big,
        memoryview(b"m" * (300 * 1024))[7:],  # a slice: its own start, not the object's
        b"tiny",  # under the threshold: httpcore's own path, between vectored ones
        memoryview(bytearray(b"a" * (100 * 1024))),
        big[: vectored.VECTORED_MIN_BYTES],  # exactly at the threshold
        # More than the sockets hold at once: sends that take part of a frame.
        *(random.Random(seed).randbytes(MIB) for seed in range(10)),
    ]


async def upload(
    http: httpx.AsyncClient, url: str, parts: Sequence[Piece | vectored.Pieces]
) -> StoredFile:
    client = StorageElementClient(
        http, stall_timeout_s=5, response_timeout_s=5, connect_timeout_s=5, probe_timeout_s=5
    )
    return await client.upload(
        "se-test", url, body=Body(parts), content_type="application/octet-stream",
        authorization=None,
    )  # fmt: skip


def test_remaining_skips_what_was_sent() -> None:
    parts = [b"abc", b"", b"defg", b"h"]
    assert [bytes(v) for v in remaining(parts, 0)] == [b"abc", b"defg", b"h"]
    assert [bytes(v) for v in remaining(parts, 2)] == [b"c", b"defg", b"h"]
    assert [bytes(v) for v in remaining(parts, 3)] == [b"defg", b"h"]
    assert [bytes(v) for v in remaining(parts, 6)] == [b"g", b"h"]
    assert remaining(parts, 8) == []


def test_pieces_split_into_views_and_open_flat() -> None:
    parts: list[Piece] = [b"abc", memoryview(b"defgh")[1:], b"", b"ij"]
    pieces = vectored.Pieces(parts)
    assert len(pieces) == 9
    assert pieces.joined() == b"abcefghij"
    head, rest = pieces.split(5)
    assert (head.joined(), rest.joined()) == (b"abcef", b"ghij")
    head, rest = pieces.split(3)  # on a boundary: no empty views
    assert [bytes(p) for p in head.parts] == [b"abc"]
    assert [bytes(p) for p in rest.parts] == [b"efgh", b"ij"]
    assert vectored.Pieces([b"one"]).joined() == b"one"
    assert [
        bytes(p) for p in vectored.flat([b"4\r\n", vectored.Pieces([b"ab", b"cd"]), b"\r\n"])
    ] == [b"4\r\n", b"ab", b"cd", b"\r\n"]


async def test_pieces_go_out_as_one_frame_each() -> None:
    """A batch of reads handed out unjoined (`Pieces`), split where a frame ends."""

    async def element(request: Request) -> Response:
        return Response.json(
            {"file_id": "f", "file_size": len(request.body), "checksum": sha256(request.body)},
            status=201,
        )

    reads = [random.Random(seed).randbytes(150 * 1024 + seed) for seed in range(14)]
    first, second = vectored.Pieces(reads[:7]), vectored.Pieces(reads[7:])
    head, rest = second.split(500 * 1024)
    small = vectored.Pieces([b"a", b"bc"])  # under the threshold: still unjoined
    with trio.fail_after(20):
        async with serve_http(element) as server, httpx.AsyncClient(trust_env=False) as http:
            stored = await upload(http, server.url, [first, small, head, rest])
    assert stored.checksum == sha256(b"".join(reads[:7]) + b"abc" + b"".join(reads[7:]))


async def test_a_batch_of_more_reads_than_one_sendmsg_takes_arrives_whole() -> None:
    """Found by a review: a slow client's batch of 1 MiB can hold thousands of tiny reads,
    and Linux refuses a `sendmsg` of more than 1024 buffers (EMSGSIZE, nothing sent): the
    upload stalled until the watchdog blamed the element. At most IOV_MAX per call now."""

    async def element(request: Request) -> Response:
        return Response.json(
            {"file_id": "f", "file_size": len(request.body), "checksum": sha256(request.body)},
            status=201,
        )

    reads = [random.Random(seed).randbytes(500 + seed % 7) for seed in range(2500)]
    with trio.fail_after(20):
        async with serve_http(element) as server, httpx.AsyncClient(trust_env=False) as http:
            stored = await upload(http, server.url, [vectored.Pieces(reads)])
    assert stored.checksum == sha256(b"".join(reads))


async def test_a_chunked_body_arrives_whole_and_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    frames: list[int] = []
    send_parts = vectored.send_parts

    async def counting(stream: trio.SocketStream, parts: Sequence[Buffer]) -> None:
        frames.append(len(parts))
        await send_parts(stream, parts)

    monkeypatch.setattr(vectored, "send_parts", counting)

    async def element(request: Request) -> Response:
        digest = hashlib.sha256(request.body).hexdigest()
        return Response.json(
            {"file_id": "f", "file_size": len(request.body), "checksum": digest}, status=201
        )

    parts = pieces()
    sent = b"".join(bytes(p) for p in parts)
    with trio.fail_after(20):
        async with serve_http(element) as server, httpx.AsyncClient(trust_env=False) as http:
            for _ in range(2):  # the second on the kept-alive connection
                stored = await upload(http, server.url, parts)
                assert stored.checksum == hashlib.sha256(sent).hexdigest()
                assert stored.file_size == len(sent)
            assert server.requests[0].headers["transfer-encoding"] == "chunked"
    # Each large piece went as one chunked frame's three parts; the small one httpcore's way.
    assert frames == [3] * 14 * 2


async def _read_head(stream: trio.SocketStream) -> None:
    parser = h11.Connection(h11.SERVER)
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            parser.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            return


@asynccontextmanager
async def raw_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


async def _read_body(
    stream: trio.abc.Stream, parser: h11.Connection | None = None, *, slow: bool = False
) -> bytes:
    """A request's body, read with h11; `slow`: each read only once every task waits."""
    parser = parser or h11.Connection(h11.SERVER)
    received: list[bytes] = []
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            if slow:
                await trio.testing.wait_all_tasks_blocked()
            parser.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Data):
            received.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(received)


async def _answer(stream: trio.abc.Stream, data: bytes, parser: h11.Connection) -> None:
    """An element's 201 for `data`."""
    answer = {"file_id": "f", "file_size": len(data), "checksum": sha256(data)}
    body = json.dumps(answer).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await stream.send_all(parser.send(h11.Response(status_code=201, headers=headers)))
    await stream.send_all(parser.send(h11.Data(data=body)) + parser.send(h11.EndOfMessage()))


async def test_an_element_slower_than_the_sender_gets_every_byte() -> None:
    """The sender outruns the reader: each `sendmsg` takes part of a frame, the rest waits
    for room (the reader reads only once every task waits)."""

    async def slow_reader(stream: trio.SocketStream) -> None:
        parser = h11.Connection(h11.SERVER)
        data = await _read_body(stream, parser, slow=True)
        await _answer(stream, data, parser)

    parts = [random.Random(seed).randbytes(MIB) for seed in range(12)]
    with trio.fail_after(60):
        async with raw_server(slow_reader) as url, httpx.AsyncClient() as http:
            stored = await upload(http, url, parts)
    assert stored.checksum == sha256(b"".join(parts))


def _self_signed(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_an_element_over_tls_gets_pieces_joined(tmp_path: Path) -> None:
    """TLS has no `sendmsg`: `Pieces` are joined and go httpcore's own way."""
    server_context, client_context = _self_signed(tmp_path)

    async def element(stream: trio.SSLStream[trio.SocketStream]) -> None:
        parser = h11.Connection(h11.SERVER)
        await _answer(stream, await _read_body(stream, parser), parser)

    reads = [random.Random(seed).randbytes(200 * 1024) for seed in range(6)]
    parts: list[Piece | vectored.Pieces] = [vectored.Pieces(reads[:3]), *reads[3:]]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, element, 0, server_context, host="127.0.0.1")
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            async with httpx.AsyncClient(verify=client_context) as http:
                stored = await upload(http, f"https://127.0.0.1:{port}", parts)
            nursery.cancel_scope.cancel()
    assert stored.checksum == sha256(b"".join(reads))


async def test_an_element_that_resets_mid_body_is_unavailable() -> None:
    async def reset_after_head(stream: trio.SocketStream) -> None:
        await _read_head(stream)
        # SO_LINGER 0: the close sends a reset, as a crashed element's kernel does.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    with trio.fail_after(20):
        async with raw_server(reset_after_head) as url, httpx.AsyncClient() as http:
            with pytest.raises(StorageElementUnavailable):
                await upload(http, url, [b"x" * MIB] * 64)


async def test_an_element_that_stops_reading_is_a_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled = trio.Event()

    async def never_reads(stream: trio.SocketStream) -> None:
        await _read_head(stream)
        await stalled.wait()

    with trio.fail_after(600):
        async with raw_server(never_reads) as url, httpx.AsyncClient() as http:
            started = trio.current_time()
            with pytest.raises(StorageElementTimeout, match="write timeout"):
                # More than loopback's socket buffers hold, so a write waits.
                await upload(http, url, [b"x" * MIB] * 256)
            assert trio.current_time() - started >= 5
            stalled.set()
