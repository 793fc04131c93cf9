"""The fault proxy itself, against a tiny in-process upstream on real loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from tests.support.fault_proxy import Fault, FaultPlan, FaultProxy, serve_fault_proxy

MIB: Final = 1024 * 1024

# Not a multiple of the proxy's 64 KiB reads, so the fault lands inside a chunk.
AFTER: Final = 100_000

# The client sends in pieces this size so it can tell how far it got before blocking.
SEND_PIECE: Final = 16 * 1024


@dataclass
class Seen:
    """What the upstream got on one connection and how that connection ended."""

    data: bytearray = field(default_factory=bytearray)
    ended: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None  # None: the client's EOF arrived
    _progress: trio.Event = field(default_factory=trio.Event)

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        self._progress.set()
        self._progress = trio.Event()

    async def wait_for(self, nbytes: int) -> None:
        while len(self.data) < nbytes and not self.ended.is_set():
            await self._progress.wait()


class Upstream:
    """Reads each connection to EOF; echoes as it goes, or replies with the byte count."""

    def __init__(self, *, echo: bool) -> None:
        self.echo = echo
        self.port = 0
        self._send, self._receive = trio.open_memory_channel[Seen](math.inf)

    async def next_connection(self) -> Seen:
        return await self._receive.receive()

    async def handle(self, stream: trio.SocketStream) -> None:
        seen = Seen()
        self._send.send_nowait(seen)
        try:
            async with stream:
                while chunk := await stream.receive_some(64 * 1024):
                    seen.add(chunk)
                    if self.echo:
                        await stream.send_all(chunk)
                # Replying only after EOF: a half-close must survive the proxy.
                if not self.echo:
                    await stream.send_all(str(len(seen.data)).encode())
        except trio.BrokenResourceError as exc:
            seen.error = exc
        finally:
            seen.ended.set()


@asynccontextmanager
async def proxied(*, echo: bool = False) -> AsyncIterator[tuple[Upstream, FaultProxy]]:
    upstream = Upstream(echo=echo)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, upstream.handle, 0, host="127.0.0.1")
        )
        upstream.port = listeners[0].socket.getsockname()[1]
        proxy = await nursery.start(serve_fault_proxy, "127.0.0.1", upstream.port)
        yield upstream, proxy
        nursery.cancel_scope.cancel()


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while chunk := await stream.receive_some(64 * 1024):
        out += chunk
    return bytes(out)


async def send_then_receive(client: trio.SocketStream, data: bytes) -> bytes | OSError:
    """The client's view of the end of a connection: EOF (b"") or the socket error."""
    try:
        await client.send_all(data)
        return await client.receive_some(1024)
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if not isinstance(cause, OSError):
            raise
        return cause


async def exchange(proxy: FaultProxy, payload: bytes) -> tuple[bytes, float]:
    """Send everything, half-close, read the reply to EOF; also the seconds it took."""
    started = trio.current_time()
    async with await connect(proxy) as client:
        await client.send_all(payload)
        await client.send_eof()
        reply = await read_to_eof(client)
    return reply, trio.current_time() - started


async def test_no_fault_passes_bytes_both_ways_intact() -> None:
    payload = secrets.token_bytes(4 * MIB + 123)
    with trio.fail_after(10):
        async with proxied(echo=True) as (upstream, proxy), await connect(proxy) as client:
            echoed = bytearray()

            async def send() -> None:
                await client.send_all(payload)
                await client.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                echoed += await read_to_eof(client)
            seen = await upstream.next_connection()
            await seen.ended.wait()

        assert seen.error is None
        assert hashlib.sha256(seen.data).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert (proxy.connections, proxy.bytes_upstream, proxy.faults_fired) == (
            1,
            len(payload),
            0,
        )


async def test_delay_adds_latency_before_forwarding() -> None:
    with trio.fail_after(10):
        async with proxied() as (_, proxy):
            proxy.set_plan(FaultPlan(Fault.DELAY, delay_s=0.3))
            reply, took = await exchange(proxy, b"x" * 1000)
        assert reply == b"1000"
        assert took >= 0.3
        assert proxy.faults_fired == 1


async def test_throttle_caps_the_upload_rate() -> None:
    with trio.fail_after(10):
        async with proxied() as (_, proxy):
            proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=2 * MIB))
            reply, took = await exchange(proxy, bytes(MIB))
            proxy.heal()
            _, unthrottled = await exchange(proxy, bytes(MIB))
        assert reply == str(MIB).encode()
        assert took >= 0.4
        # Proves the sleep came from the plan, not from a slow machine.
        assert unthrottled < 0.25
        assert (proxy.connections, proxy.faults_fired) == (2, 1)


async def test_cut_forwards_exactly_n_bytes_then_closes_both_sides() -> None:
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy):
            proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=AFTER))
            async with await connect(proxy) as client:
                # Exactly AFTER bytes, in pieces that straddle the proxy's 64 KiB reads: the
                # proxy has read everything, so the kernel closes with FIN, not RST.
                for start in range(0, AFTER, 30_000):
                    await client.send_all(bytes(min(30_000, AFTER - start)))
                assert await client.receive_some(1024) == b""
            seen = await upstream.next_connection()
            await seen.ended.wait()
        assert len(seen.data) == AFTER
        assert seen.error is None
        assert (proxy.bytes_upstream, proxy.faults_fired) == (AFTER, 1)


async def test_cut_inside_a_chunk_forwards_exactly_n_bytes() -> None:
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy):
            proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=AFTER))
            async with await connect(proxy) as client:
                end = await send_then_receive(client, bytes(3 * AFTER))
            seen = await upstream.next_connection()
            await seen.ended.wait()
        # Bytes the proxy never read make Linux follow the FIN with an RST; a socket that
        # already had the FIN (CLOSE_WAIT) reports that RST as EPIPE, not ECONNRESET.
        assert end == b"" or type(end) is BrokenPipeError
        assert len(seen.data) == AFTER
        assert seen.error is None
        assert proxy.bytes_upstream == AFTER


async def test_reset_aborts_both_sides_with_rst() -> None:
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy):
            proxy.set_plan(FaultPlan(Fault.RESET, after_bytes=AFTER))
            async with await connect(proxy) as client:
                end = await send_then_receive(client, bytes(3 * AFTER))
            seen = await upstream.next_connection()
            await seen.ended.wait()
        assert type(end) is ConnectionResetError
        assert isinstance(seen.error, trio.BrokenResourceError)
        assert isinstance(seen.error.__cause__, ConnectionResetError)
        assert len(seen.data) <= AFTER
        assert (proxy.bytes_upstream, proxy.faults_fired) == (AFTER, 1)


async def test_stall_holds_the_upload_until_heal() -> None:
    payload = secrets.token_bytes(32 * MIB)
    sent = 0
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy), await connect(proxy) as client:
            proxy.set_plan(FaultPlan(Fault.STALL, after_bytes=AFTER))
            done = trio.Event()

            async def send() -> None:
                nonlocal sent
                view = memoryview(payload)
                while sent < len(payload):
                    await client.send_all(view[sent : sent + SEND_PIECE])
                    sent += SEND_PIECE
                await client.send_eof()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                seen = await upstream.next_connection()
                await seen.wait_for(AFTER)
                with trio.move_on_after(1.0) as blocked:
                    await done.wait()
                assert blocked.cancelled_caught
                assert len(seen.data) == AFTER
                # The client kept writing into the buffers, then its send blocked.
                assert AFTER < sent < len(payload)
                proxy.heal()
            reply = await read_to_eof(client)
            await seen.ended.wait()

        assert reply == str(len(payload)).encode()
        assert hashlib.sha256(seen.data).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert (proxy.bytes_upstream, proxy.faults_fired) == (len(payload), 1)


async def test_plan_change_reaches_a_live_connection() -> None:
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy), await connect(proxy) as client:
            await client.send_all(bytes(AFTER))
            seen = await upstream.next_connection()
            await seen.wait_for(AFTER)
            assert proxy.faults_fired == 0

            proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=AFTER + 50_000))
            await client.send_all(bytes(50_000))
            await seen.ended.wait()
            assert await client.receive_some(1024) == b""

        assert len(seen.data) == AFTER + 50_000
        assert seen.error is None
        assert (proxy.connections, proxy.bytes_upstream, proxy.faults_fired) == (
            1,
            AFTER + 50_000,
            1,
        )


async def test_cancel_ends_every_task_and_a_second_proxy_starts() -> None:
    with trio.fail_after(10):
        async with proxied() as (upstream, _):
            async with trio.open_nursery() as nursery:
                first: FaultProxy = await nursery.start(
                    serve_fault_proxy, "127.0.0.1", upstream.port
                )
                first.set_plan(FaultPlan(Fault.STALL, after_bytes=4))
                client = await connect(first)
                await client.send_all(b"held")
                await (await upstream.next_connection()).wait_for(4)
                # A stalled connection waits on an event: cancelling must still end it.
                nursery.cancel_scope.cancel()
            async with client:
                assert await client.receive_some(1024) == b""

            async with trio.open_nursery() as nursery:
                second: FaultProxy = await nursery.start(
                    serve_fault_proxy, "127.0.0.1", upstream.port
                )
                reply, _ = await exchange(second, b"again")
                nursery.cancel_scope.cancel()
        assert reply == b"5"
        assert (first.bytes_upstream, first.faults_fired) == (4, 1)
        assert (second.connections, second.bytes_upstream) == (1, 5)


async def test_only_matching_cuts_the_connection_that_sent_the_bytes_and_no_other() -> None:
    """Two connections live at once; the plan names bytes only the second sends (split across
    two writes): that one is cut exactly AFTER bytes past the end of the match, the first
    goes on to the end untouched."""
    needle = b"X-Request-ID: upload-b"
    with trio.fail_after(10):
        async with proxied() as (upstream, proxy):
            proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=AFTER, only_matching=needle))
            async with await connect(proxy) as first, await connect(proxy) as second:
                await first.send_all(b"X-Request-ID: upload-a\r\n" + bytes(AFTER))
                seen_first = await upstream.next_connection()
                seen_second = await upstream.next_connection()
                await second.send_all(b"head " + needle[:9])
                # The cut may come while this is still being written.
                with contextlib.suppress(trio.BrokenResourceError):
                    await second.send_all(needle[9:] + bytes(3 * AFTER))
                await seen_second.ended.wait()
                # The first connection is still open and still forwards.
                await first.send_all(bytes(2 * AFTER))
                await first.send_eof()
                reply = await read_to_eof(first)
            await seen_first.ended.wait()
        assert seen_second.error is None
        assert bytes(seen_second.data) == b"head " + needle + bytes(AFTER)
        assert reply == str(len(b"X-Request-ID: upload-a\r\n") + 3 * AFTER).encode()
        assert proxy.faults_fired == 1
