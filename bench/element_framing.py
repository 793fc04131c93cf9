"""What the body's framing costs the element: `python -m bench.element_framing [--rounds 3]`.

One reference element, a client on a raw socket (no HTTP library in the way) sending the same
multipart upload of `--size-mib` random MiB three ways, alternating: with `Content-Length`,
chunked in 1 MiB frames (the ingester's `SEND_PIECE`), and chunked in 64 KiB frames. For each:
the element's CPU-seconds per GiB (`/proc/PID/stat`) and the throughput. Results go to
bench/results/element_framing.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import statistics
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

from bench.harness import MIB, bench_stack, clear_data, make_file, save
from bench.shapes import proc_cpu_s

GIB: Final = 1024 * MIB
WAYS: Final = (("content-length", 0), ("chunked", 1024 * 1024), ("chunked", 64 * 1024))
READ: Final = 1024 * 1024


def upload(url: str, token: str, path: Path, size: int, framing: str, frame: int) -> int:
    """One upload of `path`; the element's status code."""
    target = urlparse(url)
    assert target.hostname is not None
    assert target.port is not None
    boundary = secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunked = framing == "chunked"
    length = (
        "Transfer-Encoding: chunked"
        if chunked
        else f"Content-Length: {len(head) + size + len(tail)}"
    )
    request = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
        f"Authorization: Bearer {token}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n{length}\r\n\r\n"
    ).encode()
    with socket.create_connection((target.hostname, target.port)) as sock:
        sock.sendall(request)

        def send(data: bytes) -> None:
            sock.sendall(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)

        send(head)
        with path.open("rb") as f:
            while data := f.read(frame or READ):
                send(data)
        send(tail)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        while b"\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    return int(answer.split(b" ", 2)[1])


def run(size_mib: int, rounds: int) -> dict[str, Any]:
    size = size_mib * MIB
    rows: dict[str, dict[str, list[float]]] = {}
    with bench_stack() as bench:
        path = make_file(bench.root / "x.bin", size, compressible=False)
        url = bench.upload_url(direct=True)
        for _ in range(rounds):
            for framing, frame in WAYS:
                key = framing if not frame else f"{framing}, {frame // 1024} KiB frames"
                before, started = proc_cpu_s(bench.se.pid), time.perf_counter()
                status = upload(url, bench.token, path, size, framing, frame)
                elapsed = time.perf_counter() - started
                cpu = proc_cpu_s(bench.se.pid) - before
                if status != 201:
                    raise RuntimeError(f"{key}: the element answered {status}")
                row = rows.setdefault(key, {"cpu_s_per_gib": [], "mib_s": []})
                row["cpu_s_per_gib"].append(round(cpu * GIB / size, 2))
                row["mib_s"].append(round(size_mib / elapsed))
                clear_data(bench.se)
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "size_mib": size_mib, "ways": rows}


def report(results: dict[str, Any]) -> str:
    lines = [
        "| body framing | element CPU-s/GiB (median; rounds) | MiB/s (rounds) |",
        "|---|---|---|",
    ]
    for key, row in results["ways"].items():
        cpu = row["cpu_s_per_gib"]
        lines.append(f"| {key} | {statistics.median(cpu)}; {cpu} | {row['mib_s']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = run(args.size_mib, args.rounds)
    path = save(results, "element_framing")
    print(report(results))
    print(f"\nsaved to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
