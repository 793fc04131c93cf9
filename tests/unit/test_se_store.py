"""The reference Storage Element's store and upload form, without HTTP: a data directory
under tmp_path, real files, no processes."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Final

import pytest
import trio

from ingester.errors import InvalidField, InvalidMetadata
from ingester.http.multipart import PartStart
from ingester.storage_element.form import MAX_FIELD_BYTES, UploadForm
from ingester.storage_element.store import (
    ATTR_SUFFIX,
    READ_CHUNK_BYTES,
    WRITE_BATCH_BYTES,
    DirectoryInUse,
    ElementFull,
    FileExists,
    FileNotFound,
    FileRecord,
    FileStore,
    NewFile,
    UploadAborted,
    parse_file_id,
    recover,
)

TIMEOUT_S: Final = 10.0


def new_file(file_id: str | None = None, name: str = "report.pdf") -> NewFile:
    return NewFile(
        file_id=file_id or str(uuid.uuid4()),
        original_filename=name,
        content_type="application/pdf",
        created_by_id="u-1",
        created_by_username="alice",
        description="d",
        version="1",
        retention_policy="temporary",
        metadata={"k": [1, 2]},
    )


async def store_bytes(store: FileStore, data: bytes, new: NewFile | None = None) -> FileRecord:
    async with store.upload(len(data)) as pending:
        await pending.open_file()
        for start in range(0, len(data), 7000):
            await pending.write(data[start : start + 7000])
        return await pending.commit(new or new_file())


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if not path.name.startswith("."))


def temps(store: FileStore) -> list[str]:
    return sorted(path.name for path in store.tmp_dir.iterdir())


# --- the store ---------------------------------------------------------------------------------


async def test_commit_writes_data_and_record_and_reopen_rebuilds_the_index(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # ~2.2 MiB: several write batches
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)
        record = await store_bytes(store, data)
        assert record.file_size == len(data)
        assert record.checksum == hashlib.sha256(data).hexdigest()
        assert record.storage_filename == f"report_{record.file_id}.pdf"
        assert (tmp_path / record.storage_filename).read_bytes() == data
        attr = json.loads((tmp_path / (record.storage_filename + ATTR_SUFFIX)).read_text())
        assert attr == record.to_json()
        assert temps(store) == []
        assert (store.used_bytes, store.reserved_bytes, store.file_count) == (len(data), 0, 1)
        store.close()

        reopened = await FileStore.open(tmp_path)
        assert reopened.get(record.file_id) == record
        assert reopened.used_bytes == len(data)

        stream = await reopened.open_stream(record)
        chunks = [chunk async for chunk in stream]
        assert b"".join(chunks) == data
        assert len(chunks) == -(-len(data) // READ_CHUNK_BYTES)


async def test_a_directory_has_one_store_at_a_time(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        first = await FileStore.open(tmp_path)
        with pytest.raises(DirectoryInUse):
            await FileStore.open(tmp_path)
        first.close()
        (await FileStore.open(tmp_path)).close()


async def test_small_writes_are_batched(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)
        async with store.upload(None) as pending:
            await pending.open_file()
            for _ in range(10):
                await pending.write(b"x" * 1000)
            (temp,) = store.tmp_dir.iterdir()
            assert temp.stat().st_size == 0  # still in the batch
            await pending.write(b"y" * WRITE_BATCH_BYTES)
            assert temp.stat().st_size == 10_000 + WRITE_BATCH_BYTES
            record = await pending.commit(new_file())
        assert record.file_size == 10_000 + WRITE_BATCH_BYTES


async def test_failure_or_cancellation_leaves_nothing(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path, capacity_bytes=10 * 1024 * 1024)

        async def fail_midway() -> None:
            async with store.upload(5000) as pending:
                await pending.open_file()
                await pending.write(b"x" * 3000)
                raise RuntimeError("client went away")

        with pytest.raises(RuntimeError):
            await fail_midway()
        assert temps(store) == []

        with trio.CancelScope() as scope:
            async with store.upload(None) as pending:
                await pending.open_file()
                await pending.write(b"x" * (WRITE_BATCH_BYTES + 1))
                scope.cancel()
                await trio.sleep_forever()
        assert temps(store) == []
        assert listing(tmp_path) == []
        assert (store.used_bytes, store.reserved_bytes) == (0, 0)


async def test_capacity_reservations(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path, capacity_bytes=100)
        async with store.upload(60) as first:
            assert store.reserved_bytes == 60
            with pytest.raises(ElementFull):
                async with store.upload(50):
                    pass
            await first.open_file()
            await first.write(b"a" * 40)
            await first.commit(new_file())
        assert (store.used_bytes, store.reserved_bytes) == (40, 0)

        # Without a declared size the reservation grows with the bytes and stops at the limit.
        async def overflow() -> None:
            async with store.upload(None) as counted:
                await counted.open_file()
                await counted.write(b"b" * 50)
                assert store.reserved_bytes == 50
                await counted.write(b"b" * 11)

        with pytest.raises(ElementFull):
            await overflow()
        assert (store.used_bytes, store.reserved_bytes) == (40, 0)
        assert temps(store) == []
        await store_bytes(store, b"c" * 60)
        assert store.used_bytes == 100


async def test_file_id_claims(tmp_path: Path) -> None:
    file_id = str(uuid.uuid4())
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)
        async with store.upload(None) as first:
            first.claim(file_id)
            async with store.upload(None) as second:
                with pytest.raises(FileExists):
                    second.claim(file_id)
            await first.open_file()
            await first.commit(new_file(file_id))
        with pytest.raises(FileExists):
            await store_bytes(store, b"again", new_file(file_id))
        assert temps(store) == []
        assert store.file_count == 1


async def test_gc_aborts_an_upload_in_flight(tmp_path: Path) -> None:
    file_id = str(uuid.uuid4())
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)

        async def upload_then_gc() -> None:
            async with store.upload(None) as pending:
                pending.claim(file_id)
                await pending.open_file()
                await pending.write(b"x" * 100)
                assert await store.gc_delete(file_id) == "aborted"
                await pending.commit(new_file(file_id))

        with pytest.raises(UploadAborted):
            await upload_then_gc()
        assert not store.exists(file_id)
        assert listing(tmp_path) == []
        assert temps(store) == []
        with pytest.raises(FileNotFound):
            await store.gc_delete(file_id)


async def test_delete_removes_both_files(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)
        record = await store_bytes(store, b"bye")
        assert await store.gc_delete(record.file_id) == "deleted"
        assert listing(tmp_path) == []
        assert (store.file_count, store.used_bytes) == (0, 0)
        with pytest.raises(FileNotFound):
            await store.delete(record.file_id)


async def test_names_without_an_ascii_stem_keep_their_extension(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        store = await FileStore.open(tmp_path)
        record = await store_bytes(store, b"x", new_file(name="отчёт.pdf"))
        assert record.storage_filename == f"{record.file_id}.pdf"
        # ... and count as ours at start-up: an orphan of that shape is removed.
        (tmp_path / (record.storage_filename + ATTR_SUFFIX)).unlink()
        assert recover(tmp_path).removed_orphans == [record.storage_filename]


def test_recover_sorts_out_what_a_crash_and_operators_left(tmp_path: Path) -> None:
    good_id = str(uuid.uuid4())
    good = FileRecord(
        file_id=good_id,
        original_filename="a.txt",
        storage_filename=f"a_{good_id}.txt",
        file_size=3,
        content_type="text/plain",
        created_at="2025-01-01T00:00:00+00:00",
        created_by_id="u",
        created_by_username="u",
        description=None,
        checksum=hashlib.sha256(b"abc").hexdigest(),
        metadata={},
        version=None,
        retention_policy=None,
    )
    (tmp_path / good.storage_filename).write_bytes(b"abc")
    (tmp_path / (good.storage_filename + ATTR_SUFFIX)).write_text(json.dumps(good.to_json()))
    tmp = tmp_path / ".tmp"
    (tmp / "half").mkdir(parents=True)
    (tmp / "0123.part").write_bytes(b"partial")
    orphan = f"b_{uuid.uuid4()}.bin"
    (tmp_path / orphan).write_bytes(b"crashed between the renames")
    (tmp_path / "README").write_text("an operator's note")
    corrupt = f"c_{uuid.uuid4()}.bin"
    (tmp_path / corrupt).write_bytes(b"data")
    (tmp_path / (corrupt + ATTR_SUFFIX)).write_text("{not json")
    missing = f"d_{uuid.uuid4()}.bin"
    (tmp_path / (missing + ATTR_SUFFIX)).write_text(
        json.dumps({**good.to_json(), "storage_filename": missing, "file_id": str(uuid.uuid4())})
    )

    recovery = recover(tmp_path)

    assert set(recovery.records) == {good_id}
    assert recovery.records[good_id] == good
    assert sorted(recovery.removed_temps) == ["0123.part", "half"]
    assert list(tmp.iterdir()) == []
    assert recovery.removed_orphans == [orphan]
    assert recovery.foreign == ["README"]
    assert set(recovery.skipped) == {corrupt + ATTR_SUFFIX, missing + ATTR_SUFFIX}
    # A record that cannot be read still protects its data from the orphan sweep.
    assert (tmp_path / corrupt).exists()
    assert (tmp_path / "README").exists()


def test_parse_file_id() -> None:
    file_id = uuid.uuid4()
    assert parse_file_id(str(file_id).upper()) == str(file_id)
    assert parse_file_id(f" {{{file_id}}} ") == str(file_id)
    with pytest.raises(InvalidField):
        parse_file_id("12345")


# --- the form ----------------------------------------------------------------------------------


def part(name: str, filename: str | None = None, content_type: str | None = None) -> PartStart:
    return PartStart(name=name, filename=filename, content_type=content_type)


def in_file(form: UploadForm) -> bool:
    # A call, so that the type checker does not carry one answer over to the next.
    return form.in_file


def fill(form: UploadForm, name: str, value: bytes) -> str | None:
    assert form.start_part(part(name)) is False
    form.add_field_data(value)
    return form.end_part()


def test_form_sorts_fields_and_file_in_any_order() -> None:
    form = UploadForm()
    file_id = uuid.uuid4()
    assert fill(form, "description", b"  quarterly  ") == "description"
    assert form.start_part(part("file", "r.pdf", "text/plain")) is True
    assert in_file(form)
    assert form.end_part() is None
    assert not in_file(form)
    assert fill(form, "file_id", str(file_id).upper().encode()) == "file_id"
    assert fill(form, "whatever", b"ignored") is None
    assert fill(form, "version", b"") == "version"

    assert form.has_file
    assert form.filename == "r.pdf"
    assert form.text("description") == "quarterly"
    assert form.text("version") is None  # empty counts as not sent
    assert form.file_id() == str(file_id)
    assert form.content_type() == "text/plain"
    assert form.metadata() == {}
    assert "whatever" not in form.fields

    fill(form, "content_type", b"application/pdf")
    assert form.content_type() == "application/pdf"


def test_form_refuses_duplicates_and_oversized_fields() -> None:
    form = UploadForm()
    fill(form, "description", b"one")
    with pytest.raises(InvalidField):
        form.start_part(part("description"))
    form = UploadForm()
    form.start_part(part("file", "a"))
    form.end_part()
    with pytest.raises(InvalidField):
        form.start_part(part("file", "b"))
    form = UploadForm()
    form.start_part(part("metadata"))
    form.add_field_data(b"x" * MAX_FIELD_BYTES)
    with pytest.raises(InvalidField):
        form.add_field_data(b"x")
    form = UploadForm()
    form.start_part(part("description"))
    form.add_field_data(b"\xff\xfe")
    with pytest.raises(InvalidField):
        form.end_part()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a": {"b": [1, 2.5, null]}}', {"a": {"b": [1, 2.5, None]}}),
        (b"  ", {}),
        (b"[1]", None),
        (b'"text"', None),
        (b'{"a": NaN}', None),
        (b'{"a": 1e999}', None),
        (b"{broken", None),
    ],
)
def test_form_metadata(raw: bytes, expected: dict[str, object] | None) -> None:
    form = UploadForm()
    fill(form, "metadata", raw)
    if expected is None:
        with pytest.raises(InvalidMetadata):
            form.metadata()
    else:
        assert form.metadata() == expected


def test_form_file_id_and_content_type_defaults() -> None:
    form = UploadForm()
    form.start_part(part("file", None, None))
    form.end_part()
    assert form.file_id() is None
    assert form.content_type() == "application/octet-stream"
    fill(form, "file_id", b"nope")
    with pytest.raises(InvalidField):
        form.file_id()
