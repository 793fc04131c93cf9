"""Attacks on connections and request heads (B4, B5): heads that never finish, many idle
connections, the connection cap, and heads too large or with too many fields, however the
bytes are cut into segments."""

from __future__ import annotations

import logging
import re
from typing import Any, cast

import httpx
import psutil
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from ingester.server import install_hypercorn_patches
from tests.conftest import Stack, TokenFactory
from tests.hostile.common import (
    RawResponse,
    Spawn,
    assert_unharmed,
    closed_by_server,
    connect,
    host_port,
    read_response,
    until,
)
from tests.support.processes import ManagedProcess, free_port
from tests.support.waiting import until_still

HEADER_TIMEOUT_S = 1.0
CAP = 16
INTERNAL_PORT = free_port()


@pytest.fixture(scope="module")
def quick(spawn: Spawn) -> ManagedProcess:
    """Request heads must arrive within a second."""
    return spawn("conn-quick", INGESTER_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S))


@pytest.fixture(scope="module")
def default(spawn: Spawn) -> ManagedProcess:
    """Production defaults for connections and heads."""
    return spawn("conn-default")


@pytest.fixture(scope="module")
def capped(spawn: Spawn) -> ManagedProcess:
    proc = spawn(
        "conn-capped",
        INGESTER_INTERNAL_PORT=str(INTERNAL_PORT),
        INGESTER_MAX_CONNECTIONS=str(CAP),
        INGESTER_MAX_UPLOADS_PER_USER=str(2 * CAP),
        INGESTER_CLIENT_IDLE_TIMEOUT_S="30",
        INGESTER_CLIENT_MIN_RATE_BYTES="0",
    )
    return proc


@pytest.fixture(scope="module")
def unread(spawn: Spawn) -> ManagedProcess:
    """A small connection cap, and a write to a client that does not read ends after 2 s."""
    return spawn(
        "conn-unread", INGESTER_MAX_CONNECTIONS=str(CAP), INGESTER_CLIENT_IDLE_TIMEOUT_S="2"
    )


async def pipelined_unread(url: str, requests: int = 3) -> trio.socket.SocketType:
    """A connection that pipelines `requests` GETs of the OpenAPI document (~100 KB each)
    into a 4 KiB receive buffer and reads none of the answers."""
    host, port = host_port(url)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    with trio.move_on_after(1):
        await stream.send_all(get("/openapi.json") * requests)
    return sock


async def live(url: str) -> int:
    return (await ask(url, get("/health/live", "Connection: close"))).status


def capped_internal(proc: ManagedProcess) -> str:
    return f"http://127.0.0.1:{proc.env['INGESTER_INTERNAL_PORT']}"


async def in_flight(http: httpx.AsyncClient, internal_url: str) -> float:
    text = (await http.get(internal_url + "/metrics")).text
    match = re.search(r"^ingester_uploads_in_flight (\S+)$", text, re.MULTILINE)
    assert match is not None, text[:200]
    return float(match[1])


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def ask(url: str, request: bytes) -> RawResponse:
    stream = await connect(url)
    async with stream:
        await stream.send_all(request)
        return await read_response(stream)


# --- B4: a header-read timeout -------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    stack: Stack, quick: ManagedProcess
) -> None:
    with trio.fail_after(20):
        before = stack.all_files()
        stream = await connect(quick.url)
        async with stream:
            started = trio.current_time()
            assert await closed_by_server(stream, within_s=HEADER_TIMEOUT_S + 3)
            assert trio.current_time() - started >= HEADER_TIMEOUT_S * 0.9
        await assert_unharmed(stack, quick.url, before)


async def test_a_head_dribbled_a_line_at_a_time_gets_408_at_the_header_timeout(
    stack: Stack, quick: ManagedProcess
) -> None:
    """Each piece arrives well within any per-read timeout; the whole head never does."""
    with trio.fail_after(20):
        before = stack.all_files()
        stream = await connect(quick.url)
        async with stream, trio.open_nursery() as nursery:

            async def dribble() -> None:
                await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: test\r\n")
                for n in range(100):
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(f"X-Slow-{n}: y\r\n".encode())
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            nursery.start_soon(dribble)
            started = trio.current_time()
            response = await read_response(stream)
            took = trio.current_time() - started
            assert response.status == 408, response
            assert response.json_code() == "CLIENT_TIMEOUT"
            assert response.headers["connection"] == "close"
            assert HEADER_TIMEOUT_S * 0.9 <= took < HEADER_TIMEOUT_S + 2, took
            assert await closed_by_server(stream, within_s=2)
            nursery.cancel_scope.cancel()
        await assert_unharmed(stack, quick.url, before)


async def test_a_kept_alive_connection_waits_idle_then_has_the_header_timeout(
    stack: Stack, quick: ManagedProcess
) -> None:
    """Idle between requests is the keep-alive timeout's business; the header timeout
    starts with the next request's first byte."""
    with trio.fail_after(20):
        before = stack.all_files()
        stream = await connect(quick.url)
        async with stream:
            await stream.send_all(get("/health/live"))
            assert (await read_response(stream)).status == 200
            # Idle for longer than the header timeout: still open.
            assert not await closed_by_server(stream, within_s=HEADER_TIMEOUT_S * 1.5)
            await stream.send_all(get("/health/live"))
            assert (await read_response(stream)).status == 200
            # A head started and left unfinished: 408 within the header timeout.
            await stream.send_all(b"GET /health/live HTTP/1.1\r\n")
            response = await read_response(stream)
            assert response.status == 408, response
            assert response.json_code() == "CLIENT_TIMEOUT"
        await assert_unharmed(stack, quick.url, before)


async def test_probes_answer_under_a_thousand_idle_connections(
    stack: Stack, default: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(60):
        before = stack.all_files()
        rss_before = psutil.Process(default.pid).memory_info().rss
        idle: list[trio.SocketStream] = []
        try:
            for n in range(1000):
                stream = await connect(default.url)
                idle.append(stream)
                if n % 2:  # half of them start a head and never finish it
                    await stream.send_all(b"GET / HTTP/1.1\r\nHost: test\r\n")
            latencies = []
            for _ in range(10):
                for path in ("/health/live", "/health/ready"):
                    started = trio.current_time()
                    response = await ask(default.url, get(path))
                    latencies.append(trio.current_time() - started)
                    assert response.status == 200, response
            assert max(latencies) < 1.0, latencies
            rss_growth = psutil.Process(default.pid).memory_info().rss - rss_before
            print(f"1000 idle connections: RSS +{rss_growth / 1e6:.1f} MB, "
                  f"probe latency max {max(latencies) * 1000:.1f} ms")  # fmt: skip
        finally:
            for stream in idle:
                await stream.aclose()
        await assert_unharmed(stack, default.url, before)


# --- B4: a cap on open connections ---------------------------------------------------------


async def test_a_request_framed_both_ways_is_refused_and_its_connection_closed(
    stack: Stack, default: ManagedProcess, token: TokenFactory
) -> None:
    """Content-Length and Transfer-Encoding together (RFC 9112 section 6.3): 400, and the
    request pipelined behind it is never answered on that connection."""
    with trio.fail_after(15):
        before = stack.all_files()
        smuggled = (
            "POST /api/v1/files/upload HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer {token()}\r\n"
            "Content-Type: multipart/form-data; boundary=B0undary\r\n"
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\n"
        ).encode() + get("/health/live", "X-Request-ID: smuggled-second")
        stream = await connect(default.url)
        async with stream:
            await stream.send_all(smuggled)
            refused = await read_response(stream)
            assert refused.status == 400, refused
            assert refused.json_code() == "BAD_REQUEST"
            rest = b""
            with trio.fail_after(2):  # closed by the server, with no second answer
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            assert b"HTTP/1.1" not in rest, rest
        await assert_unharmed(stack, default.url, before)


async def test_clients_that_pipeline_read_nothing_and_leave_free_their_connections(
    stack: Stack, unread: ManagedProcess
) -> None:
    """Found by a review: their answers could not be written, h11 kept the read loop paused
    for a response cycle that never ended, and the connections (counted busy, so never
    evicted) filled the cap for good: every later request, probes included, got 503."""
    with trio.fail_after(30):
        before = stack.all_files()
        for _ in range(CAP):
            sock = await pipelined_unread(unread.url)
            await trio.sleep(0.3)
            sock.close()  # unread answers waiting: the kernel resets the connection

        async def serving() -> bool:
            return await live(unread.url) == 200

        await until(serving, timeout_s=10)
        await assert_unharmed(stack, unread.url, before)


async def test_a_client_gone_while_its_answer_is_written_frees_its_connection_at_once(
    stack: Stack, default: ManagedProcess
) -> None:
    """One ordinary request, its answer not read, the client gone: the connection ends then,
    not after the 75 s keep-alive timer that the answer's end used to start once the read
    loop had already ended (found by a review: one file descriptor per such client)."""
    with trio.fail_after(60):
        before = stack.all_files()
        server = psutil.Process(default.pid)

        def descriptors() -> int:
            return int(server.num_fds())

        for _ in range(4):  # which of two things ends first varies: several rounds
            # What the server holds at rest (earlier connections closed).
            at_rest = await until_still(descriptors, interval_s=0.1, samples=5)
            sock = await pipelined_unread(default.url, requests=1)
            await trio.sleep(0.5)  # the answer is being written into the full window
            sock.close()

            async def closed(at_rest: int = at_rest) -> bool:
                return descriptors() <= at_rest

            await until(closed, timeout_s=10)
        await assert_unharmed(stack, default.url, before)


async def test_clients_that_stop_reading_are_cut_after_the_send_timeout(
    stack: Stack, unread: ManagedProcess
) -> None:
    """Connected, not reading: a write that cannot finish within the send timeout (here 2 s)
    ends the connection and frees its place under the cap."""
    with trio.fail_after(30):
        before = stack.all_files()
        stalled = [await pipelined_unread(unread.url) for _ in range(CAP // 4)]
        ports = {sock.getsockname()[1] for sock in stalled}

        def held() -> int:
            # The ingester's own sockets: once closed they are no longer its (its FIN waits
            # behind the unsent answers, so our side cannot tell yet).
            theirs = psutil.Process(unread.pid).net_connections(kind="tcp")
            return len([c for c in theirs if c.raddr and c.raddr.port in ports])

        async def all_held() -> bool:
            return held() == len(ports)

        async def none_held() -> bool:
            return held() == 0

        try:
            await until(all_held, timeout_s=5)  # served: the answers are being written
            held_at = trio.current_time()
            await until(none_held, timeout_s=15)
            # Not at once: each was served as long as its write could go on.
            assert trio.current_time() - held_at >= 1.0
            assert await live(unread.url) == 200
        finally:
            for sock in stalled:
                sock.close()
        await assert_unharmed(stack, unread.url, before)


async def test_at_the_connection_cap_the_longest_idle_connection_makes_room(
    stack: Stack, capped: ManagedProcess
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        idle = [await connect(capped.url) for _ in range(CAP)]
        try:
            response = await ask(capped.url, get("/health/ready"))
            assert response.status == 200, response
            # The oldest idle connection was closed for it; the newest are still open.
            assert await closed_by_server(idle[0], within_s=2)
            assert not await closed_by_server(idle[-1], within_s=0.1)
        finally:
            for stream in idle:
                await stream.aclose()
        await assert_unharmed(stack, capped.url, before)


async def test_at_the_connection_cap_with_none_idle_a_new_connection_gets_503(
    stack: Stack, capped: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        busy: list[trio.SocketStream] = []
        try:
            head = (
                "POST /api/v1/files/upload HTTP/1.1\r\nHost: test\r\n"
                f"Authorization: Bearer {token(sub='busy')}\r\n"
                "Content-Type: multipart/form-data; boundary=B0undary\r\n"
                "Content-Length: 1000000\r\n\r\n"
                '--B0undary\r\nContent-Disposition: form-data; name="file"; filename="b"\r\n\r\n'
            ).encode()
            for _ in range(CAP):
                stream = await connect(capped.url)
                await stream.send_all(head + b"x" * 1000)
                busy.append(stream)
            # Every one of them is an upload in flight (seen on the internal listener,
            # which the public cap does not count).
            async with httpx.AsyncClient(trust_env=False, timeout=5) as http:

                async def all_in_flight() -> bool:
                    return await in_flight(http, capped_internal(capped)) == CAP

                await until(all_in_flight, timeout_s=10)
            refused = await ask(capped.url, get("/health/ready"))
            assert refused.status == 503, refused
            assert refused.json_code() == "SERVICE_BUSY"
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["connection"] == "close"
        finally:
            for stream in busy:
                await stream.aclose()
        # Once the busy clients are gone (their uploads cancelled), new ones are served.
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:

            async def served() -> bool:
                return (await http.get(capped.url + "/health/ready")).status_code == 200

            await until(served, timeout_s=5)
        await assert_unharmed(stack, capped.url, before)


# --- B5: a hard cap on header bytes and header count -----------------------------------------


def many_headers(count: int, size: int = 0) -> bytes:
    extra = [f"X-Header-{n}: {'v' * size or 'value'}" for n in range(count)]
    return get("/health/live", *extra)


HEADS = {
    "10000 headers (about 109 KB)": many_headers(10_000),
    "150 small headers": many_headers(150),
    "one 20 KiB header": get("/health/live", "X-Big: " + "b" * 20 * 1024),
}


# (head, segment size): one segment, 4 KiB pieces, and 100-byte pieces for the small ones.
CASES = [
    (name, segment)
    for name, data in HEADS.items()
    for segment in (None, 4096, 100)
    if not (segment == 100 and len(data) > 50_000)
]


@pytest.mark.parametrize(
    ("head", "segment"), CASES, ids=[f"{h}, {s or 'one segment'}" for h, s in CASES]
)
async def test_an_oversized_head_gets_431_however_it_is_segmented(
    stack: Stack, default: ManagedProcess, head: str, segment: int | None
) -> None:
    data = HEADS[head]
    with trio.fail_after(30):
        before = stack.all_files()
        stream = await connect(default.url)
        async with stream, trio.open_nursery() as nursery:

            async def send() -> None:
                pieces = (
                    [data]
                    if segment is None
                    else [data[i : i + segment] for i in range(0, len(data), segment)]
                )
                for piece in pieces:
                    try:
                        await stream.send_all(piece)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    if segment is not None:
                        await trio.sleep(0.002)

            nursery.start_soon(send)
            response = await read_response(stream)
            assert response.status == 431, response
            assert response.json_code() == "REQUEST_HEADERS_TOO_LARGE"
            assert response.headers["connection"] == "close"
            nursery.cancel_scope.cancel()
        await assert_unharmed(stack, default.url, before)


async def test_a_head_just_under_the_caps_is_served(stack: Stack, default: ManagedProcess) -> None:
    """The control: 90 fields and 12 KiB in one segment."""
    with trio.fail_after(10):
        response = await ask(default.url, many_headers(90, size=120))
        assert response.status == 200, response


async def test_http2_prior_knowledge_gets_an_http1_answer(
    stack: Stack, default: ManagedProcess
) -> None:
    """HTTP/2 would bypass the head caps and timeouts above: it is not spoken."""
    with trio.fail_after(10):
        before = stack.all_files()
        stream = await connect(default.url)
        async with stream:
            await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            response = await read_response(stream)
            assert response.status == 505, response
            assert response.json_code() == "HTTP_VERSION_NOT_SUPPORTED"
        await assert_unharmed(stack, default.url, before)


async def test_an_unknown_http_version_gets_505(stack: Stack, default: ManagedProcess) -> None:
    """h11 reads any HTTP/x.y: it answered HTTP/9.9 as 1.1 (found by a review)."""
    with trio.fail_after(10):
        before = stack.all_files()
        for version in ("HTTP/9.9", "HTTP/2.0", "HTTP/1.2"):
            request = f"GET /health/live {version}\r\nHost: test\r\n\r\n".encode()
            response = await ask(default.url, request)
            assert response.status == 505, (version, response)
            assert response.json_code() == "HTTP_VERSION_NOT_SUPPORTED"
        assert (await ask(default.url, get("/health/live"))).status == 200
        await assert_unharmed(stack, default.url, before)


async def test_a_transfer_coding_other_than_chunked_gets_501_with_its_own_code(
    stack: Stack, default: ManagedProcess
) -> None:
    with trio.fail_after(10):
        before = stack.all_files()
        for coding in ("gzip, chunked", "identity", "chunked, chunked"):
            request = (
                "POST /api/v1/files/upload HTTP/1.1\r\nHost: test\r\n"
                f"Transfer-Encoding: {coding}\r\n\r\n0\r\n\r\n"
            ).encode()
            response = await ask(default.url, request)
            assert response.status == 501, (coding, response)
            assert response.json_code() == "NOT_IMPLEMENTED"
        await assert_unharmed(stack, default.url, before)


async def test_a_websocket_upgrade_gets_our_400_with_its_request_id(
    stack: Stack, default: ManagedProcess
) -> None:
    """No route speaks WebSocket; Quart answered such requests itself (405, or its stock
    400 page) without X-Request-ID (found by a review)."""
    with trio.fail_after(10):
        before = stack.all_files()
        for path in ("/api/v1/files/upload", "/", "/health/live"):
            response = await ask(
                default.url,
                get(
                    path,
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "X-Request-ID: ws-probe-1",
                ),
            )
            assert response.status == 400, (path, response)
            assert response.json_code() == "BAD_REQUEST"
            assert response.headers["x-request-id"] == "ws-probe-1"
        await assert_unharmed(stack, default.url, before)


async def test_a_trailer_over_the_field_cap_gets_431(
    stack: Stack, default: ManagedProcess, token: TokenFactory
) -> None:
    """A chunked body's trailer is a head too: its fields are capped like the request's
    (found by a review: 5000 trailer lines in one read were accepted)."""
    with trio.fail_after(15):
        before = stack.all_files()
        form = (
            b'--B0undary\r\nContent-Disposition: form-data; name="file"; filename="t"\r\n\r\n'
            b"abc\r\n--B0undary--\r\n"
        )
        trailer = "".join(f"X-T{i}: v\r\n" for i in range(5000)).encode()
        request = (
            (
                "POST /api/v1/files/upload HTTP/1.1\r\nHost: test\r\n"
                f"Authorization: Bearer {token()}\r\n"
                "Content-Type: multipart/form-data; boundary=B0undary\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            + f"{len(form):x}\r\n".encode()
            + form
            + b"\r\n0\r\n"
            + trailer
            + b"\r\n"
        )
        stream = await connect(default.url)
        async with stream:
            await stream.send_all(request)
            answer = await read_response(stream)
        assert answer.status == 431, answer
        assert answer.json_code() == "REQUEST_HEADERS_TOO_LARGE"
        await assert_unharmed(stack, default.url, before)


class _SendRaces:
    """A server socket whose every send meets another task's (what hypercorn's unlocked
    `send_eof` does to its reader's error answer when a peer leaves mid-body)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this SocketStream")

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def test_an_error_in_one_connection_ends_it_and_not_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stock `TCPServer.run` lets the error out to the listeners' nursery, which ends the
    whole server (pgjones/hypercorn#203); the patched one logs it and ends that connection."""
    install_hypercorn_patches()

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never reached
        raise AssertionError("a malformed request reaches no app")

    with trio.fail_after(10):
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            port = listener.socket.getsockname()[1]
            client = await trio.open_tcp_stream("127.0.0.1", port)
            accepted = await listener.accept()
            assert isinstance(accepted, trio.SocketStream)
            config = Config()
            server = TCPServer(
                wrap_app(app, config.wsgi_max_body_size, "asgi"),
                config,
                WorkerContext(None),
                ConnectionState({}),
                cast(Any, _SendRaces(accepted)),
            )
            # Not HTTP: hypercorn's reader answers 400 itself, and that send fails.
            await client.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            with caplog.at_level(logging.WARNING, logger="ingester.server"):
                await server.run()
            await client.aclose()
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "connection_failed"]
    assert "BusyResourceError" in record.getMessage()
