"""`python -m bench.tus`: resumable uploads (tus) against one multipart upload, same run.

    python -m bench.tus [--quick]

1. Throughput: a 1 GiB incompressible file as a tus upload in 8 MiB PATCHes vs the same
   file as one multipart upload, alternating, median of the rounds; the ingester's peak RSS.
   The client is curl for both (the harness's convention): the tus upload is one curl run
   with a `next` section per PATCH over one keep-alive connection, timed from the creation
   POST to the final PATCH's answer (which waits for the file to be stored).
2. Resume after a cut: a PATCH sending 48 MiB of a 64 MiB upload is cut, either with a
   reset (the ingester sees the connection go) or by going silent (the ingester does not
   know; the client reconnects). Measured: how long the reconnecting client's HEAD takes
   to answer (the holder, if any, saves and lets go), the bytes kept of those sent, and the
   time to finish the rest.

Results go to bench/results/tus.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import httpx

from bench.harness import (
    GIB,
    MIB,
    Bench,
    bench_stack,
    clear_data,
    cpu_count,
    make_file,
    peak_rss_mb,
    reset_peak_rss,
    run_uploads,
    save,
)
from bench.harness import curl_upload_argv as multipart_argv

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
    done = subprocess.run(["curl", "-K", str(config)], capture_output=True, check=False)
    answers = done.stdout.decode().splitlines()
    if done.returncode != 0 or len(answers) != len(parts):
        raise RuntimeError(f"curl failed: {done.returncode} {done.stderr.decode()[:300]}")
    return answers


def tus_upload(
    bench: Bench, size: int, parts: list[Path], http: httpx.Client
) -> tuple[float, float, str]:
    """Seconds from the creation to the stored file, seconds of the final PATCH (its last
    chunk, then the store through the pipeline), and the result's checksum."""
    started = time.perf_counter()
    url = create(bench, size, http)
    answers = curl_patches(bench, url, parts)
    wall = time.perf_counter() - started
    bad = [a for a in answers if not a.startswith("204")]
    if bad or len(answers[-1].split()) < 3:
        raise RuntimeError(f"PATCHes failed: {bad[:3] or answers[-1]}")
    state = http.get(url, headers=tus_headers(bench)).json()
    return wall, float(answers[-1].split()[1]), state["result"]["checksum"]


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
    with httpx.Client(trust_env=False, timeout=600) as http:
        clear_data(bench.se)
        multipart_upload(bench, path)  # warm the page cache and the element
        for _ in range(rounds):
            clear_data(bench.se)
            multipart_rates.append(size / multipart_upload(bench, path) / MIB)
            clear_data(bench.se)
            reset_peak_rss(bench.ingester.pid)
            wall, final_s, checksum = tus_upload(bench, size, parts, http)
            peaks.append(peak_rss_mb(bench.ingester.pid))
            finals.append(final_s)
            if checksum != expected:
                raise RuntimeError("the tus upload stored other bytes")
            tus_rates.append(size / wall / MIB)
    for part in parts:
        part.unlink()
    return {
        "chunk_mib": CHUNK // MIB,
        "patches": len(parts),
        "multipart_mib_s": [round(x) for x in multipart_rates],
        "tus_mib_s": [round(x) for x in tus_rates],
        "ratio": round(statistics.median(tus_rates) / statistics.median(multipart_rates), 3),
        # The final PATCH carries the last chunk and waits for the store (a second pass over
        # the bytes: data file -> pipeline -> element).
        "final_patch_s": [round(x, 2) for x in finals],
        "tus_peak_rss_mb": round(max(peaks), 1),
    }


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
    args = parser.parse_args()
    size = 256 * MIB if args.quick else GIB
    rounds = 1 if args.quick else 3
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpus": cpu_count(),
        "python": sys.version.split()[0],
        "size_mib": size // MIB,
    }
    with bench_stack() as bench:
        big = make_file(bench.root / "big.bin", size, compressible=False)
        mid = make_file(bench.root / "mid.bin", 64 * MIB, compressible=False)
        print("1/2 throughput", flush=True)
        results["throughput"] = throughput(bench, big, size, rounds)
        print("2/2 resume after a cut", flush=True)
        with httpx.Client(trust_env=False, timeout=120) as http:
            clear_data(bench.se)
            results["resume_reset"] = resume(bench, mid, "reset", http)
            clear_data(bench.se)
            results["resume_silent"] = resume(bench, mid, "silent", http)
    path = save(results, "tus")
    print(report(results))
    print(f"\nsaved to {path}")
    return 0


def report(r: dict[str, Any]) -> str:
    t, cut, quiet = r["throughput"], r["resume_reset"], r["resume_silent"]
    throughput_row = f"{t['ratio']:.2f} ({t['tus_mib_s']} vs {t['multipart_mib_s']} MiB/s)"

    def cut_row(c: dict[str, Any]) -> str:
        kept = f"{c['kept_mib']} of {c['sent_mib']:g} MiB kept"
        return f"{c['head_ms']} ms, {kept}, rest stored in {c['finish_s']} s"

    rows = [
        (f"{r['size_mib']} MiB, tus ({t['chunk_mib']} MiB PATCHes) / multipart", throughput_row),
        ("  of which the final PATCH (last chunk + store)", f"{t['final_patch_s']} s"),
        ("ingester peak RSS during the tus upload", f"{t['tus_peak_rss_mb']} MB"),
        ("resume after a reset: HEAD answers", cut_row(cut)),
        ("resume after a silent cut (holder lets go)", cut_row(quiet)),
    ]  # fmt: skip
    lines = ["| measure | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
