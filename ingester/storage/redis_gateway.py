"""The process's one way to Redis: every Redis store and the registry sync go through it.

`RedisGateway` owns what each store used to build for itself:

- one sync redis-py client, so one connection pool for the process (redis-py's asyncio client
  does not run under trio), failing fast: no retries, `timeout_s` per connect and per read, the
  Sentinels' too. A dead Redis costs one timeout per call, never redis-py's 4-15 s retry loop;
- its own `trio.CapacityLimiter` for the worker threads its calls run in, apart from trio's
  default one that hashing, compression and fsync share: a tus lock renewal or a lease
  renewal never queues behind CPU work;
- one `AckPolicy`: after a `WAIT` no replica answered, no durable write of any store waits for
  the next `SKIP_AFTER_MISS_S`, so a dead replica costs one timeout per window, not one per
  store;
- one error: whatever redis-py raises (a refused or lost connection, a timeout, a command
  Redis refused) comes out as `RedisUnavailable`, here and nowhere else.

The registry's change feed (`listen`) keeps a connection of its own, from the same pool,
in a thread of its own that counts in neither limiter: a subscriber blocks for as long as it
listens, and must not hold one of the gateway's threads (or the default limiter's) for good.
It sends a PING when the feed has been quiet for `PUBSUB_PING_S` and takes no answer within
the timeout for a lost feed: a subscriber only reads, and waiting to read from a peer gone
silent (a dead host, a cut link) never fails. Its reads of the registry key are ordinary
`call`s.

`ingester registry` (a one-shot command, no trio) keeps a bare `make_client`: it runs
WATCH/MULTI transactions and nothing else shares its process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from ..boundary import redis_errors
from .redis_url import is_sentinel, parse_sentinel_url

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Worker threads for Redis calls at once. A call holds its thread for well under a
# millisecond when Redis is up, at most the timeout when it is not: 16 keep every lease and
# lock renewal moving while a few calls wait out a dead connection.
DEFAULT_THREADS: Final = 16
# How long one `get_message` blocks in the listener's thread: also the worst-case delay
# before the thread sees a cancellation (shutdown), so keep it short.
PUBSUB_POLL_S: Final = 0.5
# After this long without a word from Redis the listener sends a PING, and takes the feed for
# lost when no reply came within the gateway's timeout. Waiting for messages never finds a
# peer that vanished without closing the socket: the listener would stay subscribed to an old
# master after a failover, and every announcement on the new one would be missed.
PUBSUB_PING_S: Final = 5.0
# `WAIT 1`'s bound. A replica on the same network acknowledges in well under a millisecond
# (on loopback the script plus WAIT took 0.48 ms at p50 against 0.26 ms without); one that
# takes longer is down, or still syncing.
REPLICA_ACK_TIMEOUT_S: Final = 0.2
# After a `WAIT` no replica answered, writes stop waiting for this long, then try again.
SKIP_AFTER_MISS_S: Final = 10.0


def make_client(url: str, timeout_s: float) -> redis.Redis:
    """A sync client that fails fast: no retries, bounded connect and read.

    With a `redis+sentinel://` URL it is the master of the service as the Sentinels name it:
    each new connection asks them, so after a failover the first call on an old connection
    fails (one timeout at most, no retry) and the next one reaches the promoted replica.
    """
    # redis-py is loaded here, with the first client: a process without Redis never pays
    # for it (about 5 MB of RSS).
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    fail_fast: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **fail_fast)
    parsed = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.sentinels),
        # The Sentinels themselves fail fast too: a dead one costs a refused connect or one
        # timeout, then the next is asked.
        sentinel_kwargs=dict(fail_fast),
        **fail_fast,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.service,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
    )
    return client


class AckPolicy:
    """When a write must wait for a replica's acknowledgement (`WAIT 1`). No I/O.

    A write that would lose a file or leave an orphan if a Sentinel failover dropped it (a
    saga record before the first byte leaves) waits until one replica has it, at most
    `REPLICA_ACK_TIMEOUT_S`. When none acknowledged in time (the replica is down or still
    syncing), the write stands on the master alone, which is no worse than Redis without
    replicas: the upload goes on, and for `SKIP_AFTER_MISS_S` writes do not wait, so a dead
    replica costs one timeout per window, not one per upload.
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self._skip_until = float("-inf")
        self.replicated = True

    def should_wait(self, now: float) -> bool:
        return self.enabled and now >= self._skip_until

    def acked(self, replicas: int, now: float) -> bool | None:
        """Note what `WAIT` answered; the new `replicated` when it changed, else None."""
        ok = replicas >= 1
        if not ok:
            self._skip_until = now + SKIP_AFTER_MISS_S
        if ok == self.replicated:
            return None
        self.replicated = ok
        return ok


class RedisGateway:
    """One client, one thread limiter, one `AckPolicy`, one error; see the module."""

    def __init__(self, url: str, *, timeout_s: float, threads: int = DEFAULT_THREADS) -> None:
        self._client = make_client(url, timeout_s)
        self._timeout_s = timeout_s
        self.limiter = trio.CapacityLimiter(threads)
        # Only Sentinel URLs wait: a plain master's replicas have no automatic failover, so
        # a promotion there is an operator's decision made knowing the lag.
        self.ack_policy = AckPolicy(enabled=is_sentinel(url))
        self._scripts: dict[str, Script] = {}

    def script(self, text: str) -> Script:
        """A Lua script's handle for `run_script`; the same text gives the same handle."""
        handle = self._scripts.get(text)
        if handle is None:
            handle = self._scripts[text] = self._client.register_script(text)
        return handle

    async def call(self, fn: Callable[[redis.Redis], _T]) -> _T:
        """`fn(client)` in a worker thread under the gateway's limiter. Abandoned on cancel:
        the thread ends by itself within the socket timeout, and its result is not wanted."""
        with redis_errors():
            return await trio.to_thread.run_sync(
                fn, self._client, limiter=self.limiter, abandon_on_cancel=True
            )

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str], *, durable: bool = False
    ) -> object:
        """Run `script`; when `durable` (and the policy says so), return only once a replica
        has the write too, or `REPLICA_ACK_TIMEOUT_S` passed (see `AckPolicy`)."""
        if not (durable and self.ack_policy.should_wait(trio.current_time())):
            return await self.call(lambda _: script(keys=keys, args=args))
        result, replicas = await self.call(lambda client: _with_wait(client, script, keys, args))
        changed = self.ack_policy.acked(int(replicas), trio.current_time())
        if changed is False:
            log.warning(
                "no Redis replica acknowledged a write within %.0f ms: records written now "
                "live on the master alone and a failover may lose them",
                REPLICA_ACK_TIMEOUT_S * 1000,
                extra={"event": "redis_unreplicated"},
            )
        elif changed:
            log.info(
                "a Redis replica acknowledges writes again", extra={"event": "redis_replicated"}
            )
        return result

    async def listen(
        self,
        channel: str,
        *,
        subscribed: Callable[[], None],
        message: Callable[[], None],
    ) -> None:
        """Subscribe to `channel`; call `subscribed` once subscribed and `message` on each
        message (both on the trio side) until cancelled. `RedisUnavailable` when the
        subscription cannot be made or is lost, or a PING goes unanswered for the timeout."""

        def blocking() -> None:
            from redis.exceptions import TimeoutError as RedisTimeout

            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(channel)
                trio.from_thread.run_sync(subscribed)
                heard_at = time.monotonic()
                # When the PING still unanswered was sent.
                pinged_at: float | None = None
                while True:
                    trio.from_thread.check_cancelled()
                    received = pubsub.get_message(timeout=PUBSUB_POLL_S)
                    now = time.monotonic()
                    if received is not None:
                        heard_at = now
                        if received.get("type") == "pong":
                            pinged_at = None
                        elif received.get("type") == "message":
                            trio.from_thread.run_sync(message)
                    if pinged_at is None and now - heard_at >= PUBSUB_PING_S:
                        pubsub.ping()
                        pinged_at = now
                    elif pinged_at is not None and now - pinged_at > self._timeout_s:
                        raise RedisTimeout(f"no answer to PING within {self._timeout_s:g} s")
            finally:
                pubsub.close()

        with redis_errors():
            # Not abandoned on cancel: the thread sees the cancellation within a poll and
            # closes its connection on the way out.
            await trio.to_thread.run_sync(blocking, limiter=trio.CapacityLimiter(1))

    def close(self) -> None:
        # Closing pooled sockets does not block (no network round trip); no thread needed.
        self._client.close()


def _with_wait(
    client: redis.Redis, script: Script, keys: Sequence[str], args: Sequence[str]
) -> tuple[object, int]:
    """The script, then `WAIT 1`, in one pipeline on one connection: `WAIT` counts the
    acknowledgements of that connection's writes."""
    from redis.exceptions import NoScriptError

    try:
        return _pipelined(client, script, keys, args)
    except NoScriptError:
        # A new master (after a failover) has not seen the script yet.
        script.sha = client.script_load(script.script)
        return _pipelined(client, script, keys, args)


def _pipelined(
    client: redis.Redis, script: Script, keys: Sequence[str], args: Sequence[str]
) -> tuple[object, int]:
    # EVALSHA itself, not the script object: a pipeline that runs a script object first asks
    # SCRIPT EXISTS, one more command per write.
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(script.sha, len(keys), *keys, *args)
    pipe.wait(1, int(REPLICA_ACK_TIMEOUT_S * 1000))
    result, replicas = pipe.execute()
    return result, int(replicas)
