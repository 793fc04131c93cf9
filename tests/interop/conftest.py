"""Fixtures of the interop tests: one stack for the package (two reference Storage Elements
and an ingester that allows the browser test's page origin), the tools, and the list of
artifacts printed at the end of the run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import Stack
from tests.interop.support import PageServer, chromium_binary, node_binary, serve_page
from tests.support.fixtures import KeyPair
from tests.support.processes import ManagedProcess, start_storage_element

# Paths worth a look after the run (the browser test's screenshot), printed at the end.


@dataclass
class Interop:
    stack: Stack
    # The browser test's page; the ingester allows its origin (CORS).
    page: PageServer

    @property
    def url(self) -> str:
        return self.stack.url

    @property
    def ingester_port(self) -> int:
        return int(self.stack.url.rsplit(":", 1)[1])


@pytest.fixture(scope="package")
def interop(tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair) -> Iterator[Interop]:
    root = tmp_path_factory.mktemp("interop")
    started: list[ManagedProcess] = []

    def stop_processes() -> None:
        for proc in reversed(started):
            proc.terminate()

    with contextlib.ExitStack() as cleanup:
        # The page server first: the ingester is started allowing its origin.
        page = cleanup.enter_context(serve_page())
        cleanup.callback(stop_processes)
        se_edit = start_storage_element(
            root, element_id="se-edit", mode="edit", public_key=keypair.public_path
        )
        started.append(se_edit)
        se_rw = start_storage_element(
            root, element_id="se-rw", mode="rw", public_key=keypair.public_path
        )
        started.append(se_rw)
        stack = Stack(root, keypair, se_edit, se_rw, ingester=None)  # type: ignore[arg-type]
        stack.ingester = stack.start_ingester("ingester", INGESTER_CORS_ORIGINS=page.origin)
        started.append(stack.ingester)
        yield Interop(stack, page)


@pytest.fixture(scope="session")
def node() -> str:
    """The `node` binary, with tests/interop/node installed (`npm ci`); fails if missing."""
    return node_binary()


@pytest.fixture(scope="session")
def chromium() -> str:
    return chromium_binary()
