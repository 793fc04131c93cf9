"""tus-js-client under Node against a real ingester: 256 KiB chunks through a fault proxy
that cuts the connection in the middle of the sixth chunk; a new `Upload` instance in a new
Node process, given the upload URL, asks the server where it stands and finishes; the file on
the Storage Element is the source.

tus-js-client has no checksum extension of its own: the script (node/tus_upload.mjs) adds
`Upload-Checksum: sha256 ...` to each PATCH in `onBeforeRequest`, so the cut chunk is
discarded whole and the resume starts at a chunk boundary.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import trio

from tests.conftest import TokenFactory
from tests.interop.conftest import Interop
from tests.interop.support import (
    BASE,
    CHUNK,
    INTERRUPTED,
    NODE_DIR,
    assert_stored,
    cut_after,
    make_source,
    run_client,
)
from tests.support.client import MIB
from tests.support.fault_proxy import FaultProxy, serve_fault_proxy

SIZE = 3 * MIB + 54_321
# Five chunks and a quarter (request headers included): the cut lands in the sixth chunk.
CUT_AT = 5 * CHUNK + CHUNK // 4


async def test_tus_js_client_resumes_from_a_new_upload_after_a_cut(
    interop: Interop, token: TokenFactory, tmp_path: Path, node: str
) -> None:
    with trio.fail_after(60):
        source = make_source(tmp_path / "tus-js-source.bin", SIZE, seed=43)
        env = {"INTEROP_TOKEN": token()}
        script = [node, str(NODE_DIR / "tus_upload.mjs")]
        async with trio.open_nursery() as nursery:
            proxy: FaultProxy = await nursery.start(
                serve_fault_proxy, "127.0.0.1", interop.ingester_port
            )
            argv = [
                *script, "--endpoint", proxy.url + BASE, "--file", str(source.path),
                "--chunk-size", str(CHUNK), "--checksum", "sha256",
            ]  # fmt: skip
            cut_at: list[int] = []

            async def cut() -> None:
                cut_at.append(await cut_after(proxy, CUT_AT))

            nursery.start_soon(cut)
            first = (await run_client(argv, env=env, cwd=NODE_DIR, expect=INTERRUPTED)).report
            assert cut_at, f"the first Upload ended before the cut: {first}"
            assert proxy.faults_fired >= 1
            assert first["url"] is not None
            assert first["resumedAt"] == 0
            assert first["offset"] == 5 * CHUNK, first
            assert first["fileId"] is None

            proxy.heal()
            second = (
                await run_client([*argv, "--upload-url", first["url"]], env=env, cwd=NODE_DIR)
            ).report
            nursery.cancel_scope.cancel()

        assert second["url"] == first["url"]
        # The cut chunk failed its checksum (it was incomplete): none of it was kept.
        assert second["resumedAt"] == 5 * CHUNK, second
        assert second["error"] is None
        assert second["offset"] == SIZE
        assert second["fileId"] is not None
        upload_url = interop.url + urlsplit(second["url"]).path
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            result = await assert_stored(http, upload_url, token(), source, second["fileId"])
        assert result["storage_element_id"] == second["storageElementId"] == "se-edit"
