"""A breaker trip cancels an attempt that is streaming at that moment, end to end with processes.

Two uploads stream to element X (`se-proxied`, behind the fault proxy, preferred) at once. The
proxy cuts only the connection that carries the second upload's file name (a name no other
upload has; the ingester forwards it to the element), so that upload fails over to Y (`se-direct`)
and its failure trips X's breaker (threshold 1). The first upload's attempt on X is healthy and
idle (its client holds back the rest of its body), so nothing but the trip can end it: it is
cancelled and moves to Y while its client is still silent, then finishes there. Both files are
intact on Y, nothing of either is left on X, and only the second upload's connection was
faulted.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import httpx
import trio

from tests.conftest import TokenFactory
from tests.support.chaos import (
    Ledger,
    PacedBody,
    assert_no_orphans,
    behind_proxy,
    post_paced,
    receiving,
    snapshot,
    spool_files,
    upload_of,
)
from tests.support.client import MIB, auth, post_upload
from tests.support.fault_proxy import Fault, FaultPlan
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric
from tests.support.processes import StorageElementProcess

ENV: Final = {
    # One failure opens X's breaker, for longer than the test runs.
    "INGESTER_BREAKER_FAILURE_THRESHOLD": "1",
    "INGESTER_BREAKER_OPEN_S": "60",
    "INGESTER_BREAKER_OPEN_MAX_S": "60",
    # Neither a stall nor an idle client may end the held upload's attempt: only the trip.
    "INGESTER_SE_STALL_TIMEOUT_S": "60",
    "INGESTER_CLIENT_IDLE_TIMEOUT_S": "60",
}
HELD_AT: Final = 2 * MIB


async def progress(http: httpx.AsyncClient, url: str, upload_id: str, token: str) -> Any:
    response = await http.get(f"{url}/api/v1/files/uploads/{upload_id}", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_breaker_trip_moves_the_other_live_upload_to_the_next_element(
    element_pair: tuple[StorageElementProcess, StorageElementProcess],
    tmp_path: Path,
    keypair: KeyPair,
    token: TokenFactory,
) -> None:
    proxied, direct = element_pair
    before = snapshot(element_pair)
    ledger = Ledger()
    held_id, cut_id = str(uuid.uuid4()), str(uuid.uuid4())
    held_body = upload_of(6 * MIB, seed=31)
    paced = PacedBody(held_body, hold_at=HELD_AT)
    with trio.fail_after(60):
        async with (
            behind_proxy(tmp_path, keypair, proxied, direct, ENV) as (proxy, ingester),
            httpx.AsyncClient(trust_env=False, timeout=45) as http,
            trio.open_nursery() as nursery,
        ):
            held_done = trio.Event()

            async def held_upload() -> None:
                response = await post_paced(
                    http, ingester.url, token(), held_body, paced, **{"X-Upload-ID": held_id}
                )
                ledger.add(response, held_body)
                held_done.set()

            nursery.start_soon(held_upload)
            # The held upload streams to X, then its client goes quiet.
            await paced.holding.wait()
            await receiving(proxied, at_least=HELD_AT // 2)
            assert (await progress(http, ingester.url, held_id, token()))[
                "storage_element_id"
            ] == proxied.element_id

            # Only the connection carrying the second upload's file name is cut, 64 KiB in.
            # (Not its X-Upload-ID: the ingester scopes that to the user before the element
            # sees it.)
            cut_name = f"cut-{cut_id}.bin"
            proxy.set_plan(
                FaultPlan(Fault.CUT, after_bytes=64 * 1024, only_matching=cut_name.encode())
            )
            cut_body = replace(upload_of(3 * MIB, seed=32), filename=cut_name)
            response = await post_upload(
                http, ingester.url, token(), cut_body, headers={"X-Upload-ID": cut_id}
            )
            cut = ledger.add(response, cut_body)
            assert cut is not None
            assert cut.element_id == direct.element_id

            # The trip cancelled the held upload's healthy attempt: it is on Y while its
            # client still sends nothing.
            with trio.fail_after(15):
                while True:
                    now_on = await progress(http, ingester.url, held_id, token())
                    if now_on["storage_element_id"] == direct.element_id:
                        break
                    await trio.sleep(0.05)
            assert not held_done.is_set()
            # What X had been given is replayed to Y from the failover copy.
            await receiving(direct, at_least=HELD_AT // 2)
            paced.release()
            await held_done.wait()

            metrics = (await http.get(ingester.url + "/metrics")).text
            ready = (await http.get(ingester.url + "/health/ready")).json()
        assert proxy.faults_fired == 1
        (held,) = [s for s in ledger.stored if s.file_id != cut.file_id]
        assert held.element_id == direct.element_id
        assert metric(metrics, "ingester_failovers_total", element_id=proxied.element_id) == 2
        breaker = {e["id"]: e["breaker"] for e in ready["storage_elements"]}
        assert breaker[proxied.element_id] == "open", ready
        logs = ingester.log_path.read_text()
        assert f"circuit breaker for {proxied.element_id} opened; cancelling 1 attempts" in logs
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            await ledger.assert_intact(http, token())
        # Nothing of either upload on X: the held one's partial copy was removed too.
        await assert_no_orphans(element_pair, ledger, baseline=before)
        assert spool_files(ingester) == []
