"""Helpers of the interop tests: the tools they need (Node, the npm project, Chromium), the
clients run as processes, the cut, and the check of what was stored.

A missing tool fails the test with what to install: these tests are part of `make test` and
must never pass by skipping.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.support.client import MIB, auth, random_chunks
from tests.support.fault_proxy import Fault, FaultPlan, FaultProxy
from tests.support.waiting import eventually

INTEROP_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = INTEROP_DIR.parents[1]
NODE_DIR: Final = INTEROP_DIR / "node"
PAGE_DIR: Final = INTEROP_DIR / "page"
TUSPY_CLIENT: Final = INTEROP_DIR / "tuspy_client.py"
# Where the screenshot is copied to, so a person can look at it after `make test`.
ARTIFACTS_DIR: Final = Path(
    os.environ.get("INTEROP_ARTIFACTS_DIR", REPO_ROOT / ".artifacts" / "interop")
)
BASE: Final = "/api/v1/uploads"
CHUNK: Final = 256 * 1024
# What a client process may take before it is stopped (SIGTERM, then SIGKILL 5 s later).
CLIENT_TIMEOUT_S: Final = 45.0
# Exit code of the client scripts when the upload stopped on an error (an expected cut).
INTERRUPTED: Final = 3
NPM_CI_HINT: Final = (
    "run `make test` (it runs `npm ci` there) or `npm ci --prefix tests/interop/node`"
)


# --- tools -----------------------------------------------------------------------------------


def min_node_major() -> int:
    """The oldest Node major the npm project runs on: its package.json's `engines.node`
    (">=N"; playwright-core's own floor), which scripts/deps.sh reads too."""
    engines = json.loads((NODE_DIR / "package.json").read_text())["engines"]["node"]
    match = re.fullmatch(r">=\s*(\d+)", engines.strip())
    assert match is not None, f"engines.node is {engines!r}, not >=N"
    return int(match.group(1))


def find_node(path: str | None = None) -> str | None:
    """`node` from the venv first (where scripts/deps.sh puts one from PyPI when the
    system's is too old), then from PATH, as `make test` runs it."""
    search = os.pathsep.join([str(Path(sys.executable).parent), path or os.environ["PATH"]])
    return shutil.which("node", path=search)


def node_major(node: str) -> int | None:
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.strip()
    match = re.fullmatch(r"v(\d+)\..*", version)
    return None if match is None else int(match.group(1))


def node_binary() -> str:
    """`node`, new enough, with the npm project installed; else the test fails."""
    minimum = min_node_major()
    node = find_node()
    if node is None:
        pytest.fail(
            "node is not installed: the interop tests run tus-js-client and playwright-core "
            f"under Node.js >= {minimum}; `make test` installs it (scripts/deps.sh)"
        )
    major = node_major(node)
    if major is None or major < minimum:
        pytest.fail(
            f"{node} is Node.js {major or '(unknown version)'}, older than {minimum}: "
            "`make test` installs a newer one into the venv (scripts/deps.sh node)"
        )
    wanted = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for name, pinned in wanted.items():
        manifest = NODE_DIR / "node_modules" / name / "package.json"
        if not manifest.is_file():
            pytest.fail(f"{name} is not installed in tests/interop/node: {NPM_CI_HINT}")
        installed = json.loads(manifest.read_text())["version"]
        if installed != pinned:
            pytest.fail(f"tests/interop/node has {name} {installed}, not {pinned}: {NPM_CI_HINT}")
    return node


def chromium_binary() -> str:
    path = os.environ.get("INTEROP_CHROMIUM") or shutil.which("chromium")
    if path is None or not os.access(path, os.X_OK):
        pytest.fail(
            "chromium is not installed: the Uppy browser test runs Debian's Chromium headless "
            "(`make test` installs it: scripts/deps.sh; INTEROP_CHROMIUM=/path overrides)"
        )
    return path


# --- client processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRun:
    returncode: int
    report: dict[str, Any]
    stderr: str


async def _terminate_then_kill(process: trio.Process) -> None:
    """On cancellation: SIGTERM (the browser script closes Chromium on it), then SIGKILL."""
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(5):
        await process.wait()
        return
    process.kill()


async def run_client(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout_s: float = CLIENT_TIMEOUT_S,
    expect: int = 0,
) -> ClientRun:
    """Run a client script; its JSON report (the last line of its stdout). Fails the test
    with the script's output when it exits with another code than `expect`."""
    # Loopback only: no proxy from the environment for requests, Node or Chromium.
    child_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with trio.fail_after(timeout_s):
        done = await trio.run_process(
            list(argv),
            env={**child_env, **env},
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            deliver_cancel=_terminate_then_kill,
        )
    stdout = done.stdout.decode(errors="replace")
    stderr = done.stderr.decode(errors="replace")
    lines = stdout.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        report = {}
    if done.returncode != expect or not report:
        pytest.fail(
            f"{argv[0]} {argv[1]} exited {done.returncode} (expected {expect})\n"
            f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
        )
    return ClientRun(done.returncode, report, stderr)


def tuspy_argv(endpoint: str, source: Path, url_store: Path, *, checksum: bool) -> list[str]:
    argv = [
        sys.executable, str(TUSPY_CLIENT), "--endpoint", endpoint, "--file", str(source),
        "--url-store", str(url_store), "--chunk-size", str(CHUNK),
    ]  # fmt: skip
    return [*argv, "--checksum"] if checksum else argv


# --- the source file and the cut -------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    path: Path
    size: int
    sha256: str


def make_source(path: Path, size: int, *, seed: int) -> Source:
    """Incompressible bytes (stored as sent: the uploads ask for no compression)."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for chunk in random_chunks(size, seed=seed):
            digest.update(chunk)
            out.write(chunk)
    return Source(path, size, digest.hexdigest())


async def cut_after(proxy: FaultProxy, nbytes: int, *, bytes_per_s: int = MIB) -> int:
    """Slow uploads through `proxy` down to `bytes_per_s`, then cut every connection (the
    client's half: the ingester sees the body end early, the client gets no answer) once
    `nbytes` more have gone through. Slowed down, the proxy forwards 1/20 s worth (52 KiB at
    1 MiB/s) every 1/20 s, so the cut lands within a slice or two of `nbytes` even on a
    loaded machine, whatever the client's chunking. Returns the bytes forwarded by then."""
    start = proxy.bytes_upstream
    proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=bytes_per_s))
    await eventually(lambda: proxy.bytes_upstream - start >= nbytes, timeout_s=30, interval_s=0.005)
    proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=0))
    return proxy.bytes_upstream - start


# --- the browser test's page -----------------------------------------------------------------

UPPY_DIST: Final = NODE_DIR / "node_modules" / "uppy" / "dist"
# What the page server serves: the page, and Uppy's bundle from node_modules (no CDN).
PAGE_FILES: Final = {
    "/": (PAGE_DIR / "index.html", "text/html; charset=utf-8"),
    "/uppy/uppy.min.js": (UPPY_DIST / "uppy.min.js", "text/javascript; charset=utf-8"),
    "/uppy/uppy.min.css": (UPPY_DIST / "uppy.min.css", "text/css; charset=utf-8"),
}


@dataclass
class PageServer:
    origin: str  # http://127.0.0.1:<port>
    served: list[str]  # the paths requested, in order


class _PageHandler(http.server.BaseHTTPRequestHandler):
    served: list[str]

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.served.append(path)
        entry = PAGE_FILES.get(path)
        if entry is None:
            self.send_error(404)
            return
        body = entry[0].read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", entry[1])
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_page() -> Iterator[PageServer]:
    """Serve PAGE_FILES on 127.0.0.1 (a free port, bound before the ingester that must allow
    its origin starts) from a thread, until the block exits."""
    served: list[str] = []
    handler = type("PageHandler", (_PageHandler,), {"served": served})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield PageServer(f"http://127.0.0.1:{server.server_address[1]}", served)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- what was stored -------------------------------------------------------------------------


async def upload_state(http: httpx.AsyncClient, url: str, token: str) -> dict[str, Any]:
    """`GET /api/v1/uploads/{id}`: the upload's state, with the stored file's `result`."""
    response = await http.get(url, headers=auth(token))
    assert response.status_code == 200, response.text
    state: dict[str, Any] = response.json()
    return state


async def stored_sha256(http: httpx.AsyncClient, result: Mapping[str, Any], token: str) -> str:
    """Download the file from the Storage Element the result names and hash it."""
    url = f"{result['storage_element_url']}/api/v1/files/{result['file_id']}/download"
    digest = hashlib.sha256()
    async with http.stream("GET", url, headers=auth(token)) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
    return digest.hexdigest()


async def assert_stored(
    http: httpx.AsyncClient, upload_url: str, token: str, source: Source, file_id: str | None
) -> dict[str, Any]:
    """The upload is done; its result names `file_id` (the final PATCH's Upload-File-Id),
    the source's size, name and sha256; the bytes on the element hash to the source's."""
    state = await upload_state(http, upload_url, token)
    assert state["state"] == "done", state
    result: dict[str, Any] = state["result"]
    assert result["file_id"] == file_id, (result, file_id)
    assert result["file_size"] == source.size
    assert result["original_filename"] == source.path.name
    assert result["checksum"] == source.sha256
    assert result["compressed"] is False
    assert await stored_sha256(http, result, token) == source.sha256
    return result
