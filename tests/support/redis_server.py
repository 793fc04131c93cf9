"""A throwaway `redis-server` on a free loopback port: never the machine's Redis on 6379.

    with RedisServer(tmp_path) as server:     # started, PING answers
        server.url                            # redis://127.0.0.1:<port>/0
        server.kill(); server.start()         # an outage, then back on the same port
        server.pause(); server.resume()       # a hung Redis: connections open, no answers

No persistence (`--save ""`, no AOF): a restart comes back empty, like a lost Redis.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import pytest
import redis

from tests.support.processes import LOOPBACK, ManagedProcess, free_port

STARTUP_TIMEOUT_S: Final = 10.0


class RedisServer:
    def __init__(
        self, directory: Path, port: int | None = None, *, extra_args: Sequence[str] = ()
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        # More redis-server options (`--replicaof`, ...), kept across restarts.
        self.extra_args = list(extra_args)
        # A config file to start from (a Sentinel's, which it rewrites as it learns).
        self.config_file: Path | None = None
        self.log_path = directory / "redis.log"
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2.0)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            # A test that needs Redis must not pass by not running: `make test` installs it.
            pytest.fail("redis-server is not installed: `make test` installs it (scripts/deps.sh)")
        first = [str(self.config_file)] if self.config_file is not None else []
        argv = [
            binary, *first, "--port", str(self.port), "--bind", LOOPBACK,
            "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            *self.extra_args,
        ]  # fmt: skip
        self._process = ManagedProcess(
            argv,
            log_path=self.log_path,
            ready=self._pings,
            cwd=self.directory,
            startup_timeout_s=STARTUP_TIMEOUT_S,
        ).start()

    def _pings(self) -> bool:
        probe = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=0.5)
        try:
            return bool(probe.ping())
        except redis.ConnectionError:
            return False
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL and reap: an abrupt outage (clients see their connections drop)."""
        if self._process is not None:
            self._process.kill()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open (the kernel still accepts new ones) and nothing
        answers, as with a hung Redis or a cut link."""
        assert self._process is not None, "not running"
        self._process.stop_signal()

    def resume(self) -> None:
        assert self._process is not None, "not running"
        self._process.cont_signal()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server
