"""Fixtures of the chaos suite; its helpers are in `tests/support/chaos.py`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.fixtures import KeyPair
from tests.support.processes import StorageElementProcess, start_storage_element


@contextmanager
def storage_elements(
    root: Path, keypair: KeyPair, element_ids: Sequence[str]
) -> Iterator[list[StorageElementProcess]]:
    """Edit elements with these ids, started one after the other, stopped on exit."""
    started: list[StorageElementProcess] = []
    try:
        for element_id in element_ids:
            started.append(
                start_storage_element(
                    root, element_id=element_id, mode="edit", public_key=keypair.public_path
                )
            )
        yield started
    finally:
        for proc in started:
            proc.terminate()


@pytest.fixture(scope="module")
def element_pair(
    tmp_path_factory: pytest.TempPathFactory, keypair: KeyPair
) -> Iterator[tuple[StorageElementProcess, StorageElementProcess]]:
    """Two edit elements for a module's tests, `se-proxied` (meant to sit behind a fault
    proxy, see `behind_proxy`) and `se-direct`; tests check their data directories against
    a snapshot taken when they start."""
    root = tmp_path_factory.mktemp("elements")
    with storage_elements(root, keypair, ["se-proxied", "se-direct"]) as (proxied, direct):
        yield proxied, direct
