"""The pipelined store's rules on their own (`LiveStream`, no I/O, virtual time): what it may
read, when its window runs, what abandons it, when PATCHes wait for it. The store itself runs in
tests/chaos/test_tus_pipelined.py against real elements. Tests that wait run under
`fail_after`; those that never reach a checkpoint cannot hang."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.settings import Settings
from ingester.tus.pipelined import HELD_MAX_BYTES, LiveStream
from ingester.upload.budget import MemoryBudget, UploadBudget
from tests.support.waiting import blocked_task

MIB = 1024 * 1024


# The default slack (INGESTER_TUS_PIPELINE_LAG_BYTES).
LAG_MAX_BYTES = Settings.model_fields["tus_pipeline_lag_bytes"].default


def stream(*, readable: int = 0, length: int = 4 * MIB, window_s: float = 2.0) -> LiveStream:
    return LiveStream("a" * 32, "/nonexistent", length, readable, window_s, LAG_MAX_BYTES)


async def test_it_may_read_what_patches_wrote_and_no_more(
    autojump_clock: trio.testing.MockClock,
) -> None:
    live = stream(readable=MIB)
    live.patch_started()
    live.advance(2 * MIB)
    live.advance(MIB)  # never backwards
    assert live.readable == 2 * MIB
    live.patch_ended(2 * MIB, kept=True)
    assert live.usable
    assert live.abandoned is None


@pytest.mark.parametrize(
    ("offset", "kept"),
    [(MIB, True), (2 * MIB, False)],
    ids=["the offset keeps less than was read", "the lock was lost"],
)
async def test_bytes_read_but_not_kept_abandon_it(
    autojump_clock: trio.testing.MockClock, offset: int, kept: bool
) -> None:
    live = stream()
    live.patch_started()
    live.advance(2 * MIB)
    live.patch_ended(offset, kept=kept)
    assert not live.usable
    assert live.abandoned is not None
    # Its store is cancelled with it.
    assert live.scope.cancel_called


async def test_the_window_runs_only_between_patches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        live = stream(window_s=2.0)
        live.patch_started()
        # A long PATCH: the stream waits as long as it takes (the client's idle timeout
        # is the PATCH's business), and wakes when bytes come.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.wait_for_change)
            await trio.sleep(30)
            live.advance(MIB)
        assert live.abandoned is None
        live.patch_ended(MIB, kept=True)
        started = trio.current_time()
        await live.wait_for_change()
        assert trio.current_time() - started == pytest.approx(2.0)
        # Abandoned, and says why (str(): mypy still sees the None asserted above).
        assert "no PATCH came within 2 s" in str(live.abandoned)


async def test_the_next_patch_within_the_window_keeps_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(100):
        live = stream(window_s=2.0)
        live.patch_started()
        live.advance(MIB)
        live.patch_ended(MIB, kept=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.wait_for_change)
            await trio.sleep(1.5)
            live.patch_started()
        assert live.abandoned is None
        live.advance(2 * MIB)
        live.patch_ended(2 * MIB, kept=True)
        live.hand_over()
        assert live.handed_over
        assert live.usable


async def test_abandoning_twice_or_after_the_end_changes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        live = stream()
        live.abandon("first")
        live.abandon("second")
        assert live.abandoned == "first"
        done = stream()
        done.result = {"file_id": "f"}
        done.done.set()
        done.abandon("too late")
        assert done.abandoned is None
        assert await done.outcome() == {"file_id": "f"}
        assert not done.scope.cancel_called


# --- PATCHes keep pace with the stream ----------------------------------------------------


def patched(written: int, lag_bytes: int = LAG_MAX_BYTES) -> LiveStream:
    """A stream from the first byte, a PATCH under way that wrote `written` bytes."""
    live = LiveStream("a" * 32, "/nonexistent", 64 * MIB, 0, 2.0, lag_bytes)
    live.patch_started()
    live.advance(written)
    return live


async def test_a_patch_goes_on_while_the_stream_is_within_the_slack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        live = patched(LAG_MAX_BYTES)
        await live.keep_pace()  # nothing read yet, but no more behind than the slack
        assert trio.current_time() == 0


async def test_a_patch_waits_until_the_stream_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        live = patched(LAG_MAX_BYTES + 2 * MIB)
        async with trio.open_nursery() as nursery:
            went_on = await blocked_task(nursery, live.keep_pace)
            assert not went_on.is_set()
            live.has_read(MIB)  # still more than the slack behind
            await trio.testing.wait_all_tasks_blocked()
            assert not went_on.is_set()
            live.has_read(2 * MIB)
            await went_on.wait()
        # Woken by the reader: no timer ran.
        assert trio.current_time() == 0


async def test_an_abandoned_or_finished_stream_lets_the_patch_go_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        for end in ("abandoned", "done"):
            live = patched(LAG_MAX_BYTES + 8 * MIB)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live.keep_pace)
                await trio.testing.wait_all_tasks_blocked()
                if end == "abandoned":
                    live.abandon("the test")
                else:
                    live.finish()  # stored or failed
            # At once: no timer ran (a missed wake-up would hang until fail_after).
            assert trio.current_time() == started


async def test_the_slack_is_the_streams_own(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        # INGESTER_TUS_PIPELINE_LAG_BYTES=0: PATCHes keep within one read (a MiB) of the
        # stream. No closer: while PATCHes come the reader takes whole MiBs only, so a PATCH
        # that waited for a part of one would wait for a read that waits for it.
        await patched(MIB // 2, lag_bytes=0).keep_pace()
        assert trio.current_time() == 0
        live = patched(MIB + MIB // 2, lag_bytes=0)
        async with trio.open_nursery() as nursery:
            went_on = await blocked_task(nursery, live.keep_pace)
            live.has_read(MIB // 2 - 1)
            await trio.testing.wait_all_tasks_blocked()
            assert not went_on.is_set()
            live.has_read(MIB // 2)
        assert went_on.is_set()
        # A larger slack lets a PATCH run further ahead without waiting.
        await patched(32 * MIB, lag_bytes=32 * MIB).keep_pace()
        assert trio.current_time() == 0


async def test_a_stream_that_started_behind_may_stay_as_far_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(10):
        # Resumed here at 40 MiB: its reader starts at the file's first byte.
        live = stream(readable=40 * MIB, length=128 * MIB)
        live.patch_started()
        live.advance(40 * MIB + LAG_MAX_BYTES)
        await live.keep_pace()
        assert trio.current_time() == 0
        live.advance(40 * MIB + LAG_MAX_BYTES + MIB)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.keep_pace)
            await trio.testing.wait_all_tasks_blocked()
            live.has_read(MIB)
        assert trio.current_time() == 0


# --- who hashes, and the batches held for the reader -------------------------------------


def hashed_stream(budget_bytes: int = 64 * MIB) -> tuple[LiveStream, MemoryBudget]:
    memory = MemoryBudget(budget_bytes)
    live = LiveStream(
        "a" * 32, "/nonexistent", 64 * MIB, 0, 2.0, LAG_MAX_BYTES, UploadBudget(memory)
    )
    live.patch_started()
    return live, memory


async def test_the_writer_hashes_a_batch_only_at_the_digests_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    live, _ = hashed_stream()
    # Not where the digest ends: the reader hashes those bytes.
    assert live.claim_hash(MIB) is None
    hasher = live.claim_hash(0)
    assert hasher is live.sha256
    # One hop at a time feeds the digest.
    assert live.claim_hash(0) is None
    batch = [b"a" * (MIB // 2), b"b" * (MIB // 2)]
    live.advance(MIB, batch)
    assert (live.hashed_to, live.hashing, live.readable) == (MIB, False, MIB)
    assert live.claim_hash(MIB) is live.sha256


async def test_a_hashed_batch_is_held_for_the_reader_within_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    live, memory = hashed_stream()
    first, second = [b"a" * MIB], [b"b" * MIB]
    live.claim_hash(0)
    live.advance(MIB, first)
    live.claim_hash(MIB)
    live.advance(2 * MIB, second)
    assert memory.used == 2 * MIB
    # The reader at the second: the first was read back (dropped), the second handed over.
    assert live.take_held(MIB) == second
    assert memory.used == 0
    assert live.take_held(2 * MIB) is None


async def test_held_batches_stop_at_their_cap_and_at_the_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    live, memory = hashed_stream()
    position = 0
    while position < HELD_MAX_BYTES + 2 * MIB:
        live.claim_hash(position)
        position += MIB
        live.advance(position, [b"x" * MIB])
    assert memory.used == HELD_MAX_BYTES
    # Past the cap the reader reads back: the first batch beyond it is not held.
    assert live.take_held(HELD_MAX_BYTES) is None
    assert memory.used == 0

    tight, memory = hashed_stream(budget_bytes=MIB // 2)
    tight.claim_hash(0)
    tight.advance(MIB, [b"x" * MIB])
    assert memory.used == 0
    assert tight.take_held(0) is None
    assert tight.hashed_to == MIB


@pytest.mark.parametrize("end", ["abandoned", "finished"])
async def test_an_ended_stream_gives_its_held_batches_back(
    autojump_clock: trio.testing.MockClock, end: str
) -> None:
    live, memory = hashed_stream()
    live.claim_hash(0)
    live.advance(MIB, [b"x" * MIB])
    assert memory.used == MIB
    if end == "abandoned":
        live.abandon("the test")
    else:
        live.finish()
    assert memory.used == 0
    # Nothing is hashed or held for it any more.
    assert live.claim_hash(MIB) is None
