"""One tuspy client instance, run as its own process by `test_tuspy.py`.

tuspy is synchronous (requests, one new connection per request); a process of its own makes
each run a new client instance that knows the upload only from the fingerprint store (a
TinyDB file, `--url-store`), and can be killed whatever it is blocked in.

    python tests/interop/tuspy_client.py --endpoint URL --file PATH --url-store PATH
        [--chunk-size N] [--checksum]          (the bearer token in INTEROP_TOKEN)

Prints one JSON line: `url` (the upload URL), `resumed_at` (the offset the server gave this
instance before it sent anything: 0 for a new upload), `offset` (the last offset the server
acknowledged), `file_id`/`storage_element_id` (the final PATCH's `Upload-File-Id` and
`Upload-Storage-Element-Id`), `error` (why it stopped, or null), and for bench/tus.py
seconds: `total` (from the client's creation to the stored file) and `final_patch` (the
request carrying the last byte, from its start to its answer). Exit code 0 when the upload
completed, 3 when it stopped on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError
from tusclient.storage.filestorage import FileStorage

INTERRUPTED = 3


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--url-store", required=True)
    parser.add_argument("--chunk-size", type=int, default=256 * 1024)
    parser.add_argument("--checksum", action="store_true")
    args = parser.parse_args()

    client = TusClient(
        args.endpoint, headers={"Authorization": f"Bearer {os.environ['INTEROP_TOKEN']}"}
    )
    storage = FileStorage(args.url_store)  # type: ignore[no-untyped-call]
    report: dict[str, Any] = {"url": None, "resumed_at": None, "offset": None, "error": None}
    started = last_started = time.perf_counter()
    try:
        # With a URL in the store for this file's fingerprint, the constructor HEADs it and
        # starts from the server's offset.
        uploader = client.uploader(
            file_path=args.file,
            chunk_size=args.chunk_size,
            metadata={
                "filename": os.path.basename(args.file),
                "filetype": "application/octet-stream",
                "retention_policy": "temporary",
                "compress": "false",
                "description": "tuspy interop upload",
            },
            store_url=True,
            url_storage=storage,
            upload_checksum=args.checksum,
        )
        report["url"] = uploader.url
        report["resumed_at"] = uploader.offset
        try:
            # uploader.upload(), one chunk at a time so the last one can be timed.
            uploader.stop_at = size = uploader.get_file_size()  # type: ignore[no-untyped-call]
            if not uploader.url:
                uploader.set_url(uploader.create_url())
                uploader.offset = 0
            while uploader.offset < size:
                last_started = time.perf_counter()
                uploader.upload_chunk()  # type: ignore[no-untyped-call]
            now = time.perf_counter()
            report["total"] = now - started
            report["final_patch"] = now - last_started
        except TusCommunicationError as exc:  # TusUploadFailed is one
            report["error"] = f"{type(exc).__name__}: {exc} (status {exc.status_code})"
        report["url"] = uploader.url
        report["offset"] = uploader.offset
        last = uploader.request
        headers: dict[str, str] = last.response_headers if last is not None else {}
        report["file_id"] = headers.get("upload-file-id")
        report["storage_element_id"] = headers.get("upload-storage-element-id")
    finally:
        storage.close()  # type: ignore[no-untyped-call]
    print(json.dumps(report), flush=True)
    return INTERRUPTED if report["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
