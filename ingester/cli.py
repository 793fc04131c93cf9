"""`ingester` command line: serve, dev, token, storage-element, registry, upload.

Subcommands import their module lazily so `ingester token` does not pay for the server.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingester", description="artStore Ingester")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="production server; configuration from the environment and .env")

    dev = sub.add_parser(
        "dev", help="one-command local stack: keys, two Storage Elements, ingester"
    )
    dev.add_argument("--port", type=int, default=8020)
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--data-dir", type=Path, default=Path(".dev"))
    dev.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="N ingester replicas behind haproxy on --port, with a local Redis, its replica "
        "and three Sentinels (needs redis-server and haproxy; make run installs them)",
    )

    token = sub.add_parser("token", help="print an RS256 token (artStore claim layout)")
    token.add_argument("--key", type=Path, default=Path(".dev/keys/private.pem"))
    token.add_argument("--role", default="user")
    token.add_argument("--sub", default="dev-user")
    token.add_argument("--name", default=None)
    token.add_argument("--ttl", type=int, default=3600)
    token.add_argument("--type", dest="token_type", default="access", choices=["access", "refresh"])

    se = sub.add_parser("storage-element", help="run one reference Storage Element")
    from .storage_element.main import add_arguments

    add_arguments(se)

    registry = sub.add_parser("registry", help="Storage Element registry in Redis")
    registry.add_argument("action", choices=["list", "set", "remove"])
    registry.add_argument("rest", nargs=argparse.REMAINDER)

    upload = sub.add_parser(
        "upload",
        help="upload files: resumable above a size, progress bar, sha256 checked",
        description="Upload files to the ingester. Files above --resumable-above go up with "
        "tus and resume by themselves: after a dropped connection, and when the same command "
        "runs again after it was killed. Exit codes: 0 all stored, 1 any failed, 2 usage.",
    )
    from .client.options import add_arguments as add_upload_arguments

    add_upload_arguments(upload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .app_main import serve_command

        return serve_command()
    if args.command == "dev":
        from .dev import dev_command

        return dev_command(args)
    if args.command == "token":
        return _token_command(args)
    if args.command == "storage-element":
        from .storage_element.main import storage_element_command

        return storage_element_command(args)
    if args.command == "registry":
        from .registry_cli import registry_command

        return registry_command([args.action, *args.rest])
    if args.command == "upload":
        from .client.command import upload_command

        return upload_command(args)
    raise AssertionError(args.command)


def _token_command(args: argparse.Namespace) -> int:
    from .auth.tokens import make_token

    try:
        private_pem = args.key.read_bytes()
    except OSError as exc:
        print(f"ingester token: cannot read key {args.key}: {exc.strerror}", file=sys.stderr)
        return 2
    token_type = "refresh" if args.token_type == "refresh" else "service_account"
    print(
        make_token(
            private_pem,
            sub=args.sub,
            role=args.role,
            ttl=args.ttl,
            token_type=token_type,
            name=args.name,
        )
    )
    return 0
