"""haproxy for the scale-out tests: found on PATH, or the test fails saying how to get it."""

from __future__ import annotations

import shutil

import pytest


def haproxy_binary() -> str:
    path = shutil.which("haproxy")
    if path is None:
        # A test that needs haproxy must not pass by not running: `make test` installs it.
        pytest.fail("haproxy is not installed: `make test` installs it (scripts/deps.sh)")
    return path
