"""`ingester registry list|set|remove`: the Storage Element registry in Redis, by hand.

Writes are read-modify-write under WATCH/MULTI, so two operators changing the registry at
once never lose an update (the loser's transaction is retried on the new value). Each write
bumps `version`, sets `timestamp` and `count`, and PUBLISHes on the discovery channel in the
same transaction, so ingesters re-read at once. Errors are one line on stderr and exit 2.

A one-shot command with no trio: it takes a bare fail-fast client (`make_client`), not the
service's `RedisGateway`, whose worker threads and limiter it would not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import redis

from .settings import SEMode
from .storage.redis_gateway import make_client
from .storage.redis_registry import (
    DISCOVERY_CHANNEL,
    REGISTRY_KEY,
    STATUSES,
    WRITABLE_MODES,
    parse_registry,
)

# Concurrent writers retry on the new value; more conflicts than this means something loops.
MAX_TRANSACTION_ATTEMPTS: Final = 20
# An operator's command may wait a little longer than the ingester's hot path does.
CLI_TIMEOUT_S: Final = 2.0

Document = dict[str, Any]


class RegistryCommandError(Exception):
    """A problem to report as one line (no traceback)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingester registry")
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="print the registry")
    listing.add_argument("--json", action="store_true", help="the stored JSON document")
    setter = sub.add_parser("set", help="add or replace one Storage Element")
    setter.add_argument("--id", required=True)
    setter.add_argument("--api-url", required=True)
    setter.add_argument("--mode", required=True, choices=[m.value for m in SEMode])
    setter.add_argument("--priority", type=int, default=None)
    setter.add_argument("--status", choices=sorted(STATUSES), default=None)
    setter.add_argument("--capacity-bytes", type=int, default=None)
    remover = sub.add_parser("remove", help="remove one Storage Element")
    remover.add_argument("--id", required=True)
    return parser


def registry_command(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    from .app_main import settings_or_exit

    settings = settings_or_exit()
    if not settings.redis_url:
        print("ingester registry: INGESTER_REDIS_URL is not set", file=sys.stderr)
        return 2
    client = make_client(settings.redis_url, CLI_TIMEOUT_S)
    try:
        if args.action == "list":
            return _list(client, as_json=args.json)
        if args.action == "set":
            element_id = args.id

            def change(entries: list[Document]) -> list[Document]:
                return _set_entry(entries, args)

        else:
            element_id = args.id

            def change(entries: list[Document]) -> list[Document]:
                kept = [e for e in entries if _id_of(e) != element_id]
                if len(kept) == len(entries):
                    raise RegistryCommandError(f"no Storage Element with id {element_id!r}")
                return kept

        version = _update(client, change)
        print(f"registry version {version}: {args.action} {element_id}")
        return 0
    except RegistryCommandError as exc:
        print(f"ingester registry {args.action}: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(
            f"ingester registry {args.action}: Redis at {_safe_url(settings.redis_url)} "
            f"unreachable: {exc}",
            file=sys.stderr,
        )
        return 2
    finally:
        client.close()


def _safe_url(url: str) -> str:
    # Never print a password that may sit in the URL.
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


def _id_of(entry: Document) -> object:
    return entry.get("element_id") or entry.get("id")


def _load(raw: bytes | None) -> Document:
    """The stored document (an empty one when the key is missing); refuses an invalid one."""
    if raw is None:
        return {"version": 0, "timestamp": None, "count": 0, "storage_elements": []}
    try:
        parse_registry(raw)
    except ValueError as exc:
        raise RegistryCommandError(f"{REGISTRY_KEY} in Redis is invalid: {exc}") from None
    document: Document = json.loads(raw)
    return document


def _list(client: redis.Redis, *, as_json: bool) -> int:
    raw = client.get(REGISTRY_KEY)
    assert raw is None or isinstance(raw, bytes)
    document = _load(raw)
    if as_json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
        return 0
    elements = parse_registry(json.dumps(document))
    print(f"version {document.get('version')}, updated {document.get('timestamp')}")
    rows = [("ID", "MODE", "STATUS", "PRIORITY", "CAPACITY", "USED", "API_URL")]
    rows += [
        (
            e.id,
            e.mode.value,
            e.status,
            str(e.priority),
            "-" if e.capacity_bytes is None else str(e.capacity_bytes),
            "-" if e.used_bytes is None else str(e.used_bytes),
            e.api_url,
        )
        for e in elements
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _set_entry(entries: list[Document], args: argparse.Namespace) -> list[Document]:
    old = next((e for e in entries if _id_of(e) == args.id), {})
    status = args.status or old.get("status") or "online"
    mode = SEMode(args.mode)
    # Fields not given keep their stored value (used_bytes, name, anything the Admin Module
    # adds); the flags follow mode and status so the ingester's mapping agrees with them.
    entry: Document = {
        **old,
        "id": args.id,
        "element_id": args.id,
        "name": old.get("name") or args.id,
        "api_url": args.api_url,
        "mode": mode.value,
        "status": status,
        "priority": args.priority if args.priority is not None else old.get("priority", 100),
        "capacity_bytes": (
            args.capacity_bytes if args.capacity_bytes is not None else old.get("capacity_bytes")
        ),
        "used_bytes": old.get("used_bytes"),
        "is_writable": mode in WRITABLE_MODES,
        "is_available": status == "online",
    }
    others = [e for e in entries if _id_of(e) != args.id]
    return [*others, entry]


def _update(client: redis.Redis, change: Callable[[list[Document]], list[Document]]) -> int:
    """Apply `change` to the stored elements atomically; the new version."""
    for _ in range(MAX_TRANSACTION_ATTEMPTS):
        with client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(REGISTRY_KEY)  # type: ignore[no-untyped-call]
                raw = pipe.get(REGISTRY_KEY)
                assert raw is None or isinstance(raw, bytes)
                document = _load(raw)
                entries = list(document.get("storage_elements") or [])
                entries = change(entries)
                version = document.get("version")
                version = (version if isinstance(version, int) else 0) + 1
                document.update(
                    version=version,
                    timestamp=datetime.now(UTC).isoformat(timespec="milliseconds"),
                    count=len(entries),
                    storage_elements=entries,
                )
                encoded = json.dumps(document, ensure_ascii=False)
                try:
                    parse_registry(encoded)  # never store what ingesters would reject
                except ValueError as exc:
                    raise RegistryCommandError(str(exc)) from None
                pipe.multi()
                pipe.set(REGISTRY_KEY, encoded)
                pipe.publish(
                    DISCOVERY_CHANNEL,
                    json.dumps({"event": "storage_elements_updated", "version": version}),
                )
                pipe.execute()
                return version
            except redis.WatchError:
                continue  # someone else wrote in between: redo on their value
    raise RegistryCommandError(
        f"{REGISTRY_KEY} kept changing; gave up after {MAX_TRANSACTION_ATTEMPTS} attempts"
    )
