"""The pipeline's file sources on their own (in-memory streams, virtual time): a form's file
and its fields, a plain file's bytes, and what each holds of the memory budget. The
pipeline over them runs in tests/integration (multipart) and test_tus*.py (plain files).
Tests that wait run under `fail_after`."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing

from ingester.errors import InvalidField, MissingFile, RequestTimeout
from ingester.http import multipart_writer
from ingester.upload.budget import MemoryBudget, UploadBudget
from ingester.upload.fields import RetentionPolicy, parse_upload_fields
from ingester.upload.form import FormReader, FormSource
from ingester.upload.source import BATCH_WAIT_S, BytesSource, FileSource, FileStart

OPTIONS = parse_upload_fields({"compress": "yes"}, max_description_length=1000)
QUANTUM = 1024


class Stream:
    """Chunks as an async iterator; a number instead of a chunk is a pause of that many
    seconds first (`inf`: forever)."""

    def __init__(self, items: Sequence[bytes | float]) -> None:
        self._items = list(items)
        # When the pause under way ends: a cancelled wait resumes it, as a socket would.
        self._until: float | None = None

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        while self._items:
            item = self._items[0]
            if isinstance(item, bytes):
                self._items.pop(0)
                return item
            if self._until is None:
                self._until = trio.current_time() + item
            await trio.sleep_until(self._until)
            self._items.pop(0)
            self._until = None
        raise StopAsyncIteration


def plain(items: Sequence[bytes | float], budget: MemoryBudget) -> BytesSource:
    start = FileStart(OPTIONS, settled=True, filename="a.txt", content_type="text/plain")
    return BytesSource(
        Stream(items), start, idle_timeout_s=5.0, budget=UploadBudget(budget), quantum=QUANTUM
    )


async def read_all(source: FileSource) -> bytes:
    pieces = []
    while piece := await source.read():
        pieces.append(bytes(piece))
    return b"".join(pieces)


async def test_a_plain_file_is_handed_over_as_it_is() -> None:
    memory = MemoryBudget(1024 * QUANTUM)
    source = plain([b"ab", b"", b"c" * 3000], memory)
    start = await source.begin()
    assert (start.filename, start.content_type, start.settled) == ("a.txt", "text/plain", True)
    assert start.options is OPTIONS
    assert await read_all(source) == b"ab" + b"c" * 3000
    # Only the bytes handed over stay held (until the pipeline sends them): short reads
    # gave the rest of their quantum back.
    assert memory.used == source.budget.held == 3002
    assert source.bytes_read == 3002
    assert await source.read() == b""
    assert await source.finish() is OPTIONS


async def test_a_pending_batch_goes_on_when_the_stream_pauses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryBudget(1024 * QUANTUM)
    source = plain([1.0, b"late"], memory)
    with trio.fail_after(10):
        began = trio.current_time()
        assert await source.read(batch_pending=True) is None
        assert trio.current_time() - began == pytest.approx(BATCH_WAIT_S)
        assert memory.used == 0
        # The pause counts once against the idle timeout, however often it is asked.
        assert await source.read() == b"late"
        assert trio.current_time() - began == pytest.approx(1.0)


async def test_a_pending_batch_never_waits_for_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    memory = MemoryBudget(QUANTUM)
    assert memory.try_acquire(QUANTUM)
    source = plain([b"x"], memory)
    with trio.fail_after(10):
        assert await source.read(batch_pending=True) is None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.read)
            await trio.testing.wait_all_tasks_blocked()
            memory.release(QUANTUM)
    assert memory.used == 1


async def test_a_stream_that_stops_is_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    memory = MemoryBudget(1024 * QUANTUM)
    source = plain([b"x", float("inf")], memory)
    with trio.fail_after(10):
        assert await source.read() == b"x"
        began = trio.current_time()
        with pytest.raises(RequestTimeout):
            await source.read()
        assert trio.current_time() - began == pytest.approx(5.0)
    assert memory.used == 1


def form(*, before: dict[str, str], after: dict[str, str], files: int = 1) -> bytes:
    body = multipart_writer.fields("BND", before.items())
    for _ in range(files):
        body += multipart_writer.file_head("BND", "file", 'a"b.txt', "text/plain") + b"data" * 50
        body += b"\r\n" if _ < files - 1 else b""
    return body + multipart_writer.tail("BND", after.items())


def form_source(body: bytes, memory: MemoryBudget) -> FormSource:
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    reader = FormReader(Stream(chunks), b"BND", 5.0, UploadBudget(memory), QUANTUM)
    return FormSource(reader, max_description_length=1000)


async def test_a_form_gives_its_fields_around_the_file() -> None:
    memory = MemoryBudget(1024 * QUANTUM)
    body = form(before={"retention_policy": "permanent"}, after={"description": "late"})
    source = form_source(body, memory)
    start = await source.begin()
    assert (start.filename, start.content_type) == ('a"b.txt', "text/plain")
    assert start.options.retention_policy is RetentionPolicy.PERMANENT
    # `compress` may still come: the plan is open.
    assert not start.settled
    assert await read_all(source) == b"data" * 50
    assert memory.used == 200
    options = await source.finish()
    assert options.description == "late"
    assert options.retention_policy is RetentionPolicy.PERMANENT
    assert source.bytes_read == len(body)


async def test_fields_that_fix_the_plan_first_settle_it() -> None:
    body = form(before={"retention_policy": "temporary", "compress": "no"}, after={})
    start = await form_source(body, MemoryBudget(1024 * QUANTUM)).begin()
    assert start.settled


async def test_a_form_without_a_file_or_with_two() -> None:
    with pytest.raises(MissingFile):
        await form_source(form(before={"a": "1"}, after={}, files=0), MemoryBudget(QUANTUM)).begin()
    source = form_source(form(before={}, after={}, files=2), MemoryBudget(1024 * QUANTUM))
    await source.begin()
    await read_all(source)
    with pytest.raises(InvalidField, match="only one 'file'"):
        await source.finish()
