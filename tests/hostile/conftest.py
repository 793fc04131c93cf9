"""Fixtures of the hostile-input suite (its rules: `tests/hostile/__init__.py`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Stack
from tests.hostile.common import Spawn
from tests.support.processes import ManagedProcess


@pytest.fixture(scope="module")
def spawn(stack: Stack) -> Iterator[Spawn]:
    """Start an ingester beside the module's stack with the settings an attack needs
    (`spawn("name", INGESTER_X="1")`); all are stopped at the end of the module."""
    started: list[ManagedProcess] = []

    def start(name: str, **env: str) -> ManagedProcess:
        proc = stack.start_ingester(name, **env)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.terminate()
