"""Every request shape, through the ingester and straight to the element, with the cost of
each process: `python -m bench.shapes [--sizes 256,1024] [--rounds 3] [--env INGESTER_X=V]`.

Shapes (curl is the client everywhere, so the ratio compares servers, not clients):

    file_only     curl -F file=@x                       (plain curl, most libraries, browsers)
    fields_first  curl -F retention_policy=... -F compress=false -F file=@x
    fields_last   curl -F file=@x -F retention_policy=... -F compress=false
    tus           POST /api/v1/uploads, then one PATCH of the whole file (curl -T)

Each round runs the direct upload (curl -F file=@x to the element) and then every shape
through the ingester, so each ratio is a median over alternating pairs of one run. For each
upload it reads, per process: CPU seconds (`/proc/PID/stat` utime+stime for the ingester and
the element; `getrusage(RUSAGE_CHILDREN)` for curl), the ingester's bytes written
(`/proc/PID/io` wchar: bytes passed to write() on files, so spool writes and logs, not
socket sends) and its peak RSS (`VmHWM`, reset before each upload).
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

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
    peak_rss_mb,
    reset_peak_rss,
    save,
)

TICK: Final = os.sysconf("SC_CLK_TCK")
SHAPES: Final = ("file_only", "fields_first", "fields_last", "tus")
PLAN = ["retention_policy=temporary", "compress=false"]


def stat_fields(path: str) -> list[str]:
    """A `/proc/.../stat` line after the process or thread name: field N of the whole line
    is [N - 3]."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def _stat(pid: int) -> list[str]:
    return stat_fields(f"/proc/{pid}/stat")


def proc_cpu_s(pid: int) -> float:
    fields = _stat(pid)
    # utime and stime are fields 14 and 15 of the whole line.
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_minor_faults(pid: int) -> int:
    """Pages the process touched that were not mapped (field 10, minflt): memory the C
    allocator gave back and took again shows here (ingester.allocator)."""
    return int(_stat(pid)[7])


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value)
    return out


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Sample:
    wall_s: float
    ingester_cpu_s: float
    element_cpu_s: float
    client_cpu_s: float
    ingester_write_bytes: int
    ingester_wchar: int
    ingester_faults: int
    peak_rss_mb: float


def _run(argv: Sequence[str]) -> str:
    done = subprocess.run(list(argv), capture_output=True, check=False, timeout=CLIENT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"curl failed ({done.returncode}): {done.stderr.decode()[:300]}")
    return done.stdout.decode()


def _tus_argvs(bench: Bench, path: Path) -> tuple[list[str], Any]:
    size = path.stat().st_size
    meta = ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}"
        for k, v in (
            ("filename", path.name),
            ("retention_policy", "temporary"),
            ("compress", "false"),
        )
    )
    create = [
        "curl", "-sS", "-D", "-", "-o", "/dev/null", "-X", "POST",
        "-H", f"Authorization: Bearer {bench.token}", "-H", "Tus-Resumable: 1.0.0",
        "-H", f"Upload-Length: {size}", "-H", f"Upload-Metadata: {meta}",
        bench.ingester.url + "/api/v1/uploads",
    ]  # fmt: skip

    def patch(location: str) -> list[str]:
        return [
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH",
            "-H", f"Authorization: Bearer {bench.token}", "-H", "Tus-Resumable: 1.0.0",
            "-H", "Upload-Offset: 0", "-H", "Content-Type: application/offset+octet-stream",
            "-H", "Expect:", "-T", str(path), bench.ingester.url + location,
        ]  # fmt: skip

    return create, patch


def one(bench: Bench, path: Path, shape: str) -> Sample:
    """One upload of `path` in `shape` ("direct" goes straight to the element)."""
    clear_data(bench.se)
    ing, se = bench.ingester.pid, bench.se.pid
    reset_peak_rss(ing)
    before = (proc_cpu_s(ing), proc_cpu_s(se), children_cpu_s(), proc_io(ing))
    faults_before = proc_minor_faults(ing)
    started = time.perf_counter()
    if shape == "tus":
        create, patch = _tus_argvs(bench, path)
        headers = _run(create)
        location = next(
            line.split(":", 1)[1].strip()
            for line in headers.splitlines()
            if line.lower().startswith("location:")
        )
        status = _run(patch(location)).strip()
        if status != "204":
            raise RuntimeError(f"tus PATCH answered {status}")
    else:
        fields = {
            "direct": ([], []),
            "file_only": ([], []),
            "fields_first": (PLAN, []),
            "fields_last": ([], PLAN),
        }[shape]
        url = bench.upload_url(shape == "direct")
        argv = curl_upload_argv(url, bench.token, path, fields[0])
        for field in fields[1]:
            argv[-1:-1] = ["-F", field]
        status = _run(argv).split()[0]
        if status != "201":
            raise RuntimeError(f"{shape} upload answered {status}")
    wall = time.perf_counter() - started
    io = proc_io(ing)
    return Sample(
        wall_s=wall,
        ingester_cpu_s=proc_cpu_s(ing) - before[0],
        element_cpu_s=proc_cpu_s(se) - before[1],
        client_cpu_s=children_cpu_s() - before[2],
        ingester_write_bytes=io["write_bytes"] - before[3]["write_bytes"],
        ingester_wchar=io["wchar"] - before[3]["wchar"],
        ingester_faults=proc_minor_faults(ing) - faults_before,
        peak_rss_mb=peak_rss_mb(ing),
    )


def summarize(size: int, direct: list[Sample], samples: list[Sample]) -> dict[str, Any]:
    gib = size / (1024 * MIB)
    rates = [size / s.wall_s / MIB for s in samples]
    direct_rates = [size / s.wall_s / MIB for s in direct]
    ratios = [t / d for t, d in zip(rates, direct_rates, strict=True)]
    med = statistics.median
    return {
        "mib_s": [round(r) for r in rates],
        "direct_mib_s": [round(r) for r in direct_rates],
        "ratio": round(med(ratios), 3),
        "ingester_cpu_s_per_gib": round(med(s.ingester_cpu_s for s in samples) / gib, 2),
        "element_cpu_s_per_gib": round(med(s.element_cpu_s for s in samples) / gib, 2),
        "element_direct_cpu_s_per_gib": round(med(s.element_cpu_s for s in direct) / gib, 2),
        "client_cpu_s_per_gib": round(med(s.client_cpu_s for s in samples) / gib, 2),
        # wchar counts write() calls on files (socket sends do not count): the spool.
        "spool_written_per_byte": round(med(s.ingester_wchar for s in samples) / size, 3),
        "disk_write_bytes_per_byte": round(med(s.ingester_write_bytes for s in samples) / size, 3),
        "ingester_page_faults_per_mib": round(
            med(s.ingester_faults for s in samples) / (size / MIB), 1
        ),
        "peak_rss_mb": round(max(s.peak_rss_mb for s in samples), 1),
    }


def run_shapes(
    bench: Bench, sizes_mib: Sequence[int], rounds: int, shapes: Sequence[str]
) -> dict[str, Any]:
    """Per size and shape, the summary of `rounds` alternating pairs (direct, shape)."""
    results: dict[str, Any] = {}
    for size_mib in sizes_mib:
        size = size_mib * MIB
        path = make_file(bench.root / f"x{size_mib}.bin", size, compressible=False)
        one(bench, path, "direct")  # page cache warm-up
        direct: list[Sample] = []
        by_shape: dict[str, list[Sample]] = {s: [] for s in shapes}
        for _ in range(rounds):
            for shape in shapes:
                direct.append(one(bench, path, "direct"))
                by_shape[shape].append(one(bench, path, shape))
        # Each shape's ratio pairs it with the direct upload just before it.
        per = len(shapes)
        results[f"{size_mib}MiB"] = {
            shape: summarize(size, direct[i::per], by_shape[shape])
            for i, shape in enumerate(shapes)
        }
        path.unlink()
    return results


def run(
    sizes_mib: Sequence[int],
    rounds: int,
    shapes: Sequence[str],
    ingester_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "rounds": rounds}
    if ingester_env:
        results["ingester_env"] = ingester_env
    with bench_stack(ingester_env) as bench:
        results.update(run_shapes(bench, sizes_mib, rounds, shapes))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        "| size | shape | ingester / direct | MiB/s (direct) | CPU-s/GiB ingester | element (direct) | client | spool bytes per byte | page faults per MiB | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, shapes in results.items():
        if not key.endswith("MiB"):
            continue
        for shape, r in shapes.items():
            r = dict(r)
            lines.append(
                f"| {key} | {shape} | {r['ratio']:.2f} | {r['mib_s']} ({r['direct_mib_s']}) "
                f"| {r['ingester_cpu_s_per_gib']} | {r['element_cpu_s_per_gib']} "
                f"({r['element_direct_cpu_s_per_gib']}) | {r['client_cpu_s_per_gib']} "
                f"| {r['spool_written_per_byte']} | {r.get('ingester_page_faults_per_mib', '-')} "
                f"| {r['peak_rss_mb']} MB |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,1024", help="MiB, comma separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    add_env_option(parser)
    args = parser.parse_args()
    env = env_option(args)
    results = run([int(s) for s in args.sizes.split(",")], args.rounds, args.shapes.split(","), env)
    path = save(results, "shapes")
    print(report(results))
    print(f"\nsaved to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
