"""`ingester upload` as a user runs it: a real process against a real ingester and two
reference Storage Elements, through the fault proxy where the network is to misbehave.

Every stored file is downloaded from its element and its sha256 compared with the
source's; the client's state files live in the test's own cache dir (XDG_CACHE_HOME).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from ingester.client.resume import cache_dir, state_key
from tests.conftest import Stack, TokenFactory
from tests.interop.support import Source, make_source, stored_sha256
from tests.support.client import MIB, MultipartUpload, auth, post_upload
from tests.support.fault_proxy import Fault, FaultPlan, FaultProxy, serve_fault_proxy
from tests.support.http_server import DropConnection, Request, Response, serve_http
from tests.support.metrics import read_metric
from tests.support.processes import child_env
from tests.support.waiting import eventually

CLIENT_TIMEOUT_S: Final = 90.0
TUS_METRIC: Final = "ingester_tus_received_bytes_total"


# --- running the client ----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


def client_env(cache: Path, **extra: str) -> dict[str, str]:
    """This environment for the client: no INGESTER_* of ours, no proxy, its own cache."""
    env = {k: v for k, v in child_env().items() if not k.lower().endswith("_proxy")}
    env["XDG_CACHE_HOME"] = str(cache)
    env.update(extra)
    return env


def upload_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ingester", "upload", *args]


async def run_upload(*args: str, env: dict[str, str]) -> Run:
    with trio.fail_after(CLIENT_TIMEOUT_S):
        done = await trio.run_process(
            upload_argv(*args),
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


def state_files(cache: Path) -> list[Path]:
    directory = cache_dir({"XDG_CACHE_HOME": str(cache)})
    return sorted(directory.glob("*.json")) if directory.exists() else []


async def assert_stored(record: dict[str, Any], source: Source, token: str) -> None:
    """The record names the source, and the element holds the source's bytes."""
    assert record["file_size"] == source.size
    assert record["original_filename"] == source.path.name
    assert record["checksum"] == source.sha256
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        assert await stored_sha256(http, record, token) == source.sha256


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


async def through_proxy(
    stack: Stack, body: Callable[[FaultProxy], Awaitable[None]], *, timeout_s: float = 120
) -> None:
    """Run `body` with a fault proxy in front of the stack's ingester."""
    port = int(stack.url.rsplit(":", 1)[1])
    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            proxy: FaultProxy = await nursery.start(serve_fault_proxy, "127.0.0.1", port)
            await body(proxy)
            nursery.cancel_scope.cancel()


# --- the multipart path ----------------------------------------------------------------------


async def test_a_small_file_goes_as_one_request_with_an_idempotency_key(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    source = make_source(tmp_path / "small.bin", 3 * MIB + 7, seed=11)
    seen_state: list[dict[str, Any]] = []
    before = stack.all_files()

    async def body(proxy: FaultProxy) -> None:
        # Slowed down, so the state file can be read while the request is on its way.
        proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=4 * MIB))
        env = client_env(cache, INGESTER_TOKEN=token(), INGESTER_URL=proxy.url)
        async with trio.open_nursery() as nursery:
            runs: list[Run] = []

            async def client() -> None:
                runs.append(await run_upload("--json", str(source.path), env=env))

            nursery.start_soon(client)
            await eventually(lambda: bool(state_files(cache)), timeout_s=30)
            seen_state.append(json.loads(state_files(cache)[0].read_text()))
        run = runs[0]
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        [record] = run.records()
        await assert_stored(record, source, token())
        assert state_files(cache) == [], "the state file outlived the upload"
        # The key the client kept is the one it sent: the same request again is a replay.
        key = seen_state[0]["idempotency_key"]
        assert seen_state[0]["kind"] == "multipart"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            again = await post_upload(
                http,
                stack.url,
                token(),
                MultipartUpload([source.path.read_bytes()], filename=source.path.name),
                headers={"Idempotency-Key": key},
            )
        assert again.status_code == 201, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["file_id"] == record["file_id"]
        # Stored once: the data file and its .attr.json.
        assert len(stack.all_files() - before) == 2

    await through_proxy(stack, body)


async def test_the_request_carries_its_digest_and_a_wrong_checksum_answer_is_an_error(
    tmp_path: Path, cache: Path
) -> None:
    """Against a stand-in that answers 201 with another checksum (the real ingester checks
    the element's own): the client compares and says so, exit 1."""
    source = make_source(tmp_path / "liar.bin", 200_000, seed=5)

    async def handler(request: Request) -> Response:
        return Response.json(
            {"file_id": "f-1", "file_size": source.size, "checksum": "0" * 64}, status=201
        )

    with trio.fail_after(60):
        async with serve_http(handler) as server:
            run = await run_upload(
                str(source.path),
                "--description",
                "née",
                "--metadata",
                '{"k": 1}',
                env=client_env(cache, INGESTER_URL=server.url, INGESTER_TOKEN="t0k"),
            )
            [request] = server.requests
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"ingester upload: {source.path}: not stored: checksum mismatch: the stored file f-1 "
        f"has sha256 {'0' * 64}, the local file {source.sha256}"
    ]
    headers = request.headers
    assert headers["authorization"] == "Bearer t0k"
    assert len(headers["idempotency-key"]) == 32
    digest = base64.b64encode(hashlib.sha256(source.path.read_bytes()).digest()).decode()
    assert headers["content-digest"] == f"sha-256=:{digest}:"
    assert int(headers["content-length"]) == len(request.body)
    # The fields first, then the file: the ingester chooses the element before the bytes.
    body = request.body
    order = [
        body.index(f'name="{name}"'.encode())
        for name in ("retention_policy", "description", "metadata", "file")
    ]
    assert order == sorted(order)
    assert "née".encode() in body
    assert source.path.read_bytes() in body


# --- the resumable path ----------------------------------------------------------------------


async def test_a_cut_mid_upload_resumes_in_the_same_run(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    size = 24 * MIB + 123  # above the 16 MiB threshold: tus
    source = make_source(tmp_path / "cut.bin", size, seed=21)
    received_before = await read_metric(stack.url, TUS_METRIC)

    async def body(proxy: FaultProxy) -> None:
        env = client_env(cache, INGESTER_TOKEN=token())
        argv = ["--url", proxy.url, "--chunk-size", "1MiB", "--json", str(source.path)]
        runs: list[Run] = []
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                runs.append(await run_upload(*argv, env=env))

            proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=8 * MIB))
            nursery.start_soon(client)
            await eventually(lambda: proxy.bytes_upstream >= 6 * MIB, timeout_s=30)
            proxy.set_plan(FaultPlan(Fault.CUT, after_bytes=0))
            # The client came back on a new connection (cut too): its first one was cut.
            await eventually(lambda: proxy.connections >= 2, timeout_s=30)
            proxy.heal()
        run = runs[0]
        assert run.returncode == 0, run.stderr
        [record] = run.records()
        await assert_stored(record, source, token())
        assert "retrying in" in run.stderr
        going_on = re.search(r"the server has ([0-9.]+) MiB; going on from there", run.stderr)
        assert going_on is not None, run.stderr
        assert float(going_on.group(1)) >= 4.0, "it did not resume from where it was"
        assert proxy.connections >= 2

    await through_proxy(stack, body)
    received = await read_metric(stack.url, TUS_METRIC) - received_before
    # Resumed, not restarted: at most the cut chunk (and one more on a slow machine) twice.
    assert size <= received <= size + 3 * MIB, received
    assert state_files(cache) == []


async def test_a_killed_client_resumes_when_run_again(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    size = 32 * MIB
    source = make_source(tmp_path / "killed.bin", size, seed=31)
    received_before = await read_metric(stack.url, TUS_METRIC)
    files_before = stack.all_files()

    async def body(proxy: FaultProxy) -> None:
        env = client_env(cache, INGESTER_TOKEN=token())
        argv = upload_argv("--url", proxy.url, "--chunk-size", "1MiB", str(source.path))
        proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=8 * MIB))
        first = await trio.lowlevel.open_process(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            await eventually(lambda: proxy.bytes_upstream >= 14 * MIB, timeout_s=30)
        finally:
            first.kill()
            await first.wait()
        assert first.returncode == -signal.SIGKILL
        [state_path] = state_files(cache)
        state = json.loads(state_path.read_text())
        assert state["kind"] == "tus"
        assert state["path"] == str(source.path)
        assert state["upload_url"].startswith(proxy.url + "/api/v1/uploads/")
        proxy.heal()
        second = await run_upload(
            "--url", proxy.url, "--chunk-size", "1MiB", str(source.path), env=env
        )
        assert second.returncode == 0, second.stderr
        resumed = re.search(r"resuming an interrupted upload at ([0-9.]+) MiB", second.stderr)
        assert resumed is not None, second.stderr
        assert float(resumed.group(1)) >= 8.0
        [line] = second.stdout.splitlines()
        assert line.startswith(f"{source.path}: stored 32.0 MiB as ")
        assert "sha256 verified; resumed at" in line
        file_id = re.search(r" as (\S+) on (\S+) ", line)
        assert file_id is not None
        record = {
            "file_id": file_id.group(1),
            "storage_element_url": stack.se_edit.url,
        }
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            assert await stored_sha256(http, record, token()) == source.sha256

    await through_proxy(stack, body)
    received = await read_metric(stack.url, TUS_METRIC) - received_before
    # Well under twice the file: the second run sent only what the server did not have.
    assert size <= received <= size * 1.4, received
    assert state_files(cache) == []
    assert len(stack.all_files() - files_before) == 2  # one file and its .attr.json


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_ctrl_c_keeps_the_state_and_says_how_to_resume(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    source = make_source(tmp_path / "interrupted.bin", 20 * MIB, seed=51)

    async def body(proxy: FaultProxy) -> None:
        proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=4 * MIB))
        with trio.fail_after(CLIENT_TIMEOUT_S):
            process = await trio.lowlevel.open_process(
                upload_argv("--url", proxy.url, str(source.path)),
                env=client_env(cache, INGESTER_TOKEN=token()),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # A command started in the background by a shell without job control
                # inherits an ignored SIGINT (as `make test &` does to every child): the
                # client is then right to ignore Ctrl-C. This one is a foreground command.
                preexec_fn=_sigint_default,
            )
            assert process.stdout is not None
            assert process.stderr is not None
            async with process.stdout, process.stderr:
                await eventually(lambda: proxy.bytes_upstream >= 2 * MIB, timeout_s=30)
                process.send_signal(signal.SIGINT)
                await process.wait()
                stderr = b"".join([chunk async for chunk in process.stderr])
                stdout = b"".join([chunk async for chunk in process.stdout])
        assert process.returncode == 130
        assert stdout == b""
        assert stderr.decode().splitlines() == [
            "ingester upload: interrupted; run the same command again to resume"
        ]
        [state] = state_files(cache)
        assert json.loads(state.read_text())["kind"] == "tus"

    await through_proxy(stack, body)


async def test_an_interrupted_upload_is_resumed_unless_no_resume_is_given(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    """A state file an earlier run left (planted here: an upload with its first 4 MiB on
    the server) is resumed; --no-resume drops that upload on the server and starts afresh;
    an upload the server no longer has is started afresh."""
    size = 20 * MIB
    source = make_source(tmp_path / "planted.bin", size, seed=41)
    headers = {**auth(token()), "Tus-Resumable": "1.0.0"}
    with trio.fail_after(90):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:

            async def plant() -> str:
                created = await http.post(
                    stack.url + "/api/v1/uploads",
                    headers={
                        **headers,
                        "Upload-Length": str(size),
                        "Upload-Metadata": "filename " + base64.b64encode(b"planted.bin").decode(),
                    },
                )
                assert created.status_code == 201, created.text
                url = stack.url + created.headers["Location"]
                patched = await http.patch(
                    url,
                    content=source.path.read_bytes()[: 4 * MIB],
                    headers={
                        **headers,
                        "Upload-Offset": "0",
                        "Content-Type": "application/offset+octet-stream",
                    },
                )
                assert patched.status_code == 204, patched.text
                info = source.path.stat()
                key = state_key(source.path, size, info.st_mtime_ns, stack.url)
                directory = cache_dir({"XDG_CACHE_HOME": str(cache)})
                directory.mkdir(parents=True, exist_ok=True)
                (directory / f"{key}.json").write_text(
                    json.dumps(
                        {
                            "key": key,
                            "kind": "tus",
                            "path": str(source.path),
                            "size": size,
                            "mtime_ns": info.st_mtime_ns,
                            "target": stack.url,
                            "options": json.dumps(["temporary", False, None, None]),
                            "upload_url": url,
                        }
                    )
                )
                return url

            env = client_env(cache, INGESTER_TOKEN=token(), INGESTER_URL=stack.url)
            resumed_url = await plant()
            resumed = await run_upload("--json", str(source.path), env=env)
            assert resumed.returncode == 0, resumed.stderr
            assert "resuming an interrupted upload at 4.0 MiB of 20.0 MiB" in resumed.stderr
            [record] = resumed.records()
            assert record["upload_id"] == resumed_url.rsplit("/", 1)[1]
            await assert_stored(record, source, token())

            dropped_url = await plant()
            fresh = await run_upload("--json", "--no-resume", str(source.path), env=env)
            assert fresh.returncode == 0, fresh.stderr
            assert "resuming" not in fresh.stderr
            [record] = fresh.records()
            assert record["upload_id"] != dropped_url.rsplit("/", 1)[1]
            await assert_stored(record, source, token())
            gone = await http.head(dropped_url, headers=headers)
            assert gone.status_code == 404

            # An upload that is gone from the server (expired, removed) starts afresh.
            removed_url = await plant()
            removed = await http.delete(removed_url, headers=headers)
            assert removed.status_code == 204
            afresh = await run_upload("--json", str(source.path), env=env)
            assert afresh.returncode == 0, afresh.stderr
            assert "the interrupted upload is gone from the server" in afresh.stderr
            [record] = afresh.records()
            assert record["upload_id"] != removed_url.rsplit("/", 1)[1]
            await assert_stored(record, source, token())
    assert state_files(cache) == []


# --- output ----------------------------------------------------------------------------------


async def test_without_a_terminal_one_plain_line_per_file(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    small = make_source(tmp_path / "a.txt", 1000, seed=1)
    large = make_source(tmp_path / "b.bin", 17 * MIB, seed=2)
    run = await run_upload(
        "--url",
        stack.url,
        "--retention",
        "permanent",
        str(small.path),
        str(large.path),
        env=client_env(cache, INGESTER_TOKEN=token()),
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(
        rf"{re.escape(str(small.path))}: stored 1000 B as \S+ on se-rw \(permanent\) "
        r"in [0-9.]+ s; sha256 verified",
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        rf"{re.escape(str(large.path))}: stored 17.0 MiB as \S+ on se-rw \(permanent\) "
        r"in [0-9.]+ s, [0-9.]+ [KMG]iB/s; sha256 verified",
        lines[1],
    ), lines[1]
    assert lines[2] == "2 of 2 files stored"
    assert "\r" not in run.stdout
    assert "\x1b" not in run.stdout


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_on_a_terminal_a_progress_bar_with_bytes_rate_and_eta(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    source = make_source(tmp_path / "tty.bin", 20 * MIB, seed=3)

    async def body(proxy: FaultProxy) -> None:
        # About 3 s: the bar redraws several times.
        proxy.set_plan(FaultPlan(Fault.THROTTLE, bytes_per_s=8 * MIB))
        controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        try:
            process = await trio.lowlevel.open_process(
                upload_argv("--url", proxy.url, str(source.path)),
                env=client_env(cache, INGESTER_TOKEN=token(), TERM="xterm"),
                stdin=terminal,
                stdout=terminal,
                stderr=terminal,
            )
            os.close(terminal)
            terminal = -1
            output = await trio.to_thread.run_sync(_read_all, controller)
            await process.wait()
        finally:
            os.close(controller)
            if terminal >= 0:
                os.close(terminal)
        assert process.returncode == 0, output
        screen = output.decode(errors="replace")
        frames = [frame for frame in re.split(r"[\r\n]", screen) if "%|" in frame]
        assert len(frames) >= 3, screen
        # Bytes done of the total, elapsed<ETA, and the rate.
        moving = [
            f
            for f in frames
            if re.match(r"tty\.bin: +\d+%\|.*\| \d+(\.\d+)?M/20\.0M \[\d\d:\d\d<\d\d:\d\d, ", f)
        ]
        assert moving, frames
        assert any(re.search(r"[0-9.]+[kM]B/s", f) for f in frames), frames
        assert f"{source.path}: stored 20.0 MiB as " in screen

    await through_proxy(stack, body)


# --- failures and exit codes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: PATH"),
        (("missing.bin",), "missing.bin: no such file"),
        ((".",), ".: is a directory"),
        (("--metadata", "[1]", "f.txt"), "--metadata must be a JSON object"),
        (("--metadata", "{oops", "f.txt"), "--metadata is not JSON"),
        (("--retention", "forever", "f.txt"), "invalid choice: 'forever'"),
        (("--chunk-size", "1k", "f.txt"), "--chunk-size must be at least"),
        (("--url", "ftp://x", "f.txt"), "--url must be an http(s) URL"),
    ],
)
async def test_usage_errors_exit_2_and_send_nothing(
    tmp_path: Path, cache: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "f.txt").write_text("x")
    with trio.fail_after(30):
        done = await trio.run_process(
            upload_argv(*args),
            env=client_env(cache, INGESTER_TOKEN="t", INGESTER_URL="http://127.0.0.1:9"),
            cwd=tmp_path,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    assert state_files(cache) == []


async def test_no_token_is_a_usage_error(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    run = await run_upload(str(tmp_path / "f.txt"), env=client_env(cache))
    assert run.returncode == 2
    assert run.stderr == (
        "ingester upload: no token: pass --token or set INGESTER_TOKEN "
        "(the dev stack prints one; `ingester token` makes more)\n"
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("expired", r"the server refused the token \(401 UNAUTHORIZED: [^)]*\): "
                    r"it expired 10 min ago; get a new one \(dev stack: ingester token "),
        ("refresh", r"the server refused the token \(401 UNAUTHORIZED: [^)]*\): "
                    r"it is a refresh token; uploads need an access token"),
        ("garbage", r"the server refused the token \(401 UNAUTHORIZED: [^)]*\): "
                    r"it is not a JWT; check --token or INGESTER_TOKEN"),
        ("readonly", r"the token may not upload \(403 FORBIDDEN: .*\); its role is readonly: "
                     r"ask for a token with role admin, operator, super_admin or user, or the "
                     r"files:write scope"),
    ],
)  # fmt: skip
async def test_a_refused_token_is_explained_and_no_other_file_is_tried(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path, kind: str, expected: str
) -> None:
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: token(ttl=-600),
        "refresh": lambda: token(token_type="refresh"),
        "garbage": lambda: "not-a-token",
        "readonly": lambda: token(role="readonly"),
    }
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    first.write_text("one")
    second.write_text("two")
    before = stack.all_files()
    run = await run_upload(
        "--url",
        stack.url,
        str(first),
        str(second),
        env=client_env(cache, INGESTER_TOKEN=tokens[kind]()),
    )
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(
        rf"ingester upload: {re.escape(str(first))}: not stored: {expected}.*", lines[0]
    ), lines[0]
    assert lines[1] == f"ingester upload: {second}: not tried: the token was refused"
    assert run.stdout == "0 of 2 files stored\n"
    assert stack.all_files() == before
    assert state_files(cache) == []


async def test_a_refusal_after_an_answer_was_lost_keeps_the_key_for_the_rerun(
    token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    """Found by a review. The first request was stored but its answer lost; the retry was
    refused `401` (the token had expired meanwhile), and the client removed the state that
    held the request's `Idempotency-Key`: run again with a fresh token, it sent a new key
    and the file was stored twice. The key is kept after any attempt whose answer was lost,
    and the rerun replays it. (A server that dedupes by key, as the ingester does.)"""
    source = make_source(tmp_path / "doc.bin", 200_000, seed=5)
    stored: dict[str, dict[str, Any]] = {}
    plan = ["store, answer lost", "401"]

    async def server(request: Request) -> Response:
        key = request.headers["idempotency-key"]
        step = plan.pop(0) if plan else "answer"
        if step == "401":
            refused = Response.json(
                {"error": {"code": "UNAUTHORIZED", "message": "the token has expired"}}, 401
            )
            refused.headers.append(("www-authenticate", 'Bearer error="invalid_token"'))
            return refused
        replayed = key in stored
        stored.setdefault(key, {
            "file_id": f"file-{len(stored)}", "original_filename": source.path.name,
            "file_size": source.size, "checksum": source.sha256,
        })  # fmt: skip
        if step == "store, answer lost":
            raise DropConnection()
        answer = Response.json(stored[key], 201)
        if replayed:
            answer.headers.append(("idempotent-replayed", "true"))
        return answer

    async with serve_http(server) as fake:
        env = client_env(cache, INGESTER_TOKEN=token(), INGESTER_URL=fake.url)
        first = await run_upload("--json", str(source.path), env=env)
        assert first.returncode == 1, first
        assert "not stored" in first.stderr
        assert len(state_files(cache)) == 1  # the key is kept
        again = await run_upload("--json", str(source.path), env=env)
    assert again.returncode == 0, again
    (record,) = again.records()
    assert record["file_id"] == "file-0"
    assert len(stored) == 1, "the file was stored twice"
    assert state_files(cache) == []


async def test_a_tus_creation_whose_answer_was_lost_gets_the_upload_it_made(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    """Found by a review: a creation that reached the server but whose answer was lost was
    sent again as a new one, and the first (empty) upload held the user's quota until it
    expired. The creation now carries an Idempotency-Key, kept in the state before it is
    sent: the repeat gets the upload the first one made. Through a relay to the real
    ingester that drops the first creation's answer."""
    source = make_source(tmp_path / "doc.bin", 300_000, seed=9)
    created = await read_metric(stack.url, "ingester_tus_uploads_total", event="created")
    creations: list[str] = []
    async with httpx.AsyncClient(trust_env=False, timeout=30) as upstream:

        async def relay(request: Request) -> Response:
            headers = {
                k: v for k, v in request.headers.items() if k not in ("host", "content-length")
            }
            answer = await upstream.request(
                request.method, stack.url + request.target, headers=headers, content=request.body
            )
            if request.method == "POST" and request.path == "/api/v1/uploads":
                creations.append(request.headers.get("idempotency-key", ""))
                if len(creations) == 1:
                    raise DropConnection()  # made on the server; the client never hears
            kept = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS]
            return Response(answer.status_code, answer.content, kept)

        async with serve_http(relay) as fake:
            env = client_env(cache, INGESTER_TOKEN=token(), INGESTER_URL=fake.url)
            run = await run_upload("--json", "--resumable-above", "0", str(source.path), env=env)
    assert run.returncode == 0, run
    (record,) = run.records()
    await assert_stored(record, source, token())
    assert len(creations) == 2
    assert creations[0] == creations[1] != ""
    after = await read_metric(stack.url, "ingester_tus_uploads_total", event="created")
    assert after - created == 1, "the creation made a second upload"
    assert state_files(cache) == []


HOP_HEADERS: Final = frozenset(
    {"content-length", "transfer-encoding", "connection", "date", "server"}
)


async def test_a_tus_location_on_another_server_gets_no_token(
    token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    """Found by a review: the creation's `Location` was followed wherever it pointed, and
    every later request of the upload (with the user's token) went there. An upload URL on
    another origin is refused, and nothing reaches that server."""
    source = make_source(tmp_path / "doc.bin", 100_000, seed=6)
    async with serve_http(lambda _: _never()) as elsewhere:

        async def server(request: Request) -> Response:
            created = Response(201)
            created.headers += [
                ("location", f"{elsewhere.url}/api/v1/uploads/abc"),
                ("tus-resumable", "1.0.0"),
                ("upload-offset", "0"),
            ]
            return created

        async with serve_http(server) as fake:
            env = client_env(cache, INGESTER_TOKEN=token(), INGESTER_URL=fake.url)
            run = await run_upload("--resumable-above", "0", str(source.path), env=env)
        assert elsewhere.requests == []
    assert run.returncode == 1, run
    assert "named another server for the upload" in run.stderr
    assert token() not in run.stderr


async def _never() -> Response:
    raise AssertionError("the other server was asked")


async def test_one_failed_file_exits_1_and_the_others_are_stored(
    stack: Stack, token: TokenFactory, tmp_path: Path, cache: Path
) -> None:
    limited = await trio.to_thread.run_sync(
        lambda: stack.start_ingester("limited", INGESTER_MAX_FILE_SIZE=str(MIB))
    )
    try:
        ok = make_source(tmp_path / "ok.bin", 100_000, seed=7)
        big = make_source(tmp_path / "big.bin", 2 * MIB, seed=8)
        ok2 = make_source(tmp_path / "ok2.bin", 50_000, seed=9)
        run = await run_upload(
            "--url",
            limited.url,
            "--json",
            str(ok.path),
            str(big.path),
            str(ok2.path),
            env=client_env(cache, INGESTER_TOKEN=token()),
        )
    finally:
        await trio.to_thread.run_sync(limited.terminate)
    assert run.returncode == 1
    [line] = run.stderr.splitlines()
    assert line.startswith(f"ingester upload: {big.path}: not stored: 413 FILE_TOO_LARGE: "), line
    records = run.records()
    assert [r["original_filename"] for r in records] == ["ok.bin", "ok2.bin"]
    for record, source in zip(records, (ok, ok2), strict=True):
        await assert_stored(record, source, token())
    # The refused file's key is freed on the server: nothing left to resume.
    assert state_files(cache) == []
