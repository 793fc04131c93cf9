"""The floor on this machine: what the least a streaming proxy can do costs, beside the ingester.

    python -m bench.floor [--size-mib 256] [--rounds 3] [--env INGESTER_X=V]

Issue 10 asks for the ingester at "the physical floor". This bench measures that floor here,
in the same run and with the same client (curl -F file=@x), element and file as the
ingester, instead of assuming it. A floor proxy (`python -m bench.floor serve`) does only
what a proxy that hashes and keeps a failover copy must do to each byte, and nothing else:

- reads the request head, then the body in reads of up to 1 MiB (`recv_into` one buffer);
- hashes every byte (sha256), writes it to a spool file reused from upload to upload (as the
  ingester's `SpoolFiles` are: no new page-cache pages), and sends it on to the element over
  a connection opened per upload, with the client's `Content-Type` and `Content-Length`
  (the element parses the multipart form; the floor parses nothing);
- relays the element's answer.

No HTTP framework, no multipart parsing, no chunked framing, no tasks, no thread hops. Two
kinds, each its own process:

    blocking     plain blocking sockets in one thread: system calls, sha256 and copies only
    trio         the same loop on trio's `SocketStream` (trio's send threshold, its epoll
                 waits and scheduling): what trio adds to the floor
    trio_thread  the same, with the hash and the spool write of each read in a worker
                 thread (`trio.to_thread.run_sync`), as the ingester does them: what a
                 thread hop per read costs on this machine
    trio_chunked the ingester's shape of the same work: reads gathered into 1 MiB
                 batches, each hashed, spooled and joined in one hop, and sent to the
                 element as a chunked frame joined with its header (as h11 does), the body
                 chunked: what the ingester's data path costs without its framework

Each round uploads straight to the element, through each floor and through the ingester,
alternating; the table gives each one's throughput against direct and its CPU-seconds per
GiB (`/proc/PID/stat`), and the element's. The figure that matters is the ingester's CPU
against the floors' in the same run: what the service adds over the least possible work on
this machine, where the kernel's loopback costs (charged to the sender, partly) and the page
costs (free page reporting, README) move from day to day.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

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
    save,
)
from bench.shapes import children_cpu_s, proc_cpu_s

READ: Final = 1 * MIB
KINDS: Final = ("blocking", "trio", "trio_thread", "trio_chunked")


# --- the floor proxy ---------------------------------------------------------------------


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"no host and port in {url}")
    return parts.hostname, parts.port


def _split_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def _element_head(target: str, host: str, headers: dict[str, str], length: int | None) -> bytes:
    """The element request's head: `Content-Length`, or a chunked body when `length` is None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    lines = [f"POST {target} HTTP/1.1", f"Host: {host}", framing]
    lines += [f"{name}: {headers[name]}" for name in ("content-type", "authorization")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _answer(element_answer: bytes) -> bytes:
    """The element's answer, as ours, the connection closed after it."""
    head, _, body = element_answer.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 1)[1]
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )


def _read_head(recv: Callable[[], bytes]) -> bytes | None:
    """Bytes up to and past the end of a head; None if the peer closed before it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = recv()
        if not more:
            return None
        data += more
    return data


def _whole_answer(data: bytes) -> bool:
    """Whether `data` holds an answer's head and all of its body (its `Content-Length`)."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    _, headers = _split_head(head)
    return len(body) >= int(headers.get("content-length", "0"))


def _read_answer(recv: Callable[[], bytes]) -> bytes:
    data = b""
    while not _whole_answer(data):
        more = recv()
        if not more:
            raise ConnectionError("the element closed before its whole answer")
        data += more
    return data


class _Spool:
    """One file reused by every upload: written over from offset 0, never truncated."""

    def __init__(self, directory: Path) -> None:
        self.fd = os.open(directory / "floor-spool", os.O_RDWR | os.O_CREAT, 0o600)
        self.offset = 0

    def restart(self) -> None:
        self.offset = 0

    def write(self, data: memoryview) -> None:
        self.offset += os.pwrite(self.fd, data, self.offset)


def _serve_blocking(port: int, element: str, spool: _Spool) -> None:
    address = _address(element)
    netloc = urlsplit(element).netloc
    listener = socket.create_server(("127.0.0.1", port))
    buffer = bytearray(READ)
    view = memoryview(buffer)
    while True:
        client, _ = listener.accept()
        with client:
            data = _read_head(partial(client.recv, 65536))
            if data is None:
                continue  # a probe, or a client gone before its head
            head, _, first = data.partition(b"\r\n\r\n")
            _, headers = _split_head(head)
            length = int(headers["content-length"])
            digest = hashlib.sha256()
            spool.restart()
            upstream = socket.create_connection(address)
            with upstream:
                target = "/api/v1/files/upload"
                upstream.sendall(_element_head(target, netloc, headers, length))
                left = length
                pending = memoryview(first)
                while True:
                    if pending:
                        digest.update(pending)
                        spool.write(pending)
                        upstream.sendall(pending)
                        left -= len(pending)
                    if not left:
                        break
                    n = client.recv_into(buffer, min(READ, left))
                    if not n:
                        break
                    pending = view[:n]
                answer = _read_answer(partial(upstream.recv, 65536))
            client.sendall(_answer(answer))


def _serve_trio(port: int, element: str, spool: _Spool, *, hop: bool, batch: bool) -> None:
    import trio

    host, element_port = _address(element)
    netloc = urlsplit(element).netloc

    def keep(digest: Any, view: memoryview) -> None:
        digest.update(view)
        spool.write(view)

    def keep_joined(digest: Any, pieces: list[bytes]) -> bytes:
        for piece in pieces:
            keep(digest, memoryview(piece))
        return b"".join(pieces)

    async def send_batch(upstream: trio.SocketStream, digest: Any, pieces: list[bytes]) -> None:
        joined = await trio.to_thread.run_sync(keep_joined, digest, pieces)
        await upstream.send_all(b"".join([b"%x\r\n" % len(joined), joined, b"\r\n"]))

    async def handle(client: trio.SocketStream) -> None:
        async with client:
            data = b""
            while b"\r\n\r\n" not in data:
                more = await client.receive_some(65536)
                if not more:
                    return  # a probe, or a client gone before its head
                data += more
            head, _, first = data.partition(b"\r\n\r\n")
            _, headers = _split_head(head)
            length = int(headers["content-length"])
            digest = hashlib.sha256()
            spool.restart()
            upstream = await trio.open_tcp_stream(host, element_port)
            async with upstream:
                target = "/api/v1/files/upload"
                declared = None if batch else length
                await upstream.send_all(_element_head(target, netloc, headers, declared))
                left = length
                chunk = first
                pieces: list[bytes] = []
                held = 0
                while True:
                    if chunk and batch:
                        pieces.append(chunk)
                        held += len(chunk)
                        left -= len(chunk)
                        if held >= READ or not left:
                            await send_batch(upstream, digest, pieces)
                            pieces, held = [], 0
                    elif chunk:
                        if hop:
                            await trio.to_thread.run_sync(keep, digest, memoryview(chunk))
                        else:
                            keep(digest, memoryview(chunk))
                        await upstream.send_all(chunk)
                        left -= len(chunk)
                    if not left:
                        break
                    chunk = await client.receive_some(min(READ, left))
                    if not chunk:
                        break
                if batch:
                    await upstream.send_all(b"0\r\n\r\n")
                answer = b""
                while not _whole_answer(answer):
                    more = await upstream.receive_some(65536)
                    if not more:
                        raise ConnectionError("the element closed before its whole answer")
                    answer += more
            await client.send_all(_answer(answer))

    async def main() -> None:
        await trio.serve_tcp(handle, port, host="127.0.0.1")

    trio.run(main)


def serve(kind: str, port: int, element: str, directory: Path) -> None:
    spool = _Spool(directory)
    if kind == "blocking":
        _serve_blocking(port, element, spool)
    else:
        _serve_trio(port, element, spool, hop=kind != "trio", batch=kind == "trio_chunked")


# --- the measurement ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FloorProcess:
    def __init__(self, kind: str, element: str, directory: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "bench.floor", "serve", kind, str(self.port), element]
        self.proc = subprocess.Popen([*argv, str(directory)], cwd=Path(__file__).parent.parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the {kind} floor did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _upload(bench: Bench, url: str, path: Path) -> None:
    argv = curl_upload_argv(url + "/api/v1/files/upload", bench.token, path)
    # Bounded: a proxy that stopped must fail the run, not hang it.
    done = subprocess.run(argv, capture_output=True, check=False, timeout=CLIENT_TIMEOUT_S)
    status = done.stdout.decode().split()[:1]
    if status != ["201"]:
        raise RuntimeError(f"upload through {url} answered {status}: {done.stderr[:200]!r}")


def run_floor(bench: Bench, path: Path, rounds: int) -> dict[str, Any]:
    floors = {kind: FloorProcess(kind, bench.se.url, bench.root) for kind in KINDS}
    size_gib = path.stat().st_size / (1024 * MIB)
    targets: dict[str, tuple[str, int | None]] = {"direct": (bench.se.url, None)}
    targets.update({kind: (f.url, f.proc.pid) for kind, f in floors.items()})
    targets["ingester"] = (bench.ingester.url, bench.ingester.pid)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    try:
        for _ in range(rounds):
            for name, (url, pid) in targets.items():
                clear_data(bench.se)
                before = (proc_cpu_s(pid) if pid else 0.0, proc_cpu_s(bench.se.pid))
                client_before = children_cpu_s()
                started = time.perf_counter()
                _upload(bench, url, path)
                wall = time.perf_counter() - started
                samples[name].append(
                    {
                        "wall_s": wall,
                        "proxy_cpu_s_per_gib": ((proc_cpu_s(pid) - before[0]) if pid else 0.0)
                        / size_gib,
                        "element_cpu_s_per_gib": (proc_cpu_s(bench.se.pid) - before[1]) / size_gib,
                        "client_cpu_s_per_gib": (children_cpu_s() - client_before) / size_gib,
                    }
                )
    finally:
        for floor in floors.values():
            floor.stop()
    direct = samples["direct"]
    result: dict[str, Any] = {"size_mib": path.stat().st_size // MIB, "rounds": rounds}
    for name, runs in samples.items():
        ratios = [d["wall_s"] / r["wall_s"] for d, r in zip(direct, runs, strict=True)]
        result[name] = {
            "ratio_vs_direct": statistics.median(ratios),
            "proxy_cpu_s_per_gib": statistics.median(r["proxy_cpu_s_per_gib"] for r in runs),
            "element_cpu_s_per_gib": statistics.median(r["element_cpu_s_per_gib"] for r in runs),
            "runs": runs,
        }
    return result


def report(result: dict[str, Any]) -> str:
    out = [
        f"{result['size_mib']} MiB, curl -F file=@x, median of {result['rounds']} rounds",
        "",
        "| through | / direct | proxy CPU-s/GiB | element CPU-s/GiB |",
        "|---|---|---|---|",
    ]
    for name in ("direct", *KINDS, "ingester"):
        row = result[name]
        out.append(
            f"| {name} | {row['ratio_vs_direct']:.2f} | {row['proxy_cpu_s_per_gib']:.2f} "
            f"| {row['element_cpu_s_per_gib']:.2f} |"
        )
    ours = result["ingester"]
    out.append("")
    for name, what in (("blocking", "the blocking floor"), ("trio_chunked", "its own data path")):
        base = result[name]
        if base["proxy_cpu_s_per_gib"] and base["ratio_vs_direct"]:
            out.append(
                f"ingester against {what} ({name}): CPU "
                f"{ours['proxy_cpu_s_per_gib'] / base['proxy_cpu_s_per_gib']:.2f}x, "
                f"throughput {ours['ratio_vs_direct'] / base['ratio_vs_direct']:.2f}x"
            )
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        kind, port, element, directory = sys.argv[2:6]
        serve(kind, int(port), element, Path(directory))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    add_env_option(parser)
    args = parser.parse_args()
    with bench_stack(env_option(args)) as bench:
        path = make_file(bench.root / "floor.bin", args.size_mib * MIB, compressible=False)
        result = run_floor(bench, path, args.rounds)
    save(result, "floor")
    print(report(result))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
