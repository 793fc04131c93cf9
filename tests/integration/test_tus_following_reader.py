"""The pipelined store's reader on a real data file: where its bytes come from (the writer's
batches held in memory, or the file read back) and that its digest covers every byte once,
whoever hashed them. The store around it runs in tests/chaos/test_tus_pipelined.py."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from ingester.tus.data import DataFiles
from ingester.tus.pipelined import HELD_MAX_BYTES, FollowingReader, LiveStream
from ingester.upload.budget import MemoryBudget, UploadBudget

MIB = 1024 * 1024
UPLOAD = "b" * 32


def payload(size: int) -> bytes:
    return os.urandom(size)


async def write_batches(
    files: DataFiles, live: LiveStream, data: bytes, start: int, *, unlink: bool = False
) -> None:
    """What a PATCH's receiver does: 1 MiB batches from `start`, each hashed in its write's
    hop when the stream's digest ends there, and the stream told. With `unlink`, the file's
    name goes once the writer has it open: a reader that read anything back would fail."""
    writer = files.writer_at(UPLOAD, start)
    if unlink:
        os.unlink(files.path(UPLOAD))
    try:
        position = start
        while position < len(data):
            batch = [
                data[position : position + MIB // 2],
                data[position + MIB // 2 : position + MIB],
            ]
            hasher = live.claim_hash(position)
            await writer.write(batch, None, hasher)
            position += sum(len(piece) for piece in batch)
            live.advance(position, batch if hasher is not None else None)
            await trio.lowlevel.checkpoint()
        await writer.commit()
    finally:
        await writer.aclose()


async def read_all(reader: FollowingReader, into: list[bytes]) -> None:
    async for piece in reader:
        into.append(bytes(piece))


async def stream_upload(
    tmp_path: Path,
    data: bytes,
    *,
    already: int = 0,
    budget_bytes: int = 64 * MIB,
    unlink: bool = False,
) -> tuple[bytes, str, LiveStream]:
    files = DataFiles(tmp_path / "tus")
    await files.create(UPLOAD, len(data))
    if already:
        await write_batches(
            files, LiveStream(UPLOAD, "/none", len(data), 0, 60, 0), data[:already], 0
        )
    live = LiveStream(
        UPLOAD,
        str(files.path(UPLOAD)),
        len(data),
        already,
        60.0,
        16 * MIB,
        UploadBudget(MemoryBudget(budget_bytes)),
    )
    reader = FollowingReader(live)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all, reader, got)
        live.patch_started()
        await write_batches(files, live, data, already, unlink=unlink)
        live.patch_ended(len(data), kept=True)
        live.hand_over()
    await reader.aclose()
    return b"".join(got), reader.sha256.hexdigest(), live


async def check_streamed(tmp_path: Path, size: int, **options: Any) -> None:
    """One upload of `size` bytes through `stream_upload`: the reader hands on every byte,
    in order, and its digest covers each byte once, whoever hashed it."""
    with trio.fail_after(30):
        data = payload(size)
        got, digest, live = await stream_upload(tmp_path, data, **options)
        assert live.abandoned is None
        assert got == data
        assert digest == hashlib.sha256(data).hexdigest()
        assert live.hashed_to == len(data)


async def test_a_fresh_uploads_bytes_go_from_the_writer_to_the_reader_in_memory(
    tmp_path: Path,
) -> None:
    # The file unlinked under the writer: a reader that read anything back would fail.
    await check_streamed(tmp_path, 6 * MIB + 12345, unlink=True)


async def test_a_stream_resumed_here_reads_back_then_takes_over_from_the_writer(
    tmp_path: Path,
) -> None:
    await check_streamed(tmp_path, 8 * MIB + 777, already=3 * MIB)


async def test_with_no_memory_to_hold_batches_the_hashed_bytes_are_read_back_once(
    tmp_path: Path,
) -> None:
    # Hashed by the writer, read back unhashed: a byte hashed twice fails the digest.
    await check_streamed(tmp_path, 5 * MIB + 1, budget_bytes=MIB // 4)


async def test_after_a_stretch_read_back_the_reader_takes_held_batches_again(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        # Batches of a size no read lines up with by chance, two of them as many as are held.
        size = HELD_MAX_BYTES // 2 - 4096
        data = payload(8 * size)
        files = DataFiles(tmp_path / "tus")
        await files.create(UPLOAD, len(data))
        live = LiveStream(
            UPLOAD, str(files.path(UPLOAD)), len(data), 0, 60.0, 64 * MIB,
            UploadBudget(MemoryBudget(64 * MIB)),
        )  # fmt: skip
        live.patch_started()
        writer = files.writer_at(UPLOAD, 0)
        reader = FollowingReader(live)

        async def write(index: int) -> None:
            batch = [data[index * size : index * size + size // 2],
                     data[index * size + size // 2 : (index + 1) * size]]  # fmt: skip
            hasher = live.claim_hash(index * size)
            await writer.write(batch, None, hasher)
            live.advance((index + 1) * size, batch if hasher is not None else None)

        try:
            # Six batches before the reader starts: the first two held, the cap reached.
            for index in range(6):
                await write(index)
            got = [bytes(await reader.__anext__()) for _ in range(4)]  # batches 0 and 1
            for index in (6, 7):
                await write(index)
            # The file's copy of batches 6 and 7 spoiled: only memory holds them right.
            spoiled = os.open(files.path(UPLOAD), os.O_WRONLY)
            try:
                os.pwrite(spoiled, b"\0" * (2 * size), 6 * size)
            finally:
                os.close(spoiled)
            live.patch_ended(len(data), kept=True)
            live.hand_over()
            got += [bytes(piece) async for piece in reader]
        finally:
            await writer.aclose()
            await reader.aclose()
        assert live.abandoned is None
        assert b"".join(got) == data
        assert reader.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
