"""What a Storage Element does with an upload besides storing its bytes. No I/O.

artStore's own element drops the `metadata` and `content_type` fields and refuses empty
files; the reference element keeps both and stores them. Each capability comes from, in order:
the registry entry (`keeps_metadata`, `accepts_empty_files`, `compressed_names`), what the
element's `/api/v1/info` reports under `capabilities` (the reference element does; artStore's
does not), and then the safe answer, no. So an element nobody describes is treated as
artStore's: an empty file is refused before a byte is sent, and a compressed upload is stored
under a name that says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import quote

from ..settings import CompressedNames, StorageElementConfig
from .selection import Candidate

# The compressed form's name and media type, per algorithm (`ingester.upload.compression`).
SUFFIXES: Final = {"gzip": ".gz", "brotli": ".br"}
MEDIA_TYPES: Final = {"gzip": "application/gzip", "brotli": "application/x-brotli"}
# The compression decision's reason when the element chosen must not get compressed bytes.
ELEMENT_POLICY: Final = "element_policy"


class StoredForm(StrEnum):
    """How a compressed file is stored on one element."""

    # The element keeps our metadata (`_ingester.compressed`, algorithm, original size and
    # checksum): original name and type.
    METADATA = "metadata"
    # `<name>.br`/`.gz`, the compressed form's media type.
    SUFFIX = "suffix"
    # Not compressed for this element.
    OFF = "off"


def reported_flags(info: Mapping[str, Any]) -> dict[str, bool]:
    """The capability flags an element's `/api/v1/info` reports (booleans only)."""
    raw = info.get("capabilities")
    if not isinstance(raw, Mapping):
        return {}
    return {
        name: value
        for name in (
            "keeps_metadata",
            "accepts_empty_files",
            "serves_any_name",
            "stores_after_hangup",
        )
        if isinstance(value := raw.get(name), bool)
    }


def stores_after_hangup(reported: Mapping[str, bool]) -> bool:
    """Whether the element may store an upload whose caller hung up after the last byte.
    artStore's does (it writes the file after the body, and finishes it whoever left); the
    reference element says it does not. Not said: the safe answer, yes (a removal that finds
    nothing is then asked again for a while, see `SagaRecord.landing`)."""
    return reported.get("stores_after_hangup", True)


def resolve(element: StorageElementConfig, reported: Mapping[str, bool]) -> tuple[bool, bool, bool]:
    """(keeps_metadata, accepts_empty_files, serves_any_name): the registry's word, else the
    element's, else no."""

    def one(name: str, configured: bool | None) -> bool:
        if configured is not None:
            return configured
        return reported.get(name, False)

    return (
        one("keeps_metadata", element.keeps_metadata),
        one("accepts_empty_files", element.accepts_empty_files),
        one("serves_any_name", element.serves_any_name),
    )


def stored_form(candidate: Candidate, default: CompressedNames) -> StoredForm:
    """How a compressed upload goes to `candidate`."""
    if candidate.keeps_metadata:
        return StoredForm.METADATA
    names = candidate.compressed_names or default
    return StoredForm.SUFFIX if names is CompressedNames.SUFFIX else StoredForm.OFF


@dataclass(frozen=True, slots=True)
class Fit:
    """What an upload needs of its element, once its first bytes are known."""

    empty: bool
    compressed: bool
    default_names: CompressedNames

    def takes(self, candidate: Candidate) -> bool:
        if self.empty and not candidate.accepts_empty_files:
            return False
        return not (
            self.compressed and stored_form(candidate, self.default_names) is StoredForm.OFF
        )


def stored_as(
    filename: str,
    content_type: str,
    algorithm: str | None,
    form: StoredForm,
    *,
    any_name: bool,
) -> tuple[str, str]:
    """The name and media type the element is given for a file stored in `form` (`algorithm`
    None: not compressed, stored as it came); `any_name`: whether its downloads carry any
    name (`stored_name`)."""
    if algorithm is not None and form is StoredForm.SUFFIX:
        filename, content_type = filename + SUFFIXES[algorithm], MEDIA_TYPES[algorithm]
    return stored_name(filename, any_name=any_name), content_type


def stored_name(filename: str, *, any_name: bool) -> str:
    """The file name an element is given, so that it can store it and serve the file back.

    artStore's element writes the name raw into its download's Content-Disposition, which
    Starlette encodes as Latin-1: a name with any other character (Cyrillic, CJK, an emoji)
    fails every download of the file with a 500, and so its finalization, which copies the
    file by downloading it. Toward an element that does not say its downloads carry any name
    (`serves_any_name`), such a name goes percent-encoded: its non-ASCII characters and `%`
    as the `%XX` of their UTF-8 bytes, the rest as it is. It stays whole and can be read
    back; the Admin Module records the original (`stored_filename` beside it).

    A Latin-1 name goes as it is, but cut (`fits_artstore_files`) where its storage file's
    name would pass the file system's 255 bytes."""
    if any_name:
        return filename
    try:
        filename.encode("latin-1")
    except UnicodeEncodeError:
        return "".join(
            char if " " <= char <= "~" and char != "%" else quote(char, safe="")
            for char in filename
        )
    return fits_artstore_files(filename)


# artStore's element names its files after the original name: `<stem>_<uploader>_<time>_<32
# hex><ext>`, cut to 200 characters (by shortening the stem), then `<that>.attr.json` beside
# it. A file system name holds 255 bytes: those 200 characters may take 45 bytes more in
# UTF-8, whatever the uploader's name and wherever the cut.
ARTSTORE_NAME_CHARS: Final = 200
ARTSTORE_ATTR_SUFFIX: Final = ".attr.json"
NAME_MAX_BYTES: Final = 255
EXTRA_BYTES: Final = NAME_MAX_BYTES - ARTSTORE_NAME_CHARS - len(ARTSTORE_ATTR_SUFFIX)


def _extra_bytes(text: str) -> int:
    """What UTF-8 takes beyond one byte per character."""
    return len(text.encode()) - len(text)


def fits_artstore_files(filename: str) -> str:
    """`filename` with its stem cut short enough that artStore's element can name its files
    after it (one of two bytes per character in UTF-8, as accented Latin letters are, fails
    the write past 45 of them: `500 "Failed to create file"` on every element). A name
    within that goes as it is."""
    if _extra_bytes(filename) <= EXTRA_BYTES:
        return filename
    dot = filename.rfind(".")
    stem, ext = (filename[:dot], filename[dot:]) if dot > 0 else (filename, "")
    if _extra_bytes(ext) > EXTRA_BYTES:
        stem, ext = filename, ""
    budget = EXTRA_BYTES - _extra_bytes(ext)
    kept = 0
    for length, char in enumerate(stem):
        kept += len(char.encode()) - 1
        if kept > budget:
            return stem[:length] + ext
    return stem + ext  # pragma: no cover - the whole name was over


def compressed_by_metadata(metadata: Mapping[str, Any]) -> str | None:
    """The algorithm our `_ingester` metadata names for a stored copy, or None."""
    facts = metadata.get("_ingester")
    if not isinstance(facts, Mapping) or facts.get("compressed") is not True:
        return None
    algorithm = facts.get("compression_algorithm")
    return algorithm if algorithm in SUFFIXES else None
