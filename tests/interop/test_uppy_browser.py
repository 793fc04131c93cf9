"""Uppy (Dashboard + its tus plugin, the prebuilt bundle of the pinned `uppy` package) in
headless Debian Chromium, driven by playwright-core: a page served on loopback by this test
picks a file and uploads it to the ingester in 256 KiB chunks with the bearer token (a
cross-origin page: the ingester allows its origin with INGESTER_CORS_ORIGINS). A screenshot
is taken and copied to .artifacts/interop/ (the path is printed at the end of the run), and
the stored file is downloaded from its Storage Element and hashed."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import httpx
import psutil
import trio

from tests.conftest import TokenFactory
from tests.interop.conftest import Interop
from tests.interop.support import (
    ARTIFACTS_DIR,
    BASE,
    CHUNK,
    NODE_DIR,
    PAGE_FILES,
    assert_stored,
    make_source,
    run_client,
)
from tests.support.client import MIB

SIZE = 2 * MIB + 4_321


def kill_browsers_of(profile: Path) -> list[int]:
    """Chromium processes still running with this test's profile directory, killed by pid;
    returns their pids. A safety net: Chromium exits when its Node goes (its DevTools pipe
    closes), but playwright starts it in a process group of its own, out of reach of
    anything that stops Node's."""
    marker = f"--user-data-dir={profile}"
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if marker in (proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.info["pid"])
    return killed


async def test_uppy_uploads_a_file_through_tus_in_chromium(
    interop: Interop,
    token: TokenFactory,
    tmp_path: Path,
    node: str,
    chromium: str,
    record_property: Callable[[str, object], None],
) -> None:
    with trio.fail_after(75):
        source = make_source(tmp_path / "uppy-source.bin", SIZE, seed=47)
        screenshot = tmp_path / "uppy-upload.png"
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        config = urlencode({"endpoint": interop.url + BASE, "token": token(), "chunk": CHUNK})
        argv = [
            node, str(NODE_DIR / "browser_upload.mjs"),
            "--page", f"{interop.page.origin}/#{config}", "--file", str(source.path),
            "--screenshot", str(screenshot), "--chromium", chromium,
            "--user-data-dir", str(profile), "--timeout-ms", "45000",
        ]  # fmt: skip
        try:
            run = await run_client(argv, env={}, cwd=NODE_DIR, timeout_s=60)
        finally:
            leftover = kill_browsers_of(profile)
        assert leftover == [], f"Chromium processes outlived the script: {leftover}"
        report = run.report
        print(json.dumps(report, indent=1))  # shown when the test fails

        assert screenshot.is_file()
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        kept = ARTIFACTS_DIR / screenshot.name
        shutil.copyfile(screenshot, kept)
        record_property(
            "summary", f"interop: Uppy upload screenshot (Chromium {report['browser']}): {kept}"
        )
        print(f"screenshot: {screenshot} -> {kept}")

        assert set(interop.page.served) >= set(PAGE_FILES), interop.page.served
        assert report["offLoopback"] == [], "the page reached beyond loopback"
        assert not [line for line in report["console"] if line.startswith("pageerror")], report
        done = report["done"]
        assert (done["successful"], done["failed"], done["error"]) == (1, 0, None), report
        assert (done["name"], done["size"]) == (source.path.name, source.size)
        assert done["uploadURL"].startswith(interop.url + BASE + "/"), done

        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            # The final PATCH's Upload-File-Id, as the page's script read it (CORS exposes it).
            await assert_stored(http, done["uploadURL"], token(), source, done["fileIdHeader"])
