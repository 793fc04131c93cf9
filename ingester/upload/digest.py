"""The `Content-Digest` request header (RFC 9530). No I/O.

The header is a Structured Field Dictionary (RFC 8941/9651): `sha-256=:<base64>:`, possibly
beside other algorithms (`sha-512=:...:, sha-256=:...:`) and with parameters. The whole
header is parsed by the structured-field rules, so a malformed member is refused even when
it names an algorithm we do not verify: a header we cannot read may have been meant to carry
a sha-256 the client expects us to check.

Every algorithm we support that the header names is verified (`sha-256`, which the pipeline
computes anyway, and `sha-512`). A header naming only others (`md5`, `unixsum`, ...) is
refused with 400 `UNSUPPORTED_CONTENT_DIGEST` and a `Want-Content-Digest` saying what we
verify: storing the file unverified while the client believes it was checked is worse than
asking it to send a digest we can check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from ..buffers import Buffer
from ..errors import DigestMismatch, InvalidDigestHeader, UnsupportedDigest

if TYPE_CHECKING:
    from hashlib import _Hash

# Below this, hashing on the event loop is cheaper than a hop to a worker thread.
INLINE_HASH_BYTES: Final = 64 * 1024


async def update_hash(hasher: _Hash, data: Buffer) -> None:
    """`hasher.update(data)`: on the loop for a small piece, in a worker thread otherwise."""
    if len(data) >= INLINE_HASH_BYTES:
        await trio.to_thread.run_sync(hasher.update, data)
    else:
        hasher.update(data)


SHA256_KEY: Final = "sha-256"
# What we verify, in order of preference (sha-256 costs nothing extra: the pipeline hashes
# every upload with it).
SUPPORTED: Final[Mapping[str, Callable[[], _Hash]]] = {
    "sha-256": hashlib.sha256,
    "sha-512": hashlib.sha512,
}
# RFC 9530 section 4: the algorithms we want, with preferences (10 is the most wanted).
WANT_CONTENT_DIGEST: Final = "sha-256=10, sha-512=5"


class DigestHashing:
    """The hashes one pass over the file computes for `Content-Digest`, besides the
    pipeline's own sha-256 (false when there are none, so the common case costs nothing)."""

    def __init__(self, hashers: dict[str, _Hash]) -> None:
        self._hashers = hashers

    def __bool__(self) -> bool:
        return bool(self._hashers)

    def update(self, chunk: bytes | memoryview) -> None:
        for hasher in self._hashers.values():
            hasher.update(chunk)

    def digest(self, algorithm: str) -> bytes:
        return self._hashers[algorithm].digest()


@dataclass(frozen=True, slots=True)
class ExpectedDigest:
    """The digests `Content-Digest` asks us to verify: algorithm -> raw digest."""

    values: Mapping[str, bytes]

    def hashing(self) -> DigestHashing:
        """Fresh hashers for one pass over the file (a replay is a new pass)."""
        return DigestHashing(
            {name: SUPPORTED[name]() for name in self.values if name != SHA256_KEY}
        )

    def verify(self, sha256: bytes, hashing: DigestHashing | None) -> None:
        """`DigestMismatch` unless every expected digest is the file's."""
        for name, expected in self.values.items():
            if name == SHA256_KEY:
                actual = sha256
            else:
                assert hashing is not None, "the pass computed no digests"
                actual = hashing.digest(name)
            if actual != expected:
                raise DigestMismatch(f"the file's {name} does not match the Content-Digest header")


_KEY_RE: Final = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN_RE: Final = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_NUMBER_RE: Final = re.compile(r"-?[0-9]+(\.[0-9]*)?")
_BASE64_RE: Final = re.compile(r"[A-Za-z0-9+/=]*")


class _Bytes(bytes):
    """A parsed Byte Sequence, told apart from other bare items."""


class _Malformed(Exception):
    pass


class _Parser:
    """RFC 8941 §4.2 for a Dictionary; keeps byte sequences, checks the syntax of the rest."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _Malformed(f"expected {char!r} at position {self.pos}")
        self.pos += 1

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        found = pattern.match(self.text, self.pos)
        if found is None or not found.group():
            raise _Malformed(f"expected {what} at position {self.pos}")
        self.pos = found.end()
        return found.group()

    def dictionary(self) -> dict[str, object]:
        members: dict[str, object] = {}
        self.skip(" ")
        if not self.peek():
            return members
        while True:
            key = self.match(_KEY_RE, "a lower-case key")
            if self.peek() == "=":
                self.pos += 1
                members[key] = self.inner_list() if self.peek() == "(" else self.item()
            else:
                members[key] = True
                self.parameters()
            self.skip(" \t")
            if not self.peek():
                return members
            self.expect(",")
            self.skip(" \t")
            if not self.peek():
                raise _Malformed("trailing comma")

    def inner_list(self) -> list[object]:
        self.expect("(")
        items: list[object] = []
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.pos += 1
                self.parameters()
                return items
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise _Malformed(f"expected ' ' or ')' at position {self.pos}")

    def item(self) -> object:
        value = self.bare_item()
        self.parameters()
        return value

    def parameters(self) -> None:
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            self.match(_KEY_RE, "a lower-case parameter key")
            if self.peek() == "=":
                self.pos += 1
                self.bare_item()

    def bare_item(self) -> object:
        char = self.peek()
        if char == ":":
            return self.byte_sequence()
        if char == "-" or (char.isdigit() and char.isascii()):
            return self.number()
        if char == '"':
            return self.string()
        if char == "?":
            self.pos += 1
            value = self.peek()
            if value not in ("0", "1"):
                raise _Malformed(f"expected a boolean at position {self.pos}")
            self.pos += 1
            return value == "1"
        if char == "@":  # RFC 9651 Date
            self.pos += 1
            return self.number()
        if char == "%":
            return self.display_string()
        return self.match(_TOKEN_RE, "an item")

    def number(self) -> object:
        text = self.match(_NUMBER_RE, "a number")
        integer, _, fraction = text.lstrip("-").partition(".")
        if "." in text:
            if len(integer) > 12 or not 1 <= len(fraction) <= 3:
                raise _Malformed(f"decimal out of range at position {self.pos}")
            return float(text)
        if len(integer) > 15:
            raise _Malformed(f"integer out of range at position {self.pos}")
        return int(text)

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise _Malformed("unterminated string")
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\"):
                    raise _Malformed(f"bad escape at position {self.pos}")
                self.pos += 1
                out.append(escaped)
            elif not " " <= char <= "~":
                raise _Malformed(f"bad character in string at position {self.pos - 1}")
            else:
                out.append(char)

    def display_string(self) -> str:
        """RFC 9651: %"..." where only %xx (lower-case hex) escapes UTF-8 bytes."""
        self.expect("%")
        self.expect('"')
        start = self.pos
        while True:
            char = self.peek()
            if not char:
                raise _Malformed("unterminated display string")
            self.pos += 1
            if char == '"':
                return self.text[start : self.pos - 1]
            if char == "%":
                escape = self.text[self.pos : self.pos + 2]
                if len(escape) != 2 or not all(c in "0123456789abcdef" for c in escape):
                    raise _Malformed(f"bad escape at position {self.pos - 1}")
                self.pos += 2
            elif not " " <= char <= "~":
                raise _Malformed(f"bad character in display string at position {self.pos - 1}")

    def byte_sequence(self) -> _Bytes:
        self.expect(":")
        start = self.pos
        end = self.text.find(":", start)
        if end < 0:
            raise _Malformed("unterminated byte sequence")
        encoded = self.text[start:end]
        if not _BASE64_RE.fullmatch(encoded):
            raise _Malformed(f"byte sequence is not base64 at position {start}")
        self.pos = end + 1
        # RFC 8941 asks parsers to accept a missing "=" padding.
        padded = encoded.rstrip("=")
        padded += "=" * (-len(padded) % 4)
        try:
            return _Bytes(base64.b64decode(padded, validate=True))
        except binascii.Error:
            raise _Malformed(f"byte sequence is not base64 at position {start}") from None


def parse_content_digest(header: str | None) -> ExpectedDigest | None:
    """What a `Content-Digest` header asks us to verify, or None.

    None when the header is absent or empty. `InvalidDigestHeader` when the header is not a
    valid structured-field dictionary (keys are lower case: `SHA-256` is malformed), or when
    a supported algorithm's value is not a byte sequence of its digest's length.
    `UnsupportedDigest` when it names only algorithms we do not verify. Of repeated keys the
    last counts, as RFC 8941 says.
    """
    if header is None:
        return None
    parser = _Parser(header)
    try:
        members = parser.dictionary()
    except _Malformed as exc:
        raise InvalidDigestHeader(
            f"Content-Digest is not a valid structured-field dictionary: {exc}"
        ) from None
    if not members:
        return None
    values: dict[str, bytes] = {}
    for name, make in SUPPORTED.items():
        if name not in members:
            continue
        value = members[name]
        if not isinstance(value, _Bytes):
            raise InvalidDigestHeader(
                f"Content-Digest {name} must be a byte sequence: {name}=:<base64>:"
            )
        size = make().digest_size
        if len(value) != size:
            raise InvalidDigestHeader(
                f"Content-Digest {name} must be {size} bytes, not {len(value)}"
            )
        values[name] = bytes(value)
    if not values:
        named = ", ".join(list(members)[:5])
        raise UnsupportedDigest(
            f"Content-Digest names {named}; this server verifies {' and '.join(SUPPORTED)}",
            headers={"Want-Content-Digest": WANT_CONTENT_DIGEST},
        )
    return ExpectedDigest(values)
