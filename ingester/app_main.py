"""Running the ingester: `ingester serve`, and the same server for `ingester dev`.

run_ingester
  ├── service nursery     Service.run: key reload, prober, janitor
  └── server nursery
        ├── drain_on_signal   SIGTERM/SIGINT -> readiness 503, new uploads 503,
        │                     in-flight uploads get the grace period, then stop
        ├── hypercorn         connections; each request runs in its own task
        └── hypercorn         the internal listener (probes, metrics), when configured
"""

from __future__ import annotations

import gc
import logging
import resource
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Final

import trio
from pydantic import ValidationError

from . import logs
from .allocator import configure_malloc
from .http.app import create_app, create_internal_app
from .server import (
    SHUTDOWN_SIGNALS,
    ConnectionLimits,
    hypercorn_config,
    pass_received_bodies_through,
    serve_app,
    set_socket_read_size,
    share_receive_memory,
)
from .service import Service
from .settings import ConfigProblems, Settings

log = logging.getLogger(__name__)

# Once uploads have drained, what is left (probes, progress polls) needs little time.
HYPERCORN_GRACE_S: Final = 2.0
# The internal listener serves probes and a scraper: a few connections, never a crowd.
INTERNAL_MAX_CONNECTIONS: Final = 64
# Descriptors besides client connections: element connections, spool and data files, Redis,
# the internal listener.
FD_HEADROOM: Final = 512


def settings_or_exit() -> Settings:
    """Settings from the environment, or one clear line per problem and exit code 2."""
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, ConfigProblems):
                for problem in cause.problems:
                    print(f"invalid configuration: {problem}", file=sys.stderr)
                continue
            name = f"INGESTER_{str(error['loc'][0]).upper()}" if error["loc"] else "settings"
            detail = ".".join(str(p) for p in error["loc"][1:])
            suffix = f" ({detail})" if detail else ""
            message = error["msg"].removeprefix("Value error, ")
            given = error.get("input")
            # The value helps, but never a secret's, nor a long one (a Redis URL may carry
            # its password).
            secret = any(word in name for word in ("SECRET", "TOKEN", "KEY", "REDIS_URL"))
            shown = (
                f" (got {given!r})"
                if isinstance(given, str | int | float) and not secret and len(str(given)) <= 80
                else ""
            )
            print(f"invalid configuration: {name}{suffix}: {message}{shown}", file=sys.stderr)
        raise SystemExit(2) from None


def raise_open_files_limit(connections: int) -> None:
    """Each connection is a descriptor, and so are element connections, spool and data files:
    raise the soft limit (often 1024 in containers) toward the hard one for the cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open files limit %d is below INGESTER_MAX_CONNECTIONS + %d: at the cap, "
            "accepting connections will fail before the cap refuses them",
            soft,
            FD_HEADROOM,
            extra={"event": "fd_limit_low"},
        )


def serve_command() -> int:
    settings = settings_or_exit()
    logs.configure(settings.log_format, settings.log_level)
    raise_open_files_limit(settings.max_connections)
    try:
        trio.run(run_ingester, settings)
    except ValueError as exc:  # a key file that cannot be read, for instance
        print(f"ingester: {exc}", file=sys.stderr)
        return 2
    return 0


async def drain(service: Service, grace_s: float, delay_s: float = 0.0) -> None:
    """Refuse new uploads and let those in flight finish, for at most `grace_s`; keep
    listening for at least `delay_s` of it (INGESTER_DRAIN_DELAY_S), idle or not."""
    service.begin_drain()
    with trio.move_on_after(grace_s):
        await trio.sleep(delay_s)
        # Resumable uploads' PATCHes too (found by a review: with no multipart upload in
        # flight a PATCH got hypercorn's 2 s, not the grace).
        await service.wait_idle()
    if service.admission.in_flight or service.tus.busy():
        log.warning(
            "%d uploads still in flight after the grace period%s; cancelling them",
            service.admission.in_flight,
            " (and resumable uploads' PATCHes)" if service.tus.busy() else "",
            extra={"event": "drain_timeout"},
        )


async def run_ingester(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    app, service = create_app(settings)
    configure_malloc()
    # What start-up built lives as long as the process: out of every later collection's
    # scan (the idle one in Service included), which then looks at upload garbage only.
    gc.collect()
    gc.freeze()
    set_socket_read_size(settings.socket_read_size)
    pass_received_bodies_through()
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections,
        retry_after_s=settings.retry_after_s,
        send_timeout_s=settings.client_idle_timeout_s,
    )
    config = hypercorn_config(
        settings.host, settings.port, graceful_timeout=HYPERCORN_GRACE_S, limits=limits
    )
    config.max_app_queue_size = settings.app_queue_size
    share_receive_memory(config, app.config["RECEIVE_SHARE"])
    stop = trio.Event()
    drain_scope = trio.CancelScope()

    async def drain_then_stop() -> None:
        with drain_scope:
            await drain(service, settings.shutdown_grace_s, settings.drain_delay_s)
        stop.set()

    async def watch_signals(
        nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # One receiver for the whole life of the server, so no signal falls through to
        # Python's default handlers between the first and the second.
        with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if not service.draining:
                    log.info("%s: draining", name, extra={"event": "signal"})
                    service.begin_drain()
                    nursery.start_soon(drain_then_stop)
                else:
                    log.warning("%s again: stopping now", name, extra={"event": "signal"})
                    drain_scope.cancel()

    async def watch_trigger(nursery: trio.Nursery, trigger: Callable[[], Awaitable[None]]) -> None:
        await trigger()
        nursery.start_soon(drain_then_stop)

    async with trio.open_nursery() as service_nursery:
        await service_nursery.start(service.run)
        async with trio.open_nursery() as server_nursery:
            if shutdown_trigger is None:
                await server_nursery.start(watch_signals, server_nursery)
            else:
                server_nursery.start_soon(watch_trigger, server_nursery, shutdown_trigger)

            async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_app(app, config, shutdown_trigger=stop.wait, task_status=task_status)
                server_nursery.cancel_scope.cancel()

            if settings.internal_port is not None:
                # Started first: probes and metrics answer as soon as the public port does.
                internal_config = hypercorn_config(
                    settings.internal_host or settings.host,
                    settings.internal_port,
                    graceful_timeout=HYPERCORN_GRACE_S,
                    limits=replace(limits, max_connections=INTERNAL_MAX_CONNECTIONS),
                )
                internal = await server_nursery.start(
                    partial(
                        serve_app,
                        create_internal_app(service),
                        internal_config,
                        shutdown_trigger=stop.wait,
                    )
                )
                log.info(
                    "internal listener (probes, metrics) on %s",
                    ", ".join(internal),
                    extra={"event": "listening_internal"},
                )
            binds = await server_nursery.start(serve)
            log.info("ingester listening on %s", ", ".join(binds), extra={"event": "listening"})
            task_status.started(binds)
        service_nursery.cancel_scope.cancel()
    log.info("ingester stopped", extra={"event": "stopped"})
