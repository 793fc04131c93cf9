"""The resumable path: tus 1.0.0 at `/api/v1/uploads` (creation, checksum).

Every `PATCH` carries `Upload-Checksum: sha256`, so the server keeps a chunk whole or not
at all, and its offset is always a chunk boundary the client knows. After any failure the
client asks `HEAD` where the upload stands and goes on from there; the last `PATCH` is
answered once the file is stored, with `Upload-File-Id`, and `GET` on the upload gives
the `201` record.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import mimetypes
import uuid
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import urljoin, urlsplit

import httpx

from .answers import describe, error_of, raise_for, transport_error
from .errors import Retryable, UploadFailed, UploadGone
from .job import PIECE, Job, Stored, human_bytes, store_timeout
from .options import MIN_CHUNK_SIZE
from .resume import ResumeState

TUS_VERSION: Final = "1.0.0"
ENDPOINT: Final = "/api/v1/uploads"
OCTETS: Final = "application/offset+octet-stream"
# Resuming re-reads what the server already has, to hash it; say so when that takes a while.
SLOW_REHASH_BYTES: Final = 256 * 1024 * 1024


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def upload_metadata(job: Job) -> str:
    """`Upload-Metadata`: the file name and the form fields of a multipart upload."""
    pairs: list[tuple[str, str]] = [("filename", job.source.path.name)]
    filetype, _ = mimetypes.guess_type(job.source.path.name)
    if filetype:
        pairs.append(("filetype", filetype))
    pairs.extend(job.options.form_fields())
    return ",".join(f"{key} {_b64(value.encode('utf-8'))}" for key, value in pairs)


class TusUpload:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.endpoint = job.options.url + ENDPOINT
        self.chunk_size = job.options.chunk_size
        self.attempts = 1
        self.creation_key: str | None = None
        # Whether this run made the key (a 410 or 422 for it is then the server's word).
        self.fresh_key = False

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Tus-Resumable": TUS_VERSION, **extra}

    # --- the run -----------------------------------------------------------------------

    def run(self) -> Stored:
        job = self.job
        size = job.source.size
        state = job.store.load(job.key)
        if state is not None and not job.resumable(state, "tus"):
            self._discard(state)
            state = None
        url = state.upload_url if state is not None else None
        # The creation's key, kept before it is sent: a creation whose answer is lost (on a
        # retry, or in a later run) then gets the upload it made, not a second one holding
        # the user's quota until it expires.
        self.creation_key = state.idempotency_key if state is not None else None
        resuming = url is not None
        offset: int | None = None
        resumed_at: int | None = None
        file_id: str | None = None
        while file_id is None:
            try:
                if url is None:
                    url, offset, file_id = self._create()
                    continue
                if offset is None:
                    offset = self._head(url)
                    if resuming and resumed_at is None:
                        resumed_at = offset
                        job.progress.note(
                            f"{job.name}: resuming an interrupted upload at "
                            f"{human_bytes(offset)} of {human_bytes(size)}"
                        )
                    elif self.attempts > 1:
                        job.progress.note(
                            f"{job.name}: the server has {human_bytes(offset)}; going on from there"
                        )
                self._hash_up_to(offset)
                job.progress.update(offset)
                before = offset
                offset, file_id = self._patch(url, offset)
                if offset > before:
                    job.backoff.progressed()
            except UploadGone as exc:
                if not resuming:
                    raise UploadFailed(f"the server lost the upload ({exc})") from None
                job.progress.note(
                    f"{job.name}: the interrupted upload is gone from the server ({exc}); "
                    "starting afresh"
                )
                job.store.remove(job.key)
                url, offset, resuming, resumed_at = None, None, False, None
                self.creation_key = None
            except Retryable as exc:
                job.pause(exc)
                self.attempts += 1
                offset = None
        assert url is not None
        job.progress.update(size)
        record = self._result(url)
        return Stored(record, resumed_at=resumed_at, attempts=self.attempts)

    def _hash_up_to(self, offset: int) -> None:
        """What the server already has is hashed from the local file before going on."""
        source = self.job.source
        if offset - source.hashed > SLOW_REHASH_BYTES:
            self.job.progress.note(
                f"{self.job.name}: hashing the {human_bytes(offset - source.hashed)} "
                "already uploaded (sha256, to check the stored file)"
            )
        source.hash_up_to(offset)

    def _discard(self, state: ResumeState) -> None:
        """An earlier upload of this file that is not to be resumed: ask the server to drop
        it (termination) so its bytes do not wait for expiry, and forget it."""
        if state.upload_url is not None:
            with contextlib.suppress(httpx.HTTPError):
                self.job.http.delete(state.upload_url, headers=self._headers(), timeout=10.0)
        self.job.store.remove(self.job.key)

    # --- requests ------------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.job.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise transport_error(exc) from None

    def _create(self) -> tuple[str, int, str | None]:
        job = self.job
        if self.creation_key is None:
            self.fresh_key = True
            self.creation_key = uuid.uuid4().hex
            job.store.save(job.new_state("tus", idempotency_key=self.creation_key))
        response = self._send(
            "POST",
            self.endpoint,
            headers=self._headers(
                **{
                    "Upload-Length": str(job.source.size),
                    "Upload-Metadata": upload_metadata(job),
                    "Idempotency-Key": self.creation_key,
                }
            ),
        )
        if response.status_code in (410, 422) and not self.fresh_key:
            # The key's upload expired, or the key made another one (a state file from an
            # earlier run of other options): a new key, once.
            self.creation_key, self.fresh_key = None, True
            return self._create()
        if response.status_code != 201:
            raise_for(response, job.options.token)
        location = response.headers.get("Location")
        if not location:
            raise UploadFailed("the server created the upload but sent no Location")
        url = urljoin(self.endpoint, location)
        if _origin(url) != _origin(self.endpoint):
            # Every later request of the upload carries the token: it goes to the server
            # the user named, never to one an answer names (found by a review).
            raise UploadFailed(
                f"the server named another server for the upload ({_origin(url)}); "
                "not sending the token there"
            )
        job.store.save(job.new_state("tus", upload_url=url, idempotency_key=self.creation_key))
        offset = int(response.headers.get("Upload-Offset", "0"))
        return url, offset, response.headers.get("Upload-File-Id")

    def _head(self, url: str) -> int:
        response = self._send("HEAD", url, headers=self._headers())
        if response.status_code in (404, 410):
            raise UploadGone(f"{response.status_code}")
        if response.status_code != 200:
            raise_for(response, self.job.options.token)
        if response.headers.get("Upload-Length") != str(self.job.source.size):
            raise UploadGone("it has another length")
        try:
            offset = int(response.headers["Upload-Offset"])
        except (KeyError, ValueError):
            raise UploadFailed("the server's HEAD answer has no Upload-Offset") from None
        if not 0 <= offset <= self.job.source.size:
            raise UploadFailed(f"the server reports offset {offset} for a file of this size")
        return offset

    def _pieces(self, data: bytes, offset: int) -> Iterator[bytes]:
        view = memoryview(data)
        for start in range(0, len(view), PIECE):
            piece = view[start : start + PIECE]
            yield bytes(piece)
            self.job.progress.update(offset + start + len(piece))
        if offset + len(data) == self.job.source.size:
            self.job.progress.storing()

    def _patch(self, url: str, offset: int) -> tuple[int, str | None]:
        """One chunk from `offset` (none at the end: that asks for the stored result)."""
        job = self.job
        size = job.source.size
        length = min(self.chunk_size, size - offset)
        data = job.source.read(offset, length)
        headers = self._headers(
            **{
                "Upload-Offset": str(offset),
                "Content-Type": OCTETS,
                "Content-Length": str(length),
            }
        )
        if length:
            headers["Upload-Checksum"] = "sha256 " + _b64(hashlib.sha256(data).digest())
        last = offset + length == size
        timeout = store_timeout(job.http) if last else job.http.timeout
        response = self._send(
            "PATCH", url, content=self._pieces(data, offset), headers=headers, timeout=timeout
        )
        status = response.status_code
        if status == 204:
            try:
                new_offset = int(response.headers["Upload-Offset"])
            except (KeyError, ValueError):
                raise UploadFailed("the server's PATCH answer has no Upload-Offset") from None
            return new_offset, response.headers.get("Upload-File-Id")
        if status in (404, 410):
            raise UploadGone(describe(response))
        if status == 409:
            raise Retryable(f"{describe(response)}; asking the server where the upload stands")
        if status == 460:
            raise Retryable(f"{describe(response)}: the chunk arrived damaged")
        _, message = error_of(response)
        if status == 413 and "chunk" in message and self.chunk_size > MIN_CHUNK_SIZE:
            self.chunk_size = max(MIN_CHUNK_SIZE, self.chunk_size // 2)
            job.progress.note(
                f"{job.name}: the server takes smaller chunks ({message}); "
                f"going on with {human_bytes(self.chunk_size)}"
            )
            return offset, None
        raise_for(response, job.options.token)

    def _result(self, url: str) -> dict[str, Any]:
        """The stored file's `201` record, from `GET` on the upload."""
        while True:
            try:
                response = self._send("GET", url, headers=self._headers())
                if response.status_code != 200:
                    raise_for(response, self.job.options.token)
                result = response.json().get("result")
                if not isinstance(result, dict):
                    raise UploadFailed("the server stored the file but has no result for it")
                return result
            except Retryable as exc:
                self.job.pause(exc)


def upload_tus(job: Job) -> Stored:
    return TusUpload(job).run()


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port (the default one made explicit)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port
