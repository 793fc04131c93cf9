"""`make bench-failover`: what the death of a Storage Element costs an upload.

    python -m bench.failover [--runs 15] [--size-mib 64]

Two reference elements, `se-a` (preferred) and `se-b`, and the ingester, all on 127.0.0.1;
curl is the client, as in `bench.run_all`. Each run uploads the same incompressible file
twice: once untouched (the baseline of that run), once with `se-a` SIGKILLed when half the
file has reached it. Then `se-a` is restarted on its port and data directory, and the next
run waits until the ingester sees it ready again.

- failover time: from the kill to `se-b` receiving the upload (its temporary file appears),
  polled every 0.5 ms from this process;
- the ingester's own `ingester_failover_seconds` for that upload (from the failure it saw
  to the upload stored on the next element, so it includes the rest of the upload);
- extra time: the killed upload's wall time minus the baseline's, same run.

Results go to bench/results/failover.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.harness import MIB, clear_data, curl_upload_argv, make_file, save
from ingester.auth.tokens import generate_keypair, make_token
from tests.support.chaos import temporary_sizes
from tests.support.metrics import metric
from tests.support.processes import (
    ManagedProcess,
    StorageElementProcess,
    start_ingester,
    start_storage_element,
)

PLAIN_FIELDS: Final = ["retention_policy=temporary", "compress=false"]
POLL_S: Final = 0.0005
WAIT_S: Final = 60.0


@dataclass
class FailoverStack:
    root: Path
    token: str
    se_a: StorageElementProcess
    se_b: StorageElementProcess
    ingester: ManagedProcess


@contextmanager
def failover_stack() -> Iterator[FailoverStack]:
    root = Path(tempfile.mkdtemp(prefix="ingester-bench-failover-"))
    procs: list[ManagedProcess] = []
    try:
        private, public = generate_keypair(root / "keys")
        se_a = start_storage_element(root, element_id="se-a", mode="edit", public_key=public)
        procs.append(se_a)
        se_b = start_storage_element(root, element_id="se-b", mode="edit", public_key=public)
        procs.append(se_b)
        env = {
            "INGESTER_LOG_LEVEL": "WARNING",
            # The restarted element is seen ready soon after it answers.
            "INGESTER_SE_PROBE_INTERVAL_S": "0.2",
        }
        ingester = start_ingester(
            root,
            name="ingester",
            public_key=public,
            elements=[se_a.registry_entry(priority=1), se_b.registry_entry(priority=2)],
            env=env,
        )
        procs.append(ingester)
        ingester.wait_ready()
        token = make_token(private.read_bytes(), sub="bench", role="user", ttl=24 * 3600)
        yield FailoverStack(root, token, se_a, se_b, ingester)
    finally:
        for proc in reversed(procs):
            proc.terminate()
        shutil.rmtree(root, ignore_errors=True)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> float:
    """Poll `check` every POLL_S; the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if check():
            return time.perf_counter()
        time.sleep(POLL_S)
    raise RuntimeError(f"timed out waiting for {what}")


def wait_se_a_ready(bench: FailoverStack) -> None:
    """Until the ingester would send the next upload to se-a again."""

    def ready() -> bool:
        body = httpx.get(bench.ingester.url + "/health/ready", timeout=2, trust_env=False).json()
        states = {e["id"]: (e["ready"], e["breaker"]) for e in body["storage_elements"]}
        return states.get("se-a") == (True, "closed")

    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError("se-a never came back")
        time.sleep(0.05)


def failover_histogram(bench: FailoverStack) -> tuple[float, float]:
    text = httpx.get(bench.ingester.url + "/metrics", timeout=5, trust_env=False).text
    return (
        metric(text, "ingester_failover_seconds_sum"),
        metric(text, "ingester_failover_seconds_count"),
    )


def start_upload(bench: FailoverStack, path: Path, out: Path) -> subprocess.Popen[bytes]:
    argv = curl_upload_argv(
        bench.ingester.url + "/api/v1/files/upload", bench.token, path, PLAIN_FIELDS
    )
    argv[argv.index("/dev/null")] = str(out)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish_upload(proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    status = stdout.decode().split()[0] if stdout else "000"
    if status != "201":
        raise RuntimeError(f"upload answered {status}: {out.read_text()[:300]} {stderr[:300]!r}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def one_run(bench: FailoverStack, path: Path, size: int) -> dict[str, float]:
    for se in (bench.se_a, bench.se_b):
        clear_data(se)
    wait_se_a_ready(bench)
    out = bench.root / "answer.json"

    started = time.perf_counter()
    baseline = finish_upload(start_upload(bench, path, out), out)
    baseline_s = time.perf_counter() - started
    if baseline["storage_element_id"] != "se-a":
        raise RuntimeError(f"the baseline went to {baseline['storage_element_id']}")

    before = failover_histogram(bench)
    started = time.perf_counter()
    upload = start_upload(bench, path, out)
    wait_until(lambda: any(s >= size // 2 for s in temporary_sizes(bench.se_a)), "half on se-a")
    killed_at = time.perf_counter()
    os.kill(bench.se_a.pid, signal.SIGKILL)
    receiving_at = wait_until(lambda: bool(temporary_sizes(bench.se_b)), "se-b receiving")
    result = finish_upload(upload, out)
    killed_s = time.perf_counter() - started
    if result["storage_element_id"] != "se-b":
        raise RuntimeError(f"the killed upload ended on {result['storage_element_id']}")
    after = failover_histogram(bench)
    bench.se_a.kill()  # reap it
    bench.se_a.start()  # same port, same data directory
    observed = after[0] - before[0] if after[1] - before[1] == 1 else float("nan")
    return {
        "baseline_s": baseline_s,
        "killed_s": killed_s,
        "extra_s": killed_s - baseline_s,
        "failover_s": receiving_at - killed_at,
        "ingester_failover_s": observed,
    }


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(len(ordered) * share)) - 1]


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(values), 4),
        "p99": round(percentile(values, 0.99), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    size = args.size_mib * MIB
    runs: list[dict[str, float]] = []
    with failover_stack() as bench:
        path = make_file(bench.root / "upload.bin", size, compressible=False)
        for n in range(args.runs):
            run = one_run(bench, path, size)
            runs.append(run)
            print(
                f"run {n + 1}/{args.runs}: failover {run['failover_s'] * 1000:.1f} ms, "
                f"baseline {run['baseline_s']:.3f} s, killed {run['killed_s']:.3f} s",
                flush=True,
            )
    observed = [r["ingester_failover_s"] for r in runs if not math.isnan(r["ingester_failover_s"])]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "runs": len(runs),
        "size_mib": args.size_mib,
        "failover_s": summarize([r["failover_s"] for r in runs]),
        "ingester_failover_s": summarize(observed) if observed else None,
        "baseline_s": summarize([r["baseline_s"] for r in runs]),
        "killed_s": summarize([r["killed_s"] for r in runs]),
        "extra_s": summarize([r["extra_s"] for r in runs]),
        "each": runs,
    }
    path = save(results, "failover")
    print(report(results))
    print(f"\nsaved to {path}")
    return 0


def report(r: dict[str, Any]) -> str:
    def ms(s: dict[str, float]) -> str:
        return f"p50 {s['p50'] * 1000:.1f} ms, p99 {s['p99'] * 1000:.1f} ms"

    def sec(s: dict[str, float]) -> str:
        return f"p50 {s['p50']:.3f} s, p99 {s['p99']:.3f} s"

    size, n = r["size_mib"], r["runs"]
    observed = r["ingester_failover_s"]
    rows = [
        (
            f"failover time, SIGKILL at half of {size} MiB → next element receiving ({n} runs)",
            ms(r["failover_s"]),
        ),
        (
            "`ingester_failover_seconds` (failure seen → stored on the next element)",
            sec(observed) if observed else "not reported",
        ),
        (f"{size} MiB upload, no kill (baseline, same runs)", sec(r["baseline_s"])),
        (f"{size} MiB upload, element killed halfway", sec(r["killed_s"])),
        ("extra time of the killed upload over its run's baseline", sec(r["extra_s"])),
    ]
    lines = ["| measure | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
