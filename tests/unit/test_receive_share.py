"""The receive share: reads and body buffers shrink as more connections receive at once."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.http.body import BodyLimits, RequestBody
from ingester.http.receive import MIN_READ, Intake, ReceiveShare
from tests.support.waiting import blocked_task

MIB = 1024 * 1024


def share(busy: int, *, total: int = 64 * MIB, max_read: int = MIB, queue: int = 2) -> ReceiveShare:
    return ReceiveShare(total_bytes=total, max_read=max_read, queue_size=queue, busy=busy)


def opened(s: ReceiveShare, client: object, server: object) -> Intake:
    intake = s.open(client, server)
    assert intake is not None
    return intake


def test_a_few_uploads_read_the_largest_size() -> None:
    for busy in (0, 1, 4, 12):
        assert share(busy).read_size() == MIB
        assert share(busy).body_limit(MIB) == MIB


def test_many_uploads_share_the_total() -> None:
    s = share(64)
    # 1 MiB each: a read in hand, two queued and a body buffer of two reads.
    assert s.read_size() == 1 * MIB // 5 // 4096 * 4096
    held = s.read_size() * (1 + 2) + s.body_limit(MIB)
    assert held <= MIB
    assert 64 * held <= 64 * MIB


def test_reads_never_go_below_the_floor_nor_above_the_setting() -> None:
    assert share(100_000).read_size() == MIN_READ
    assert share(100_000).body_limit(MIB) == 2 * MIN_READ
    assert share(1, max_read=16 * 1024).read_size() == 16 * 1024
    assert share(1, total=MIB, max_read=8 * MIB).read_size() == MIB // 5 // 4096 * 4096


def test_sizes_are_whole_pages_and_fall_as_connections_grow() -> None:
    sizes = [share(n).read_size() for n in range(1, 300)]
    assert all(size % 4096 == 0 for size in sizes)
    assert sizes == sorted(sizes, reverse=True)


def test_the_body_limit_never_exceeds_the_configured_one() -> None:
    assert share(1).body_limit(256 * 1024) == 256 * 1024


def test_counting_requests() -> None:
    s = share(0)
    s.started()
    s.started()
    s.ended()
    assert s.busy == 1
    s.ended()
    with pytest.raises(AssertionError):
        s.ended()


def test_a_connection_reads_no_more_than_what_is_left_of_its_part() -> None:
    s = share(4)  # a part of 16 MiB each; reads of 1 MiB
    intake = opened(s, "client", "server")
    s.received(intake, 15 * MIB + 512 * 1024)
    assert s.read_size(intake) == 512 * 1024
    s.received(intake, 512 * 1024)
    assert s.read_size(intake) == MIN_READ  # the floor: it is never stopped outright
    s.taken(intake, 4 * MIB)
    assert s.read_size(intake) == MIB


def test_what_the_first_uploads_hold_leaves_the_rest_less_of_the_total() -> None:
    """The first uploads read big while they were few; when the others come, those reads
    are still held, and the newcomers' reads fit in what is left of the total."""
    s = share(0)
    first = [opened(s, "early", n) for n in range(8)]
    for intake in first:
        s.started()
        s.received(intake, 6 * MIB)  # a read in hand, two queued, a body buffer and more
    late = [opened(s, "late", n) for n in range(56)]
    for _ in late:
        s.started()
    # 48 of 64 MiB held: 16 MiB left for 56 connections.
    assert s.read_size(late[0]) == s.read_size()  # within the total: the even size
    reads = 0
    while s.total_bytes - s.held >= s.read_size():
        s.received(late[reads % 56], s.read_size(late[reads % 56]))
        reads += 1
    assert reads == 16 * MIB // s.read_size()
    room = s.total_bytes - s.held
    assert s.read_size(late[-1]) == max(MIN_READ, room // 4096 * 4096)
    # Past the total, every read is the floor's.
    s.received(late[-1], room)
    assert s.read_size(late[-2]) == MIN_READ
    # The early ones, over their part of 1 MiB, read the floor.
    assert s.read_size(first[0]) == MIN_READ


def test_what_a_request_leaves_unread_is_gone_when_it_ends() -> None:
    s = share(1)
    key = ("client", "server")
    intake = opened(s, *key)
    assert s.intake_for(*key) is intake
    s.received(intake, 3 * MIB)
    s.taken(intake, MIB)
    assert (intake.held, s.held) == (2 * MIB, 2 * MIB)
    s.settle(intake)
    assert (intake.held, s.held) == (0, 0)
    # More taken than counted (bytes read before the intake opened): never below zero.
    s.received(intake, 10)
    s.taken(intake, 100)
    assert (intake.held, s.held) == (0, 0)
    s.received(intake, 10)
    s.close(*key, intake)
    assert s.held == 0
    assert s.intake_for(*key) is None


def test_a_connection_without_a_client_address_has_no_intake() -> None:
    # A Unix socket's connections: their requests could not tell them apart.
    s = share(1)
    assert s.open(None, "/run/ingester.sock") is None
    assert s.intake_for(None, "/run/ingester.sock") is None


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="must be"):
        ReceiveShare(total_bytes=0, max_read=MIB, queue_size=2)
    with pytest.raises(ValueError, match="must be"):
        ReceiveShare(total_bytes=MIB, max_read=MIB, queue_size=0)


# --- the body buffer under a share ----------------------------------------------------------


def shared_body(s: ReceiveShare, intake: Intake | None = None) -> RequestBody:
    return RequestBody(BodyLimits(buffer_limit=MIB, receive_share=s), intake)


async def test_a_body_pauses_its_receiver_at_the_shared_limit_even_when_it_shrinks() -> None:
    s = share(1)
    body = shared_body(s)
    body.append(b"x" * (600 * 1024))
    with trio.fail_after(5):
        await body.wait_for_room()  # 600 KiB of a 1 MiB limit: room
        # Many more connections now: the limit falls to 2 x 64 KiB, below what is held.
        s.busy = 100_000
        async with trio.open_nursery() as nursery:
            waited = await blocked_task(nursery, body.wait_for_room)
            assert not waited.is_set()  # paused, not spinning: every task is blocked
            assert len(await body.__anext__()) == 600 * 1024
            await waited.wait()


async def test_a_body_tells_its_intake_of_what_it_hands_out_and_drops() -> None:
    s = share(1)
    intake = opened(s, "client", "server")
    body = shared_body(s, intake)
    for size in (300, 200, 100):
        s.received(intake, size * 1024)
        body.append(b"x" * (size * 1024))
    with trio.fail_after(5):
        assert len(await body.__anext__()) == 300 * 1024
        assert s.held == 300 * 1024
        async with trio.open_nursery() as nursery:
            body_task_done = await blocked_task(nursery, body.drain)
            # The buffered rest is dropped, and so are bytes that come while it lingers.
            assert s.held == 0
            s.received(intake, 4096)
            body.append(b"y" * 4096)
            assert s.held == 0
            body.set_complete()
        assert body_task_done.is_set()
