"""A TCP fault-injection proxy for tests: sits between the ingester and a Storage Element.

Only the upload direction (client -> upstream) is faulted; responses pass through, except
that a STALL holds them too. The plan is read at every chunk, so `set_plan` reaches live
connections as well as new ones.

    proxy = await nursery.start(serve_fault_proxy, "127.0.0.1", se_port)
    proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=1_000_000))

A plan with `only_matching` faults only the connections whose upload bytes contain those
bytes (a request id, say), counting `after_bytes` from the end of the match; the others
pass untouched. That is how one of two uploads streaming to the same element is cut while
the other goes on.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final

import trio

# Large enough to move MiBs quickly, small enough that faults land close to the byte asked for.
READ_SIZE: Final = 64 * 1024

# A throttled chunk is sent in one burst after its sleep; 1/20 s worth keeps bursts short at
# low rates so the rate holds over short windows too.
THROTTLE_SLICES_PER_S: Final = 20

# l_onoff=1, l_linger=0: close() then discards unsent data and sends RST instead of FIN.
_LINGER_ABORT: Final = struct.pack("ii", 1, 0)

# What a peer going away looks like; it ends that connection, never the server.
_CONNECTION_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Fault(Enum):
    NONE = "none"
    DELAY = "delay"
    THROTTLE = "throttle"
    STALL = "stall"
    CUT = "cut"
    RESET = "reset"


@dataclass(frozen=True)
class FaultPlan:
    """What to do to client -> upstream traffic."""

    fault: Fault = Fault.NONE
    delay_s: float = 0.0
    bytes_per_s: int = 0
    after_bytes: int = 0
    # Fault only connections that sent these bytes (from the end of the match on).
    only_matching: bytes | None = None

    def __post_init__(self) -> None:
        # A silent no-op plan would make a chaos test pass for the wrong reason.
        if self.delay_s < 0 or self.after_bytes < 0:
            raise ValueError("delay_s and after_bytes must be >= 0")
        if self.fault is Fault.THROTTLE and self.bytes_per_s <= 0:
            raise ValueError("THROTTLE needs bytes_per_s > 0")
        if self.only_matching is not None and not self.only_matching:
            raise ValueError("only_matching must not be empty")

    def limited(self) -> bool:
        """True when the fault waits for `after_bytes` before it acts."""
        return self.fault in (Fault.STALL, Fault.CUT, Fault.RESET)


@dataclass
class _Conn:
    forwarded: int = 0  # upload bytes sent upstream on this connection
    faulted: bool = False
    ending: Fault = Fault.NONE  # CUT or RESET once fired: decides how the sockets close
    # For a plan with `only_matching`: where the match ended (upload bytes), and the last
    # bytes seen, so a match split across reads is found.
    matched: bytes | None = None
    matched_at: int = 0
    window: bytes = b""

    def look_for(self, needle: bytes | None, data: bytes) -> None:
        """Note whether `data`, about to be forwarded, completes a match of `needle`."""
        if needle is None or self.matched == needle:
            return
        seen = self.window + data
        found = seen.find(needle)
        if found >= 0:
            self.matched = needle
            self.matched_at = self.forwarded + found + len(needle) - len(self.window)
            self.window = b""
        else:
            self.window = seen[-(len(needle) - 1) :] if len(needle) > 1 else b""


class FaultProxy:
    """Handle on a running proxy. Counters are totals since the proxy started."""

    def __init__(self, port: int, upstream_host: str, upstream_port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.connections = 0
        self.bytes_upstream = 0
        self.faults_fired = 0
        self._upstream = (upstream_host, upstream_port)
        self._plan = FaultPlan()
        # Replaced on every plan change, so stalled pumps wake up and re-read the plan.
        self._changed = trio.Event()

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    def set_plan(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._changed.set()
        self._changed = trio.Event()

    def heal(self) -> None:
        self.set_plan(FaultPlan())

    def _fired(self, conn: _Conn) -> None:
        if not conn.faulted:
            conn.faulted = True
            self.faults_fired += 1

    def _applies(self, conn: _Conn) -> bool:
        """Whether the plan faults this connection (every one, or the matching ones)."""
        needle = self._plan.only_matching
        return needle is None or conn.matched == needle

    def _due_at(self, conn: _Conn) -> int:
        """The connection's upload offset at which a limited fault acts."""
        plan = self._plan
        base = conn.matched_at if plan.only_matching is not None else 0
        return base + plan.after_bytes

    def _stalled(self, conn: _Conn) -> bool:
        plan = self._plan
        return (
            plan.fault is Fault.STALL
            and self._applies(conn)
            and conn.forwarded >= self._due_at(conn)
        )

    async def _hold_while_stalled(self, conn: _Conn) -> None:
        while self._stalled(conn):
            self._fired(conn)
            await self._changed.wait()

    def _read_size(self) -> int:
        plan = self._plan
        if plan.fault is Fault.THROTTLE:
            return max(1, min(READ_SIZE, plan.bytes_per_s // THROTTLE_SLICES_PER_S))
        return READ_SIZE

    async def _pace(self, conn: _Conn, nbytes: int) -> None:
        plan = self._plan
        if not self._applies(conn):
            return
        if plan.fault is Fault.DELAY and plan.delay_s > 0:
            self._fired(conn)
            await trio.sleep(plan.delay_s)
        elif plan.fault is Fault.THROTTLE:
            self._fired(conn)
            await trio.sleep(nbytes / plan.bytes_per_s)

    async def _pump_up(
        self,
        conn: _Conn,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        while True:
            # Checked before reading too: a STALL must stop reading the client so its
            # send window fills, and a fault due at exactly a chunk boundary fires now.
            await self._hold_while_stalled(conn)
            if self._end_if_due(conn, scope):
                return
            data = await client.receive_some(self._read_size())
            if not data:
                await upstream.send_eof()
                return
            conn.look_for(self._plan.only_matching, data)
            while data:
                await self._pace(conn, len(data))
                await self._hold_while_stalled(conn)
                if self._end_if_due(conn, scope):
                    return
                plan = self._plan
                limited = plan.limited() and self._applies(conn)
                room = self._due_at(conn) - conn.forwarded if limited else len(data)
                piece, data = data[:room], data[room:]
                await upstream.send_all(piece)
                conn.forwarded += len(piece)
                self.bytes_upstream += len(piece)

    def _end_if_due(self, conn: _Conn, scope: trio.CancelScope) -> bool:
        plan = self._plan
        if (
            plan.fault in (Fault.CUT, Fault.RESET)
            and self._applies(conn)
            and conn.forwarded >= self._due_at(conn)
        ):
            self._fired(conn)
            conn.ending = plan.fault
            scope.cancel()
            return True
        return False

    async def _pump_down(
        self, conn: _Conn, client: trio.SocketStream, upstream: trio.SocketStream
    ) -> None:
        while True:
            data = await upstream.receive_some(READ_SIZE)
            if not data:
                await client.send_eof()
                return
            await self._hold_while_stalled(conn)
            await client.send_all(data)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        conn = _Conn()
        try:
            try:
                upstream = await trio.open_tcp_stream(*self._upstream)
            except OSError:
                return
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_up, conn, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump_down, conn, client, upstream)
            except* _CONNECTION_ERRORS:
                pass
            finally:
                await _close(upstream, conn.ending)
        finally:
            await _close(client, conn.ending)


async def _close(stream: trio.SocketStream, ending: Fault) -> None:
    # Shielded: this runs while the server is being cancelled too, and a socket left open
    # would outlive the serve nursery (and trip ResourceWarning, an error in this suite).
    with trio.CancelScope(shield=True):
        if ending is Fault.RESET:
            with contextlib.suppress(OSError):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        elif ending is Fault.CUT:
            with contextlib.suppress(*_CONNECTION_ERRORS):
                await stream.send_eof()
        await stream.aclose()


async def serve_fault_proxy(
    upstream_host: str,
    upstream_port: int,
    *,
    task_status: trio.TaskStatus[FaultProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on 127.0.0.1 (free port) and proxy to the upstream until cancelled."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    proxy = FaultProxy(port, upstream_host, upstream_port)
    task_status.started(proxy)
    await trio.serve_listeners(proxy._handle, listeners)
