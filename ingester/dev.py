"""`ingester dev`: keys, two reference Storage Elements and the ingester, in one command.

The Storage Elements run as child processes (their own interpreters, so they do not share
the ingester's core), the ingester in this process. Ctrl-C stops everything: the terminal
sends SIGINT to the whole process group, and whatever has not exited a few seconds later
is killed, so nothing outlives the command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from . import logs
from .app_main import run_ingester, settings_or_exit
from .auth.tokens import generate_keypair, make_token
from .dev_parts import DEV_TOKEN_TTL_S, print_banner, start_elements
from .settings import Settings

log = logging.getLogger(__name__)


def dev_command(args: argparse.Namespace) -> int:
    base = settings_or_exit()
    logs.configure("text", base.log_level)
    # A Ctrl-C that lands before the signal receivers are installed.
    if args.replicas is not None and args.replicas < 1:
        print("ingester dev: --replicas must be 1 or more", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        if args.replicas is None:
            trio.run(run_dev, args.host, args.port, args.data_dir.resolve(), base)
            return 0
        from .dev_replicas import MissingTool, run_dev_replicas

        try:
            trio.run(
                run_dev_replicas, args.host, args.port, args.data_dir.resolve(), base, args.replicas
            )
        except MissingTool as exc:
            print(f"ingester dev: {exc}", file=sys.stderr)
            return 2
    return 0


async def run_dev(host: str, port: int, data_dir: Path, base: Settings) -> None:
    private_key, public_key = await trio.to_thread.run_sync(generate_keypair, data_dir / "keys")
    async with AsyncExitStack() as stack:
        elements = await start_elements(stack, host, port, data_dir, public_key)
        settings = base.model_copy(
            update={
                "host": host,
                "port": port,
                "auth_public_key_path": public_key,
                "auth_jwks_url": None,
                "storage_elements": base.storage_elements or elements,
                "spool_dir": data_dir / "spool",
                "log_format": "text",
                # The dev stack is where people meet the API: show it.
                "docs_enabled": True,
            }
        )
        pem = await trio.Path(private_key).read_bytes()
        # RSA signing is CPU work: off the event loop like the rest.
        token = await trio.to_thread.run_sync(
            lambda: make_token(pem, sub="dev-user", role="user", ttl=DEV_TOKEN_TTL_S)
        )
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(run_ingester, settings)
            url = f"http://{host}:{port}"
            print_banner(url, binds, token, data_dir, private_key)
    log.info("dev stack stopped")
