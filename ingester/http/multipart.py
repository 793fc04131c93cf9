"""A push parser for `multipart/form-data` that turns bytes into part events. No I/O.

python-multipart parses; this layer turns its callbacks into a short list of events per
`feed()`, parses each part's headers, bounds what an attacker can make us hold (header size
and count, number of parts, size of the non-file fields) and maps the library's errors
onto `MalformedMultipart`.

Inside a part's data, the bytes that cannot start a delimiter skip the library: a read
with no delimiter in it (`search.find`, glibc's `memmem`: a third of the CPU of the
library's `bytes.find`) and no partial one at its end is part data as it is, with no
copy. The library then sees only the rest of the read, from the delimiter (or from the
partial one at its end), in the state it left: inside the part's data, nothing pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from ..errors import MalformedMultipart, UnsupportedMediaType
from .search import find

# A form with more parts than this is not an upload form but an attempt to exhaust us.
MAX_PARTS: Final = 64
# RFC 2046 caps a boundary at 70 characters.
MAX_BOUNDARY_LENGTH: Final = 70


@dataclass(frozen=True, slots=True)
class PartStart:
    name: str
    filename: str | None
    content_type: str | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PartData:
    # A view into the bytes fed, when the part's data came in one piece: no copy.
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


@dataclass(frozen=True, slots=True)
class BodyEnd:
    """The closing boundary was seen: the form is complete."""


Event = PartStart | PartData | PartEnd | BodyEnd


def parse_boundary(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type; 415 for any other type."""
    mimetype, params = parse_options_header(content_type or "")
    if mimetype.lower() != b"multipart/form-data":
        raise UnsupportedMediaType(
            f"expected multipart/form-data, got {mimetype.decode('latin-1') or 'no Content-Type'}"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedMultipart("the Content-Type has no multipart boundary")
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise MalformedMultipart("the multipart boundary is longer than 70 characters")
    return boundary


class MultipartStreamParser:
    """Feed body bytes, get events. `close()` checks the form was complete."""

    def __init__(self, boundary: bytes) -> None:
        self._events: list[Event] = []
        self._data: list[bytes | memoryview] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, str] = {}
        self._parts = 0
        self._in_part = False
        self._ended = False
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_end": self._on_end,
            },
            max_header_count=16,
        )

    @property
    def ended(self) -> bool:
        return self._ended

    def feed(self, data: bytes) -> list[Event]:
        if self._ended:
            # Bytes after the closing boundary are an epilogue, which RFC 2046 says to ignore.
            return []
        plain = self._plain_data(data)
        if plain:
            self._data.append(data if plain == len(data) else memoryview(data)[:plain])
            data = data[plain:]
        try:
            if data:
                self._parser.write(data)
        except MultipartParseError as exc:
            raise MalformedMultipart(f"malformed multipart body: {exc}") from None
        self._flush_data()
        events, self._events = self._events, []
        return events

    def _plain_data(self, data: bytes) -> int:
        """How many of `data`'s first bytes are part data the library need not see: 0
        unless it is inside a part's data with no partial delimiter pending."""
        parser = self._parser
        if (
            not isinstance(data, bytes)  # `find` takes bytes; the library any buffer
            or parser.state != MultipartState.PART_DATA
            or parser.index != 0
            or parser.marks.get("part_data") != 0
        ):
            return 0
        delimiter = parser.boundary  # CRLF, "--", the boundary
        at = find(data, delimiter)
        if at != -1:
            return at
        # A delimiter that the next read completes starts with the last CR of the tail
        # (a boundary holds no CR), if with any.
        tail = data.rfind(b"\r", max(0, len(data) - len(delimiter) + 1))
        if tail != -1 and delimiter.startswith(data[tail:]):
            return tail
        return len(data)

    def close(self) -> None:
        """The body ended; raise unless the closing boundary was seen."""
        if not self._ended:
            if self._in_part:
                raise MalformedMultipart("the body ended inside a part (truncated upload?)")
            raise MalformedMultipart("the body ended before the closing multipart boundary")

    # --- python-multipart callbacks -------------------------------------------------------

    def _flush_data(self) -> None:
        if self._data:
            chunk = self._data[0] if len(self._data) == 1 else b"".join(self._data)
            self._data.clear()
            self._events.append(PartData(chunk))

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise MultipartParseError(f"more than {MAX_PARTS} parts")
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        # Browsers send UTF-8 filenames raw in the header despite RFC 7578's latin-1 default.
        try:
            value = self._header_value.decode("utf-8")
        except UnicodeDecodeError:
            value = self._header_value.decode("latin-1")
        self._headers[name] = value.strip()
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(
            self._headers.get("content-disposition", "").encode("utf-8")
        )
        if disposition.lower() != b"form-data":
            raise MultipartParseError("a part has no 'Content-Disposition: form-data' header")
        raw_name = params.get(b"name")
        if raw_name is None:
            raise MultipartParseError("a part has no name")
        filename = params.get(b"filename*") or params.get(b"filename")
        content_type = self._headers.get("content-type")
        self._in_part = True
        self._events.append(
            PartStart(
                name=raw_name.decode("utf-8", "replace"),
                filename=None if filename is None else filename.decode("utf-8", "replace"),
                content_type=content_type,
                headers=self._headers,
            )
        )

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._data.append(memoryview(data)[start:end])

    def _on_part_end(self) -> None:
        self._flush_data()
        self._in_part = False
        self._events.append(PartEnd())

    def _on_end(self) -> None:
        self._ended = True
        self._events.append(BodyEnd())
