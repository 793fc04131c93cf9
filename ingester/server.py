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

import hypercorn.trio.tcp_server
import trio
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
