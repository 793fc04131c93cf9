"""`python -m bench.tus`: resumable uploads (tus) against one multipart upload, same run.

    python -m bench.tus [--quick] [--rounds 3]

1. Throughput: a 1 GiB incompressible file as a tus upload in 8 MiB PATCHes vs the same
   file as one multipart upload, alternating, median of the rounds; the ingester's peak RSS.
   The client is curl for both (the harness's convention): the tus upload is one curl run
   with a `next` section per PATCH over one keep-alive connection, timed from the creation
   POST to the final PATCH's answer (which waits for the file to be stored). The PATCHes
   but the last run as one curl, the last as another, so the CPU of each process is
   measured apart for the PATCH path (receiving) and for the final PATCH (its chunk and
   the store).
2. Real tus clients (the interop tests' scripts): tus-js-client under Node and tuspy under
   Python, 8 MiB chunks, each round paired with a multipart upload (curl) of the same file:
   throughput ratio, final PATCH seconds, CPU-seconds per GiB of the ingester, the element
   and the client, the ingester's peak RSS. Every stored file's checksum is checked.
3. Resume after a cut: a PATCH sending 48 MiB of a 64 MiB upload is cut, either with a
   reset (the ingester sees the connection go) or by going silent (the ingester does not
   know; the client reconnects). Measured: how long the reconnecting client's HEAD takes
   to answer (the holder, if any, saves and lets go), the bytes kept of those sent, and the
   time to finish the rest.

Results go to bench/results/tus.json and a Markdown table on stdout; `make bench`
(bench/run_all.py) runs sections 1 and 2 too. `--redis` keeps the uploads' state and locks
in a `redis-server` of the bench's own (on a free loopback port), as replicas do, instead
of in the ingester's process: every `PATCH` then pays its Redis calls.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from bench.harness import (
    CLIENT_TIMEOUT_S,
    GIB,
    MIB,
    Bench,
    add_env_option,
    bench_stack,
    clear_data,
    cpu_count,
    env_option,
    make_file,
    peak_rss_mb,
    reset_peak_rss,
    run_uploads,
    save,
)
from bench.harness import curl_upload_argv as multipart_argv
from bench.shapes import children_cpu_s, proc_cpu_s

CHUNK: Final = 8 * MIB
OFFSET_STREAM: Final = "application/offset+octet-stream"
PLAIN_FIELDS: Final = ["retention_policy=temporary", "compress=false"]


def tus_headers(bench: Bench, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {bench.token}", "Tus-Resumable": "1.0.0", **extra}


def create(bench: Bench, size: int, http: httpx.Client) -> str:
    response = http.post(
        bench.ingester.url + "/api/v1/uploads",
        headers=tus_headers(
            bench,
            **{"Upload-Length": str(size), "Upload-Metadata": "filename YmlnLmJpbg=="},
        ),
    )
    if response.status_code != 201:
        raise RuntimeError(f"creation failed: {response.status_code} {response.text}")
    return bench.ingester.url + response.headers["Location"]


def split(path: Path, size: int, chunk: int) -> list[Path]:
    """The file as chunk files, for curl's `upload-file` (not timed)."""
    parts = []
    with open(path, "rb") as source:
        for index in range(0, size, chunk):
            part = path.parent / f"{path.name}.part{index // chunk:05d}"
            part.write_bytes(source.read(chunk))
            parts.append(part)
    return parts


def curl_patches(bench: Bench, url: str, parts: list[Path], start: int = 0) -> list[str]:
    """One curl run sending `parts` as consecutive PATCHes from `start`; each answer's
    status, seconds and Upload-File-Id."""
    config = parts[0].parent / "tus-curl.conf"
    lines: list[str] = []
    offset = start
    for index, part in enumerate(parts):
        if index:
            lines.append("next")
        lines += [
            f'url = "{url}"',
            'request = "PATCH"',
            f'header = "Authorization: Bearer {bench.token}"',
            'header = "Tus-Resumable: 1.0.0"',
            f'header = "Content-Type: {OFFSET_STREAM}"',
            f'header = "Upload-Offset: {offset}"',
            'header = "Expect:"',
            f'upload-file = "{part}"',
            'output = "/dev/null"',
            'write-out = "%{http_code} %{time_total} %header{upload-file-id}\\n"',
            "silent",
            "show-error",
        ]
        offset += part.stat().st_size
    config.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        ["curl", "-K", str(config)], capture_output=True, check=False, timeout=CLIENT_TIMEOUT_S
    )
    answers = done.stdout.decode().splitlines()
    if done.returncode != 0 or len(answers) != len(parts):
        raise RuntimeError(f"curl failed: {done.returncode} {done.stderr.decode()[:300]}")
    return answers


@dataclass
class Cpu:
    """CPU-seconds of the ingester, the element and the client (children of this process)."""

    ingester: float
    element: float
    client: float

    @classmethod
    def now(cls, bench: Bench) -> Cpu:
        return cls(proc_cpu_s(bench.ingester.pid), proc_cpu_s(bench.se.pid), children_cpu_s())

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(
            self.ingester - other.ingester, self.element - other.element, self.client - other.client
        )


def tus_upload(
    bench: Bench, size: int, parts: list[Path], http: httpx.Client
) -> tuple[float, float, str, Cpu, Cpu]:
    """Seconds from the creation to the stored file, seconds of the final PATCH (its last
    chunk, then the store), the result's checksum, and the CPU of the PATCHes before the last
    (the receive path) and of the last."""
    started = time.perf_counter()
    url = create(bench, size, http)
    first = Cpu.now(bench)
    answers = curl_patches(bench, url, parts[:-1])
    before_last = Cpu.now(bench)
    final_started = time.perf_counter()
    answers += curl_patches(bench, url, parts[-1:], start=size - parts[-1].stat().st_size)
    final_s = time.perf_counter() - final_started
    wall = time.perf_counter() - started
    bad = [a for a in answers if not a.startswith("204")]
    if bad or len(answers[-1].split()) < 3:
        raise RuntimeError(f"PATCHes failed: {bad[:3] or answers[-1]}")
    end = Cpu.now(bench)
    state = http.get(url, headers=tus_headers(bench)).json()
    return wall, final_s, state["result"]["checksum"], before_last - first, end - before_last


def multipart_upload(bench: Bench, path: Path) -> float:
    wall, results = run_uploads(
        [multipart_argv(bench.upload_url(False), bench.token, path, PLAIN_FIELDS)]
    )
    if results[0][0] != 201:
        raise RuntimeError(f"multipart upload failed with {results[0][0]}")
    return wall


def throughput(bench: Bench, path: Path, size: int, rounds: int) -> dict[str, Any]:
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    parts = split(path, size, CHUNK)
    tus_rates, multipart_rates, peaks, finals = [], [], [], []
    receive: list[Cpu] = []
    last: list[Cpu] = []
    with httpx.Client(trust_env=False, timeout=600) as http:
        clear_data(bench.se)
        # Warm the page cache and the element, and leave each path's reused files (the
        # multipart spool's, an idle tus data file) as a running service has them.
        multipart_upload(bench, path)
        clear_data(bench.se)
        tus_upload(bench, size, parts, http)
        for _ in range(rounds):
            clear_data(bench.se)
            multipart_rates.append(size / multipart_upload(bench, path) / MIB)
            clear_data(bench.se)
            reset_peak_rss(bench.ingester.pid)
            wall, final_s, checksum, receiving, final_cpu = tus_upload(bench, size, parts, http)
            peaks.append(peak_rss_mb(bench.ingester.pid))
            finals.append(final_s)
            receive.append(receiving)
            last.append(final_cpu)
            if checksum != expected:
                raise RuntimeError("the tus upload stored other bytes")
            tus_rates.append(size / wall / MIB)
    received_gib = (size - parts[-1].stat().st_size) / GIB
    for part in parts:
        part.unlink()
    med = statistics.median
    return {
        "chunk_mib": CHUNK // MIB,
        "patches": len(parts),
        "multipart_mib_s": [round(x) for x in multipart_rates],
        "tus_mib_s": [round(x) for x in tus_rates],
        "ratio": round(med(tus_rates) / med(multipart_rates), 3),
        # The final PATCH carries the last chunk and waits for the store.
        "final_patch_s": [round(x, 2) for x in finals],
        # The PATCHes before the last: receiving only.
        "patch_path_cpu_s_per_gib": {
            "ingester": [round(c.ingester / received_gib, 2) for c in receive],
            "element": [round(c.element / received_gib, 2) for c in receive],
            "curl": [round(c.client / received_gib, 2) for c in receive],
        },
        "final_patch_cpu_s": {
            "ingester": [round(c.ingester, 2) for c in last],
            "element": [round(c.element, 2) for c in last],
        },
        "tus_peak_rss_mb": round(max(peaks), 1),
    }


def client_argv(bench: Bench, client: str, path: Path) -> list[str]:
    """The interop tests' client scripts, 8 MiB chunks, no checksums."""
    from tests.interop.support import NODE_DIR, TUSPY_CLIENT, find_node

    endpoint = bench.ingester.url + "/api/v1/uploads"
    if client == "tus-js-client":
        node = find_node()
        if node is None or not (NODE_DIR / "node_modules" / "tus-js-client").exists():
            raise RuntimeError(
                "tus-js-client needs node and tests/interop/node/node_modules: "
                "make tests/interop/node/node_modules/.installed"
            )
        return [
            node, str(NODE_DIR / "tus_upload.mjs"), "--endpoint", endpoint, "--file", str(path),
            "--chunk-size", str(CHUNK), "--checksum", "none",
        ]  # fmt: skip
    store = bench.root / "tuspy-urls.json"
    store.unlink(missing_ok=True)
    return [
        sys.executable, str(TUSPY_CLIENT), "--endpoint", endpoint, "--file", str(path),
        "--url-store", str(store), "--chunk-size", str(CHUNK),
    ]  # fmt: skip


def client_upload(bench: Bench, client: str, path: Path, http: httpx.Client) -> dict[str, Any]:
    """One upload by a real tus client: its report, the wall time, the CPU of each process,
    the stored checksum."""
    argv = client_argv(bench, client, path)
    env = {**os.environ, "INTEROP_TOKEN": bench.token}
    before = Cpu.now(bench)
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, env=env, check=False, timeout=1200)
    wall = time.perf_counter() - started
    cpu = Cpu.now(bench) - before
    if done.returncode != 0:
        raise RuntimeError(f"{client} failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    url = report["url"]
    url = url if url.startswith("http") else bench.ingester.url + url
    state = http.get(url, headers=tus_headers(bench)).json()
    return {
        "wall_s": wall,
        # From the client's first request to its success: without the process's start-up
        # and, for the Node script, its read of the whole file into memory first (0.3-0.6 s
        # for 1 GiB here), which are the client's, not the upload's.
        "upload_s": float(report["total"]),
        "final_patch_s": report.get("finalPatch", report.get("final_patch")),
        "cpu": cpu,
        "checksum": state["result"]["checksum"],
    }


def clients(bench: Bench, path: Path, size: int, rounds: int) -> dict[str, Any]:
    """tus-js-client and tuspy, each round paired with a multipart upload (curl)."""
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    gib = size / GIB
    med = statistics.median
    out: dict[str, Any] = {}
    with httpx.Client(trust_env=False, timeout=600) as http:
        for client in ("tus-js-client", "tuspy"):
            tus_rates, wall_rates, multipart_rates, finals, peaks = [], [], [], [], []
            cpus: list[Cpu] = []
            for _ in range(rounds):
                clear_data(bench.se)
                multipart_rates.append(size / multipart_upload(bench, path) / MIB)
                clear_data(bench.se)
                reset_peak_rss(bench.ingester.pid)
                run = client_upload(bench, client, path, http)
                peaks.append(peak_rss_mb(bench.ingester.pid))
                if run["checksum"] != expected:
                    raise RuntimeError(f"{client}'s upload stored other bytes")
                tus_rates.append(size / run["upload_s"] / MIB)
                wall_rates.append(size / run["wall_s"] / MIB)
                finals.append(run["final_patch_s"])
                cpus.append(run["cpu"])
            out[client] = {
                "tus_mib_s": [round(x) for x in tus_rates],
                "multipart_mib_s": [round(x) for x in multipart_rates],
                "ratio": round(med(tus_rates) / med(multipart_rates), 3),
                "wall_mib_s": [round(x) for x in wall_rates],
                "ratio_wall": round(med(wall_rates) / med(multipart_rates), 3),
                "final_patch_s": [round(x, 2) for x in finals],
                "cpu_s_per_gib": {
                    "ingester": round(med(c.ingester for c in cpus) / gib, 2),
                    "element": round(med(c.element for c in cpus) / gib, 2),
                    "client": round(med(c.client for c in cpus) / gib, 2),
                },
                "peak_rss_mb": round(max(peaks), 1),
            }
    return out


def open_patch(bench: Bench, url: str, offset: int, declared: int) -> socket.socket:
    host, port = bench.ingester.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    path = url.removeprefix(bench.ingester.url)
    sock.sendall(
        (
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bench.token}\r\n"
            f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
            f"Content-Type: {OFFSET_STREAM}\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
    )
    return sock


def resume(bench: Bench, path: Path, how: str, http: httpx.Client) -> dict[str, Any]:
    """Cut a PATCH after 48 MiB of 64 MiB (`reset` or `silent`), then resume it."""
    data = path.read_bytes()
    size, sent = len(data), 48 * MIB
    url = create(bench, size, http)
    sock = open_patch(bench, url, 0, size)
    sock.sendall(data[:sent])
    time.sleep(1.0)  # the ingester has read it
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    started = time.perf_counter()
    head = http.head(url, headers=tus_headers(bench))
    head_s = time.perf_counter() - started
    kept = int(head.headers["Upload-Offset"])
    rest = path.parent / "rest.bin"
    rest.write_bytes(data[kept:])
    finish_started = time.perf_counter()
    answers = curl_patches(bench, url, [rest], start=kept)
    finish_s = time.perf_counter() - finish_started
    rest.unlink()
    if how == "silent":
        sock.close()
    if not answers[0].startswith("204"):
        raise RuntimeError(f"resume failed: {answers}")
    state = http.get(url, headers=tus_headers(bench)).json()
    if state["result"]["checksum"] != hashlib.sha256(data).hexdigest():
        raise RuntimeError("the resumed upload stored other bytes")
    return {
        "head_ms": round(head_s * 1000, 1),
        "sent_mib": sent / MIB,
        "kept_mib": round(kept / MIB, 2),
        "finish_s": round(finish_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="256 MiB and one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="INGESTER_TUS_PIPELINE_WINDOW_S=0: PATCHes only receive, the final one stores",
    )
    parser.add_argument("--curl-only", action="store_true", help="skip the tus clients")
    parser.add_argument(
        "--redis", action="store_true", help="state and locks in a redis-server of the bench's own"
    )
    add_env_option(parser)
    args = parser.parse_args()
    size = 256 * MIB if args.quick else GIB
    rounds = 1 if args.quick else args.rounds
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": cpu_count(),
        "python": sys.version.split()[0],
        "size_mib": size // MIB,
    }
    env = {"INGESTER_TUS_PIPELINE_WINDOW_S": "0"} if args.no_pipeline else {}
    env.update(env_option(args))
    results["pipelined"] = not args.no_pipeline
    results["redis"] = args.redis
    with contextlib.ExitStack() as stack:
        if args.redis:
            from tests.support.redis_server import RedisServer

            directory = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-redis-"))
            )
            env["INGESTER_REDIS_URL"] = stack.enter_context(RedisServer(directory)).url
        results["env"] = env
        bench = stack.enter_context(bench_stack(env))
        results.update(run_tus(bench, size, rounds, clients_too=not args.curl_only))
        if not args.skip_resume:
            mid = make_file(bench.root / "mid.bin", 64 * MIB, compressible=False)
            print("3/3 resume after a cut", flush=True)
            with httpx.Client(trust_env=False, timeout=120) as http:
                clear_data(bench.se)
                results["resume_reset"] = resume(bench, mid, "reset", http)
                clear_data(bench.se)
                results["resume_silent"] = resume(bench, mid, "silent", http)
    name = "tus" if not args.no_pipeline else "tus-no-pipeline"
    path = save(results, name + ("-redis" if args.redis else ""))
    print(report(results))
    print(f"\nsaved to {path}")
    return 0


def run_tus(bench: Bench, size: int, rounds: int, *, clients_too: bool = True) -> dict[str, Any]:
    """Sections 1 and 2 (also `make bench`'s tus section)."""
    big = make_file(bench.root / "tus-big.bin", size, compressible=False)
    print("tus 1/2 curl, PATCH path and final PATCH apart", flush=True)
    out: dict[str, Any] = {"size_mib": size // MIB}
    out["throughput"] = throughput(bench, big, size, rounds)
    if clients_too:
        print("tus 2/2 tus-js-client and tuspy", flush=True)
        out["clients"] = clients(bench, big, size, rounds)
    big.unlink()
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values)


def report(r: dict[str, Any]) -> str:
    """The tus figures against the issue's targets."""
    t = r["throughput"]
    cpu = t["patch_path_cpu_s_per_gib"]
    size = r.get("size_mib", 1024)
    rows: list[tuple[str, str, str]] = [
        (
            f"{size} MiB, curl, tus ({t['chunk_mib']} MiB PATCHes) / multipart",
            f"{t['ratio']:.2f} ({t['tus_mib_s']} vs {t['multipart_mib_s']} MiB/s)",
            f"≥ 0.85: {_met(t['ratio'] >= 0.85)}",
        ),
        (
            "  final PATCH (last chunk + store), s",
            f"{t['final_patch_s']}",
            f"≤ 1 s: {_met(_med(t['final_patch_s']) <= 1.0)}",
        ),
        (
            "  PATCH path CPU-s/GiB: ingester; element, curl",
            f"{cpu['ingester']}; {cpu['element']}, {cpu['curl']}",
            f"≤ 2.0: {_met(_med(cpu['ingester']) <= 2.0)}",
        ),
        (
            "  final PATCH CPU-s: ingester; element",
            f"{t['final_patch_cpu_s']['ingester']}; {t['final_patch_cpu_s']['element']}",
            "report",
        ),
        (
            "  ingester peak RSS",
            f"{t['tus_peak_rss_mb']} MB",
            f"≤ 100 MB: {_met(t['tus_peak_rss_mb'] <= 100)}",
        ),
    ]
    for client, c in r.get("clients", {}).items():
        per = c["cpu_s_per_gib"]
        rows += [
            (
                f"{size} MiB, {client} / multipart (curl): the upload (the whole process)",
                f"{c['ratio']:.2f} ({c['tus_mib_s']} vs {c['multipart_mib_s']} MiB/s); "
                f"{c.get('ratio_wall', c['ratio']):.2f} ({c.get('wall_mib_s', c['tus_mib_s'])})",
                f"≥ 0.85: {_met(c['ratio'] >= 0.85)}",
            ),
            (
                "  final PATCH, s",
                f"{c['final_patch_s']}",
                f"≤ 1 s: {_met(_med(c['final_patch_s']) <= 1.0)}",
            ),
            (
                "  CPU-s/GiB, whole upload: ingester, element, client",
                f"{per['ingester']}, {per['element']}, {per['client']}",
                "report",
            ),
            (
                "  ingester peak RSS",
                f"{c['peak_rss_mb']} MB",
                f"≤ 100 MB: {_met(c['peak_rss_mb'] <= 100)}",
            ),
        ]

    def cut_row(c: dict[str, Any]) -> str:
        kept = f"{c['kept_mib']} of {c['sent_mib']:g} MiB kept"
        return f"{c['head_ms']} ms, {kept}, rest stored in {c['finish_s']} s"

    if "resume_reset" in r:
        rows += [
            ("resume after a reset: HEAD answers", cut_row(r["resume_reset"]), "report"),
            ("resume after a silent cut (holder lets go)", cut_row(r["resume_silent"]), "report"),
        ]
    lines = ["| measure | result | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


if __name__ == "__main__":
    raise SystemExit(main())
