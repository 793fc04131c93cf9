"""The tus data files on a real file system: idle files kept and taken over, and what a
taken-over file's old bytes may never do (be read as the new upload's)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio

from ingester.tus.data import CLAIM_GRACE_S, REUSE_MAX_FILES, REUSE_MIN_BYTES, DataFiles
from ingester.tus.errors import UploadDataLost

MIB = 1024 * 1024


async def write(files: DataFiles, upload_id: str, offset: int, data: bytes) -> None:
    writer = files.writer_at(upload_id, offset)
    try:
        await writer.write([data])
        assert await writer.commit() == len(data)
    finally:
        await writer.aclose()


async def read(files: DataFiles, upload_id: str, length: int) -> bytes:
    reader = files.reader([(upload_id, length)])
    try:
        return b"".join([chunk async for chunk in reader])
    finally:
        await reader.aclose()


async def received(files: DataFiles, upload_id: str, data: bytes) -> int:
    """An upload that received `data`: its file's inode."""
    await files.create(upload_id, len(data))
    await write(files, upload_id, 0, data)
    return files.path(upload_id).stat().st_ino


async def finished(files: DataFiles, upload_id: str, data: bytes) -> int:
    """An upload that received `data` and was removed: its file's inode."""
    inode = await received(files, upload_id, data)
    assert await files.remove(upload_id) == len(data)
    return inode


async def finished_together(files: DataFiles, sizes: list[int]) -> dict[int, int]:
    """Uploads of these sizes (MiB) running at once, then removed: inode by size."""
    inodes = {size: await received(files, f"{size:032x}", b"o" * (size * MIB)) for size in sizes}
    for size in sizes:
        await files.remove(f"{size:032x}")
    return inodes


async def test_a_finished_file_is_taken_over_and_cut_to_the_new_length(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        inode = await finished(files, "a" * 32, b"o" * (3 * MIB))
        assert not files.path("a" * 32).exists()
        # The orphan scan does not see the idle file.
        assert await files.scan() == []

        new = os.urandom(2 * MIB)
        assert await files.create("b" * 32, len(new))
        path = files.path("b" * 32)
        assert path.stat().st_ino == inode
        assert path.stat().st_size == len(new)
        await write(files, "b" * 32, 0, new)
        assert await read(files, "b" * 32, len(new)) == new
        assert [entry[0] for entry in await files.scan()] == ["b" * 32]


async def test_old_bytes_past_the_offset_are_written_over_and_never_read(tmp_path: Path) -> None:
    """A taken-over file is longer than its offset; a resumed upload writes at the offset,
    and what it reads back is exactly its own bytes."""
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        await finished(files, "a" * 32, b"o" * (4 * MIB))
        data = os.urandom(4 * MIB)
        assert await files.create("b" * 32, None)  # a deferred length: kept whole
        assert files.path("b" * 32).stat().st_size == 4 * MIB
        await write(files, "b" * 32, 0, data[:MIB])
        # A chunk that failed its checksum: written, then discarded; the offset stays.
        writer = files.writer_at("b" * 32, MIB)
        await writer.write([b"x" * MIB])
        writer.discard()
        await writer.aclose()
        assert await read(files, "b" * 32, MIB) == data[:MIB]
        await write(files, "b" * 32, MIB, data[MIB:])
        assert await read(files, "b" * 32, len(data)) == data


async def test_the_smallest_file_that_holds_the_length_is_taken(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        inodes = await finished_together(files, [8, 2, 4])
        assert await files.create("c" * 32, 3 * MIB)
        assert files.path("c" * 32).stat().st_ino == inodes[4]
        # Nothing holds 9 MiB: the largest is taken (its pages serve the first 8).
        assert await files.create("d" * 32, 9 * MIB)
        assert files.path("d" * 32).stat().st_ino == inodes[8]


async def test_the_idle_files_stay_within_their_bytes_and_count(tmp_path: Path) -> None:
    with trio.fail_after(20):
        files = DataFiles(tmp_path / "tus", keep_bytes=5 * MIB)
        await finished_together(files, [2, 3, 1])
        # 2 and 3 MiB fit in 5 MiB; the third was removed.
        assert sorted(p.stat().st_size for p in files.reuse_dir.iterdir()) == [2 * MIB, 3 * MIB]
        # Too small to keep.
        small = DataFiles(tmp_path / "small", keep_bytes=5 * MIB)
        await finished(small, "e" * 32, b"o" * (REUSE_MIN_BYTES - 1))
        assert not small.reuse_dir.exists()

        many = DataFiles(tmp_path / "many", keep_bytes=1024 * MIB)
        await finished_together(many, list(range(1, REUSE_MAX_FILES + 3)))
        assert len(list(many.reuse_dir.iterdir())) == REUSE_MAX_FILES


async def test_the_janitor_trims_the_idle_files_oldest_first(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        await received(files, "a" * 32, b"o" * MIB)
        await received(files, "b" * 32, b"o" * (2 * MIB))
        await files.remove("a" * 32)
        oldest = next(files.reuse_dir.iterdir())
        await trio.sleep(0.05)  # ctime resolution
        await files.remove("b" * 32)
        newest = set(files.reuse_dir.iterdir()) - {oldest}
        # A take-over that died between its two steps leaves a claimed file.
        claimed = files.reuse_dir / ("claimed-" + "c" * 32)
        claimed.write_bytes(b"x")
        assert await files.trim_idle() == 0
        files.keep_bytes = 2 * MIB  # an operator lowered it
        assert await files.trim_idle() == 1
        assert set(files.reuse_dir.iterdir()) == newest | {claimed}
        # Past the grace (a ctime cannot be set back: the clock is moved on instead).
        assert await files.trim_idle(now=time.time() + CLAIM_GRACE_S) == 1
        assert set(files.reuse_dir.iterdir()) == newest


async def test_nothing_is_kept_when_turned_off_or_for_an_orphan(tmp_path: Path) -> None:
    with trio.fail_after(10):
        off = DataFiles(tmp_path / "off", keep_bytes=0)
        await finished(off, "a" * 32, b"o" * (2 * MIB))
        assert not off.reuse_dir.exists()
        assert not await off.create("b" * 32, MIB)
        assert off.path("b" * 32).stat().st_size == 0

        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        assert not await files.create("c" * 32, 2 * MIB)
        await write(files, "c" * 32, 0, b"o" * (2 * MIB))
        assert await files.remove("c" * 32, reuse=False) == 2 * MIB
        assert not files.reuse_dir.exists()


async def test_a_take_over_never_replaces_a_file(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        await finished(files, "a" * 32, b"o" * (2 * MIB))
        files.path("b" * 32).write_bytes(b"mine")
        with pytest.raises(FileExistsError):
            await files.create("b" * 32, MIB)
        assert files.path("b" * 32).read_bytes() == b"mine"


async def test_a_file_shorter_than_the_offset_is_lost_data(tmp_path: Path) -> None:
    """The writer's first hop finds it, whether a write or a commit, and stores nothing."""
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=64 * MIB)
        assert not await files.create("a" * 32, 10)
        await write(files, "a" * 32, 0, b"12345")
        writer = files.writer_at("a" * 32, 6)
        with pytest.raises(UploadDataLost):
            await writer.write([b"6789"])
        assert writer.written == 0
        await writer.aclose()
        files.path("a" * 32).unlink()
        gone = files.writer_at("a" * 32, 5)
        with pytest.raises(UploadDataLost):
            await gone.write([b"6789"], last=True)
        await gone.aclose()
        assert not files.path("a" * 32).exists()


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_commit_that_closes_leaves_the_bytes_and_no_descriptor(tmp_path: Path) -> None:
    """The file opens at the first write; a `PATCH`'s last save fsyncs and closes in one
    hop: the bytes are there, the descriptor is gone, and closing again is a no-op."""
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=0)
        upload_id = "c" * 32
        await files.create(upload_id, 3 * MIB)
        before = open_descriptors()
        writer = files.writer_at(upload_id, 0)
        assert open_descriptors() == before
        await writer.write([b"x" * MIB])
        assert open_descriptors() == before + 1
        assert await writer.commit() == MIB  # a checkpoint: the file stays open
        await writer.write([b"y" * MIB])
        assert await writer.commit(close=True) == 2 * MIB
        assert open_descriptors() == before
        await writer.aclose()
        assert open_descriptors() == before
        assert await read(files, upload_id, 2 * MIB) == b"x" * MIB + b"y" * MIB


async def test_a_last_write_fsyncs_and_closes_in_its_own_hop(tmp_path: Path) -> None:
    """One hop for a whole `PATCH` of one batch: open, write, fsync, close; the commit
    after it has nothing left to do."""
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=0)
        upload_id = "d" * 32
        await files.create(upload_id, 2 * MIB)
        await write(files, upload_id, 0, b"a" * MIB)
        before = open_descriptors()
        writer = files.writer_at(upload_id, MIB)
        await writer.write([b"b" * 1000, b"c" * 24], last=True)
        assert open_descriptors() == before
        assert await writer.commit(close=True) == 1024
        await writer.aclose()
        assert open_descriptors() == before
        assert await read(files, upload_id, MIB + 1024) == b"a" * MIB + b"b" * 1000 + b"c" * 24


async def test_a_writer_that_wrote_nothing_opens_nothing(tmp_path: Path) -> None:
    """A `PATCH` with no data (one that only declares the length) touches no file."""
    with trio.fail_after(10):
        files = DataFiles(tmp_path / "tus", keep_bytes=0)
        writer = files.writer_at("e" * 32, 0)
        assert await writer.commit(close=True) == 0
        await writer.aclose()
        assert not files.path("e" * 32).exists()
