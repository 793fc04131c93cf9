"""Reading a multipart upload form from a request body: `FormReader` pulls the body under
the client idle timeout and the memory budget, and yields the parser's events; `read_field`
and `add_field` take the small text fields around the file part."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Final

import trio

from ..errors import InvalidField, MalformedMultipart, RequestTimeout
from ..http.multipart import MultipartStreamParser, PartData, PartEnd
from .budget import UploadBudget
from .spool import Buffer

# A text field larger than this is not a form field but an attempt to exhaust memory
# (metadata's own limit is 64 KiB).
MAX_FIELD_BYTES: Final = 128 * 1024
MAX_FIELDS_TOTAL: Final = 256 * 1024
# A partial batch goes out when the client sends nothing more for this long, so a slow
# client's bytes do not wait for a full batch.
BATCH_WAIT_S: Final = 0.01


class FormReader:
    """Pulls the request body under the client idle timeout and yields multipart events.

    Before each read it takes `quantum` bytes of the memory budget (trued up to what was
    read); framing is given back at once, part data is held by whoever consumes it.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        boundary: bytes,
        idle_timeout_s: float,
        budget: UploadBudget,
        quantum: int,
    ) -> None:
        self._body = body
        self._parser = MultipartStreamParser(boundary)
        self._idle_timeout_s = idle_timeout_s
        self._pending: list[Any] = []
        self._exhausted = False
        self.budget = budget
        self._quantum = quantum
        self.bytes_read = 0
        # When the current wait for client data began (the idle timer's start).
        self._waiting_since: float | None = None

    async def next_event(self, *, batch_pending: bool = False) -> Any:
        """The next multipart event. With `batch_pending` (the caller holds file bytes it
        has not passed on), None instead of waiting: when the memory budget has no room
        now, or the client sends nothing for BATCH_WAIT_S. The caller then passes its batch
        on (giving budget back) and asks again."""
        while not self._pending:
            if self._exhausted:
                self._parser.close()
                raise MalformedMultipart("the body ended before the form was complete")
            # Waiting for budget is our pace, not the client's: outside the idle timer.
            if batch_pending:
                if not self.budget.try_acquire(self._quantum):
                    return None
            else:
                await self.budget.acquire(self._quantum)
            now = trio.current_time()
            if self._waiting_since is None:
                self._waiting_since = now
            idle_deadline = self._waiting_since + self._idle_timeout_s
            wait_until = min(idle_deadline, now + BATCH_WAIT_S) if batch_pending else idle_deadline
            with trio.move_on_at(wait_until) as waited:
                try:
                    chunk = await anext(self._body)
                except StopAsyncIteration:
                    self._exhausted = True
                    self.budget.release(self._quantum)
                    continue
            if waited.cancelled_caught:
                self.budget.release(self._quantum)
                if trio.current_time() >= idle_deadline:
                    raise RequestTimeout(f"no data from the client for {self._idle_timeout_s:g} s")
                return None
            self._waiting_since = None
            self.bytes_read += len(chunk)
            if len(chunk) > self._quantum:
                await self.budget.acquire(len(chunk) - self._quantum)
            events = self._parser.feed(chunk)
            part_bytes = sum(len(e.data) for e in events if isinstance(e, PartData))
            # The parser may emit a few bytes it held back from the previous chunk (a
            # possible boundary), so part data can exceed this chunk's share.
            self.budget.release(max(self._quantum, len(chunk)) - part_bytes)
            events.reverse()
            self._pending = events
        return self._pending.pop()


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
