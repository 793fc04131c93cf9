"""Storage Elements that die or freeze under an upload: one 201 with the file intact on
another element, or a clear 503 when none is left; and once the elements are back, nothing
of a failed attempt is left in any data directory."""

from __future__ import annotations

import contextlib
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
    readiness,
    receiving,
    restart_element,
    serve_ingester,
    spool_files,
    start_elements,
    upload_of,
    wait_writable,
)
from tests.support.client import MIB, post_upload
from tests.support.fixtures import KeyPair
from tests.support.metrics import metric
from tests.support.processes import StorageElementProcess

STALL_S: Final = 1.5
# What an element's death costs beyond the stall timeout on this shared 2-core machine:
# the heartbeat's half-second tick, filling the socket buffers of a frozen element, the
# replay of what it had been given and the rest of the upload.
MARGIN_S: Final = 6.0
DEADLINE_S: Final = 30.0
ENV: Final = {
    "INGESTER_SE_STALL_TIMEOUT_S": str(STALL_S),
    # Only a failure wakes the prober: the test decides when elements are seen down.
    "INGESTER_SE_PROBE_INTERVAL_S": "60",
    "INGESTER_UPLOAD_DEADLINE_S": str(DEADLINE_S),
}


async def lose(se: StorageElementProcess, how: str) -> None:
    if how == "kill":
        se.kill()
    else:
        se.stop_signal()


async def bring_back(se: StorageElementProcess, how: str) -> StorageElementProcess:
    """The element back: restarted on its port and data directory after a kill (it drops a
    killed run's leftovers at start), continued after a freeze."""
    if how == "kill":
        return await restart_element(se)
    se.cont_signal()
    return se


@pytest.mark.parametrize(
    ("how", "flavor"),
    [("kill", "reference"), ("stop", "reference"), ("kill", "artstore")],
)
async def test_element_lost_mid_upload_fails_over(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, how: str, flavor: str
) -> None:
    """SIGKILL or SIGSTOP the element receiving a large upload: one 201, the file intact on
    the other element, within the stall timeout for a freeze; the first element back, the
    partial copy is gone. Also with elements that answer as artStore's does."""
    extra = ["--artstore-compat"] if flavor == "artstore" else []
    async with contextlib.AsyncExitStack() as stack:
        first, second = await start_elements(stack, tmp_path, keypair, 2, extra_args=extra)
        ingester = await serve_ingester(
            stack, tmp_path, keypair, [first.registry_entry(1), second.registry_entry(2)], ENV
        )
        body = upload_of(96 * MIB, seed=21)
        ledger = Ledger()
        with trio.fail_after(90):
            async with (
                httpx.AsyncClient(trust_env=False, timeout=60) as http,
                trio.open_nursery() as nursery,
            ):
                answered = trio.Event()
                # The ingester is ready with one writable element; the upload must start on
                # `first` (priority 1), so both must have passed a probe.
                await wait_writable(http, ingester, {first.element_id, second.element_id})

                async def upload() -> None:
                    ledger.add(await post_upload(http, ingester.url, token(), body), body)
                    answered.set()

                nursery.start_soon(upload)
                # Some MiB into the first element, then it dies or freezes.
                await receiving(first, 8 * MIB)
                await lose(first, how)
                lost_at = trio.current_time()
                await receiving(second)
                failover_s = trio.current_time() - lost_at
                await answered.wait()
                answer_s = trio.current_time() - lost_at
            (stored,) = ledger.stored
            assert stored.element_id == second.element_id
            async with httpx.AsyncClient(trust_env=False, timeout=60) as http:
                await assert_intact(http, stored, token())
                metrics = (await http.get(ingester.url + "/metrics")).text
            assert metric(metrics, "ingester_failovers_total", element_id=first.element_id) == 1
            if how == "stop":
                # Nothing accepted for the stall timeout, then on to the next element.
                assert STALL_S / 2 <= failover_s < STALL_S + MARGIN_S, failover_s
                assert answer_s < STALL_S + MARGIN_S, answer_s
            else:
                assert failover_s < MARGIN_S, failover_s
            first = await bring_back(first, how)
            # The first element holds nothing of the upload, not even a temporary file.
            await assert_no_orphans([first, second], ledger)
            async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
                exists = await http.get(
                    f"{first.url}/api/v1/gc/{stored.file_id}/exists",
                    headers={"Authorization": f"Bearer {token()}"},
                )
            assert exists.json()["exists"] is False
            assert spool_files(ingester) == []


@pytest.mark.parametrize("how", ["down_before", "kill", "stop"])
async def test_all_elements_down_is_a_503_and_leaves_nothing(
    tmp_path: Path, keypair: KeyPair, token: TokenFactory, how: str
) -> None:
    """Every element down before the upload, or each killed or frozen while it receives:
    503 NO_STORAGE_AVAILABLE with Retry-After within the upload deadline, nothing stored
    anywhere once they are back, and the ingester serves again."""
    async with contextlib.AsyncExitStack() as stack:
        elements = await start_elements(stack, tmp_path, keypair, 2)
        ingester = await serve_ingester(
            stack,
            tmp_path,
            keypair,
            [se.registry_entry(n) for n, se in enumerate(elements, 1)],
            {**ENV, "INGESTER_SE_PROBE_INTERVAL_S": "0.5"},
        )
        ledger = Ledger()
        with trio.fail_after(DEADLINE_S + 60):
            async with httpx.AsyncClient(trust_env=False, timeout=DEADLINE_S + 10) as http:
                if how == "down_before":
                    for se in elements:
                        se.kill()
                    body = upload_of(2 * MIB, seed=5)
                    started = trio.current_time()
                    response = await post_upload(http, ingester.url, token(), body)
                else:
                    body = upload_of(256 * MIB, seed=6)
                    started = trio.current_time()
                    async with trio.open_nursery() as nursery:
                        answer: list[httpx.Response] = []

                        async def upload() -> None:
                            answer.append(await post_upload(http, ingester.url, token(), body))

                        nursery.start_soon(upload)
                        for se in elements:
                            await receiving(se, 4 * MIB)
                            await lose(se, how)
                    response = answer[0]
                took = trio.current_time() - started
                ledger.add(response, body)
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "NO_STORAGE_AVAILABLE"
                assert took < DEADLINE_S, took
                # Readiness says so too, once the probes have seen them gone.
                await wait_writable(http, ingester, set())
                status, ready = await readiness(http, ingester)
                assert status == 503, ready
                for n, se in enumerate(elements):
                    elements[n] = await bring_back(se, "kill" if how != "stop" else how)
                await assert_no_orphans(elements, ledger)
                assert spool_files(ingester) == []
                # Back in service once the elements answer again.
                await wait_writable(http, ingester, {se.element_id for se in elements})
                again = upload_of(MIB, seed=7)
                ledger.add(await post_upload(http, ingester.url, token(), again), again)
                await ledger.assert_intact(http, token())
                await assert_no_orphans(elements, ledger)
