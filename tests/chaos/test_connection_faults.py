"""The connection to an element reset or cut at several offsets of an upload, through the
fault proxy: the upload ends 201 on the other element with the file intact, and nothing of
it is left on the element behind the proxy."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    Ledger,
    assert_intact,
    assert_no_orphans,
    behind_proxy,
    snapshot,
    spool_files,
    upload_of,
)
from tests.support.client import MIB, post_upload
from tests.support.fault_proxy import Fault, FaultPlan
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric
from tests.support.processes import StorageElementProcess

KIB: Final = 1024
UPLOAD_SIZE: Final = 8 * MIB
# Bytes of the element connection let through before the fault: at once, inside the first
# chunk, a few chunks in, and near the end of the ~8 MiB body.
OFFSETS: Final = {"0": 0, "64KiB": 64 * KIB, "1MiB": MIB, "7MiB": 7 * MIB}


@pytest.mark.parametrize("offset", OFFSETS.values(), ids=OFFSETS.keys())
@pytest.mark.parametrize("fault", [Fault.RESET, Fault.CUT], ids=["reset", "cut"])
async def test_connection_fault_fails_over_and_leaves_nothing(
    element_pair: tuple[StorageElementProcess, StorageElementProcess],
    tmp_path: Path,
    keypair: KeyPair,
    token: TokenFactory,
    fault: Fault,
    offset: int,
) -> None:
    proxied, direct = element_pair
    ledger = Ledger()
    before = snapshot(element_pair)
    with trio.fail_after(60):
        async with (
            behind_proxy(tmp_path, keypair, proxied, direct) as (proxy, ingester),
            httpx.AsyncClient(trust_env=False, timeout=30) as http,
        ):
            proxy.set_plan(FaultPlan(fault, after_bytes=offset))
            body = upload_of(UPLOAD_SIZE, seed=offset + 1)
            stored = ledger.add(await post_upload(http, ingester.url, token(), body), body)
            proxy.heal()
            assert stored is not None
            assert stored.element_id == direct.element_id
            assert proxy.faults_fired >= 1
            await assert_intact(http, stored, token())
            metrics = (await http.get(ingester.url + "/metrics")).text
            if offset > 0:
                # Bytes had gone out: a failover mid-stream, not a refused connection.
                failovers = metric(
                    metrics, "ingester_failovers_total", element_id=proxied.element_id
                )
                assert failovers >= 1, metrics
            await assert_no_orphans(element_pair, ledger, baseline=before)
            assert spool_files(ingester) == []
