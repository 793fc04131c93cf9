"""Client-supplied file names made safe to show and to store. No I/O.

`sanitize_filename` gives the name we record and answer with (`original_filename`): still the
user's name, Unicode and all, but one path component, printable, without bidi tricks, and
bounded in UTF-8 bytes. `storage_filename` gives a name for a disk: ASCII, unique per file.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

FALLBACK_STEM: Final = "upload"
# An extension longer than this is not a type suffix worth keeping through truncation.
MAX_EXTENSION_CHARS: Final = 16
MAX_STORAGE_NAME_BYTES: Final = 255

# C0 controls (NUL, CR, LF, TAB...), DEL and C1 controls break headers, logs and terminals;
# U+2028/U+2029 are line breaks to JavaScript and some log viewers.
_CONTROL_RE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Bidi embeddings, overrides, isolates and marks. The override U+202E makes
# "invoice\u202egpj.exe" display as "invoiceexe.jpg"; names in right-to-left scripts
# display correctly without any of these, so nothing legitimate is lost. Other invisible
# format characters (ZWJ, ZWNJ) are kept: emoji sequences and Persian or Indic words need them.
_BIDI_RE: Final = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Lone surrogates cannot be encoded as UTF-8 (they only arise from lax decoding upstream).
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")
_SEPARATORS_RE: Final = re.compile(r"[/\\]")
_UNSAFE_ASCII_RE: Final = re.compile(r"[^A-Za-z0-9._-]+")


def _is_edge_junk(char: str) -> bool:
    return char == "." or char.isspace()


def _strip_edges(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[start:end]


def _rstrip_edges(text: str) -> str:
    end = len(text)
    while end > 0 and _is_edge_junk(text[end - 1]):
        end -= 1
    return text[:end]


def _split_extension(name: str) -> tuple[str, str]:
    """(stem, extension with its dot); the extension only if short and non-empty."""
    stem, dot, extension = name.rpartition(".")
    if not dot or not extension or len(extension) > MAX_EXTENSION_CHARS:
        return name, ""
    return stem, dot + extension


def _cut_utf8(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` within `max_bytes` UTF-8 bytes, whole characters only,
    not ending between a base character and its combining marks."""
    if max_bytes <= 0:
        return ""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    cut = encoded[:max_bytes].decode("utf-8", "ignore")
    while cut and len(cut) < len(text) and unicodedata.combining(text[len(cut)]):
        cut = cut[:-1]
    return cut


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def sanitize_filename(raw: str | None, *, max_length: int = 255) -> str:
    """A safe display name from the client's `filename`, at most `max_length` UTF-8 bytes.

    Keeps only the last path component (`/` and `\\` both separate; percent-escapes are not
    decoded, so `..%2F` stays literal text), drops control and bidi characters, normalizes
    to NFC, strips dots and whitespace at both ends (no hidden files, no `.`/`..`, no names
    Windows would silently change). A name that was only an extension (`.pdf`) becomes
    `upload.pdf`; a name with nothing left becomes `upload`. Truncation keeps an extension
    of up to 16 characters.
    """
    if not raw:
        return FALLBACK_STEM
    # Removal before normalization: a removed character may have separated a base
    # character from a combining mark that NFC now joins to it.
    name = _SURROGATE_RE.sub("", _BIDI_RE.sub("", _CONTROL_RE.sub("", raw)))
    name = unicodedata.normalize("NFC", name)
    name = _SEPARATORS_RE.split(name)[-1]
    core = _strip_edges(name)
    if not core:
        return FALLBACK_STEM
    stem, extension = _split_extension(core)
    if (
        not extension
        and name.lstrip().startswith(".")
        and "." not in core
        and len(core) <= MAX_EXTENSION_CHARS
    ):
        # ".pdf" was only an extension: keep the type, which is what identifies the file.
        stem, extension = "", "." + core
    if extension and _utf8_len(extension) + 1 > max_length:
        # No room for even one character of stem beside it.
        stem, extension = core, ""
    if _utf8_len(stem) + _utf8_len(extension) > max_length:
        stem = _cut_utf8(stem, max_length - _utf8_len(extension))
        # The cut may expose dots or spaces; only the start of a name must lose its dots.
        stem = _strip_edges(stem) if not extension else _rstrip_edges(stem)
    result = stem + extension if stem else FALLBACK_STEM + extension
    return _cut_utf8(result, max_length) or FALLBACK_STEM


def storage_filename(original: str, file_id: str) -> str:
    """`<stem>_<file_id>.<ext>`: ASCII `[A-Za-z0-9._-]` only, at most 255 bytes.

    Runs of other characters become one `_`; the stem is shortened to fit and loses leading
    dots and dashes (no hidden files, nothing a shell tool could take for an option). The
    file id makes the name unique, so no two uploads collide whatever their names.
    """
    safe_id = _UNSAFE_ASCII_RE.sub("_", file_id).strip("._-")
    if not safe_id:
        raise ValueError("file_id must contain a letter or a digit")
    name = _SEPARATORS_RE.split(original)[-1]
    stem, extension = _split_extension(name)
    extension = _UNSAFE_ASCII_RE.sub("_", extension[1:]).strip("._-")
    suffix = f".{extension}" if extension else ""
    room = MAX_STORAGE_NAME_BYTES - len(safe_id) - len(suffix) - 1
    stem = _UNSAFE_ASCII_RE.sub("_", stem).strip("._-")[: max(room, 0)].rstrip("._-")
    if not stem:
        return (safe_id + suffix)[:MAX_STORAGE_NAME_BYTES]
    return f"{stem}_{safe_id}{suffix}"
