"""Serving an app with hypercorn under trio, and stopping it on SIGTERM/SIGINT.

`hypercorn -k trio` dies at once on SIGTERM, so servers here run programmatically:
`serve_app` binds, reports the bound URLs through `task_status` (callers can
`await nursery.start(serve_app, ...)` and know the port is open), and returns once
`shutdown_trigger` has fired and connections have drained or hit `graceful_timeout`.

hypercorn (0.18) lacks what a server facing hostile clients needs; each gap is closed by one
patch below, in one place, with its reason (installed once per process by `serve_app`):

- `_read_data`: a header-read timeout (hypercorn's only clock before a request head is
  complete is the 75 s keep-alive timer), eviction at the connection cap, and no CLOSE_WAIT
  after the client closed.
- `_run`: a cap on open connections (`ConnectionLimits.max_connections`), and one
  connection's error ends that connection, not the server (`_connection_failed`).
- `_guard_heads`: hard caps on request-head bytes and header count whatever the TCP
  segmentation (h11's own cap only applies while a head is incomplete: 10,000 headers in one
  segment were parsed), and no HTTP/2 (prior knowledge or h2c upgrade), which would bypass
  all of the above.
- `_send_error_response`: connection-level refusals (400, 408, 431, 505) carry the
  project's JSON envelope and an `X-Request-ID`, like every other answer.
- `_Continue`: `Expect: 100-continue` is answered when the handler first waits for the
  body, not as soon as the head is parsed, so a refused request costs its client no body
  (`tests/hostile/test_expect_continue.py`).

Why patches and not settings: hypercorn's `Config` (0.18) has `keep_alive_timeout`,
`h11_max_incomplete_size` and `backlog`, and none of a header-read timeout, a connection cap
or head caps that hold for a complete head. Each patch has a minimal reproduction against
stock hypercorn, kept as a test that fails without it (tests/hostile/test_connections.py):

- header timeout: connect and send `GET / HTTP/1.1\r\n` then one header line every 5 s, or
  nothing at all: stock hypercorn has only its 75 s keep-alive timer for either
  (`test_a_head_dribbled_a_line_at_a_time_gets_408_at_the_header_timeout`,
  `test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout`);
- connection cap: open a thousand idle connections, then ask `/health/live`: stock
  hypercorn accepts them all and the probe waits behind them
  (`test_probes_answer_under_a_thousand_idle_connections`, `test_at_the_connection_cap_*`);
- head caps: send a head of 10,000 headers in one `send()`: h11 parses it, as its cap only
  counts incomplete heads (`test_an_oversized_head_gets_431_however_it_is_segmented`);
- HTTP/2: send the h2 prior-knowledge preface: stock hypercorn switches to h2, where none of
  the above applies (`test_http2_prior_knowledge_gets_an_http1_answer`);
- a connection's error: serve a connection whose sends raise `BusyResourceError` (as
  hypercorn's unlocked `send_eof` makes its reader's 400 do when a peer leaves mid-body)
  and send it a line that is not HTTP: stock `TCPServer.run` raises, which ends the server
  (`test_an_error_in_one_connection_ends_it_and_not_the_server`).
"""

from __future__ import annotations

import json
import logging
import re
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import chain
from math import inf
from typing import Any, Final

import h11
import h11._connection
import hypercorn.trio.tcp_server
import trio
from h11._receivebuffer import ReceiveBuffer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from .concurrency import leaves
from .http.receive import Intake, ReceiveShare

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# A refusal written straight to the socket, and the close after it: bounded, so a client
# that does not read cannot hold the connection.
REFUSAL_SEND_S: Final = 1.0
REFUSAL_LINGER_S: Final = 0.5
REFUSAL_LINGER_BYTES: Final = 64 * 1024
# Refusals and evictions at the connection cap are logged once per this many.
LOG_EVERY: Final = 100
# The end of a request head (h11 accepts bare LF line ends too).
_END_OF_HEAD: Final = re.compile(rb"\n\r?\n")
_HTTP2_PREFACE: Final = b"PRI * HTTP/2.0"
# Connection-level answers and their codes (`ingester.errors` names the same).
_CODES: Final = {
    400: "BAD_REQUEST",
    408: "CLIENT_TIMEOUT",
    431: "REQUEST_HEADERS_TOO_LARGE",
    501: "NOT_IMPLEMENTED",
    503: "SERVICE_BUSY",
    505: "HTTP_VERSION_NOT_SUPPORTED",
}
_REASONS: Final = {
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listener allows its clients before a route runs."""

    # A request head must be whole this long after the connection's accept, or after its
    # first byte on a kept-alive connection.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    # Open connections; None: no cap.
    max_connections: int | None = None
    retry_after_s: int = 5
    # One write to the client that takes longer (a client that stopped reading) ends the
    # connection: stock hypercorn waits for it forever, shielded (`_patch_protocol_send`).
    send_timeout_s: float = 60.0


def hypercorn_config(
    host: str,
    port: int,
    *,
    graceful_timeout: float,
    keep_alive_s: float = 75.0,
    limits: ConnectionLimits | None = None,
) -> Config:
    limits = limits or ConnectionLimits()
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    # Longer than common load balancers' idle timeouts (60 s), so they close first.
    config.keep_alive_timeout = keep_alive_s
    config.h11_max_incomplete_size = limits.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.ingester_connections = Connections(limits)  # type: ignore[attr-defined]
    return config


def set_socket_read_size(size: int) -> None:
    """hypercorn reads sockets 64 KiB at a time; a module constant is the only knob."""
    hypercorn.trio.tcp_server.MAX_RECV = size


# --- the head caps (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str

    @property
    def code(self) -> str:
        return _CODES.get(self.status, f"HTTP_{self.status}")


def head_problem(data: bytes, *, max_bytes: int, max_headers: int) -> Refusal | None:
    """What is wrong with the start of a request head, as far as `data` goes (complete or
    not): too many bytes, too many fields, or HTTP/2. None while it may still be fine."""
    if data[: len(_HTTP2_PREFACE)] == _HTTP2_PREFACE:
        return Refusal(505, "HTTP/2 is not served here; use HTTP/1.1")
    end = _END_OF_HEAD.search(data, 0, max_bytes)
    if end is None and len(data) > max_bytes:
        return Refusal(431, f"the request head is larger than {max_bytes} bytes")
    head_end = end.end() if end is not None else len(data)
    # Each field ends a line; so do the request line and, once complete, the blank line.
    lines = data.count(b"\n", 0, head_end)
    fields = lines - 2 if end is not None else lines - 1
    if fields > max_headers:
        return Refusal(431, f"the request has more than {max_headers} header fields")
    return None


class _GuardedConnection(h11.Connection):
    """h11's server connection, with `head_problem` checked before each head is parsed: the
    refusal is raised as h11's own `RemoteProtocolError`, so hypercorn answers and closes
    the usual way."""

    def __init__(self, limits: ConnectionLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._limits = limits
        self.refusal: Refusal | None = None
        # `Expect: 100-continue` is left to the request's handler (`_Continue`): hypercorn,
        # which sends the `100` itself as soon as the head is parsed, is told no one waits.
        self.defers_continue = False
        self.continue_opened = False

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        if self.defers_continue and not self.continue_opened:
            return False
        return super().they_are_waiting_for_100_continue

    def start_next_cycle(self) -> None:
        super().start_next_cycle()
        self.continue_opened = False

    def _extract_next_receive_event(self) -> Any:
        if self.their_state is h11.IDLE:
            self.refusal = head_problem(
                bytes(self._receive_buffer),
                max_bytes=self._limits.max_header_bytes,
                max_headers=self._limits.max_headers,
            )
            if self.refusal is not None:
                raise h11.RemoteProtocolError(
                    self.refusal.message, error_status_hint=self.refusal.status
                )
        event = super()._extract_next_receive_event()
        if isinstance(event, h11.Request) and event.http_version not in _SERVED_VERSIONS:
            # h11 reads any "HTTP/x.y" and answered HTTP/9.9 as 1.1.
            self.refusal = Refusal(505, "only HTTP/1.1 (and 1.0) is served here")
            raise h11.RemoteProtocolError(self.refusal.message, error_status_hint=505)
        if isinstance(event, h11.EndOfMessage) and len(event.headers) > self._limits.max_headers:
            # A chunked body's trailer is a head of its own, under the same cap (h11 applies
            # its size cap only while a trailer is incomplete: 5000 lines in one read passed).
            self.refusal = Refusal(
                431, f"the request's trailer has more than {self._limits.max_headers} fields"
            )
            raise h11.RemoteProtocolError(self.refusal.message, error_status_hint=431)
        if isinstance(event, h11.Request) and _framed_twice(event):
            # RFC 9112 section 6.3: such a request may be refused, and its connection must
            # close either way; a proxy in front that framed it by its Content-Length would
            # read our next bytes as another request (request smuggling). h11 alone served
            # it by its chunks and kept the connection (found by a review).
            self.refusal = Refusal(
                400, "a request must not carry both Content-Length and Transfer-Encoding"
            )
            raise h11.RemoteProtocolError(self.refusal.message, error_status_hint=400)
        return event


_SERVED_VERSIONS: Final = frozenset({b"1.0", b"1.1"})


class _Continue:
    """The `ContinueGate` of one connection's requests: `100 Continue` when the handler
    first waits for the body. hypercorn (0.18) sends it as soon as the head is parsed, so a
    client that asked (curl does for every body over 1 MiB) sent its whole body to be
    refused: a bad token, a `Content-Length` over the limit. uvicorn waits for the app's
    first `receive()`, as this does."""

    def __init__(self, protocol: H11Protocol, connection: _GuardedConnection) -> None:
        self._protocol = protocol
        self._connection = connection
        connection.defers_continue = True

    async def open(self) -> None:
        connection = self._connection
        if connection.continue_opened:
            return
        connection.continue_opened = True
        if connection.client_is_waiting_for_100_continue and (
            connection.our_state is h11.SEND_RESPONSE
        ):
            protocol = self._protocol
            await protocol._send_h11_event(
                h11.InformationalResponse(
                    status_code=100, headers=protocol.config.response_headers("h11")
                )
            )

    def shut(self) -> bool:
        return self._connection.client_is_waiting_for_100_continue


def _framed_twice(request: h11.Request) -> bool:
    names = {name for name, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


# --- the connections of one listener --------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Connection:
    server: TCPServer
    accepted_at: float
    # When the head being waited for began (its first byte; the accept for the first).
    head_started: float | None
    # When it last became idle (accepted, or its last response done).
    idle_since: float
    head_bytes: bool = False
    requests_seen: int = 0
    read_scope: trio.CancelScope | None = None
    evicted: bool = False
    # Counted in the receive share as a connection with a request running.
    receiving: bool = False
    # Its bytes received and not yet handed to a handler, in the receive share.
    intake: Intake | None = None
    # Where the read loop hands hypercorn what it read; cancelled when the connection is
    # known dead (a write failed or timed out), since hypercorn may wait there, for a
    # response cycle that can no longer end, before it reads again.
    handle_scope: trio.CancelScope | None = None
    dead: bool = False
    # The read loop has ended: the client's side is over, and no keep-alive is wanted.
    read_done: bool = False

    def waiting_since(self) -> float | None:
        """Since when it has waited for a request head; None while a request runs."""
        if not _waiting_for_head(self.server):
            return None
        return self.head_started if self.head_started is not None else self.idle_since


@dataclass(eq=False)
class Connections:
    """The open connections of one listener, for its cap."""

    limits: ConnectionLimits
    open: set[_Connection] = field(default_factory=set)
    evictions: int = 0
    refusals: int = 0

    def admit(self, conn: _Connection) -> bool:
        """Count `conn` in; at the cap, close the connection that has waited longest for a
        request head to make room. False when every connection is busy: refuse it."""
        cap = self.limits.max_connections
        if cap is not None and len(self.open) >= cap:
            victim = self._longest_waiting()
            if victim is None:
                self.refusals += 1
                return False
            self.evict(victim)
        self.open.add(conn)
        return True

    def leave(self, conn: _Connection) -> None:
        self.open.discard(conn)

    def evict(self, conn: _Connection) -> None:
        self.open.discard(conn)
        conn.evicted = True
        self.evictions += 1
        if self.evictions % LOG_EVERY == 1:
            log.info(
                "connection cap reached: closing the longest-idle connection; %d closed so far",
                self.evictions,
                extra={"event": "connection_evicted"},
            )
        if conn.read_scope is not None:
            conn.read_scope.cancel()

    def _longest_waiting(self) -> _Connection | None:
        waiting = [(since, c) for c in self.open if (since := c.waiting_since()) is not None]
        return min(waiting, key=lambda item: item[0])[1] if waiting else None


def _receive_share(config: Config) -> ReceiveShare | None:
    found = getattr(config, "ingester_receive_share", None)
    return found if isinstance(found, ReceiveShare) else None


def share_receive_memory(config: Config, share: ReceiveShare) -> None:
    """Size this listener's socket reads from `share` (see `ingester.http.receive`)."""
    config.ingester_receive_share = share  # type: ignore[attr-defined]


def _addresses(server: TCPServer) -> tuple[object, object]:
    """The connection's client and server addresses, as hypercorn puts them in the ASGI
    scope (how a request finds its connection's intake)."""
    return (getattr(server.protocol, "client", None), getattr(server.protocol, "server", None))


def _count_receiving(share: ReceiveShare | None, conn: _Connection, receiving: bool) -> None:
    if share is None or conn.receiving == receiving:
        return
    conn.receiving = receiving
    if receiving:
        share.started()
    else:
        share.ended()
        if conn.intake is not None:
            share.settle(conn.intake)


def _connections(config: Config) -> Connections:
    found = getattr(config, "ingester_connections", None)
    if not isinstance(found, Connections):
        found = Connections(ConnectionLimits())
        config.ingester_connections = found  # type: ignore[attr-defined]
    return found


def _h11(server: TCPServer) -> H11Protocol | None:
    wrapper = getattr(server, "protocol", None)
    inner = getattr(wrapper, "protocol", None)
    return inner if isinstance(inner, H11Protocol) else None


def _buffered(protocol: H11Protocol) -> bool:
    """Whether h11 holds received bytes it has not parsed into events yet."""
    connection = protocol.connection
    return isinstance(connection, h11.Connection) and bool(connection.trailing_data[0])


def _waiting_for_head(server: TCPServer) -> bool:
    protocol = _h11(server)
    if protocol is None:
        return False
    connection = protocol.connection
    return isinstance(connection, h11.Connection) and connection.their_state is h11.IDLE


def error_body(status: int, message: str, request_id: str) -> bytes:
    code = _CODES.get(status, f"HTTP_{status}")
    return json.dumps(
        {"error": {"code": code, "message": message, "request_id": request_id}}
    ).encode()


def _raw_response(status: int, message: str, extra: dict[str, str] | None = None) -> bytes:
    request_id = uuid.uuid4().hex
    body = error_body(status, message, request_id)
    headers = {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "connection": "close",
        "x-request-id": request_id,
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return (head + "\r\n").encode("latin-1") + body


async def _refuse_raw(stream: Any, response: bytes) -> None:
    """Write `response`, stop sending, and read what the client had sent (briefly), so the
    kernel's reset of unread input does not destroy the answer; then close."""
    with trio.move_on_after(REFUSAL_SEND_S):
        try:
            await stream.send_all(response)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            return
    with trio.move_on_after(REFUSAL_LINGER_S):
        drained = 0
        while drained < REFUSAL_LINGER_BYTES:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            drained += len(data)


def _connection_failed(exc: Exception) -> None:
    """Log a connection's unexpected end (trio's listener loop then closes its socket).

    Seen under load: a peer closes mid-body while the app ends its answer; hypercorn's reader
    then sends a 400 while `TCPServer._close` sends EOF outside the send lock, and the reader's
    `send_all` raises `BusyResourceError`. The peer is gone either way."""
    log.warning(
        "connection ended by an error: %s",
        "; ".join(f"{type(e).__name__}: {e}" for e in leaves(exc)),
        exc_info=exc,
        extra={"event": "connection_failed"},
    )


# --- the patches ------------------------------------------------------------------------


def _patch_run() -> None:
    """The connection cap: a connection is counted in before hypercorn serves it. At the
    cap, the connection that has waited longest for a request head (idle keep-alive, a
    client that connected and said nothing, a slow head) is closed to make room, as nginx
    reuses its idle connections; when every connection has a request running, the new one
    gets 503 SERVICE_BUSY with Retry-After at once and is closed. Stopping to accept
    instead would leave it in the kernel's queue, where a health probe would time out."""
    run = TCPServer.run

    async def _run(self: TCPServer) -> None:
        connections = _connections(self.config)
        now = trio.current_time()
        conn = _Connection(self, accepted_at=now, head_started=now, idle_since=now)
        self._ingester_conn = conn  # type: ignore[attr-defined]
        if not connections.admit(conn):
            retry = str(connections.limits.retry_after_s)
            if connections.refusals % LOG_EVERY == 1:  # a flood must not flood the log too
                log.warning(
                    "connection refused: %d open connections, all busy (the cap); "
                    "%d refused so far",
                    len(connections.open),
                    connections.refusals,
                    extra={"event": "connection_refused"},
                )
            try:
                await _refuse_raw(
                    self.stream,
                    _raw_response(
                        503, "too many open connections; retry shortly", {"retry-after": retry}
                    ),
                )
            finally:
                with trio.CancelScope(shield=True):
                    await self.stream.aclose()
            return
        try:
            await run(self)
        except Exception as exc:
            # One connection's failure ends that connection, never the server (stock
            # hypercorn lets it reach the listeners' nursery: pgjones/hypercorn#203).
            _connection_failed(exc)
        finally:
            connections.leave(conn)
            share = _receive_share(self.config)
            _count_receiving(share, conn, False)
            if share is not None and conn.intake is not None:
                share.close(*_addresses(self), conn.intake)

    TCPServer.run = _run  # type: ignore[method-assign]


def _patch_read_data() -> None:
    """The read loop, with three additions to hypercorn's:

    - Header-read timeout: a request head must be whole `header_timeout_s` after the accept
      (first request) or after its first byte (later requests on a kept-alive connection;
      the idle time before is the keep-alive timeout's). A partial head then gets 408
      CLIENT_TIMEOUT; a connection that sent nothing is closed silently.
    - Eviction: the connection cap cancels the read of the connection it closes.
    - No CLOSE_WAIT: hypercorn starts its keep-alive timer when a response completes; when
      the client then closes, the read loop ends but the connection's task group still waits
      for that timer, so the socket sat in CLOSE_WAIT for the whole keep-alive timeout (75 s,
      measured: 15 of 20 curl uploads). Stopping the timer once the loop ends closes it.
    """

    async def _read_data(self: TCPServer) -> None:
        conn: _Connection | None = getattr(self, "_ingester_conn", None)
        timeout_s = _connections(self.config).limits.header_timeout_s
        share = _receive_share(self.config)
        if conn is not None and share is not None:
            # Before the first read: no request of this connection can look for it sooner.
            conn.intake = share.open(*_addresses(self))
            protocol = _h11(self)
            if conn.intake is not None and protocol is not None:
                connection = protocol.connection
                if isinstance(connection, _GuardedConnection):
                    conn.intake.continue_gate = _Continue(protocol, connection)
        intake = conn.intake if conn is not None else None
        while True:
            deadline = inf
            waiting = _waiting_for_head(self)
            if conn is not None:
                _count_receiving(share, conn, not waiting)
            read_size = (
                share.read_size(intake) if share is not None else hypercorn.trio.tcp_server.MAX_RECV
            )
            protocol = _h11(self)
            if conn is not None and protocol is not None:
                if protocol.keep_alive_requests != conn.requests_seen:
                    # A new request cycle: the next head's clock starts with its first byte.
                    conn.requests_seen = protocol.keep_alive_requests
                    conn.head_started, conn.head_bytes = None, False
                    conn.idle_since = trio.current_time()
                if waiting and conn.head_started is None and _buffered(protocol):
                    # Bytes of a head that came while the last response was still going out
                    # (or pipelined after it): its clock starts now.
                    conn.head_started = trio.current_time()
                    conn.head_bytes = True
                if waiting and conn.head_started is not None:
                    deadline = conn.head_started + timeout_s
                if conn.evicted:
                    break
            with trio.CancelScope(deadline=deadline) as scope:
                if conn is not None:
                    conn.read_scope = scope
                try:
                    data = await self.stream.receive_some(read_size)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                finally:
                    if conn is not None:
                        conn.read_scope = None
            if scope.cancelled_caught:
                if conn is not None and not conn.evicted and conn.head_bytes:
                    await _timed_out(self, timeout_s)
                break
            if conn is not None and _waiting_for_head(self):
                # These bytes start (or go on with) a request head.
                if conn.head_started is None:
                    conn.head_started = trio.current_time()
                conn.head_bytes = conn.head_bytes or bool(data)
            if intake is not None and share is not None and conn is not None and conn.receiving:
                # A request's body. (A read that waited for a head is not counted: the
                # head is parsed at once, and it cannot stay counted for the request's
                # length. The body bytes it may carry are under-counted, one read at most.)
                share.received(intake, len(data))
            with trio.CancelScope() as handling:
                if conn is not None:
                    if conn.dead:
                        handling.cancel()
                    conn.handle_scope = handling
                try:
                    await self.protocol.handle(RawData(bytes(data)))
                finally:
                    if conn is not None:
                        conn.handle_scope = None
            if handling.cancelled_caught or data == b"":
                break
        if conn is not None:
            conn.read_done = True
            # Nothing more is read: the connection stops counting now, not when its
            # request's cleanup ends (a handler cancelled by the client's leaving may take
            # seconds to undo its upload, holding received bytes it will never read).
            _count_receiving(share, conn, False)
        await self.protocol.handle(Closed())
        await self.idle_task.stop()

    TCPServer._read_data = _read_data  # type: ignore[method-assign]


async def _timed_out(server: TCPServer, timeout_s: float) -> None:
    response = _raw_response(408, f"the request headers did not arrive within {timeout_s:g} s")
    async with server.send_lock:
        await _refuse_raw(server.stream, response)


def _patch_protocol_send() -> None:
    """Writes to the client, bounded. hypercorn sends each piece of a response under its
    send lock, shielded from cancellation and with no timeout, so a client that stops
    reading (its receive window full) held the write, the lock and the connection forever.
    With pipelined requests it was worse: h11 pauses the read loop until the response
    cycle ends, which it never did, so the connection was neither read nor closed, even
    after the client had gone, and counted as busy it was never evicted (found by a review:
    16 such connections filled a 16-connection cap for good).

    Now a write that takes longer than `send_timeout_s` closes the socket, and after a
    write that failed or timed out, a read loop paused for the response cycle (the only
    wait nothing else ends) is stopped, so the connection ends."""
    protocol_send = TCPServer.protocol_send

    async def send(self: TCPServer, event: Event) -> None:
        conn: _Connection | None = getattr(self, "_ingester_conn", None)
        if not isinstance(event, RawData):
            if isinstance(event, Updated) and event.idle and conn is not None and conn.read_done:
                # The response ended after the read loop did (the client went away while
                # it was being answered): no keep-alive timer, whose 75 s the connection
                # (its socket and its place under the cap) would otherwise wait out.
                return
            await protocol_send(self, event)
            return
        timeout_s = _connections(self.config).limits.send_timeout_s
        async with self.send_lock:
            failed = False
            # Shielded, as hypercorn does (a cancelled handler must not cut a write in two),
            # but within a deadline of its own.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(timeout_s):
                        await self.stream.send_all(event.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    failed = True
                except trio.TooSlowError:
                    failed = True
                    log.info(
                        "a write to the client did not finish within %g s; closing",
                        timeout_s,
                        extra={"event": "client_send_timeout"},
                    )
                    # Whatever reads or writes next on it fails: the connection ends.
                    await self.stream.aclose()
        if not failed:
            return
        await self.protocol.handle(Closed())
        protocol = _h11(self)
        if conn is not None and protocol is not None and not protocol.can_read.is_set():
            # The read loop waits in hypercorn for a response cycle that can no longer end
            # (a pipelined request behind this answer): nothing else would ever wake it.
            conn.dead = True
            if conn.handle_scope is not None:
                conn.handle_scope.cancel()

    TCPServer.protocol_send = send  # type: ignore[method-assign]


def _guard_heads() -> None:
    """Head caps and HTTP/1.1 only: every h11 connection is a `_GuardedConnection`, and an
    `Upgrade: h2c` is ignored (the request is served as HTTP/1.1, which RFC 9110 allows)."""
    init = H11Protocol.__init__

    def __init__(self: H11Protocol, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.connection = _GuardedConnection(_connections(self.config).limits)

    async def _check_protocol(self: H11Protocol, event: h11.Request) -> None:
        return None

    H11Protocol.__init__ = __init__  # type: ignore[method-assign]
    H11Protocol._check_protocol = _check_protocol  # type: ignore[method-assign]


def _patch_error_response() -> None:
    """hypercorn answers a request h11 cannot parse with an empty body; ours carry the JSON
    envelope and an `X-Request-ID` like every other answer (400 malformed, 431 too large,
    505 HTTP/2)."""

    async def _send_error_response(self: H11Protocol, status_code: int) -> None:
        refusal = getattr(self.connection, "refusal", None)
        if isinstance(refusal, Refusal) and refusal.status == status_code:
            message = refusal.message
        elif status_code == 431:
            message = f"the request head is larger than {self.config.h11_max_incomplete_size} bytes"
        elif status_code == 501:
            message = "the request's Transfer-Encoding is not supported (only chunked is)"
        else:
            message = "the request is not valid HTTP/1.1"
        request_id = uuid.uuid4().hex
        body = error_body(status_code, message, request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
        ]
        await self._send_h11_event(
            h11.Response(
                status_code=status_code,
                headers=list(chain(headers, self.config.response_headers("h11"))),
                reason=_REASONS.get(status_code, "").encode(),
            )
        )
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]


def _cork_response_heads() -> None:
    """One write per short answer. hypercorn writes an answer's head, each body piece and
    the end of message (no bytes at all with `Content-Length`) as separate sends, each
    under the send lock, a shielded deadline and a trio checkpoint: three for a JSON
    answer, two for a `204`. With many tasks running (a pipelined tus store streaming to
    its element) each checkpoint waits its turn, and a `PATCH`'s answer took about 1 ms
    of its client's time.

    Now the head of a final answer waits for what follows it and goes out in the same
    send, and a send of nothing is skipped. Only once the request has been read whole
    (h11's `their_state` is `DONE`): an answer given while the body is still arriving (an
    early refusal, whose body is then drained) goes out at once, as before, so a client
    still sending sees it."""

    async def _send_h11_event(self: H11Protocol, event: Any) -> None:
        head: bytes | None = getattr(self, "_ingester_head", None)
        self._ingester_head = None  # type: ignore[attr-defined]
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            data = None
        else:
            if isinstance(event, h11.Response) and self.connection.their_state is h11.DONE:
                self._ingester_head = data  # type: ignore[attr-defined]
                return
        if head:
            data = head + (data or b"")
        if data:
            await self.send(RawData(data=data))

    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]


def install_hypercorn_patches() -> None:
    """Apply the patches above (idempotent)."""
    if getattr(TCPServer, "_ingester_patched", False):
        return
    _patch_run()
    _patch_read_data()
    _patch_protocol_send()
    _guard_heads()
    _patch_error_response()
    _cork_response_heads()
    TCPServer._ingester_patched = True  # type: ignore[attr-defined]


class _PassThroughReceiveBuffer(ReceiveBuffer):
    """h11's receive buffer, without its copies of request bodies.

    h11 (0.16) appends every socket read to a bytearray (one copy), and hands body data out
    as a slice of it, sliced twice (`maybe_extract_at_most` slices once to test for
    emptiness, then `_extract` slices again); hypercorn then turns that bytearray into
    `bytes` (a fourth copy). This buffer keeps a read as the `bytes` object the socket
    returned while the buffer is otherwise empty, and takes from it without copying: all of
    it is handed out as that same object (hypercorn's `bytes()` of it is then free), a part
    as a `memoryview` of it (one copy, hypercorn's), and a chunk header is found and cut from
    it in place. So a chunked body (the ingester's own requests to an element are chunked,
    in 1 MiB frames) costs one copy, not four, also when a read spans a chunk's end: with
    the reads of a busy element that was every read, which made chunked bodies cost it about
    1.5 CPU-s/GiB more than the same body with `Content-Length` (bench/element_framing.py).
    Anything else (request heads, a line cut by a read, a partial take of merged bytes)
    first merges into the bytearray and goes through h11's own code.

    Reproduce: feed `h11.Connection(h11.SERVER)` a request head, then a 1 MiB body read;
    `next_event()` returns `Data` whose `data` is a new bytearray, not the bytes fed.
    """

    def __init__(self) -> None:
        super().__init__()
        # A read not merged into `_data` (then empty), from `_pos` on.
        self._src: bytes | None = None
        self._pos = 0

    def _merge(self) -> None:
        src = self._src
        if src is not None:
            self._data += memoryview(src)[self._pos :]
            self._src = None

    def __iadd__(self, byteslike: bytes | bytearray) -> _PassThroughReceiveBuffer:
        if self._src is None and not self._data and type(byteslike) is bytes and byteslike:
            self._src, self._pos = byteslike, 0
        else:
            self._merge()
            self._data += byteslike
        return self

    def __len__(self) -> int:
        return len(self._data) + (len(self._src) - self._pos if self._src is not None else 0)

    def __bool__(self) -> bool:
        return bool(len(self))

    def __bytes__(self) -> bytes:
        self._merge()
        return bytes(self._data)

    def _extract(self, count: int) -> bytearray:
        self._merge()
        return super()._extract(count)

    def _taken(self) -> None:
        self._next_line_search = 0
        self._multiple_lines_search = 0

    def maybe_extract_at_most(self, count: int) -> bytearray | None:
        src = self._src
        if src is not None:
            self._taken()
            pos = self._pos
            if pos + count >= len(src):
                self._src = None
                # h11's readers take any bytes-like.
                return src if pos == 0 else memoryview(src)[pos:]  # type: ignore[return-value]
            self._pos = pos + count
            return memoryview(src)[pos : pos + count]  # type: ignore[return-value]
        if not self._data:
            return None
        return super()._extract(count)

    def maybe_extract_next_line(self) -> bytearray | None:
        src = self._src
        if src is not None:
            end = src.find(b"\r\n", self._pos)
            if end != -1:
                self._taken()
                line = bytearray(memoryview(src)[self._pos : end + 2])
                self._pos = end + 2
                if self._pos == len(src):
                    self._src = None
                return line
        self._merge()
        return super().maybe_extract_next_line()

    def maybe_extract_lines(self) -> list[bytearray] | None:
        self._merge()
        return super().maybe_extract_lines()

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        self._merge()
        return super().is_next_line_obviously_invalid_request_line()


def pass_received_bodies_through() -> None:
    """Make every h11 connection of this process use `_PassThroughReceiveBuffer`.
    Idempotent. h11 has no public hook for its buffer, so its module's name is replaced."""
    h11._connection.ReceiveBuffer = _PassThroughReceiveBuffer  # type: ignore[attr-defined]


async def serve_app(
    app: Any,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    install_hypercorn_patches()
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def wait_for_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
    """Return the first of SIGTERM/SIGINT (installed before `started()`, so none is lost)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name, extra={"event": "signal"})
            return int(signum)
    raise RuntimeError("signal receiver closed")  # pragma: no cover - trio never closes it
