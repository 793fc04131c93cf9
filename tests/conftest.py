"""Shared fixtures.

Rules for every test here: servers bind 127.0.0.1 on free ports; every async test body runs
under `trio.fail_after`; integration tests start real processes (reference Storage
Elements, the ingester under hypercorn) and check what a user would: status, `error.code`,
bytes stored equal bytes sent, nothing left behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from tests.support.fixtures import KeyPair, keypair, token_factory
from tests.support.fixtures import TokenFactory as SignedTokens
from tests.support.processes import (
    IngesterProcess,
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)
from tests.support.redis_sentinel import sentinel_redis
from tests.support.redis_server import redis_server
from tests.support.waiting import eventually

TokenFactory = Callable[..., str]


@pytest.fixture(scope="session")
def token(token_factory: SignedTokens) -> TokenFactory:
    """Tokens for user `alice` unless told otherwise (`token(role="readonly", sub="bob")`)."""
    return partial(token_factory, sub="alice")


@dataclass
class Stack:
    root: Path
    keys: KeyPair
    se_edit: StorageElementProcess
    se_rw: StorageElementProcess
    ingester: IngesterProcess

    @property
    def url(self) -> str:
        return self.ingester.url

    @property
    def elements(self) -> list[StorageElementProcess]:
        return [self.se_edit, self.se_rw]

    def all_files(self) -> set[Path]:
        return {p for se in self.elements for p in se.stored_files()}

    async def settled(self, expected: set[Path], timeout_s: float = 3.0) -> None:
        """The elements' files come back to `expected`: an aborted request's temporary file
        is removed by the element just after the client got its answer."""
        try:
            await eventually(lambda: self.all_files() == expected, timeout_s=timeout_s)
        except trio.TooSlowError:
            assert self.all_files() == expected  # shows the difference

    def start_ingester(self, name: str, **env: str) -> IngesterProcess:
        proc = start_ingester(
            self.root,
            name=name,
            public_key=self.keys.public_path,
            elements=[se.registry_entry() for se in self.elements],
            env=env,
        )
        proc.wait_ready()
        return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair) -> Iterator[Stack]:
    keys = keypair
    root = tmp_path_factory.mktemp("stack")
    started: list[ManagedProcess] = []
    try:
        se_edit = start_storage_element(
            root, element_id="se-edit", mode="edit", public_key=keys.public_path
        )
        started.append(se_edit)
        se_rw = start_storage_element(
            root, element_id="se-rw", mode="rw", public_key=keys.public_path
        )
        started.append(se_rw)
        stack = Stack(root, keys, se_edit, se_rw, ingester=None)  # type: ignore[arg-type]
        stack.ingester = stack.start_ingester(
            "ingester",
            INGESTER_CLIENT_IDLE_TIMEOUT_S="2",
            INGESTER_SE_STALL_TIMEOUT_S="5",
        )
        started.append(stack.ingester)
        yield stack
    finally:
        for proc in reversed(started):
            proc.terminate()


# Fixtures defined in tests.support, registered here for every test module.
__all__ = ["keypair", "redis_server", "sentinel_redis", "token_factory"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The lines tests record as `summary` (`record_property`): a soak's figures, where an
    interop screenshot was kept. Read from the reports, so tests run in xdist's workers
    show theirs too."""
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "summary" and getattr(report, "when", "call") == "call":
                    terminalreporter.write_line(str(value))
