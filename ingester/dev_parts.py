"""The parts of `ingester dev` that its single and replica modes share: child processes
stopped with the stack, the two reference Storage Elements, and the banner."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import httpx
import trio

from .settings import SEMode, StorageElementConfig

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 5.0
# A day: long enough for a working session of copy-pasted curl lines.
DEV_TOKEN_TTL_S: Final = 24 * 3600


class ChildProcess:
    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.process: trio.Process | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = await trio.to_thread.run_sync(lambda: open(self.log_path, "ab"))  # noqa: SIM115
        try:
            self.process = await trio.lowlevel.open_process(
                self.argv,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        finally:
            handle.close()

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def wait_answering(url: str, child: ChildProcess, probe: str = "/health/live") -> None:
    """Until `url` + `probe` answers 200, within the start-up timeout; fails at once when
    `child` has exited."""
    async with httpx.AsyncClient(trust_env=False) as http:
        with trio.fail_after(STARTUP_TIMEOUT_S):
            while True:
                if child.process is not None and child.process.returncode is not None:
                    raise RuntimeError(
                        f"{child.name} exited with {child.process.returncode}; see {child.log_path}"
                    )
                try:
                    if (await http.get(url + probe, timeout=1.0)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)


async def start_elements(
    stack: AsyncExitStack, host: str, port: int, data_dir: Path, public_key: Path
) -> list[StorageElementConfig]:
    """The two reference Storage Elements on `port + 1` and `port + 2`, healthy."""
    elements = [("se-edit", SEMode.EDIT, port + 1), ("se-rw", SEMode.RW, port + 2)]
    children: list[ChildProcess] = []
    for element_id, mode, se_port in elements:
        argv = [
            sys.executable, "-m", "ingester", "storage-element",
            "--mode", mode.value, "--port", str(se_port), "--host", host,
            "--data-dir", str(data_dir / element_id), "--public-key", str(public_key),
            "--id", element_id,
        ]  # fmt: skip
        child = ChildProcess(element_id, argv, data_dir / "logs" / f"{element_id}.log")
        await child.start()
        stack.push_async_callback(child.stop)
        children.append(child)
    for child, (_, _, se_port) in zip(children, elements, strict=True):
        await wait_answering(f"http://{host}:{se_port}", child)
    return [
        StorageElementConfig(id=element_id, api_url=f"http://{host}:{se_port}", mode=mode)
        for element_id, mode, se_port in elements
    ]


def _ingester_command() -> str:
    """How to run this `ingester` from the user's shell: the console script beside this
    interpreter (the venv's, which `make run` does not put on PATH), else `python -m`."""
    script = Path(sys.executable).parent / "ingester"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m ingester"
    relative = os.path.relpath(script)
    return shlex.quote(script.as_posix() if relative.startswith("..") else relative)


def print_banner(
    url: str,
    binds: list[str],
    token: str,
    data_dir: Path,
    key: Path,
    *,
    topology: Sequence[str] = (),
) -> None:
    rel = os.path.relpath(data_dir)
    lines = [
        "",
        f"artStore Ingester (dev) on {url}   [bound: {', '.join(binds)}]",
        *topology,
        f"  Storage Elements: se-edit (temporary) and se-rw (permanent), data under {rel}/",
        f"  API docs: {url}/docs   (OpenAPI: {url}/openapi.json)",
        f"  token (user, 24 h; more with: ingester token --key {os.path.relpath(key)}):",
        f"    export TOKEN={token}",
        "  try:",
        "    echo 'hello artStore' > /tmp/hello.txt",
        f'    curl -sS -H "Authorization: Bearer $TOKEN" -F retention_policy=temporary '
        f"-F file=@/tmp/hello.txt {url}/api/v1/files/upload",
        f"    ls {shlex.quote(rel)}/se-edit/",
        "  or with the command-line client (resumable, progress bar; any size):",
        f'    {_ingester_command()} upload --url {url} --token "$TOKEN" /tmp/hello.txt',
        "  Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
