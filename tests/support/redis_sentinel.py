"""A throwaway Redis with Sentinel on free loopback ports: a master, one replica, three Sentinels.

    with SentinelRedis(tmp_path) as cluster:     # replicating, every Sentinel knows all
        cluster.url                              # redis+sentinel://127.0.0.1:a,...:b,...:c/artstore
        cluster.kill_master()                    # SIGKILL; Sentinel promotes the replica
        cluster.wait_failover(timeout_s=10)      # the new master's port, and how long it took

Short Sentinel timings (`down-after-milliseconds` 500, `failover-timeout` 3000) make a
failover take about 1-3 s, as it would in a tuned production setup it takes down-after plus an
election. Each process is a `RedisServer` (same start, PING wait and SIGKILL); all are stopped
when the context exits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import pytest
import redis

from tests.support.processes import LOOPBACK
from tests.support.redis_server import RedisServer

SERVICE: Final = "artstore"
QUORUM: Final = 2
DOWN_AFTER_MS: Final = 500
FAILOVER_TIMEOUT_MS: Final = 3000
# Sentinels find each other through hello messages every 2 s and the replica through INFO
# every 10 s (1 s once they know it): a cold start is known to all within a few seconds.
DISCOVERY_TIMEOUT_S: Final = 30.0
POLL_S: Final = 0.05


class SentinelRedis:
    def __init__(self, directory: Path, *, sentinels: int = 3) -> None:
        self.directory = directory
        self.master = RedisServer(directory / "node-a")
        self.replica = RedisServer(
            directory / "node-b", extra_args=["--replicaof", LOOPBACK, str(self.master.port)]
        )
        self.sentinels = [RedisServer(directory / f"sentinel-{i}") for i in range(sentinels)]
        for sentinel in self.sentinels:
            sentinel.config_file = sentinel.directory / "sentinel.conf"
            sentinel.extra_args = ["--sentinel"]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.master, self.replica]

    def node_on(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return self.sentinels[index].client()

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                address = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if isinstance(address, tuple):
                return int(address[1])
        return None

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.directory.mkdir(parents=True, exist_ok=True)
            assert sentinel.config_file is not None
            sentinel.config_file.write_text(
                f"sentinel monitor {SERVICE} {LOOPBACK} {self.master.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            sentinel.start()
        self._wait_discovered()

    def _wait_discovered(self) -> None:
        """Until the replica is in sync and every Sentinel knows the replica and the others:
        only then can a failover happen."""
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        others = len(self.sentinels) - 1
        while time.monotonic() < deadline:
            if self._replica_synced() and all(
                self._knows_all(sentinel, others) for sentinel in self.sentinels
            ):
                return
            time.sleep(POLL_S)
        raise RuntimeError(f"Sentinels did not discover each other within {DISCOVERY_TIMEOUT_S}s")

    def _replica_synced(self) -> bool:
        client = self.replica.client()
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return info.get("master_link_status") == "up"

    @staticmethod
    def _knows_all(sentinel: RedisServer, others: int) -> bool:
        client = sentinel.client()
        try:
            state = client.sentinel_master(SERVICE)
        except redis.RedisError:
            return False
        finally:
            client.close()
        assert isinstance(state, dict)
        return (
            int(state.get("num-slaves", 0)) >= 1
            and int(state.get("num-other-sentinels", 0)) >= others
        )

    def kill_master(self) -> RedisServer:
        """SIGKILL whichever node the Sentinels name master; returns it."""
        port = self.master_port()
        assert port is not None, "no Sentinel names a master"
        node = self.node_on(port)
        node.kill()
        return node

    def wait_failover(self, old_port: int, *, timeout_s: float) -> tuple[int, float]:
        """Until a Sentinel names a master other than `old_port` that answers as master:
        its port and the seconds it took."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old_port and self._is_master(port):
                return port, time.monotonic() - started
            time.sleep(POLL_S)
        raise TimeoutError(f"no failover within {timeout_s}s")

    def wait_all_name(self, port: int, *, timeout_s: float) -> None:
        """Until every Sentinel names `port` master. Restart a killed master only after
        that: a Sentinel still naming the old one would send clients to the restarted,
        empty node until it is made a replica (and its writes flushed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            named = set()
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
                except redis.RedisError:
                    address = None
                finally:
                    client.close()
                named.add(int(address[1]) if isinstance(address, tuple) else None)
            if named == {port}:
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"the Sentinels did not all name {port} within {timeout_s}s")

    @staticmethod
    def _is_master(port: int) -> bool:
        client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=1.0)
        try:
            return client.info("replication").get("role") == "master"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.kill()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture
def sentinel_redis(tmp_path: Path) -> Iterator[SentinelRedis]:
    with SentinelRedis(tmp_path / "sentinel-redis") as cluster:
        yield cluster
