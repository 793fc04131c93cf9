"""The spool on its own: in memory up to its limit and inside the memory budget, then in one
file written once; reads of any range while it grows or moves; budgets given back; files
without a name, reused by the next upload within their budget and closed past it. Real files
under `tmp_path`; each test under `fail_after`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from ingester.errors import ServiceBusy
from ingester.upload.budget import MemoryBudget
from ingester.upload.spool import READ_PIECE, FileCopy, Spool, SpoolBudget, SpoolFiles

KIB = 1024


def listing(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def make(tmp_path: Path, *, memory_limit: int, budget: int = 64 * KIB * KIB) -> Spool:
    return Spool(
        tmp_path,
        "upload",
        disk=SpoolBudget(1 << 40),
        memory=MemoryBudget(budget),
        memory_limit=memory_limit,
    )


async def append(spool: Spool, *pieces: bytes) -> bool:
    """What the pipeline does: reserve, write in a worker thread when it goes to disk, commit."""
    to_disk = spool.reserve(sum(len(p) for p in pieces))
    if to_disk:
        await trio.to_thread.run_sync(spool.write_sync, list(pieces))
    spool.commit(list(pieces))
    return to_disk


async def read_all(spool: Spool, start: int = 0, end: int | None = None) -> bytes:
    cursor = spool.cursor(start, end)
    out = b""
    while (piece := await cursor.next()) is not None:
        assert len(piece) <= READ_PIECE
        out += bytes(piece)
    return out


async def test_a_small_copy_stays_in_memory(tmp_path: Path) -> None:
    with trio.fail_after(10):
        spool = make(tmp_path, memory_limit=100)
        assert not await append(spool, b"abc", b"defg")
        assert not await append(spool, b"hi")
        assert spool.size == 9
        assert await read_all(spool) == b"abcdefghi"
        # Any range, starting and ending inside pieces.
        assert await read_all(spool, 2, 8) == b"cdefgh"
        assert spool.bytes_written == 0
        assert await trio.to_thread.run_sync(listing, tmp_path) == []
        await spool.discard()


async def test_a_copy_of_many_small_reads_replays_in_few_pieces(tmp_path: Path) -> None:
    """A slow client's upload is many small reads: a replay from memory sends them as a few
    pieces of up to READ_PIECE (each piece is a frame the element parses), not one per
    read."""
    with trio.fail_after(10):
        spool = make(tmp_path, memory_limit=READ_PIECE + 10 * KIB)
        reads = [os.urandom(100) for _ in range(READ_PIECE // 100 + 50)]
        for read in reads:
            assert not await append(spool, read)
        cursor = spool.cursor(150, spool.size)
        pieces = []
        while (piece := await cursor.next()) is not None:
            pieces.append(bytes(piece))
        assert [len(p) for p in pieces] == [READ_PIECE, spool.size - 150 - READ_PIECE]
        assert b"".join(pieces) == b"".join(reads)[150:]
        await spool.discard()


async def test_past_the_limit_everything_moves_to_one_file_once(tmp_path: Path) -> None:
    with trio.fail_after(10):
        memory = MemoryBudget(64 * KIB * KIB)
        disk = SpoolBudget(1 << 40)
        spool = Spool(tmp_path, "upload", disk=disk, memory=memory, memory_limit=10)
        assert not await append(spool, b"0123456789")
        assert memory.used == 10
        cursor = spool.cursor(0, 10)
        first = await cursor.next()
        assert first is not None
        assert bytes(first) == b"0123456789"
        assert await append(spool, b"abc")
        # The memory copy went to the file with the new bytes, and its budget back.
        assert memory.used == 0
        assert spool.on_disk
        assert spool.bytes_written == 13
        assert disk.used == 13
        assert await read_all(spool) == b"0123456789abc"
        assert await read_all(spool, 5, 12) == b"56789ab"
        assert await append(spool, b"d" * (3 * READ_PIECE))
        assert spool.bytes_written == 13 + 3 * READ_PIECE
        whole = await read_all(spool)
        assert whole == b"0123456789abc" + b"d" * (3 * READ_PIECE)
        # The file has no name: nothing is left behind even by a process that is killed.
        assert await trio.to_thread.run_sync(listing, tmp_path) == []
        await spool.discard()
        assert await trio.to_thread.run_sync(listing, tmp_path) == []
        assert disk.used == 0
        # Twice is harmless.
        await spool.discard()
        assert disk.used == 0


async def test_a_cursor_goes_on_across_the_move_to_disk(tmp_path: Path) -> None:
    with trio.fail_after(10):
        spool = make(tmp_path, memory_limit=READ_PIECE + 4)
        await append(spool, b"a" * READ_PIECE)
        await append(spool, b"bbbb")
        cursor = spool.cursor(0, READ_PIECE + 4)
        first = await cursor.next()
        assert first is not None
        assert bytes(first) == b"a" * READ_PIECE
        assert await append(spool, b"cccc")
        rest = await cursor.next()
        assert rest is not None
        assert bytes(rest) == b"bbbb"
        assert await cursor.next() is None
        await spool.discard()


async def test_a_busy_memory_budget_sends_the_copy_to_disk(tmp_path: Path) -> None:
    """In-memory copies never take the budget past a quarter: readers need the rest."""
    with trio.fail_after(10):
        memory = MemoryBudget(400)
        assert memory.try_acquire(90)
        spool = Spool(tmp_path, "u", disk=SpoolBudget(1 << 40), memory=memory, memory_limit=1000)
        assert not await append(spool, b"x" * 10)
        assert await append(spool, b"y" * 10)
        assert memory.used == 90
        assert await read_all(spool) == b"x" * 10 + b"y" * 10
        await spool.discard()


async def test_a_full_disk_budget_is_a_503(tmp_path: Path) -> None:
    with trio.fail_after(10):
        spool = Spool(tmp_path, "u", disk=SpoolBudget(10), memory=None, memory_limit=0)
        with pytest.raises(ServiceBusy):
            spool.reserve(11)
        await spool.discard()
        assert await trio.to_thread.run_sync(listing, tmp_path) == []


async def test_reading_past_what_was_committed_is_a_bug(tmp_path: Path) -> None:
    with trio.fail_after(10):
        spool = make(tmp_path, memory_limit=100)
        await append(spool, b"abc")
        with pytest.raises(RuntimeError):
            spool.cursor(0, 4)
        await spool.discard()


async def test_a_file_copy_replays_existing_files_and_leaves_them(tmp_path: Path) -> None:
    """A resumable upload's data files as its spool: nothing written or counted, reads of
    what was committed across file boundaries and in READ_PIECE pieces, files kept."""
    with trio.fail_after(10):
        first, second = tmp_path / "a", tmp_path / "b"
        one = os.urandom(READ_PIECE + 100)
        two = os.urandom(300)
        first.write_bytes(one + b"beyond the length")
        second.write_bytes(two)
        copy = FileCopy([(first, len(one)), (second, len(two))])
        assert not await append(copy, one[:1000])
        # Only what the pipeline has taken may be replayed.
        with pytest.raises(RuntimeError):
            copy.cursor(0, 1001)
        assert not await append(copy, one[1000:], two[:10])
        assert copy.size == len(one) + 10
        assert copy.bytes_written == 0
        assert await read_all(copy) == one + two[:10]
        assert await append(copy, two[10:]) is False
        assert await read_all(copy, len(one) - 5) == one[-5:] + two
        # More than the files hold is a bug, not a short read.
        with pytest.raises(RuntimeError):
            copy.reserve(1)
        await copy.discard()
        await copy.discard()
        assert await trio.to_thread.run_sync(listing, tmp_path) == [first, second]


def pooled(tmp_path: Path, files: SpoolFiles) -> Spool:
    return Spool(tmp_path, "u", disk=SpoolBudget(1 << 40), memory=None, memory_limit=0, files=files)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_the_next_upload_writes_over_the_last_ones_file(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = SpoolFiles(tmp_path, keep_bytes=10 * KIB)
        first = pooled(tmp_path, files)
        assert await append(first, b"a" * 3000)
        await first.discard()
        assert (files.idle, files.idle_bytes) == (1, 3000)
        # A shorter upload on the same file reads its own bytes only, never the old tail.
        second = pooled(tmp_path, files)
        assert await append(second, b"b" * 1000)
        assert files.idle == 0, "a second file was opened while one was idle"
        assert await read_all(second) == b"b" * 1000
        assert second.size == 1000
        # Two uploads at once get two files.
        third = pooled(tmp_path, files)
        assert await append(third, b"c" * 10)
        assert await read_all(third) == b"c" * 10
        await second.discard()
        await third.discard()
        # The file keeps its length (3000): written over, never cut.
        assert (files.idle, files.idle_bytes) == (2, 3010)
        assert await trio.to_thread.run_sync(listing, tmp_path) == []
        files.close()
        assert (files.idle, files.idle_bytes) == (0, 0)


async def test_files_past_the_keep_budget_are_closed(tmp_path: Path) -> None:
    with trio.fail_after(10):
        files = SpoolFiles(tmp_path, keep_bytes=4 * KIB)
        spool = pooled(tmp_path, files)
        assert await append(spool, b"x" * (5 * KIB))
        fd = spool._fd
        assert fd is not None
        await spool.discard()
        assert files.idle == 0
        assert not is_open(fd), "a file past the budget was kept open"
        # With no budget at all (a spool without shared files), nothing is kept either.
        alone = Spool(tmp_path, "u", disk=SpoolBudget(1 << 40), memory=None, memory_limit=0)
        assert await append(alone, b"y")
        fd = alone._fd
        assert fd is not None
        await alone.discard()
        assert not is_open(fd)
