"""The command line of `ingester upload` and its checks.

Everything wrong with the command line is found before the first byte is sent, and ends
the command with exit code 2: a missing file, a directory, metadata that is not a JSON
object, no token, a URL that is not http(s).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from .errors import UsageError

MIB: Final = 1024 * 1024
# The dev stack's address: `ingester upload FILE` works against `make run` as it is.
DEFAULT_URL: Final = "http://127.0.0.1:8020"
DEFAULT_RESUMABLE_ABOVE: Final = 16 * MIB
# One tus PATCH: what a cut connection can cost (a chunk with a checksum is kept whole or
# not at all), against one round trip and one fsync on the server per chunk.
DEFAULT_CHUNK_SIZE: Final = 8 * MIB
MIN_CHUNK_SIZE: Final = 64 * 1024
MAX_DESCRIPTION: Final = 1000

_SIZE_RE: Final = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1024, "m": MIB, "g": 1024 * MIB, "t": 1024 * 1024 * MIB}


def parse_size(text: str) -> int:
    """`16777216`, `16M`, `16MiB`, `512k`: bytes (powers of 1024)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 16MiB, 512KiB, 1048576)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _chunk_size(text: str) -> int:
    size = parse_size(text)
    if size < MIN_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"--chunk-size must be at least {MIN_CHUNK_SIZE} bytes")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files to upload")
    parser.add_argument(
        "--url", help=f"the ingester's base URL (default: $INGESTER_URL, else {DEFAULT_URL})"
    )
    parser.add_argument("--token", help="bearer token (default: $INGESTER_TOKEN)")
    parser.add_argument(
        "--retention",
        choices=["temporary", "permanent"],
        default="temporary",
        help="temporary (an edit element, with a TTL; default) or permanent (an rw element)",
    )
    parser.add_argument(
        "--compress", action="store_true", help="ask the ingester to compress the stored copy"
    )
    parser.add_argument("--description", help=f"up to {MAX_DESCRIPTION} characters")
    parser.add_argument("--metadata", help='a JSON object, e.g. \'{"project": "x"}\'')
    parser.add_argument(
        "--json", action="store_true", help="print each stored file's 201 record, one per line"
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh, ignoring (and discarding) an interrupted upload of the same file",
    )
    parser.add_argument(
        "--resumable-above",
        type=parse_size,
        default=DEFAULT_RESUMABLE_ABOVE,
        metavar="SIZE",
        help="files larger than this go up resumably with tus (default 16MiB; 0: all)",
    )
    parser.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="SIZE",
        help="bytes per tus PATCH (default 8MiB)",
    )


@dataclass(frozen=True)
class Options:
    paths: tuple[Path, ...]  # absolute
    url: str  # without a trailing slash
    token: str
    retention: str
    compress: bool
    description: str | None
    metadata: str | None  # the JSON text, checked to be an object
    json: bool
    resume: bool
    resumable_above: int
    chunk_size: int

    def form_fields(self) -> list[tuple[str, str]]:
        """The upload's form fields, as a multipart form sends them and as a tus upload's
        `Upload-Metadata` carries them."""
        fields = [("retention_policy", self.retention)]
        if self.compress:
            fields.append(("compress", "true"))
        if self.description is not None:
            fields.append(("description", self.description))
        if self.metadata is not None:
            fields.append(("metadata", self.metadata))
        return fields

    def fingerprint(self) -> str:
        """What decides how a file is stored: an interrupted upload made with other
        choices is not resumed (the server fixed them when it was created)."""
        return json.dumps(
            [self.retention, self.compress, self.description, self.metadata], ensure_ascii=True
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Options:
    url = (args.url or environ.get("INGESTER_URL") or DEFAULT_URL).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--url must be an http(s) URL like {DEFAULT_URL}, not {url!r}")
    token = (args.token or environ.get("INGESTER_TOKEN") or "").strip()
    if token.lower().startswith("bearer "):
        token = token[len("bearer ") :].strip()
    if not token:
        raise UsageError(
            "no token: pass --token or set INGESTER_TOKEN "
            "(the dev stack prints one; `ingester token` makes more)"
        )
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--metadata is not JSON: {exc.msg} at {exc.pos}") from None
        if not isinstance(metadata, dict):
            raise UsageError('--metadata must be a JSON object, like \'{"key": "value"}\'')
    if args.description is not None and len(args.description) > MAX_DESCRIPTION:
        raise UsageError(f"--description is longer than {MAX_DESCRIPTION} characters")
    paths = []
    for path in args.paths:
        absolute = Path(path).expanduser().absolute()
        if not absolute.exists():
            raise UsageError(f"{path}: no such file")
        if absolute.is_dir():
            raise UsageError(f"{path}: is a directory (upload the files in it)")
        if not absolute.is_file():
            raise UsageError(f"{path}: not a regular file")
        paths.append(absolute)
    return Options(
        paths=tuple(paths),
        url=url,
        token=token,
        retention=args.retention,
        compress=args.compress,
        description=args.description,
        metadata=args.metadata,
        json=args.json,
        resume=not args.no_resume,
        resumable_above=args.resumable_above,
        chunk_size=args.chunk_size,
    )
