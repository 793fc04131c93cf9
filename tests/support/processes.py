"""Real processes for the tests and the benches: start, wait until they answer, stop.

One class, `ManagedProcess`, for every child a test starts: it runs in a session of its own
(so a stray child of it can be found and killed with the whole group), writes stdout and
stderr to a log file (appended: a restart keeps the earlier run's log above its own), and is
killed and reaped when its owner is done with it, whatever the test did: no zombies, no
leaked processes. A start-up that fails raises `ProcessStartError` carrying the tail of the
log, so a CI failure says why.

Its methods are plain blocking calls, for sync (module-scoped) fixtures and the benches:

    se = start_storage_element(root, element_id="se-a", mode="edit", public_key=key)
    ...                         # se.pid, se.url, se.terminate(), se.kill(), se.start() again
    se.terminate()

and the same object is an async context manager for trio tests; where it blocks (start-up,
waiting for an exit) it runs in a worker thread that a trio cancellation still stops:

    async with contextlib.AsyncExitStack() as stack:
        se = await stack.enter_async_context(StorageElementProcess(tmp_path, mode="edit", ...))
        se.kill()               # immediate: SIGKILL to the group, then reap
        await se.exited()       # until it exits by itself (put a timeout around this)

Children never see the parent's `INGESTER_*` variables (`child_env`): a test configures what
it runs, and neither a developer's environment nor a `.env` file leaks into it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, ParamSpec, Self, TypeVar

import trio

LOOPBACK: Final = "127.0.0.1"
# Python, the app and its imports: a few seconds on a loaded CI machine, rarely more.
DEFAULT_STARTUP_TIMEOUT_S: Final = 30.0
# An ingester's readiness (its elements probed) after it answers at all.
DEFAULT_READY_TIMEOUT_S: Final = 15.0
# A server that drains for longer than this on SIGTERM is killed.
DEFAULT_TERMINATE_TIMEOUT_S: Final = 15.0
# Fast enough not to slow tests down, slow enough not to burn a core.
POLL_INTERVAL_S: Final = 0.02
PROBE_TIMEOUT_S: Final = 2.0
LOG_TAIL_LINES: Final = 40
# Reaping after SIGKILL is immediate unless the kernel is in trouble; do not hang on it.
REAP_TIMEOUT_S: Final = 10.0


class ProcessStartError(RuntimeError):
    """The process exited or did not answer in time during start-up."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free right now on `host` (the usual small race until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port_run(count: int, host: str = LOOPBACK) -> int:
    """A port P with P .. P+count-1 all free right now (`ingester dev` takes port+1, port+2).

    Drawn below Linux's ephemeral range (32768-60999): a port the kernel hands out for
    outgoing connections must not be taken between this check and the bind.
    """
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind((host, port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no run of {count} free ports found")


def child_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without `INGESTER_*` (a test configures what it runs), unbuffered."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("INGESTER_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def python_module_argv(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this test run's interpreter."""
    return [sys.executable, "-m", module, *args]


# --- readiness probes: a callable that says whether the child answers yet -------------------


def http_ok(url: str) -> Callable[[], bool]:
    """Whether a GET of `url` answers 200 (no proxy; a fresh connection each time)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "") or "/"

    def probe() -> bool:
        connection = http.client.HTTPConnection(
            parts.hostname or LOOPBACK, parts.port, timeout=PROBE_TIMEOUT_S
        )
        try:
            connection.request("GET", target)
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    return probe


def tcp_open(port: int, host: str = LOOPBACK) -> Callable[[], bool]:
    """Whether something accepts TCP connections on `host:port`."""

    def probe() -> bool:
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
        except OSError:
            return False
        return True

    return probe


# --- waiting without reaping ---------------------------------------------------------------


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (WNOWAIT).

    Not reaping keeps its pid, and with it its process group id, ours until `_reap`:
    signalling the group can never hit an unrelated process that reused the number.
    """
    try:
        state = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return state is not None


def _pause(seconds: float, *, cancellable: bool) -> None:
    """`time.sleep`; in a trio worker thread (`trio.to_thread.run_sync`), and when
    `cancellable`, it raises `trio.Cancelled` first if the waiting trio task was cancelled."""
    if cancellable:
        with contextlib.suppress(RuntimeError):  # not a trio worker thread
            trio.from_thread.check_cancelled()
    time.sleep(seconds)


def _exited_within(pid: int, timeout_s: float | None, *, cancellable: bool) -> bool:
    """Until the child has exited (without reaping it) or `timeout_s` passed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not _exited(pid):
        left = POLL_INTERVAL_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return False
        _pause(min(left, POLL_INTERVAL_S), cancellable=cancellable)
    return True


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(log.tell() - 64 * 1024, 0))
            text = log.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _open_log(path: Path, argv: Sequence[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    # Appending: a restarted process keeps the earlier run's log above its own.
    os.write(fd, f"=== {' '.join(argv)}\n".encode())
    return fd


class ManagedProcess:
    """One child process and its lifetime.

    `start()` spawns it and waits until `ready()` holds (it is killed if that fails);
    `terminate()`, `kill()`, `wait()`, `close()` end it and reap it; `start()` again brings
    it back (same argv, same log). Blocking calls, safe from any thread; `async with` (and
    `exited()`, `aclose()`) does the same from trio.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        url: str = "",
        ready: Callable[[], bool] | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        """`ready` says when a start-up is done (`http_ok(url)`, `tcp_open(port)`); without
        it `start()` returns as soon as the process is spawned."""
        self.argv = list(argv)
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.ready = ready
        self.name = name or Path(self.argv[0]).name
        self.env = child_env() if env is None else dict(env)
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self._popen and self._popen.pid}>"

    # --- lifetime ----------------------------------------------------------------------------

    def start(self) -> Self:
        """Spawn the process and wait until it is ready; on failure it is killed."""
        if self._popen is not None and self._popen.returncode is None:
            raise RuntimeError(f"{self.name} is already running")
        if self.cwd is not None:
            self.cwd.mkdir(parents=True, exist_ok=True)
        log_fd = _open_log(self.log_path, self.argv)
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            os.close(log_fd)  # the child has its own copy
        try:
            if self.ready is not None:
                self._wait_until(self.ready, self.startup_timeout_s, "start-up")
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(
        self, path: str = "/health/ready", timeout_s: float = DEFAULT_READY_TIMEOUT_S
    ) -> None:
        """Until `url + path` answers 200 (an ingester's readiness, after its start-up). A
        process that never gets ready is killed, as one whose start-up failed: its caller
        gets the error, not the process, and nobody else would stop it (seen: an ingester
        of a failed fixture, still running half an hour after its test run)."""
        try:
            self._wait_until(http_ok(self.url + path), timeout_s, path)
        except BaseException:
            self.close()
            raise

    def _wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if _exited(self.pid):
                code = self._reap()
                raise self._start_error(f"exited with status {code} during {what}")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise self._start_error(f"{what} not done within {timeout_s:g} s")
            _pause(POLL_INTERVAL_S, cancellable=True)

    def _start_error(self, reason: str) -> ProcessStartError:
        message = (
            f"{self.name} (pid {self.pid}, {self.url or self.argv[0]}) {reason}; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )
        # Also straight to stderr: pytest shows it even when the exception is swallowed.
        print(message, file=sys.stderr)
        return ProcessStartError(message)

    def close(self) -> None:
        """Kill the whole process group and reap; safe to call more than once."""
        if self._popen is not None and self._popen.returncode is None:
            self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- from trio ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return await trio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """`close()` from trio, shielded: it runs when the test failed on a deadline too."""
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.close)

    async def exited(self) -> int:
        """`wait()` from trio: until it exits by itself (put a timeout around this)."""
        return await trio.to_thread.run_sync(self.wait)

    # --- state -------------------------------------------------------------------------------

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (after `wait`, `terminate`, `kill` or `close`)."""
        return None if self._popen is None else self._popen.returncode

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    # --- signals -----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Signal the process itself (not its group); a no-op once it was reaped."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop_signal(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def cont_signal(self) -> None:
        self.send_signal(signal.SIGCONT)

    def terminate(self, timeout_s: float = DEFAULT_TERMINATE_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL to the group if it has not exited within `timeout_s`;
        reaped; the exit status."""
        if self.returncode is not None:
            return self.returncode
        self.send_signal(signal.SIGTERM)
        # A stopped process would hold the SIGTERM until continued.
        self.send_signal(signal.SIGCONT)
        if not _exited_within(self.pid, timeout_s, cancellable=False):
            self._signal_group(signal.SIGKILL)
        return self._reap()

    def kill(self) -> int:
        """SIGKILL to the whole group, then reap; the exit status (-9 unless it had exited)."""
        if self.returncode is not None:
            return self.returncode
        self._signal_group(signal.SIGKILL)
        return self._reap()

    def wait(self, timeout_s: float | None = None) -> int:
        """Until it exits by itself, then reap; `TimeoutError` after `timeout_s`."""
        if self.returncode is not None:
            return self.returncode
        if not _exited_within(self.pid, timeout_s, cancellable=True):
            raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout_s} s")
        return self._reap()

    def _signal_group(self, signum: int) -> None:
        # Only called before `_reap`: the group id is still this child's pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def _reap(self) -> int:
        if _exited(self.pid):
            # Whatever it left behind in its group goes too, while the group id is ours.
            self._signal_group(signal.SIGKILL)
        try:
            return self.popen.wait(REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"pid {self.pid} could not be reaped within {REAP_TIMEOUT_S:g} s"
            ) from None


P = ParamSpec("P")
M = TypeVar("M", bound=ManagedProcess)


def _starter(make: Callable[P, M]) -> Callable[P, M]:
    """`make(...)`, started: for the sync fixtures and the benches."""

    def start(*args: P.args, **kwargs: P.kwargs) -> M:
        return make(*args, **kwargs).start()

    start.__doc__ = f"A started {make.__name__} (see there)."
    return start


class StorageElementProcess(ManagedProcess):
    """A reference Storage Element (`python -m ingester storage-element`) on 127.0.0.1.

    Its files are under `root/<element_id>/`: data in `data/` unless `data_dir` says
    otherwise, the log in `se.log`. `start()` again after a kill brings it back on the same
    port and data directory.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: str,
        public_key: Path,
        element_id: str | None = None,
        capacity_bytes: int | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        extra_args: Sequence[str] = (),
        artstore_compat: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.mode = mode
        self.element_id = element_id or f"se-{mode}"
        self.port = port or free_port()
        self.data_dir = data_dir or root / self.element_id / "data"
        self.tmp_dir = self.data_dir / ".tmp"
        self.public_key = public_key
        self.capacity_bytes = capacity_bytes
        self.extra_args = (*extra_args, *(["--artstore-compat"] if artstore_compat else []))
        args = [
            "storage-element", "--mode", mode, "--host", LOOPBACK, "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--public-key", str(public_key),
            "--id", self.element_id,
        ]  # fmt: skip
        if capacity_bytes is not None:
            args += ["--capacity-bytes", str(capacity_bytes)]
        url = f"http://{LOOPBACK}:{self.port}"
        super().__init__(
            python_module_argv("ingester", *args, *self.extra_args),
            log_path=root / self.element_id / "se.log",
            url=url,
            ready=http_ok(url + "/health/live"),
            name=self.element_id,
            env=env,
            cwd=root / self.element_id,
        )

    def stored_files(self) -> list[Path]:
        """Every file in the data directory, temporary ones included (orphan checks)."""
        if not self.data_dir.exists():
            return []
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())

    def registry_entry(self, priority: int = 100) -> dict[str, object]:
        return {"id": self.element_id, "api_url": self.url, "mode": self.mode, "priority": priority}


class IngesterProcess(ManagedProcess):
    """`python -m ingester serve` on 127.0.0.1 over `elements` (registry entries), JSON logs;
    under `root/<name>/`: its working directory, `spool/` and `ingester.log`. `env` adds
    to or overrides its `INGESTER_*` settings. Started means live; `wait_ready()` for ready.
    """

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        public_key: Path,
        elements: list[dict[str, object]],
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.spool_dir = root / name / "spool"
        settings = {
            "INGESTER_HOST": LOOPBACK,
            "INGESTER_PORT": str(self.port),
            "INGESTER_AUTH_PUBLIC_KEY_PATH": str(public_key),
            "INGESTER_STORAGE_ELEMENTS": json.dumps(elements),
            "INGESTER_SPOOL_DIR": str(self.spool_dir),
            "INGESTER_LOG_FORMAT": "json",
            "INGESTER_SE_PROBE_INTERVAL_S": "0.5",
            **(env or {}),
        }
        url = f"http://{LOOPBACK}:{self.port}"
        super().__init__(
            python_module_argv("ingester", "serve"),
            log_path=root / name / "ingester.log",
            url=url,
            ready=http_ok(url + "/health/live"),
            name=name,
            env=child_env(settings),
            cwd=root / name,
        )


start_storage_element = _starter(StorageElementProcess)
start_ingester = _starter(IngesterProcess)


@dataclass
class DevStack:
    """`python -m ingester dev ...` as a developer runs it, once its banner is out."""

    process: ManagedProcess
    log: Path
    banner: str
    token: str


@contextlib.asynccontextmanager
async def dev_stack(tmp_path: Path, *args: str) -> AsyncIterator[DevStack]:
    """Start `ingester dev ARGS` in a session of its own (so Ctrl-C can reach its whole
    group), its output in `tmp_path/dev.log`, until the banner prints the token; the group
    is killed at the end when the test has not stopped it."""
    log = tmp_path / "dev.log"

    def banner_out() -> bool:
        return "export TOKEN=" in log.read_text()

    argv = python_module_argv("ingester", "dev", *args)
    dev = ManagedProcess(argv, log_path=log, ready=banner_out, cwd=tmp_path, startup_timeout_s=60)
    async with dev as process:
        banner = log.read_text()
        found = re.search(r"export TOKEN=(\S+)", banner)
        assert found is not None, banner
        yield DevStack(process, log, banner, found.group(1))
