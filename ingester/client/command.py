"""`ingester upload PATH...`: each file in turn, one line each, and the exit code.

Exit codes: 0 every file stored; 1 any file not stored (one line on stderr for each); 2 the
command line is wrong (nothing sent); 130 interrupted (the state is kept: run the same
command again to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Final, TextIO

import httpx

from .. import __version__
from .errors import TokenRejected, UploadFailed, UsageError
from .job import Job, Stored, human_bytes
from .multipart import upload_multipart
from .options import Options, resolve
from .progress import BarProgress, NoProgress, Progress
from .resume import ResumeStore, cache_dir, state_key
from .source import SourceFile
from .tus import upload_tus

PROG: Final = "ingester upload"
TIMEOUT: Final = httpx.Timeout(connect=10.0, read=120.0, write=60.0, pool=10.0)
INTERRUPTED: Final = 130


def upload_command(args: argparse.Namespace) -> int:
    try:
        options = resolve(args, os.environ)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    progress: Progress = BarProgress(sys.stdout) if sys.stdout.isatty() else NoProgress()
    store = ResumeStore(cache_dir(os.environ))
    try:
        failed = _upload_all(options, [str(p) for p in args.paths], store, progress)
    except KeyboardInterrupt:
        progress.finish()
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED
    total = len(options.paths)
    if total > 1 and not options.json:
        print(f"{total - failed} of {total} files stored", flush=True)
    return 1 if failed else 0


def _client(options: Options) -> httpx.Client:
    return httpx.Client(
        headers={
            "Authorization": f"Bearer {options.token}",
            "User-Agent": f"artstore-ingester-upload/{__version__}",
        },
        timeout=TIMEOUT,
        follow_redirects=False,
    )


def _upload_all(options: Options, names: list[str], store: ResumeStore, progress: Progress) -> int:
    failed = 0
    with _client(options) as http:
        for index, (path, name) in enumerate(zip(options.paths, names, strict=True)):
            try:
                stored, elapsed = upload_file(http, options, path, name, store, progress)
            except TokenRejected as exc:
                progress.finish()
                print(f"{PROG}: {name}: not stored: {exc}", file=sys.stderr)
                for other in names[index + 1 :]:
                    print(f"{PROG}: {other}: not tried: the token was refused", file=sys.stderr)
                return failed + len(names) - index
            except UploadFailed as exc:
                progress.finish()
                print(f"{PROG}: {name}: not stored: {exc}", file=sys.stderr, flush=True)
                failed += 1
                continue
            progress.finish()
            _report(sys.stdout, options, name, stored, elapsed)
    return failed


def upload_file(
    http: httpx.Client,
    options: Options,
    path: Path,
    name: str,
    store: ResumeStore,
    progress: Progress,
) -> tuple[Stored, float]:
    started = time.monotonic()
    with SourceFile(path) as source:
        job = Job(
            http=http,
            options=options,
            source=source,
            name=name,
            key=state_key(path, source.size, source.mtime_ns, options.url),
            store=store,
            progress=progress,
        )
        # The bar names the file only: a long path would leave no room for the bar.
        progress.start(path.name, source.size, 0)
        resumable = source.size > options.resumable_above
        stored = upload_tus(job) if resumable else upload_multipart(job)
        # The server has the file: nothing is left to resume, whatever the checks say.
        store.remove(job.key)
        source.check_unchanged()
        _verify(source, stored)
    return stored, time.monotonic() - started


def _verify(source: SourceFile, stored: Stored) -> None:
    record = stored.record
    local = source.sha256()
    if record.get("checksum") != local:
        raise UploadFailed(
            f"checksum mismatch: the stored file {record.get('file_id')} has sha256 "
            f"{record.get('checksum')}, the local file {local}"
        )
    if record.get("file_size") != source.size:
        raise UploadFailed(
            f"size mismatch: the stored file {record.get('file_id')} has "
            f"{record.get('file_size')} bytes, the local file {source.size}"
        )


def _report(out: TextIO, options: Options, name: str, stored: Stored, elapsed: float) -> None:
    record = stored.record
    if options.json:
        print(json.dumps(record, ensure_ascii=False, separators=(",", ":")), file=out, flush=True)
        return
    size = int(record.get("file_size", 0))
    details = [str(record.get("retention_policy", "?"))]
    if record.get("compressed"):
        details.append(f"{record.get('compression_algorithm')} x{record.get('compression_ratio')}")
    notes = ["sha256 verified"]
    if stored.resumed_at is not None:
        notes.append(f"resumed at {human_bytes(stored.resumed_at)}")
    if stored.replayed:
        notes.append("already stored by an earlier attempt (same Idempotency-Key)")
    rate = f", {human_bytes(size / elapsed)}/s" if elapsed > 0 and size >= 1024 * 1024 else ""
    print(
        f"{name}: stored {human_bytes(size)} as {record.get('file_id')} on "
        f"{record.get('storage_element_id')} ({', '.join(details)}) in {elapsed:.1f} s{rate}; "
        f"{'; '.join(notes)}",
        file=out,
        flush=True,
    )
