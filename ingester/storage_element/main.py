"""`ingester storage-element`: run one reference Storage Element.

Module-level imports stay light (trio only): the `ingester` parser imports `add_arguments`
for every subcommand, and `ingester token` should not pay for Quart, hypercorn and httpx.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from ..concurrency import leaves

if TYPE_CHECKING:
    from .config import ElementConfig

MODES: Final = ("edit", "rw", "ro", "ar")
# hypercorn reads 64 KiB per recv by default; 1 MiB measured about 20% faster uploads.
SOCKET_READ_SIZE: Final = 1024 * 1024


class StartupError(Exception):
    """The element cannot start (unusable data directory or public key); exit code 2."""


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {value}")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", required=True, choices=MODES, help="edit, rw, ro or ar")
    parser.add_argument("--port", required=True, type=_port, help="0 picks a free port")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument(
        "--public-key", required=True, type=Path, help="PEM RSA public key for RS256 tokens"
    )
    parser.add_argument("--id", dest="element_id", default=None, help="default: se-<mode>")
    parser.add_argument(
        "--capacity-bytes",
        type=_non_negative_int,
        default=None,
        help="default: the data directory's file system is the limit",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--priority", type=int, default=100)
    parser.add_argument("--graceful-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--log-format", choices=("json", "text"), default="text")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--artstore-compat",
        action="store_true",
        help="answer as artStore's own Storage Element does where it differs from this one: "
        "empty files refused with 500, metadata and content_type dropped, no "
        "storage_filename, never 507 (see the README)",
    )
    parser.add_argument(
        "--artstore-tmp-bytes",
        type=_non_negative_int,
        default=None,
        help="with --artstore-compat: the temporary disk artStore's element spools forms to "
        "(each upload's bytes past its first MiB, all uploads together); when it cannot take "
        "more, the upload is answered 400 'There was an error parsing the body'. Default: "
        "unbounded",
    )
    parser.add_argument(
        "--artstore-write-delay-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --artstore-compat: how long its write of the file after the last byte of "
        "the body takes (artStore's element writes it then, and finishes it whoever hung up; "
        "a gc delete meanwhile finds nothing). Default: 0",
    )


def storage_element_command(args: argparse.Namespace) -> int:
    from .. import logs
    from ..server import pass_received_bodies_through, set_socket_read_size
    from ..settings import SEMode
    from .config import ElementConfig

    logs.configure(args.log_format, args.log_level.upper())
    for flag, given in (
        ("--artstore-tmp-bytes", args.artstore_tmp_bytes is not None),
        ("--artstore-write-delay-s", args.artstore_write_delay_s != 0.0),
    ):
        if given and not args.artstore_compat:
            print(f"ingester storage-element: {flag} needs --artstore-compat", file=sys.stderr)
            return 2
    if args.artstore_write_delay_s < 0:
        print("ingester storage-element: --artstore-write-delay-s is negative", file=sys.stderr)
        return 2
    config = ElementConfig(
        element_id=args.element_id or f"se-{args.mode}",
        mode=SEMode(args.mode),
        data_dir=args.data_dir,
        public_key=args.public_key,
        host=args.host,
        port=args.port,
        priority=args.priority,
        capacity_bytes=args.capacity_bytes,
        graceful_timeout_s=args.graceful_timeout,
        artstore_compat=args.artstore_compat,
        artstore_tmp_bytes=args.artstore_tmp_bytes,
        artstore_write_delay_s=args.artstore_write_delay_s,
    )
    set_socket_read_size(SOCKET_READ_SIZE)
    # Bodies as the socket returns them, as the real element's C parser (httptools) does.
    pass_received_bodies_through()
    status = 0
    try:
        trio.run(run_storage_element, config)
    except* StartupError as group:
        for error in leaves(group):
            print(f"ingester storage-element: {error}", file=sys.stderr)
        status = 2
    except* KeyboardInterrupt:
        pass  # Ctrl-C before the signal handler was installed is still a clean stop
    return status


async def run_storage_element(
    config: ElementConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one Storage Element until `shutdown_trigger` returns.

    Without a trigger, SIGTERM and SIGINT stop it (call it from the main thread then); with
    one, signals are left to the caller (`ingester dev` runs several in one process).
    `task_status` receives the bound URLs, so `port=0` works with `nursery.start`. On stop,
    uploads in flight get `graceful_timeout_s`, then are cancelled and cleaned up.
    """
    import contextlib
    import logging

    import httpx

    from ..auth.verifier import build_verifier
    from ..server import hypercorn_config, serve_app, wait_for_signal
    from ..settings import Settings
    from .app import create_storage_element_app
    from .store import FileStore

    log = logging.getLogger(__name__)

    async def stop_on_signal(
        stop: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await wait_for_signal(task_status=task_status)
        stop.set()

    # No proxies from the environment: the client only serves the verifier, never a caller.
    async with (
        contextlib.AsyncExitStack() as stack,
        httpx.AsyncClient(trust_env=False) as http,
        trio.open_nursery() as nursery,
    ):
        if shutdown_trigger is None:
            stop = trio.Event()
            # First, so a signal during the index rebuild is not lost.
            await nursery.start(stop_on_signal, stop)
            shutdown_trigger = stop.wait
        try:
            store = await FileStore.open(config.data_dir, capacity_bytes=config.capacity_bytes)
        except OSError as exc:
            raise StartupError(f"cannot use the data directory {config.data_dir}: {exc}") from exc
        # Released when this block exits, whatever ends it.
        stack.callback(store.close)
        # The element reads no environment of its own; explicit None keeps an ingester's
        # INGESTER_AUTH_JWKS_URL from replacing (or conflicting with) the PEM it was given.
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]  # pydantic-settings' own init argument
            auth_public_key_path=config.public_key,
            auth_jwks_url=None,
        )
        try:
            verifier = build_verifier(settings, http)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot use the public key {config.public_key}: {exc}") from exc
        if verifier is None:  # pragma: no cover - a public key is always configured here
            raise StartupError("no public key configured")
        app = create_storage_element_app(config, store, verifier)
        await nursery.start(verifier.run)
        hypercorn = hypercorn_config(
            config.host, config.port, graceful_timeout=config.graceful_timeout_s
        )

        async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
            assert shutdown_trigger is not None
            await serve_app(
                app, hypercorn, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
            # The server has drained: the key watcher and the signal task go with it.
            nursery.cancel_scope.cancel()

        try:
            urls: list[str] = await nursery.start(serve)
        except* OSError as group:
            # Binding fails before `started()`: a port in use is a start-up error.
            reason = "; ".join(str(error) for error in leaves(group))
            raise StartupError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
        log.info(
            "storage element %s (%s) serving %s, data in %s",
            config.element_id,
            config.mode,
            " ".join(urls),
            store.data_dir,
            extra={
                "event": "se_started",
                "storage_element_id": config.element_id,
                "urls": urls,
                "mode": str(config.mode),
                "artstore_compat": config.artstore_compat,
            },
        )
        task_status.started(urls)
