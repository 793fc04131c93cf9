"""The service's two small long-lived tasks, under trio's MockClock: the memory trim after a
busy spell, and the progress records' expiry."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.allocator import trim_when_idle
from ingester.upload.progress import ProgressBook, UploadState


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps only once every task has waited a while in real time: the
    trim runs in a worker thread, which a clock jumping at once would overtake."""
    return trio.testing.MockClock(autojump_threshold=0.05)


class Uploads:
    busy = False
    served = 0


async def test_memory_goes_back_once_per_busy_spell_and_only_when_idle(
    clock: trio.testing.MockClock,
) -> None:
    trims: list[int] = []
    told: list[int] = []
    uploads = Uploads()
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                trim_when_idle,
                lambda: uploads.busy,
                lambda: uploads.served,
                5.0,
                lambda: trims.append(1),  # in a worker thread, as the real trim
                lambda: told.append(1),  # the metric
            )
            await trio.sleep(30)
            assert trims == []  # nothing served yet
            uploads.busy, uploads.served = True, 3
            await trio.sleep(30)
            assert trims == []  # not while uploads run
            uploads.busy = False
            await trio.sleep(6)
            assert len(trims) == 1
            await trio.sleep(60)
            assert len(trims) == 1  # once per spell
            uploads.served = 4
            await trio.sleep(6)
            assert len(trims) == 2
            assert told == trims  # each trim is counted once it is done
            nursery.cancel_scope.cancel()


async def test_finished_progress_records_are_forgotten_after_their_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    book = ProgressBook(retention_s=60, clock=trio.current_time)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(book.run, 10.0)
            done = book.start("u-1", "alice", 10)
            book.start("u-2", "alice", 10)  # still running: kept
            book.finish(done, UploadState.DONE)
            await trio.sleep(30)
            assert book.get("u-1") is not None
            await trio.sleep(60)
            assert book.get("u-1") is None
            assert book.get("u-2") is not None
            nursery.cancel_scope.cancel()
