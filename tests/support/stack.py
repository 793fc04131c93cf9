"""A running stack for integration tests: reference Storage Elements and the ingester,
each a real process on a free loopback port, started from sync (module-scoped) fixtures.

The children run in a scratch working directory with every `INGESTER_*` variable of the
parent removed, so neither a developer's environment nor a `.env` file leaks into a test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx

from tests.support.processes import child_env, free_port

STARTUP_TIMEOUT_S: Final = 30.0
STOP_TIMEOUT_S: Final = 10.0


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    url: str
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.cwd.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with httpx.Client(trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
                try:
                    if http.get(self.url + "/health/live", timeout=1.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"{self.name} did not answer within {STARTUP_TIMEOUT_S}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def terminate(self) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@dataclass
class StorageElementProc(Proc):
    element_id: str = ""
    mode: str = "edit"
    data_dir: Path = field(default_factory=Path)

    def stored_files(self) -> list[Path]:
        """Every file in the data directory, temporary ones included (orphan checks)."""
        if not self.data_dir.exists():
            return []
        return sorted(p for p in self.data_dir.rglob("*") if p.is_file())

    def registry_entry(self, priority: int = 100) -> dict[str, object]:
        return {"id": self.element_id, "api_url": self.url, "mode": self.mode, "priority": priority}


def start_storage_element(
    root: Path,
    *,
    element_id: str,
    mode: str,
    public_key: Path,
    capacity_bytes: int | None = None,
    port: int | None = None,
    data_dir: Path | None = None,
    artstore_compat: bool = False,
) -> StorageElementProc:
    port = port or free_port()
    data_dir = data_dir or root / element_id / "data"
    argv = [
        sys.executable, "-m", "ingester", "storage-element",
        "--mode", mode, "--port", str(port), "--host", "127.0.0.1",
        "--data-dir", str(data_dir), "--public-key", str(public_key), "--id", element_id,
    ]  # fmt: skip
    if capacity_bytes is not None:
        argv += ["--capacity-bytes", str(capacity_bytes)]
    if artstore_compat:
        argv.append("--artstore-compat")
    proc = StorageElementProc(
        name=element_id,
        argv=argv,
        env=child_env({}),
        cwd=root / element_id,
        log_path=root / element_id / "se.log",
        url=f"http://127.0.0.1:{port}",
        element_id=element_id,
        mode=mode,
        data_dir=data_dir,
    )
    proc.start()
    return proc


def start_ingester(
    root: Path,
    *,
    name: str,
    public_key: Path,
    elements: list[dict[str, object]],
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Proc:
    port = port or free_port()
    settings = {
        "INGESTER_HOST": "127.0.0.1",
        "INGESTER_PORT": str(port),
        "INGESTER_AUTH_PUBLIC_KEY_PATH": str(public_key),
        "INGESTER_STORAGE_ELEMENTS": json.dumps(elements),
        "INGESTER_SPOOL_DIR": str(root / name / "spool"),
        "INGESTER_LOG_FORMAT": "json",
        "INGESTER_SE_PROBE_INTERVAL_S": "0.5",
    }
    settings.update(env or {})
    proc = Proc(
        name=name,
        argv=[sys.executable, "-m", "ingester", "serve"],
        env=child_env(settings),
        cwd=root / name,
        log_path=root / name / "ingester.log",
        url=f"http://127.0.0.1:{port}",
    )
    proc.start()
    return proc


def wait_ready(url: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                if http.get(url + "/health/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{url} never became ready")
