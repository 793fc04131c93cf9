"""The one-request path: `POST /api/v1/files/upload`, multipart/form-data.

The fields go before the file part (the ingester then settles where and how to store before
the first byte, with no spool). The request carries an `Idempotency-Key`, kept in the state
file until the file is stored: a retry after a lost answer, or a rerun after the process
was killed, gets the first `201` back instead of storing the file twice. It also carries
`Content-Digest` (a first pass over the file, cheap below the resumable threshold), so a
file that changes while it is sent is refused whole by the server.
"""

from __future__ import annotations

import base64
import mimetypes
import uuid
from collections.abc import Iterator
from typing import Any, Final

import httpx

from ..http import multipart_writer
from .answers import raise_for, transport_error
from .errors import GaveUp, Retryable, UploadFailed
from .job import PIECE, Job, Stored, store_timeout

ENDPOINT: Final = "/api/v1/files/upload"


class MultipartBody:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.boundary = f"artstore-{uuid.uuid4().hex}"
        fields = job.options.form_fields()
        name = job.source.path.name
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self.head = multipart_writer.fields(self.boundary, fields) + multipart_writer.file_head(
            self.boundary, "file", name, content_type
        )
        self.tail = multipart_writer.tail(self.boundary)

    @property
    def content_type(self) -> str:
        return multipart_writer.form_content_type(self.boundary)

    @property
    def length(self) -> int:
        return len(self.head) + self.job.source.size + len(self.tail)

    def __iter__(self) -> Iterator[bytes]:
        source = self.job.source
        source.restart_hash()
        yield self.head
        offset = 0
        while offset < source.size:
            piece = source.read(offset, min(4 * PIECE, source.size - offset))
            yield piece
            offset += len(piece)
            self.job.progress.update(offset)
        yield self.tail
        self.job.progress.storing()


def upload_multipart(job: Job) -> Stored:
    state = job.store.load(job.key)
    key = state.idempotency_key if state and job.resumable(state, "multipart") else None
    resumed = bool(key)
    if not key:
        key = uuid.uuid4().hex
        job.store.save(job.new_state("multipart", idempotency_key=key))
    first_pass = job.source.sha256()
    digest = base64.b64encode(bytes.fromhex(first_pass)).decode("ascii")
    tries = _Tries()
    try:
        response, attempts = _send(job, key, digest, tries)
    except GaveUp:
        raise
    except UploadFailed:
        if tries.count == 1 and not resumed:
            # The server said no to the only request ever made with this key: it holds
            # nothing, there is nothing to replay. After an attempt whose answer was lost,
            # the key may name a stored file (its token expired meanwhile, say): kept, a
            # rerun replays it rather than storing the file again (found by a review).
            job.store.remove(job.key)
        raise
    if job.source.sha256() != first_pass:
        raise UploadFailed("the file changed while it was being sent; run the command again")
    record: dict[str, Any] = response.json()
    replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
    return Stored(record, replayed=replayed, attempts=attempts)


class _Tries:
    """How many requests `_send` made, also when it raises."""

    count = 0


def _send(job: Job, key: str, digest: str, tries: _Tries) -> tuple[httpx.Response, int]:
    """The request, again after each failure worth another attempt; the 201 answer."""
    attempts = 0
    while True:
        attempts += 1
        tries.count = attempts
        body = MultipartBody(job)
        job.progress.update(0)
        try:
            try:
                response = job.http.post(
                    job.options.url + ENDPOINT,
                    content=iter(body),
                    headers={
                        "Content-Type": body.content_type,
                        "Content-Length": str(body.length),
                        "Idempotency-Key": key,
                        "Content-Digest": f"sha-256=:{digest}:",
                    },
                    timeout=store_timeout(job.http),
                )
            except httpx.TransportError as exc:
                raise transport_error(exc) from None
            if response.status_code != 201:
                raise_for(response, job.options.token)
        except Retryable as exc:
            job.pause(exc)
            continue
        return response, attempts
