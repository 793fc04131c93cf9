"""Benchmark plumbing: processes, clients, measurements. Everything on 127.0.0.1.

The client is curl (C, one process per upload), the same for direct and through-ingester
runs, so the ratio compares the servers and not two clients. Peak RSS is the kernel's own
high-water mark (`VmHWM`), reset before each scenario through `/proc/<pid>/clear_refs`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ingester.auth.tokens import generate_keypair, make_token
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
# One client run (an upload, or a burst of them), at the slowest this machine has run: tens
# of MiB/s for a GiB. A server that hangs fails the bench (subprocess.TimeoutExpired) instead
# of holding it forever.
CLIENT_TIMEOUT_S: Final = 600


@dataclass
class Bench:
    root: Path
    token: str
    se: StorageElementProcess
    ingester: ManagedProcess

    def upload_url(self, direct: bool) -> str:
        return (self.se.url if direct else self.ingester.url) + "/api/v1/files/upload"


@contextmanager
def bench_stack(ingester_env: dict[str, str] | None = None) -> Iterator[Bench]:
    root = Path(tempfile.mkdtemp(prefix="ingester-bench-"))
    procs: list[ManagedProcess] = []
    try:
        private, public = generate_keypair(root / "keys")
        se = start_storage_element(root, element_id="se-bench", mode="edit", public_key=public)
        procs.append(se)
        env = {"INGESTER_LOG_LEVEL": "WARNING", "INGESTER_MAX_UPLOADS_IN_FLIGHT": "256",
               "INGESTER_MAX_UPLOADS_PER_USER": "256"}  # fmt: skip
        env.update(ingester_env or {})
        ingester = start_ingester(
            root, name="ingester", public_key=public, elements=[se.registry_entry()], env=env
        )
        procs.append(ingester)
        ingester.wait_ready()
        token = make_token(private.read_bytes(), sub="bench", role="user", ttl=24 * 3600)
        yield Bench(root, token, se, ingester)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        shutil.rmtree(root, ignore_errors=True)


def make_file(path: Path, size: int, *, compressible: bool) -> Path:
    """Write `size` bytes: random (incompressible) or log-like text."""
    from tests.support.client import random_chunks, text_chunks

    chunks = text_chunks(size) if compressible else random_chunks(size, seed=42)
    with open(path, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
    return path


def curl_upload_argv(url: str, token: str, path: Path, fields: Sequence[str] = ()) -> list[str]:
    argv = [
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}\n",
        "-H", f"Authorization: Bearer {token}", "-H", "Expect:",
    ]  # fmt: skip
    for field in fields:
        argv += ["-F", field]
    argv += ["-F", f"file=@{path};type=application/octet-stream", url]
    return argv


def run_uploads(argvs: Sequence[list[str]]) -> tuple[float, list[tuple[int, float]]]:
    """Run the curl commands all at once; wall time and (status, seconds) of each."""
    started = time.perf_counter()
    deadline = started + CLIENT_TIMEOUT_S
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
    results: list[tuple[int, float]] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.perf_counter()))
            parts = out.decode().split()
            if len(parts) >= 2:
                results.append((int(parts[0]), float(parts[1])))
            else:
                results.append((0, 0.0))
                print("curl failed:", err.decode()[:200])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return time.perf_counter() - started, results


def reset_peak_rss(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def clear_data(se: StorageElementProcess) -> None:
    """Remove stored files between runs so the element's disk does not fill up."""
    for path in se.data_dir.glob("*"):
        if path.is_file():
            path.unlink()


def save(results: dict[str, object], name: str) -> Path:
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def cpu_count() -> int:
    return os.cpu_count() or 1


def add_env_option(parser: argparse.ArgumentParser) -> None:
    """`--env INGESTER_X=VALUE` (repeatable): settings of the ingester under test."""
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="INGESTER_X=VALUE",
        help="a setting of the ingester under test (repeatable)",
    )


def env_option(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.env)
