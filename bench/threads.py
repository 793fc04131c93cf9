"""Where each process's CPU goes, by thread: the event loop against the worker threads.

    python -m bench.threads [--shapes file_only,tus,concurrency] [--size-mib 1024] [--rounds 3]
                            [--env INGESTER_X=VALUE]

For each shape, one warm-up upload (it pays the new page-cache pages of the spool or the tus
data file, which later ones reuse), then `--rounds` measured ones, each straight to the
element and through the ingester. Per round it prints the throughput, the machine's busy
share over the upload (`/proc/stat`: under about 85% the cores were not what bound it), and,
per GiB, the user and system CPU-seconds of the ingester's and the element's event loop (the
main thread) and of their worker threads together (`/proc/PID/task/*/stat`).

    file_only     curl -F file=@x
    tus           curl, 8 MiB PATCHes back to back (the last one's store included)
    concurrency   64 x 16 MiB file-only forms at once (`--size-mib` does not apply)

`bench.profile` says which functions; this says which threads, and whether the machine was
full. The README's "Benchmarks" and `docs/performance.md` quote it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx

from bench.harness import (
    CLIENT_TIMEOUT_S,
    MIB,
    Bench,
    add_env_option,
    bench_stack,
    clear_data,
    curl_upload_argv,
    env_option,
    make_file,
    run_uploads,
)
from bench.shapes import TICK, stat_fields
from bench.tus import CHUNK, create, curl_patches, split

GIB: Final = 1024 * MIB
SHAPES: Final = ("file_only", "tus", "concurrency")
CONCURRENT: Final = (64, 16 * MIB)
# (user, system) clock ticks by thread id.
Ticks = dict[int, tuple[int, int]]


@dataclass(frozen=True)
class Split:
    """CPU-seconds of one process over a span, its main thread apart from the others."""

    loop_user: float
    loop_sys: float
    workers_user: float
    workers_sys: float

    def per_gib(self, gib: float) -> str:
        total = self.loop_user + self.loop_sys + self.workers_user + self.workers_sys
        return (
            f"{total / gib:.2f} (loop {self.loop_user / gib:.2f} + {self.loop_sys / gib:.2f}, "
            f"workers {self.workers_user / gib:.2f} + {self.workers_sys / gib:.2f})"
        )


def threads(pid: int) -> Ticks:
    """(user, system) clock ticks of each thread of `pid`."""
    out: Ticks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = stat_fields(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue  # a worker thread that ended meanwhile
        out[int(tid)] = (int(fields[11]), int(fields[12]))
    return out


def split_of(pid: int, before: Ticks, after: Ticks) -> Split:
    sums = [0.0, 0.0, 0.0, 0.0]
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0, 0))
        base = 0 if tid == pid else 2
        sums[base] += (user - user0) / TICK
        sums[base + 1] += (system - system0) / TICK
    return Split(*sums)


def machine() -> list[int]:
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:9]]


def busy_share(before: list[int], after: list[int]) -> float:
    delta = [b - a for a, b in zip(before, after, strict=True)]
    idle = delta[3] + delta[4]  # idle, iowait
    return 1 - idle / max(1, sum(delta))


def measure(bench: Bench, label: str, gib: float, upload: Callable[[], None]) -> None:
    clear_data(bench.se)
    pids = {"ingester": bench.ingester.pid, "element": bench.se.pid}
    before = {name: threads(pid) for name, pid in pids.items()}
    cpu_before = machine()
    upload()
    cpu_after = machine()
    after = {name: threads(pid) for name, pid in pids.items()}
    parts = [
        f"{name} {split_of(pid, before[name], after[name]).per_gib(gib)}"
        for name, pid in pids.items()
    ]
    print(f"  {label}: machine {busy_share(cpu_before, cpu_after):.0%} busy; " + "; ".join(parts))


def _many(argvs: list[list[str]]) -> Callable[[], None]:
    def run() -> None:
        _, results = run_uploads(argvs)
        failed = [status for status, _ in results if status != 201]
        if failed:
            raise RuntimeError(f"{len(failed)} uploads failed: {failed[:5]}")

    return run


def _tus(bench: Bench, size: int, parts: list[Path]) -> Callable[[], None]:
    def run() -> None:
        with httpx.Client(trust_env=False, timeout=CLIENT_TIMEOUT_S) as http:
            url = create(bench, size, http)
            answers = curl_patches(bench, url, parts)
        if not all(a.startswith("204") for a in answers):
            raise RuntimeError(f"PATCHes failed: {answers[:3]}")

    return run


def run_shape(bench: Bench, shape: str, size: int, rounds: int) -> None:
    if shape == "concurrency":
        count, each = CONCURRENT
        path = make_file(bench.root / "threads-16m.bin", each, compressible=False)
        gib = count * each / GIB
        direct = _many([curl_upload_argv(bench.upload_url(True), bench.token, path)] * count)
        through = _many([curl_upload_argv(bench.upload_url(False), bench.token, path)] * count)
        print(f"{count} x {each // MIB} MiB at once, CPU-s/GiB (user + system)")
    else:
        path = make_file(bench.root / "threads.bin", size, compressible=False)
        gib = size / GIB
        direct = _many([curl_upload_argv(bench.upload_url(True), bench.token, path)])
        if shape == "tus":
            through = _tus(bench, size, split(path, size, CHUNK))
        else:
            through = _many([curl_upload_argv(bench.upload_url(False), bench.token, path)])
        print(f"{shape}, {size // MIB} MiB, CPU-s/GiB (user + system)")
    clear_data(bench.se)
    through()  # the warm-up: new page-cache pages for the spool or the data file
    for index in range(rounds):
        measure(bench, f"round {index + 1} direct", gib, direct)
        measure(bench, f"round {index + 1} ingester", gib, through)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    add_env_option(parser)
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes: {sorted(unknown)} (known: {', '.join(SHAPES)})")
    with bench_stack(env_option(args)) as bench:
        for shape in shapes:
            run_shape(bench, shape, args.size_mib * MIB, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
