"""Writing `multipart/form-data` (RFC 7578): the one place the ingester frames a form. No I/O.

Every form the ingester writes is made of these pieces: the body sent to a Storage Element
(`upload.pipeline`), finalization's copy (`finalize.finalizer`) and the command-line client's
request (`client.multipart`).

    field(boundary, name, value)                       one text part
    fields(boundary, items)                            text parts, in order
    file_head(boundary, name, filename, content_type)  the file part, up to its first byte
    tail(boundary, after)                              ends the file's bytes, then the text
                                                       parts that follow them, then the
                                                       closing delimiter

**One quoting rule** (`quote`) for the `name` and `filename` parameters of
Content-Disposition, written as quoted-strings in UTF-8, raw, as browsers send them
(RFC 7578 §4.2; no `filename*`, which that section forbids and python-multipart ignores):

- CR, LF and NUL are dropped. A quoted-string cannot carry them (RFC 9110 §5.6.4), and a
  line break ends the header: a line-based parser would read what follows as a header of
  the sender's choosing, python-multipart (which ends a header value only at CR) as part of
  the name. Dropped, not percent-encoded: no parser here decodes `%0A`, and our own server
  drops control characters from names anyway (`upload.filenames.sanitize_filename`), so a
  name arrives as that server would make of it sent raw.
- `\\` and `"` are escaped as quoted-pairs (`\\\\`, `\\"`), which every parser below undoes.
- Lone surrogates (what Python makes of file names that are not valid UTF-8) become U+FFFD:
  they cannot be encoded.

What real parsers make of it:

- python-multipart's `parse_options_header`, which our parser (`http.multipart`) and
  Starlette's form parser (so FastAPI, and so artStore's Storage Element) both use: undoes
  the escapes and hands the UTF-8 bytes back, which both decode as UTF-8. A name comes back
  exactly as written, with two exceptions of that library's: a `filename` that looks like a
  Windows path (`C:\\...`, `\\\\host\\...`) is cut to its last `\\`-separated component (a
  workaround for IE6; `sanitize_filename` keeps only the last component anyway), and a part
  header over 4224 bytes is refused (the names we send are at most 255 bytes of UTF-8).
- Browsers percent-encode instead (`"` as `%22`, CR and LF as `%0D` and `%0A`; the HTML
  standard's form encoding), and three of the four writers this module replaced did too: no
  parser above decodes that, so a `"` in a name was stored as `%22`.

Field values are the parts' bodies, not headers: they go as they are, in UTF-8. The media
type of the file part is not quoted; it is cleaned as names are (CR, LF, NUL, surrogates).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

# What can never appear in a part header.
_LINE_BREAK_OR_NUL: Final = re.compile("[\r\n\0]")
# Lone surrogates cannot be encoded as UTF-8.
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def _clean(value: str) -> str:
    """`value` without what no part header may carry, and encodable."""
    return _SURROGATE.sub("\ufffd", _LINE_BREAK_OR_NUL.sub("", value))


def quote(value: str) -> str:
    """`value` as the inside of a quoted-string parameter of a part header."""
    return _clean(value).replace("\\", "\\\\").replace('"', '\\"')


def form_content_type(boundary: str) -> str:
    """The Content-Type of a form written with `boundary`."""
    return f"multipart/form-data; boundary={boundary}"


def field(boundary: str, name: str, value: str) -> bytes:
    """One text part: its head and `value`, up to the next delimiter."""
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{quote(name)}"\r\n\r\n{value}\r\n'
    ).encode()


def fields(boundary: str, items: Iterable[tuple[str, str]]) -> bytes:
    """Text parts, (name, value) in order."""
    return b"".join(field(boundary, name, value) for name, value in items)


def file_head(boundary: str, name: str, filename: str | None, content_type: str | None) -> bytes:
    """The head of a file part, up to its first byte; no `filename` parameter and no
    Content-Type header when they are None (or empty, for the media type)."""
    disposition = f'form-data; name="{quote(name)}"'
    if filename is not None:
        disposition += f'; filename="{quote(filename)}"'
    head = f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
    media_type = _clean(content_type or "")
    if media_type:
        head += f"Content-Type: {media_type}\r\n"
    return (head + "\r\n").encode()


def tail(boundary: str, after: Iterable[tuple[str, str]] = ()) -> bytes:
    """What follows the file's bytes: the line break that ends them, the text parts `after`
    ((name, value), in order), the closing delimiter."""
    return b"\r\n" + fields(boundary, after) + f"--{boundary}--\r\n".encode()
