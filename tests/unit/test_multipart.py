"""The multipart push parser: events for any split of the bytes, and precise errors."""

from __future__ import annotations

import pytest

from ingester.errors import MalformedMultipart, UnsupportedMediaType
from ingester.http.multipart import (
    MAX_PARTS,
    BodyEnd,
    Event,
    MultipartStreamParser,
    PartData,
    PartEnd,
    PartStart,
    parse_boundary,
)

BOUNDARY = b"XyZ"


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n"
        if filename is not None:
            out += b"Content-Type: text/plain\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--XyZ--\r\n"


def parse(data: bytes, step: int) -> list[Event]:
    parser = MultipartStreamParser(BOUNDARY)
    events: list[Event] = []
    for i in range(0, len(data), step):
        events += parser.feed(data[i : i + step])
    parser.close()
    return events


def summarize(events: list[Event]) -> list[tuple[str, object]]:
    """Join consecutive data events, which depend on how the bytes were split."""
    out: list[tuple[str, object]] = []
    for event in events:
        if isinstance(event, PartData):
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + bytes(event.data))  # type: ignore[operator]
            else:
                out.append(("data", bytes(event.data)))
        elif isinstance(event, PartStart):
            out.append(("start", (event.name, event.filename, event.content_type)))
        elif isinstance(event, PartEnd):
            out.append(("end", None))
        elif isinstance(event, BodyEnd):
            out.append(("body_end", None))
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_events_do_not_depend_on_how_bytes_arrive(step: int) -> None:
    data = form(("a", b"1", None), ("file", b"hello\r\n--Xy world", "f.txt"), ("b", b"", None))
    assert summarize(parse(data, step)) == [
        ("start", ("a", None, None)),
        ("data", b"1"),
        ("end", None),
        ("start", ("file", "f.txt", "text/plain")),
        ("data", b"hello\r\n--Xy world"),
        ("end", None),
        ("start", ("b", None, None)),
        ("end", None),
        ("body_end", None),
    ]


def test_utf8_filenames_survive() -> None:
    events = parse(form(("file", b"x", "résumé.pdf")), 5)
    start = next(e for e in events if isinstance(e, PartStart))
    assert start.filename == "résumé.pdf"


def test_epilogue_after_the_closing_boundary_is_ignored() -> None:
    parser = MultipartStreamParser(BOUNDARY)
    events = parser.feed(form(("a", b"1", None)))
    assert isinstance(events[-1], BodyEnd)
    assert parser.feed(b"trailing garbage") == []
    parser.close()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (form(("file", b"abc", "f"))[:-12], "inside a part"),
        (b"", "before the closing"),
        (b"--XyZ\r\nContent-Disposition: attachment\r\n\r\nx\r\n--XyZ--\r\n", "form-data"),
        (b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XyZ--\r\n", "no name"),
        (b"not a form", "malformed"),
    ],
)
def test_broken_bodies(data: bytes, message: str) -> None:
    def feed_all() -> None:
        parser = MultipartStreamParser(BOUNDARY)
        parser.feed(data)
        parser.close()

    with pytest.raises(MalformedMultipart, match=message):
        feed_all()


def test_too_many_parts() -> None:
    data = form(*[(f"f{i}", b"x", None) for i in range(MAX_PARTS + 1)])
    with pytest.raises(MalformedMultipart, match="parts"):
        parse(data, 4096)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, UnsupportedMediaType),
        ("application/json", UnsupportedMediaType),
        ("text/plain; boundary=x", UnsupportedMediaType),
        ("multipart/form-data", MalformedMultipart),
        ("multipart/form-data; boundary=" + "b" * 71, MalformedMultipart),
    ],
)
def test_boundary_errors(header: str | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_boundary(header)


def test_boundary_quoted_and_case_insensitive_type() -> None:
    assert parse_boundary('Multipart/Form-Data; boundary="a b"') == b"a b"
