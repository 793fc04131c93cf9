"""A client that goes away mid-upload, while the element is receiving or while it is
stalled: the element's request is cancelled, nothing is left on any element or in the
spool, and the ingester serves the next upload.

The plain case (fields first, element receiving) is `test_client_disconnect_cancels_the_
element_request` in `tests/integration/test_upload_errors.py`; these are the harder ones.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Final

import httpx
import pytest
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
    temporary_sizes,
    upload_of,
)
from tests.support.client import MIB, MultipartUpload, auth, post_upload, random_chunks
from tests.support.fault_proxy import Fault, FaultPlan
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric
from tests.support.processes import StorageElementProcess
from tests.support.waiting import eventually

# The client stops sending here and then disconnects: well inside the element's request.
HOLD_AT: Final = 6 * MIB
# The element stalls (the proxy stops forwarding) after this much.
STALL_AFTER: Final = 2 * MIB
STALL_S: Final = 3.0
MARGIN_S: Final = 5.0


@pytest.mark.parametrize("case", ["file_first_receiving", "element_stalled"])
async def test_client_disconnect_cancels_the_element_request_and_leaves_nothing(
    element_pair: tuple[StorageElementProcess, StorageElementProcess],
    tmp_path: Path,
    keypair: KeyPair,
    token: TokenFactory,
    case: str,
) -> None:
    proxied, direct = element_pair
    before = snapshot(element_pair)
    upload_id = str(uuid.uuid4())
    if case == "file_first_receiving":
        # The file before the fields: teed into a spool as well as the failover copy.
        body = MultipartUpload(
            random_chunks(64 * MIB, seed=31),
            fields=[("retention_policy", "temporary"), ("compress", "false")],
            file_first=True,
        )
    else:
        body = upload_of(64 * MIB, seed=32)
    paced = PacedBody(body, hold_at=HOLD_AT)
    env = {"INGESTER_SE_STALL_TIMEOUT_S": str(STALL_S)}
    with trio.fail_after(60):
        async with (
            behind_proxy(tmp_path, keypair, proxied, direct, env) as (proxy, ingester),
            httpx.AsyncClient(trust_env=False, timeout=30) as http,
        ):
            if case == "element_stalled":
                proxy.set_plan(FaultPlan(Fault.STALL, after_bytes=STALL_AFTER))
            async with trio.open_nursery() as nursery:

                async def upload() -> None:
                    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
                        await post_paced(
                            client, ingester.url, token(), body, paced, **{"X-Upload-ID": upload_id}
                        )
                    raise AssertionError("the upload was answered; it should have been dropped")

                nursery.start_soon(upload)
                await paced.holding.wait()
                if case == "element_stalled":
                    await eventually(lambda: proxy.faults_fired >= 1, timeout_s=10)
                else:
                    await receiving(proxied, MIB)
                # The client goes away: its connection closes.
                nursery.cancel_scope.cancel()
            gone_at = trio.current_time()

            while True:
                progress = await http.get(
                    f"{ingester.url}/api/v1/files/uploads/{upload_id}", headers=auth(token())
                )
                if progress.json()["state"] == "cancelled":
                    break
                await trio.sleep(0.02)
            noticed_s = trio.current_time() - gone_at
            if case == "element_stalled":
                # Known limit: while the element takes nothing, backpressure has stopped the
                # ingester reading the client's socket, so the disconnect is seen only once
                # the stall timeout moved the upload on (to se-direct, compensated too).
                assert noticed_s < STALL_S + MARGIN_S, noticed_s
                # The element learns of it when its connection moves again.
                proxy.heal()
            else:
                assert noticed_s < 1.0, noticed_s
            # The element's request is gone with its temporary file within a second.
            await eventually(lambda: not temporary_sizes(proxied), timeout_s=1.0)
            await assert_no_orphans(element_pair, baseline=before)
            assert spool_files(ingester) == []
            metrics = (await http.get(ingester.url + "/metrics")).text
            assert metric(metrics, "ingester_uploads_total", outcome="client_disconnected") == 1
            if case != "element_stalled":
                assert metric(metrics, "ingester_failovers_total", element_id="se-proxied") == 0
            # Still serving, through the same proxy.
            ledger = Ledger()
            again = upload_of(MIB, seed=33)
            ledger.add(await post_upload(http, ingester.url, token(), again), again)
            await ledger.assert_intact(http, token())
            await assert_no_orphans(element_pair, ledger, baseline=before)
