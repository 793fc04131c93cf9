"""A finished resumable upload as the multipart form `ingest` reads: the fields first (so the
pipeline settles where and how to store before the first byte and needs no spool), then the
file part, streamed from the data files, then the closing boundary. Its exact length is
known in advance. No I/O of its own: the data comes from a `DataReader`.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

from ..http import multipart_writer
from ..upload.fields import UploadOptions
from .data import DataReader
from .pipelined import FollowingReader


def form_head(
    boundary: str, fields: Mapping[str, str], filename: str | None, filetype: str | None
) -> bytes:
    return multipart_writer.fields(boundary, fields.items()) + multipart_writer.file_head(
        boundary, "file", filename or None, filetype
    )


def canonical_fields(options: UploadOptions) -> dict[str, str]:
    """The validated options as form fields, every one that settles the storage plan
    present (defaults filled in), so the pipeline never has to spool."""
    fields = {
        "retention_policy": options.retention_policy.value,
        "compress": "true" if options.compress else "false",
    }
    if options.compression_algorithm is not None:
        fields["compression_algorithm"] = options.compression_algorithm.value
    if options.ttl_days is not None:
        fields["ttl_days"] = str(options.ttl_days)
    if options.description:
        fields["description"] = options.description
    if options.metadata:
        fields["metadata"] = json.dumps(options.metadata, ensure_ascii=False)
    return fields


class UploadForm:
    """The multipart body: head, the data, tail. Iterate once; `aclose` when done."""

    def __init__(
        self,
        data: DataReader | FollowingReader,
        size: int,
        options: UploadOptions,
        filename: str | None,
        filetype: str | None,
    ) -> None:
        self.boundary = "tus" + secrets.token_hex(16)
        fields = canonical_fields(options)
        self._head: bytes | None = form_head(self.boundary, fields, filename, filetype)
        self._tail: bytes | None = multipart_writer.tail(self.boundary)
        self._data = data
        self.content_length = len(self._head) + size + len(self._tail)

    @property
    def content_type(self) -> str:
        return multipart_writer.form_content_type(self.boundary)

    def __aiter__(self) -> UploadForm:
        return self

    async def __anext__(self) -> bytes:
        if self._head is not None:
            head, self._head = self._head, None
            return head
        if self._tail is None:
            raise StopAsyncIteration
        try:
            return await anext(self._data)
        except StopAsyncIteration:
            tail, self._tail = self._tail, None
            return tail

    async def aclose(self) -> None:
        await self._data.aclose()
