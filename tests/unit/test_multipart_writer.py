"""The multipart writer: what it writes, our parser (python-multipart underneath, as in
Starlette) reads back, for any name or filename, hostile ones included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingester.errors import MalformedMultipart
from ingester.http import multipart
from ingester.http.multipart_writer import field, file_head, form_content_type, quote, tail

BOUNDARY = "wRiTeR0123456789"


def parse(body: bytes, step: int | None = None) -> list[multipart.Event]:
    parser = multipart.MultipartStreamParser(BOUNDARY.encode())
    step = step or len(body)
    events: list[multipart.Event] = []
    for i in range(0, len(body), step):
        events += parser.feed(body[i : i + step])
    parser.close()
    return events


def file_part(events: list[multipart.Event]) -> tuple[multipart.PartStart, bytes]:
    start = next(e for e in events if isinstance(e, multipart.PartStart) and e.name == "file")
    index = events.index(start)
    end = next(i for i in range(index, len(events)) if isinstance(events[i], multipart.PartEnd))
    data = b"".join(bytes(e.data) for e in events[index:end] if isinstance(e, multipart.PartData))
    return start, data


def written(name: str) -> str:
    """The name the writer puts on the wire: no CR, LF or NUL; U+FFFD for lone surrogates."""
    kept = "".join(c for c in name if c not in "\r\n\0")
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in kept)


def read_back(filename: str) -> str:
    """What python-multipart gives back for a filename written as `filename`: the same,
    but for its IE6 workaround, which looks at the header's bytes (as latin-1 text) and
    keeps only the last backslash-separated component of what looks like a Windows path."""
    raw = written(filename).encode().decode("latin-1")
    if raw[1:3] == ":\\" or raw[:2] == "\\\\":
        raw = raw.split("\\")[-1]
    return raw.encode("latin-1").decode()


# Pieces that matter to quoting and to python-multipart, between runs of any characters
# (lone surrogates too).
TRICKY = [
    '"',
    "\\",
    "\\\\",
    '\\"',
    "\r",
    "\n",
    "\r\n",
    "\0",
    ";",
    "=",
    ":\\",
    "; filename=",
    "\t",
    " ",
]
NAMES = st.lists(
    st.sampled_from(TRICKY) | st.text(st.characters(exclude_categories=()), max_size=8),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(
    name=NAMES,
    filename=NAMES,
    data=st.binary(max_size=64),
    step=st.integers(1, 64),
)
def test_our_parser_reads_back_any_name_and_filename(
    name: str, filename: str, data: bytes, step: int
) -> None:
    body = file_head(BOUNDARY, "file", filename, "text/plain") + data + tail(BOUNDARY)
    start, got = file_part(parse(body, step))
    assert start.filename == read_back(filename)
    assert start.content_type == "text/plain"
    assert got == data
    # Field names take the same rule (python-multipart's IE6 workaround is for filenames).
    body = field(BOUNDARY, name, "v") + file_head(BOUNDARY, "file", None, None) + tail(BOUNDARY)
    first = parse(body, step)[0]
    assert isinstance(first, multipart.PartStart)
    assert first.name == written(name)


@settings(max_examples=200, deadline=None)
@given(value=st.text(max_size=200), after=st.text(max_size=200))
def test_field_values_go_as_they_are(value: str, after: str) -> None:
    body = (
        field(BOUNDARY, "description", value)
        + file_head(BOUNDARY, "file", "a.bin", None)
        + b"\x00\r\n--"
        + tail(BOUNDARY, [("metadata", after), ("version", "1")])
    )
    events = parse(body)
    texts: dict[str, bytes] = {}
    current = ""
    for event in events:
        if isinstance(event, multipart.PartStart):
            current = event.name
            texts[current] = b""
        elif isinstance(event, multipart.PartData):
            texts[current] += bytes(event.data)
    assert texts == {
        "description": value.encode(),
        "file": b"\x00\r\n--",
        "metadata": after.encode(),
        "version": b"1",
    }
    assert isinstance(events[-1], multipart.BodyEnd)


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("plain.txt", "plain.txt"),
        ('quo"te.txt', 'quo"te.txt'),
        ("back\\slash.txt", "back\\slash.txt"),
        ('ends with \\"', 'ends with \\"'),
        ("trailing backslash\\", "trailing backslash\\"),
        ('x"; filename="evil.exe', 'x"; filename="evil.exe'),
        ("line\r\nContent-Type: text/html\r\n\r\n.txt", "lineContent-Type: text/html.txt"),
        ("lone\nfeed\rreturn.txt", "lonefeedreturn.txt"),
        ("nul\0byte.txt", "nulbyte.txt"),
        ("héllo wörld 日本語 🎉.txt", "héllo wörld 日本語 🎉.txt"),
        ("bad\udcffbyte.txt", "bad\ufffdbyte.txt"),
        ("  spaces  ", "  spaces  "),
        ("", ""),
        # python-multipart's IE6 workaround: a Windows path keeps its last component.
        ("C:\\Users\\me\\a.txt", "a.txt"),
        ("\\\\host\\share\\a.txt", "a.txt"),
    ],
)
def test_hostile_filenames(filename: str, expected: str) -> None:
    head = file_head(BOUNDARY, "file", filename, "application/pdf")
    # The delimiter, the disposition, the type, the blank line: nothing injected.
    assert head.count(b"\r\n") == 4
    assert b"\0" not in head
    start, data = file_part(parse(head + b"%PDF" + tail(BOUNDARY)))
    assert start.filename == expected
    assert start.content_type == "application/pdf"
    assert data == b"%PDF"


def test_very_long_names_round_trip_within_pythonmultiparts_header_limit() -> None:
    name = ("日本語\\" + '"' + "x" * 20) * 40  # 1,000 characters, 1,880 bytes written
    start, _ = file_part(parse(file_head(BOUNDARY, "file", name, None) + tail(BOUNDARY)))
    assert start.filename == name
    # A part header over 4224 bytes is refused, by Starlette as by us: the writer does not
    # cut names (ours are at most 255 bytes).
    with pytest.raises(MalformedMultipart, match="header size"):
        parse(file_head(BOUNDARY, "file", "x" * 4300, None) + tail(BOUNDARY))


def test_the_bytes_on_the_wire() -> None:
    assert field("B", "file_id", "f1") == (
        b'--B\r\nContent-Disposition: form-data; name="file_id"\r\n\r\nf1\r\n'
    )
    assert file_head("B", "file", 'a"b\\c.txt', "text/plain") == (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\\"b\\\\c.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
    )
    assert file_head("B", "file", None, None) == (
        b'--B\r\nContent-Disposition: form-data; name="file"\r\n\r\n'
    )
    # A media type cannot carry a header of its own either.
    assert file_head("B", "file", "a", "text/plain\r\nX-Evil: 1") == (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n'
        b"Content-Type: text/plainX-Evil: 1\r\n\r\n"
    )
    assert tail("B") == b"\r\n--B--\r\n"
    assert tail("B", [("version", "1")]) == (
        b'\r\n--B\r\nContent-Disposition: form-data; name="version"\r\n\r\n1\r\n--B--\r\n'
    )
    assert form_content_type("B") == "multipart/form-data; boundary=B"
    assert quote('\\"\r\n\0') == '\\\\\\"'
