"""The Storage Element's upload form, sorted out of multipart events. No I/O.

Fields: `file` (required; its filename and Content-Type describe the file), `description`,
`version`, `file_id` (a UUID), `retention_policy`, and two extras artStore's element does
not have but the ingester may send: `metadata` (a JSON object) and `content_type` (overrides
the part's). Any field may come before or after the file. As artStore's element does (via
FastAPI), an empty value counts as not sent; unknown fields are read and ignored. An
artStore-compatible form (`extras=False`) takes `metadata` and `content_type` for unknown
fields too, as artStore's upload route does.
"""

from __future__ import annotations

from typing import Any, Final

from ..auth.principal import Principal
from ..errors import InvalidField, InvalidMetadata
from ..http.multipart import PartStart
from ..upload.fields import loads_strict_json
from ..upload.filenames import sanitize_filename
from .store import NewFile, parse_file_id

FILE_FIELD: Final = "file"
# What artStore's own upload route reads besides the file.
ARTSTORE_FIELDS: Final = frozenset(
    {"description", "version", "file_id", "finalize_transaction_id", "retention_policy"}
)
TEXT_FIELDS: Final = ARTSTORE_FIELDS | {"metadata", "content_type"}
# Per text field, metadata included, as Starlette's form parser (artStore's element) caps
# each: 1 MiB. The ingester's own limits are lower (64 KiB of a client's metadata, to which
# it adds its `_ingester` facts), and must never meet this one.
MAX_FIELD_BYTES: Final = 1024 * 1024
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"


class UploadForm:
    """Feed it the parts as they come; the file's bytes go elsewhere (see `in_file`)."""

    def __init__(self, *, extras: bool = True) -> None:
        self._extras = extras
        self._known = TEXT_FIELDS if extras else ARTSTORE_FIELDS
        self.fields: dict[str, str] = {}
        self.has_file = False
        self.filename: str | None = None
        self.part_content_type: str | None = None
        self._in_file = False
        self._field: str | None = None
        self._value = bytearray()

    @property
    def in_file(self) -> bool:
        """True while the data being received belongs to the file."""
        return self._in_file

    def start_part(self, part: PartStart) -> bool:
        """Begin a part; True when it is the file."""
        if part.name == FILE_FIELD:
            if self.has_file:
                raise InvalidField("only one 'file' part is allowed")
            self.has_file = True
            self._in_file = True
            self.filename = part.filename
            self.part_content_type = part.content_type
            return True
        if part.name in self._known:
            if part.name in self.fields:
                raise InvalidField(f"the field {part.name!r} was sent twice")
            self._field = part.name
        else:
            self._field = None
        self._value.clear()
        return False

    def add_field_data(self, data: bytes | memoryview) -> None:
        if self._field is None:
            return
        if len(self._value) + len(data) > MAX_FIELD_BYTES:
            raise InvalidField(f"the field {self._field!r} is longer than {MAX_FIELD_BYTES} bytes")
        self._value += data

    def end_part(self) -> str | None:
        """End the current part; the name of the text field it completed, if any."""
        if self._in_file:
            self._in_file = False
            return None
        name, self._field = self._field, None
        if name is None:
            return None
        try:
            self.fields[name] = self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidField(f"the field {name!r} is not UTF-8") from None
        finally:
            self._value.clear()
        return name

    # --- values ------------------------------------------------------------------------------

    def text(self, name: str) -> str | None:
        value = self.fields.get(name, "").strip()
        return value or None

    def file_id(self) -> str | None:
        value = self.text("file_id")
        return None if value is None else parse_file_id(value)

    def content_type(self) -> str:
        return (
            self.text("content_type")
            or (self.part_content_type or "").strip()
            or (DEFAULT_CONTENT_TYPE)
        )

    def metadata(self) -> dict[str, Any]:
        value = self.text("metadata")
        if value is None:
            return {}
        try:
            parsed = loads_strict_json(value)
        except RecursionError:
            raise InvalidMetadata("metadata nests too deeply") from None
        except ValueError as exc:
            raise InvalidMetadata(f"metadata is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidMetadata("metadata must be a JSON object")
        return parsed

    def new_file(self, file_id: str, principal: Principal) -> NewFile:
        """The stored file's record, as the form describes it (metadata only where the
        element keeps it: artStore's own drops it)."""
        return NewFile(
            file_id=file_id,
            original_filename=sanitize_filename(self.filename),
            content_type=self.content_type(),
            created_by_id=principal.subject,
            created_by_username=principal.username,
            description=self.text("description"),
            version=self.text("version"),
            retention_policy=self.text("retention_policy"),
            metadata=self.metadata() if self._extras else {},
        )
