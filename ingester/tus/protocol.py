"""tus 1.0.0 on the wire: header parsing and formatting. No I/O.

Every parser raises a project error (`InvalidTusHeader` and friends, 4xx) whose message
names the header and the rule, so a client sees what to fix.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from ..errors import InvalidField
from .errors import InvalidTusHeader, TusVersionUnsupported

TUS_VERSION: Final = "1.0.0"
SUPPORTED_VERSIONS: Final = (TUS_VERSION,)
# Announced in `Tus-Extension`, in the order the spec lists them.
EXTENSIONS: Final = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "termination",
    "checksum",
    "expiration",
    "concatenation",
)
OFFSET_STREAM: Final = "application/offset+octet-stream"
# The spec requires sha1; md5 and sha256 are what clients commonly offer besides it.
CHECKSUMS: Final[Mapping[str, Callable[[], hashlib._Hash]]] = {
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "sha256": hashlib.sha256,
}
# Methods `X-HTTP-Method-Override` may name (the tus ones, and GET for our result view).
METHODS: Final = frozenset({"OPTIONS", "POST", "HEAD", "PATCH", "DELETE", "GET"})

# ASCII digits only, as many as a signed 64-bit integer can hold: int() alone would take
# "+5", "1_000" and non-ASCII digits.
_INTEGER_RE: Final = re.compile(r"[0-9]{1,18}")
_UPLOAD_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
# A media type as RFC 9110 tokens allow; anything else is dropped rather than carried into
# the part header the completed upload is sent to its element with.
_MEDIA_TYPE_RE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,128}")
_METADATA_KEY_RE: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII, no , or space

# Upload-Metadata keys that stand for the form fields of a multipart upload (validated as
# they are); `filename`/`filetype` name the file and its type. Uppy and tus-js-client send
# `name`/`type` for the same. Other keys are ignored, as unknown form fields are.
FIELD_KEYS: Final = (
    "description",
    "retention_policy",
    "ttl_days",
    "compress",
    "compression_algorithm",
    "metadata",
    "storage_mode",
)
FILENAME_KEYS: Final = ("filename", "name")
FILETYPE_KEYS: Final = ("filetype", "type")


def check_version(value: str | None) -> None:
    """`Tus-Resumable` of a request other than OPTIONS: required, and a version we speak."""
    if value is None or value.strip() not in SUPPORTED_VERSIONS:
        shown = "no Tus-Resumable header" if value is None else f"Tus-Resumable {value[:20]!r}"
        raise TusVersionUnsupported(
            f"{shown}; this server speaks tus {', '.join(SUPPORTED_VERSIONS)}",
            headers={"Tus-Version": ",".join(SUPPORTED_VERSIONS)},
        )


def effective_method(method: str, override: str | None) -> str:
    """The method to run: `X-HTTP-Method-Override` on a POST (tus core: for clients that can
    send only GET and POST), else the request's. On any other method the header is ignored:
    a GET or HEAD, which a browser, a crawler or a cache may send on its own, must never
    delete or change an upload."""
    method = method.upper()
    if method != "POST" or override is None or not override.strip():
        return method
    name = override.strip().upper()
    if name not in METHODS:
        raise InvalidTusHeader(f"X-HTTP-Method-Override {override[:20]!r} is not a tus method")
    return name


def parse_size(name: str, value: str | None) -> int | None:
    """A non-negative integer header (`Upload-Offset`, `Upload-Length`), or None when absent."""
    if value is None:
        return None
    text = value.strip()
    if not _INTEGER_RE.fullmatch(text):
        raise InvalidTusHeader(f"{name} must be a non-negative integer, not {value[:30]!r}")
    return int(text)


def parse_defer_length(value: str | None) -> bool:
    if value is None:
        return False
    if value.strip() != "1":
        raise InvalidTusHeader("Upload-Defer-Length must be 1")
    return True


def is_offset_stream(content_type: str | None) -> bool:
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == OFFSET_STREAM


def parse_upload_id(value: str) -> str | None:
    """Our upload ids are 32 lowercase hex digits; anything else names no upload (and can
    never reach a file path)."""
    return value if _UPLOAD_ID_RE.fullmatch(value) else None


# --- Upload-Metadata -------------------------------------------------------------------------


def parse_metadata(value: str | None) -> dict[str, bytes]:
    """`key base64,key base64,key` → {key: bytes}. An empty header is no metadata (tuspy sends
    one when it has none)."""
    result: dict[str, bytes] = {}
    if value is None or not value.strip():
        return result
    for pair in value.split(","):
        item = pair.strip()
        key, _, encoded = item.partition(" ")
        encoded = encoded.strip()
        if not key or not _METADATA_KEY_RE.fullmatch(key):
            raise InvalidTusHeader(
                f"Upload-Metadata keys must be non-empty printable ASCII without spaces or "
                f"commas, not {key[:40]!r}"
            )
        if key in result:
            raise InvalidTusHeader(f"Upload-Metadata has the key {key!r} more than once")
        try:
            result[key] = base64.b64decode(encoded, validate=True) if encoded else b""
        except (binascii.Error, ValueError):
            raise InvalidTusHeader(
                f"Upload-Metadata value of {key!r} is not valid base64"
            ) from None
    return result


def encode_metadata(metadata: Mapping[str, bytes]) -> str:
    return ",".join(
        f"{key} {base64.b64encode(value).decode('ascii')}" if value else key
        for key, value in metadata.items()
    )


@dataclass(frozen=True, slots=True)
class FileDescription:
    """What Upload-Metadata says about the file: its name, type and the form fields."""

    filename: str | None
    filetype: str | None
    fields: dict[str, str]


def describe_file(metadata: Mapping[str, bytes]) -> FileDescription:
    """The file's name, type and form fields from decoded Upload-Metadata (text must be
    UTF-8). The fields still need `parse_upload_fields` for their own rules."""

    def text(key: str) -> str:
        try:
            return metadata[key].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidField(f"Upload-Metadata {key} must be UTF-8 text") from None

    filename = next((text(k) for k in FILENAME_KEYS if k in metadata), None)
    filetype = next((text(k).strip() for k in FILETYPE_KEYS if k in metadata), None)
    if filetype is not None and not _MEDIA_TYPE_RE.fullmatch(filetype):
        # Browsers send "" for unknown types; the name's extension decides then.
        filetype = None
    fields = {key: text(key) for key in FIELD_KEYS if key in metadata}
    return FileDescription(filename or None, filetype, fields)


# --- Upload-Checksum -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checksum:
    algorithm: str
    digest: bytes

    def hasher(self) -> hashlib._Hash:
        return CHECKSUMS[self.algorithm]()


def parse_checksum(value: str | None) -> Checksum | None:
    """`Upload-Checksum: <algorithm> <base64 digest>`; 400 for an algorithm we lack (spec)."""
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise InvalidTusHeader(
            f"Upload-Checksum algorithm {algorithm[:20]!r} is not supported; "
            f"use one of {', '.join(CHECKSUMS)}"
        )
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTusHeader("Upload-Checksum digest is not valid base64") from None
    if len(digest) != CHECKSUMS[algorithm]().digest_size:
        raise InvalidTusHeader(
            f"Upload-Checksum digest has {len(digest)} bytes; {algorithm} has "
            f"{CHECKSUMS[algorithm]().digest_size}"
        )
    return Checksum(algorithm, digest)


# --- Upload-Concat ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Concat:
    """`partial`, or `final` with the ids of its partial uploads in order."""

    partial: bool
    parts: tuple[str, ...] = ()


def parse_concat(value: str | None) -> Concat | None:
    if value is None:
        return None
    text = value.strip()
    if text == "partial":
        return Concat(partial=True)
    kind, _, urls = text.partition(";")
    if kind.strip() != "final":
        raise InvalidTusHeader("Upload-Concat must be 'partial' or 'final;<url> <url> ...'")
    parts = tuple(upload_id_from_url(url) for url in urls.split())
    if not parts:
        raise InvalidTusHeader("Upload-Concat final names no partial upload")
    return Concat(partial=False, parts=parts)


def upload_id_from_url(url: str) -> str:
    """The id of an upload URL, absolute or relative (the last path segment): clients send
    back what `Location` said, resolved against whatever base they had."""
    path = urlsplit(url).path.rstrip("/")
    upload_id = parse_upload_id(path.rsplit("/", 1)[-1])
    if upload_id is None:
        raise InvalidTusHeader(f"{url[:80]!r} is not an upload URL of this server")
    return upload_id


# --- responses -------------------------------------------------------------------------------


def http_date(timestamp: float) -> str:
    """RFC 7231 IMF-fixdate, as `Upload-Expires` requires."""
    return email.utils.formatdate(timestamp, usegmt=True)


def options_headers(max_size: int) -> dict[str, str]:
    return {
        "Tus-Version": ",".join(SUPPORTED_VERSIONS),
        "Tus-Extension": ",".join(EXTENSIONS),
        "Tus-Max-Size": str(max_size),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
    }
