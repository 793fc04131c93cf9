"""Real processes for integration and chaos tests: start, wait until they answer, stop.

Each process runs in a session of its own (so a stray child of it can be found and killed
with the whole group), writes stdout and stderr to a log file, and is killed and reaped when
its context exits, whatever the test did: no zombies, no leaked processes. A start-up that
fails raises `ProcessStartError` carrying the tail of the log, so a CI failure says why.

    async with ManagedProcess(argv, url=url, log_path=tmp_path / "x.log") as proc:
        ...                       # proc.pid, proc.url, await proc.terminate(), proc.kill()

or, for the reference Storage Element:

    async with contextlib.AsyncExitStack() as stack:
        se = await start_storage_element(stack, tmp_path=tmp_path, mode="edit", ...)
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

import httpx
import trio

LOOPBACK: Final = "127.0.0.1"
# Python, the app and its imports: a few seconds on a loaded CI machine, rarely more.
DEFAULT_STARTUP_TIMEOUT_S: Final = 30.0
# A server that drains for longer than this on SIGTERM is killed.
DEFAULT_TERMINATE_TIMEOUT_S: Final = 15.0
# Fast enough not to slow tests down, slow enough not to burn a core.
POLL_INTERVAL_S: Final = 0.02
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


async def _wait_exited(pid: int) -> None:
    """Until the child has exited, without reaping it (see `_exited`)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already reaped
    except (AttributeError, OSError):
        # No pidfd (not Linux 5.3+): poll, as nothing else reports an exit without reaping.
        while not _exited(pid):  # noqa: ASYNC110
            await trio.sleep(POLL_INTERVAL_S)
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


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
    """One child process and its lifetime; an async context manager.

    Entering starts it and waits until `url + ready_path` answers 200; leaving kills its
    whole process group and reaps it. In between: `terminate()`, `kill()`,
    `stop_signal()`/`cont_signal()` (SIGSTOP/SIGCONT, for chaos tests), `wait()`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        url: str,
        log_path: Path,
        ready_path: str | None = "/health/live",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        self.argv = list(argv)
        self.url = url.rstrip("/")
        self.log_path = log_path
        self.ready_path = ready_path
        self.env = child_env() if env is None else dict(env)
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self._process: trio.Process | None = None
        self._returncode: int | None = None

    # --- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Spawn the process and wait until it is ready; on failure it is killed."""
        if self._process is not None:
            raise RuntimeError("already started")
        log_fd = await trio.to_thread.run_sync(_open_log, self.log_path, self.argv)
        try:
            self._process = await trio.lowlevel.open_process(
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
            if self.ready_path is not None:
                await self._wait_ready()
        except BaseException:
            await self.aclose()
            raise

    async def _wait_ready(self) -> None:
        assert self.ready_path is not None
        probe = self.url + self.ready_path
        async with httpx.AsyncClient(trust_env=False, timeout=2.0) as client:
            with trio.move_on_after(self.startup_timeout_s):
                while True:
                    if _exited(self.pid):
                        code = await self._reap()
                        raise self._start_error(f"exited with status {code} during start-up")
                    try:
                        response = await client.get(probe)
                    except httpx.TransportError:
                        pass
                    else:
                        if response.status_code == 200:
                            return
                    await trio.sleep(POLL_INTERVAL_S)
        raise self._start_error(f"{probe} did not answer 200 within {self.startup_timeout_s:g} s")

    def _start_error(self, reason: str) -> ProcessStartError:
        tail = self.log_tail()
        message = (
            f"{self.argv[0]} (pid {self.pid}) {reason}; last lines of {self.log_path}:\n{tail}"
        )
        # Also straight to stderr: pytest shows it even when the exception is swallowed.
        print(message, file=sys.stderr)
        return ProcessStartError(message)

    async def aclose(self) -> None:
        """Kill the whole process group and reap; safe to call more than once."""
        with trio.CancelScope(shield=True):
            if self._process is not None and self._returncode is None:
                self._signal_group(signal.SIGKILL)
                await self._reap()

    # --- state -------------------------------------------------------------------------------

    @property
    def process(self) -> trio.Process:
        if self._process is None:
            raise RuntimeError("not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (after `wait`, `terminate`, `kill` or exit)."""
        return self._returncode

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    # --- signals -----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Signal the process itself (not its group); a no-op once it was reaped."""
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop_signal(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def cont_signal(self) -> None:
        self.send_signal(signal.SIGCONT)

    async def terminate(self, timeout_s: float = DEFAULT_TERMINATE_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; the exit status."""
        if self._returncode is not None:
            return self._returncode
        self.send_signal(signal.SIGTERM)
        # A stopped process would hold the SIGTERM until continued.
        self.send_signal(signal.SIGCONT)
        if not await self._exited_within(timeout_s):
            self._signal_group(signal.SIGKILL)
        return await self._reap()

    async def kill(self) -> int:
        """SIGKILL to the whole group, then reap; the exit status (-9 unless it had exited)."""
        if self._returncode is not None:
            return self._returncode
        self._signal_group(signal.SIGKILL)
        return await self._reap()

    async def wait(self) -> int:
        """Wait until it exits by itself (put a timeout around this), and reap it."""
        if self._returncode is not None:
            return self._returncode
        await _wait_exited(self.pid)
        return await self._reap()

    async def _exited_within(self, timeout_s: float) -> bool:
        with trio.move_on_after(timeout_s):
            await _wait_exited(self.pid)
            return True
        return False

    def _signal_group(self, signum: int) -> None:
        # Only called before `_reap`: the group id is still this child's pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def _reap(self) -> int:
        process = self.process
        if _exited(self.pid):
            # Whatever it left behind in its group goes too, while the group id is ours.
            self._signal_group(signal.SIGKILL)
        with trio.move_on_after(REAP_TIMEOUT_S):
            self._returncode = await process.wait()
            return self._returncode
        raise RuntimeError(f"pid {self.pid} could not be reaped within {REAP_TIMEOUT_S:g} s")


class StorageElementProcess(ManagedProcess):
    """A reference Storage Element (`python -m ingester storage-element`)."""

    def __init__(
        self,
        *,
        mode: str,
        data_dir: Path,
        public_key: Path,
        element_id: str,
        port: int,
        log_path: Path,
        capacity_bytes: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        args = [
            "storage-element",
            "--mode",
            mode,
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--public-key",
            str(public_key),
            "--id",
            element_id,
        ]
        if capacity_bytes is not None:
            args += ["--capacity-bytes", str(capacity_bytes)]
        super().__init__(
            python_module_argv("ingester", *args, *extra_args),
            url=f"http://{LOOPBACK}:{port}",
            log_path=log_path,
            env=env,
            startup_timeout_s=startup_timeout_s,
        )
        self.mode = mode
        self.data_dir = data_dir
        self.tmp_dir = data_dir / ".tmp"
        self.public_key = public_key
        self.element_id = element_id
        self.port = port
        self.capacity_bytes = capacity_bytes
        self.extra_args = tuple(extra_args)


async def _hold(
    process: ManagedProcess, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    async with process:
        task_status.started()
        await trio.sleep_forever()


async def start_storage_element(
    nursery_or_stack: trio.Nursery | contextlib.AsyncExitStack,
    *,
    tmp_path: Path,
    mode: str,
    public_key: Path,
    element_id: str | None = None,
    capacity_bytes: int | None = None,
    port: int | None = None,
    data_dir: Path | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> StorageElementProcess:
    """Start a Storage Element on 127.0.0.1 and return it once `/health/live` answers.

    With an `AsyncExitStack` it is killed when the stack closes; with a nursery, when the
    nursery is cancelled (a task holds it until then). Data goes to `data_dir`, by default
    `tmp_path/<element_id>`, and the log to `tmp_path/<element_id>.log` (appended, so a
    restart on the same directory keeps both runs' logs).
    """
    element_id = element_id or f"se-{mode}"
    element = StorageElementProcess(
        mode=mode,
        data_dir=data_dir or tmp_path / element_id,
        public_key=public_key,
        element_id=element_id,
        port=port or free_port(),
        log_path=tmp_path / f"{element_id}.log",
        capacity_bytes=capacity_bytes,
        extra_args=extra_args,
        env=env,
    )
    if isinstance(nursery_or_stack, contextlib.AsyncExitStack):
        await nursery_or_stack.enter_async_context(element)
    else:
        await nursery_or_stack.start(_hold, element)
    return element


@dataclass
class DevStack:
    """`python -m ingester dev ...` as a developer runs it, once its banner is out."""

    process: trio.Process
    log: Path
    banner: str
    token: str


@contextlib.asynccontextmanager
async def dev_stack(tmp_path: Path, *args: str) -> AsyncIterator[DevStack]:
    """Start `ingester dev ARGS` in a session of its own (so Ctrl-C can reach its whole
    group), its output in `tmp_path/dev.log`, until the banner prints the token; the group
    is killed at the end when the test has not stopped it."""
    log = tmp_path / "dev.log"
    out = await trio.to_thread.run_sync(lambda: open(log, "wb"))  # noqa: SIM115
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "ingester", "dev", *args],
            env=child_env(),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        out.close()
    try:
        while "export TOKEN=" not in log.read_text():
            assert process.returncode is None, log.read_text()
            await trio.sleep(0.1)
        banner = log.read_text()
        found = re.search(r"export TOKEN=(\S+)", banner)
        assert found is not None, banner
        yield DevStack(process, log, banner, found.group(1))
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
