"""Serving an app with hypercorn under trio, and stopping it on SIGTERM/SIGINT.

`hypercorn -k trio` dies at once on SIGTERM, so servers here run programmatically:
`serve_app` binds, reports the bound URLs through `task_status` (callers can
`await nursery.start(serve_app, ...)` and know the port is open), and returns once
`shutdown_trigger` has fired and connections have drained or hit `graceful_timeout`.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Final

import h11._connection
import hypercorn.trio.tcp_server
import trio
from h11._receivebuffer import ReceiveBuffer
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger(__name__)

SHUTDOWN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


def hypercorn_config(
    host: str, port: int, *, graceful_timeout: float, keep_alive_s: float = 75.0
) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = graceful_timeout
    # Longer than common load balancers' idle timeouts (60 s), so they close first.
    config.keep_alive_timeout = keep_alive_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


def set_socket_read_size(size: int) -> None:
    """hypercorn reads sockets 64 KiB at a time; a module constant is the only knob."""
    hypercorn.trio.tcp_server.MAX_RECV = size


def close_idle_connections_on_peer_eof() -> None:
    """Close a keep-alive connection as soon as its client does.

    hypercorn (0.18) starts its keep-alive timer when a response completes; when the client
    then closes, its read loop ends but the connection's task group still waits for that
    timer, so the socket sits in CLOSE_WAIT for the whole `keep_alive_timeout` (75 s here,
    measured: 15 of 20 curl uploads). Stopping the timer once the read loop ends closes the
    socket at once. Idempotent.
    """
    if getattr(TCPServer._read_data, "_closes_on_eof", False):
        return
    read_data = TCPServer._read_data

    async def _read_data(self: TCPServer) -> None:
        await read_data(self)
        await self.idle_task.stop()

    _read_data._closes_on_eof = True  # type: ignore[attr-defined]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]


class _PassThroughReceiveBuffer(ReceiveBuffer):
    """h11's receive buffer, without its copies of request bodies.

    h11 (0.16) appends every socket read to a bytearray (one copy), and hands body data out
    as a slice of it, sliced twice (`maybe_extract_at_most` slices once to test for
    emptiness, then `_extract` slices again); hypercorn then turns that bytearray into
    `bytes` (a fourth copy). For an upload's body, a read is almost always consumed whole.
    This buffer keeps a read as the `bytes` object the socket returned while the buffer is
    otherwise empty, and hands that same object out when the reader wants all of it: no
    copy at all, and hypercorn's `bytes()` of a `bytes` is free. Anything else (header
    lines, chunk framing, a partial take) first merges into the bytearray and goes through
    h11's own code. Measured: 4 of the 5 copies of each received byte gone.

    Reproduce: feed `h11.Connection(h11.SERVER)` a request head, then a 1 MiB body read;
    `next_event()` returns `Data` whose `data` is a new bytearray, not the bytes fed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._whole: bytes | None = None

    def _merge(self) -> None:
        if self._whole is not None:
            self._data += self._whole
            self._whole = None

    def __iadd__(self, byteslike: bytes | bytearray) -> _PassThroughReceiveBuffer:
        if self._whole is None and not self._data and type(byteslike) is bytes:
            self._whole = byteslike
        else:
            self._merge()
            self._data += byteslike
        return self

    def __len__(self) -> int:
        return len(self._data) + (len(self._whole) if self._whole is not None else 0)

    def __bool__(self) -> bool:
        return bool(len(self))

    def __bytes__(self) -> bytes:
        self._merge()
        return bytes(self._data)

    def _extract(self, count: int) -> bytearray:
        self._merge()
        return super()._extract(count)

    def maybe_extract_at_most(self, count: int) -> bytearray | None:
        whole = self._whole
        if whole is not None and count >= len(whole):
            self._whole = None
            self._next_line_search = 0
            self._multiple_lines_search = 0
            return whole  # type: ignore[return-value]  # h11's readers take any bytes-like
        self._merge()
        if not self._data:
            return None
        return super()._extract(count)

    def maybe_extract_next_line(self) -> bytearray | None:
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
    close_idle_connections_on_peer_eof()
    await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def wait_for_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
    """Return the first of SIGTERM/SIGINT (installed before `started()`, so none is lost)."""
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name, extra={"event": "signal"})
            return int(signum)
    raise RuntimeError("signal receiver closed")  # pragma: no cover - trio never closes it
