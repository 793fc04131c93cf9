"""tuspy (the tus project's Python client; synchronous, on requests) against a real ingester:
256 KiB chunks through a fault proxy that cuts the connection in the middle of the sixth
chunk; a new client process finds the upload through tuspy's fingerprint store, asks the
server where it stands, and finishes; the file on the Storage Element is the source."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.conftest import TokenFactory
from tests.interop.conftest import Interop
from tests.interop.support import (
    BASE,
    CHUNK,
    INTERRUPTED,
    assert_stored,
    cut_after,
    make_source,
    run_client,
    tuspy_argv,
)
from tests.support.client import MIB
from tests.support.fault_proxy import FaultProxy, serve_fault_proxy

SIZE = 3 * MIB + 12_345
# Five chunks and a quarter (request headers included): the cut lands in the sixth chunk.
CUT_AT = 5 * CHUNK + CHUNK // 4


@pytest.mark.parametrize("checksum", [True, False], ids=["sha1-checksum", "no-checksum"])
async def test_tuspy_resumes_from_a_new_client_after_a_cut(
    interop: Interop, token: TokenFactory, tmp_path: Path, checksum: bool
) -> None:
    with trio.fail_after(60):
        source = make_source(tmp_path / "tuspy-source.bin", SIZE, seed=41 + checksum)
        env = {"INTEROP_TOKEN": token()}
        async with trio.open_nursery() as nursery:
            proxy: FaultProxy = await nursery.start(
                serve_fault_proxy, "127.0.0.1", interop.ingester_port
            )
            argv = tuspy_argv(
                proxy.url + BASE, source.path, tmp_path / "tuspy-urls.json", checksum=checksum
            )
            cut_at: list[int] = []

            async def cut() -> None:
                cut_at.append(await cut_after(proxy, CUT_AT))

            nursery.start_soon(cut)
            first = (await run_client(argv, env=env, expect=INTERRUPTED)).report
            assert cut_at, f"the first client stopped before the cut: {first}"
            assert proxy.faults_fired >= 1
            # The cut came in the sixth chunk: five were acknowledged.
            assert first["url"] is not None
            assert first["offset"] == 5 * CHUNK, first
            assert first["file_id"] is None

            proxy.heal()
            second = (await run_client(argv, env=env)).report
            nursery.cancel_scope.cancel()

        assert second["url"] == first["url"], "the new client did not find the upload"
        if checksum:
            # Upload-Checksum: the cut chunk could not be verified, so none of it was kept.
            assert second["resumed_at"] == 5 * CHUNK, second
        else:
            # Without one, what arrived before the cut was kept (the offset is what is on disk).
            assert 5 * CHUNK < second["resumed_at"] < 6 * CHUNK, second
        assert second["error"] is None
        assert second["offset"] == SIZE
        assert second["file_id"] is not None
        upload_url = interop.url + urlsplit(second["url"]).path
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            result = await assert_stored(http, upload_url, token(), source, second["file_id"])
        assert result["storage_element_id"] == second["storage_element_id"] == "se-edit"
