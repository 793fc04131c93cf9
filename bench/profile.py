"""Where the ingester's CPU goes, by request shape: py-spy samples while curl uploads.

    python -m bench.profile [--shape file_only] [--size-mib 256] [--uploads 3] [--top 15]

py-spy (from PyPI, `pip install py-spy`) records the ingester (all threads, idle frames
left out) and the element while `--uploads` uploads of `--shape` run. It prints, per
process, the functions holding the most samples by themselves ("self") and with what they
call ("total"), as shares of all samples. Collapsed stacks are kept under bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

from bench.harness import MIB, bench_stack, make_file
from bench.shapes import SHAPES, one


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return stack.split(";"), int(count)


def _package(frame: str) -> str:
    """`ReceiveBuffer._extract (h11/_receivebuffer.py:69)` -> `h11`."""
    where = frame.rpartition("(")[2].rstrip(")")
    return where.split("/", 1)[0] if "/" in where else where.split(":", 1)[0]


def top(collapsed: Path, n: int) -> str:
    packages: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        samples += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "(no samples)"
    out = [f"{samples} samples", "self, by package:"]
    out += [f"  {c / samples:6.1%}  {p}" for p, c in packages.most_common(8)]
    out.append("self:")
    out += [f"  {c / samples:6.1%}  {f}" for f, c in own.most_common(n)]
    out.append("total:")
    out += [f"  {c / samples:6.1%}  {f}" for f, c in total.most_common(n) if "<module>" not in f]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="file_only", choices=SHAPES)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--uploads", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--gil", action="store_true", help="only samples holding the GIL (Python's own work)"
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    with bench_stack() as bench:
        path = make_file(bench.root / "x.bin", args.size_mib * MIB, compressible=False)
        one(bench, path, "direct")
        recorders = {}
        for name, pid in (("ingester", bench.ingester.pid), ("element", bench.se.pid)):
            target = out_dir / f"profile-{args.shape}-{name}.txt"
            recorders[name] = (
                target,
                subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--format", "raw", "--threads",
                     "--rate", "250", "--output", str(target), "--nonblocking",
                     *(["--gil"] if args.gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                ),
            )  # fmt: skip
        for _ in range(args.uploads):
            one(bench, path, args.shape)
        for _, proc in recorders.values():
            proc.send_signal(2)
            proc.wait(30)
    for name, (target, _) in recorders.items():
        print(f"== {name} ({args.shape}, {args.uploads} x {args.size_mib} MiB)")
        print(top(target, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
