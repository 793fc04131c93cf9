"""The Redis gateway against a real redis-server on a free loopback port.

Its calls and scripts work; a dead Redis (nobody listening, killed, frozen) is one
`RedisUnavailable` within the timeout, never a hang; its worker threads are its own, so
trio's default thread limiter full of blocked work does not hold a Redis call up; the change
feed holds none of them, and a frozen Redis ends it; and the stores over one gateway share
one replica-ack policy.
Every test runs under `fail_after`, and waits on events, never on sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator
from functools import partial

import pytest
import redis
import trio
import trio.testing

from ingester.boundary import RedisUnavailable
from ingester.finalize.record import SourceFile, Transaction
from ingester.finalize.store import RedisFinalizeStore
from ingester.saga.record import Copy, SagaRecord, SagaState
from ingester.saga.store import RedisSagaStore
from ingester.storage import redis_gateway
from ingester.storage.redis_gateway import PUBSUB_POLL_S, RedisGateway
from tests.support.processes import free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

TIMEOUT_S = 0.5


@pytest.fixture
async def gateway(redis_server: RedisServer) -> AsyncIterator[RedisGateway]:
    gateway = RedisGateway(redis_server.url, timeout_s=TIMEOUT_S)
    try:
        yield gateway
    finally:
        gateway.close()


def ping(client: redis.Redis) -> bool:
    return bool(client.ping())


async def test_a_call_and_a_script_reach_redis(gateway: RedisGateway) -> None:
    with trio.fail_after(5):
        assert await gateway.call(lambda client: client.set("k", "v"))
        assert await gateway.call(lambda client: client.get("k")) == b"v"
        text = "return redis.call('GET', KEYS[1]) .. ARGV[1]"
        script = gateway.script(text)
        # Registered once for the process: two stores with the same script share it.
        assert gateway.script(text) is script
        assert await gateway.run_script(script, ["k"], ["!"]) == b"v!"
        assert await gateway.run_script(script, ["k"], ["?"], durable=True) == b"v?"


async def test_nobody_listening_is_redis_unavailable() -> None:
    gateway = RedisGateway(f"redis://127.0.0.1:{free_port()}/0", timeout_s=TIMEOUT_S)
    try:
        # Two refused connects, each answered at once: well inside a timeout apiece.
        with trio.fail_after(2 * TIMEOUT_S):
            with pytest.raises(RedisUnavailable) as caught:
                await gateway.call(ping)
            assert isinstance(caught.value.__cause__, redis.ConnectionError)
            # Nothing was sent: the caller may count on nothing having happened.
            assert caught.value.may_have_run is False
            with pytest.raises(RedisUnavailable) as caught:
                await gateway.run_script(gateway.script("return 1"), [], [], durable=True)
            assert caught.value.may_have_run is False
    finally:
        gateway.close()


async def test_a_killed_redis_is_redis_unavailable(
    gateway: RedisGateway, redis_server: RedisServer
) -> None:
    with trio.fail_after(5):
        assert await gateway.call(ping)
        redis_server.kill()
        # The pooled connection is dead, then a new one is refused: both the one error,
        # and neither sent anything (the pool finds its connection closed and reconnects).
        for _ in range(2):
            with pytest.raises(RedisUnavailable) as caught:
                await gateway.call(ping)
            assert caught.value.may_have_run is False


async def test_a_frozen_redis_costs_one_timeout_not_a_hang(
    gateway: RedisGateway, redis_server: RedisServer
) -> None:
    with trio.fail_after(5):
        assert await gateway.call(ping)
    redis_server.pause()
    try:
        started = time.monotonic()
        with trio.fail_after(TIMEOUT_S * 4), pytest.raises(RedisUnavailable) as caught:
            await gateway.call(ping)
        assert isinstance(caught.value.__cause__, redis.TimeoutError)
        assert time.monotonic() - started >= TIMEOUT_S * 0.9
    finally:
        redis_server.resume()
    with trio.fail_after(5):
        # Back: the next call gets a fresh connection (the timed-out one was dropped).
        assert await gateway.call(ping)


async def test_a_write_whose_reply_timed_out_may_have_run(
    gateway: RedisGateway, redis_server: RedisServer
) -> None:
    script = gateway.script("return redis.call('SET', KEYS[1], ARGV[1])")
    with trio.fail_after(5):
        # Loaded in Redis (else the frozen call's EVALSHA would be refused, not run).
        assert await gateway.run_script(script, ["before"], ["yes"]) == b"OK"
    redis_server.pause()
    try:
        with trio.fail_after(TIMEOUT_S * 4), pytest.raises(RedisUnavailable) as caught:
            await gateway.run_script(script, ["written"], ["yes"])
        assert caught.value.may_have_run is True
    finally:
        redis_server.resume()
    with trio.fail_after(5):
        # Why it must say so: the write took effect once Redis went on.
        assert await gateway.call(lambda client: client.get("written")) == b"yes"


async def test_a_full_default_thread_limiter_does_not_hold_redis_calls_up(
    gateway: RedisGateway,
) -> None:
    default = trio.to_thread.current_default_thread_limiter()
    release = threading.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            try:
                # Every token of the default limiter taken by a blocked thread (hashing,
                # compression, fsync), and one more task queued behind them.
                for _ in range(int(default.total_tokens) + 1):
                    nursery.start_soon(partial(trio.to_thread.run_sync, release.wait))
                await trio.testing.wait_all_tasks_blocked()
                assert default.borrowed_tokens == default.total_tokens
                assert default.statistics().tasks_waiting == 1
                assert await gateway.call(ping)
                assert await gateway.run_script(gateway.script("return 7"), [], []) == 7
                assert default.statistics().tasks_waiting == 1
            finally:
                release.set()
    assert gateway.limiter is not default


async def test_the_change_feed_holds_no_gateway_thread(
    gateway: RedisGateway, redis_server: RedisServer
) -> None:
    subscribed, received, lost = trio.Event(), trio.Event(), trio.Event()

    async def listen() -> None:
        with pytest.raises(RedisUnavailable):
            await gateway.listen("feed", subscribed=subscribed.set, message=received.set)
        lost.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await subscribed.wait()
            assert gateway.limiter.borrowed_tokens == 0
            assert await gateway.call(lambda client: client.publish("feed", "changed")) == 1
            await received.wait()
            # The feed's connection lost: the one error, not a silent end or a hang.
            redis_server.kill()
            await lost.wait()


async def test_a_frozen_redis_ends_the_change_feed(
    gateway: RedisGateway, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A subscriber's reads never fail on a peer gone silent (a dead host, a cut link): the
    # feed's PING finds it, sent here after 0.2 s without a word instead of 5 s.
    ping_s = 0.2
    monkeypatch.setattr(redis_gateway, "PUBSUB_PING_S", ping_s)
    subscribed, lost = trio.Event(), trio.Event()
    client = redis_server.client()

    def pings() -> int:
        return int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))

    async def listen() -> None:
        with pytest.raises(RedisUnavailable):
            await gateway.listen("feed", subscribed=subscribed.set, message=lambda: None)
        lost.set()

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(listen)
                await subscribed.wait()
                # Answered PINGs keep it up.
                before = pings()
                await eventually(lambda: pings() >= before + 2, timeout_s=5)
                assert not lost.is_set()
                redis_server.pause()
                try:
                    # The next PING, its timeout, and a poll or two either side.
                    with trio.fail_after(ping_s + TIMEOUT_S + 2 * PUBSUB_POLL_S + 1.0):
                        await lost.wait()
                finally:
                    redis_server.resume()
    finally:
        client.close()


async def test_stores_over_one_gateway_share_one_replica_ack_policy(
    gateway: RedisGateway, redis_server: RedisServer
) -> None:
    # A plain URL never waits for replicas; turned on here as a Sentinel URL turns it on.
    # This server has no replica, so the first `WAIT 1` finds none.
    gateway.ack_policy.enabled = True
    sagas, moves = RedisSagaStore(gateway), RedisFinalizeStore(gateway)
    copy = Copy("se-a", "http://127.0.0.1:1")
    record = SagaRecord(upload_id="u1", file_id="f1", owner="one", state=SagaState.RECEIVING)
    record.add_copy(copy)
    move = Transaction(
        transaction_id="t1",
        file_id="f1",
        owner="one",
        requested_by="alice",
        source=copy,
        file=SourceFile("a.txt", "text/plain", "0" * 64, 1),
        created_at=time.time(),
    )
    now = time.time()
    client = redis_server.client()

    def waits() -> int:
        return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))

    try:
        with trio.fail_after(5):
            assert await sagas.put(record, due=now + 30, must_exist=False)
            assert not gateway.ack_policy.replicated
            waited = waits()
            assert waited >= 1
            # The other store's durable writes see the same miss: they do not wait either.
            assert await moves.create(move, due=now + 30, retention_s=60) is None
            assert await moves.put(move, due=now + 30, retention_s=60)
            assert await sagas.delete("one", "u1")
            assert waits() == waited
    finally:
        client.close()
