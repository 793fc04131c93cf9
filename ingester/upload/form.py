"""Reading a multipart upload form from a request body: `FormReader` pulls the body (under
the client idle timeout and the memory budget, `source.BodyReader`) and yields the parser's
events; `FormSource` is the pipeline's file source over it (the fields around the file part,
its bytes); `read_field` and `add_field` take the small text fields."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from ..buffers import Buffer
from ..errors import InvalidField, MalformedMultipart, MissingFile
from ..http.multipart import BodyEnd, MultipartStreamParser, PartData, PartEnd, PartStart
from .budget import UploadBudget
from .fields import TRUE_WORDS, UploadOptions, parse_upload_fields
from .source import BodyReader, FileStart

# A text field larger than this is not a form field but an attempt to exhaust memory
# (metadata's own limit is 64 KiB).
MAX_FIELD_BYTES: Final = 128 * 1024
MAX_FIELDS_TOTAL: Final = 256 * 1024


class FormReader(BodyReader):
    """Pulls the request body and yields multipart events. Framing goes back to the budget
    at once; part data is held by whoever consumes it."""

    def __init__(
        self,
        body: AsyncIterator[bytes],
        boundary: bytes,
        idle_timeout_s: float,
        budget: UploadBudget,
        quantum: int,
    ) -> None:
        super().__init__(body, idle_timeout_s, budget, quantum)
        self._parser = MultipartStreamParser(boundary)
        self._pending: list[Any] = []

    async def next_event(self, *, batch_pending: bool = False) -> Any:
        """The next multipart event; None as `FileSource.read`."""
        while not self._pending:
            pulled = await self.pull(batch_pending=batch_pending)
            if pulled is None:
                if not self.exhausted:
                    return None
                self._parser.close()
                raise MalformedMultipart("the body ended before the form was complete")
            chunk, held = pulled
            events = self._parser.feed(chunk)
            part_bytes = sum(len(e.data) for e in events if isinstance(e, PartData))
            # The parser may emit a few bytes it held back from the previous chunk (a
            # possible boundary), so part data can exceed this chunk's share.
            self.budget.release(held - part_bytes)
            events.reverse()
            self._pending = events
        return self._pending.pop()


def plan_is_settled(fields: Mapping[str, str]) -> bool:
    """Whether the fields seen so far fix where and how the bytes are stored.

    Those choices must be made before the first byte leaves for a Storage Element (the other
    fields travel after the file data). When a later field could still change them, the
    upload is teed into a spool so it can be sent again without asking the client.
    """
    policy = "retention_policy" in fields or "storage_mode" in fields
    compress = fields.get("compress")
    if compress is None:
        return False
    algorithm_open = (
        compress.strip().lower() in TRUE_WORDS and "compression_algorithm" not in fields
    )
    return policy and not algorithm_open


class FormSource:
    """The file of a multipart upload form: the fields before the file part, its bytes,
    then the fields after it (the file part may come anywhere)."""

    def __init__(self, reader: FormReader, *, max_description_length: int) -> None:
        self._reader = reader
        self._max_description_length = max_description_length
        self._fields: dict[str, str] = {}
        self._field_budget = [MAX_FIELDS_TOTAL]
        self.budget = reader.budget

    @property
    def bytes_read(self) -> int:
        return self._reader.bytes_read

    @property
    def prehashed(self) -> None:
        return None

    async def begin(self) -> FileStart:
        while True:
            event = await self._reader.next_event()
            if isinstance(event, PartStart):
                if event.name == "file":
                    break
                await self._add_field(event.name)
            elif isinstance(event, BodyEnd):
                raise MissingFile()
        # Validate what is known now: a bad early field fails before any byte goes out.
        return FileStart(
            options=self._options(),
            settled=plan_is_settled(self._fields),
            filename=event.filename,
            content_type=event.content_type,
        )

    async def read(self, *, batch_pending: bool = False) -> Buffer | None:
        event = await self._reader.next_event(batch_pending=batch_pending)
        if event is None:
            return None
        if isinstance(event, PartData):
            return event.data
        if isinstance(event, PartEnd):
            return b""
        raise MalformedMultipart("unexpected multipart structure")  # pragma: no cover

    async def finish(self) -> UploadOptions:
        """The fields after the file part, to the form's end."""
        while True:
            event = await self._reader.next_event()
            if isinstance(event, PartStart):
                if event.name == "file":
                    raise InvalidField("only one 'file' part is accepted")
                await self._add_field(event.name)
            elif isinstance(event, BodyEnd):
                return self._options()

    async def _add_field(self, name: str) -> None:
        add_field(self._fields, name, await read_field(self._reader, self._field_budget))

    def _options(self) -> UploadOptions:
        return parse_upload_fields(
            self._fields, max_description_length=self._max_description_length
        )


async def read_field(reader: FormReader, budget: list[int]) -> str:
    parts: list[Buffer] = []
    size = 0
    while True:
        event = await reader.next_event()
        if isinstance(event, PartData):
            reader.budget.release(len(event.data))
            size += len(event.data)
            budget[0] -= len(event.data)
            if size > MAX_FIELD_BYTES or budget[0] < 0:
                raise InvalidField("a form field is larger than 128 KiB")
            parts.append(event.data)
        elif isinstance(event, PartEnd):
            try:
                return b"".join(parts).decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidField("form fields must be UTF-8 text") from None
        else:  # pragma: no cover - the parser always ends a part before starting another
            raise MalformedMultipart("unexpected multipart structure")


def add_field(fields: dict[str, str], name: str, value: str) -> None:
    if name in fields:
        raise InvalidField(f"{name} was sent more than once")
    fields[name] = value
