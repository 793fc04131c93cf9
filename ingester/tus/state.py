"""One resumable upload's state and the rules that move it. No I/O.

    receiving ──(offset reaches length)──▶ completing ──(stored)──▶ done
        ▲                                      │
        └──────(the store failed: offset back to before the last chunk)

`offset` is what the data file durably holds: it only moves after the bytes were fsynced.
A completion that fails puts the offset back to where the last chunk began, so `HEAD`
never reports an upload finished that was not stored, and a client (tus-js-client, tuspy)
sends the last chunk again, which runs the completion again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ..errors import FileTooLarge, IngesterError
from .errors import FinalUploadNotPatchable, InvalidTusHeader, OffsetMismatch
from .protocol import encode_metadata, parse_metadata


class Phase(StrEnum):
    RECEIVING = "receiving"
    COMPLETING = "completing"
    DONE = "done"


class ConcatKind(StrEnum):
    PARTIAL = "partial"
    FINAL = "final"


@dataclass(slots=True)
class TusUpload:
    id: str
    owner: str
    # None while the length is deferred (creation-defer-length).
    length: int | None
    created_at: float
    expires_at: float
    offset: int = 0
    metadata: dict[str, bytes] = field(default_factory=dict)
    phase: Phase = Phase.RECEIVING
    concat: ConcatKind | None = None
    # A final upload's partial uploads, in order, and the header as the client sent it.
    parts: list[str] = field(default_factory=list)
    concat_header: str | None = None
    # Where the chunk that completed the upload began: the offset goes back there when
    # storing fails, so the client sends that chunk again.
    offset_before: int = 0
    # Completions tried so far (each runs the pipeline under an upload id of its own).
    attempts: int = 0
    result: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None

    # --- questions -------------------------------------------------------------------------

    @property
    def is_final(self) -> bool:
        return self.concat is ConcatKind.FINAL

    @property
    def is_partial(self) -> bool:
        return self.concat is ConcatKind.PARTIAL

    @property
    def all_received(self) -> bool:
        return self.length is not None and self.offset == self.length

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def room(self, max_size: int) -> int:
        """Bytes the next chunk may carry: up to the length, or the size limit if deferred."""
        ceiling = self.length if self.length is not None else max_size
        return max(ceiling - self.offset, 0)

    # --- transitions -----------------------------------------------------------------------

    def check_length(self, length: int | None, max_size: int) -> None:
        """A PATCH declaring `length` (deferred-length uploads), or none: may it go on?"""
        if self.is_final:
            raise FinalUploadNotPatchable()
        if length is None:
            return
        if self.length is not None and length != self.length:
            raise InvalidTusHeader(
                f"Upload-Length {length} differs from the upload's length {self.length}"
            )
        if length > max_size:
            raise FileTooLarge(f"Upload-Length {length} exceeds the limit of {max_size} bytes")
        if length < self.offset:
            raise InvalidTusHeader(
                f"Upload-Length {length} is below the bytes already stored ({self.offset})"
            )

    def check_offset(self, offset: int) -> None:
        """A PATCH at `offset` (under the upload's lock): 409, nothing changed, unless it is
        exactly where the upload is and the upload still takes bytes."""
        if self.phase is not Phase.RECEIVING or offset != self.offset:
            raise OffsetMismatch(
                f"Upload-Offset is {offset}, the upload is at {self.offset}",
                headers={"Upload-Offset": str(self.offset)},
            )

    def declare_length(self, length: int | None) -> None:
        if length is not None and self.length is None:
            self.length = length

    def accept(self, size: int, *, now: float, expiration_s: float) -> None:
        """`size` more bytes are durably stored; an active upload's expiry moves on."""
        self.offset += size
        self.expires_at = now + expiration_s

    def begin_completion(self, offset_before: int) -> None:
        assert self.all_received, "only a complete upload can be stored"
        self.phase = Phase.COMPLETING
        self.offset_before = offset_before

    def completed(self, result: dict[str, Any], *, now: float, retention_s: float) -> None:
        self.phase = Phase.DONE
        self.result = result
        self.last_error = None
        self.attempts += 1
        self.expires_at = now + retention_s

    def completion_failed(self, error: IngesterError, *, now: float, expiration_s: float) -> None:
        self.phase = Phase.RECEIVING
        self.offset = self.offset_before
        self.attempts += 1
        self.last_error = {"code": error.code, "message": error.message, "status": error.status}
        self.expires_at = now + expiration_s

    # --- serialization ---------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "owner": self.owner,
                "length": self.length,
                "offset": self.offset,
                "created_at": self.created_at,
                "expires_at": self.expires_at,
                "metadata": encode_metadata(self.metadata),
                "phase": self.phase.value,
                "concat": self.concat.value if self.concat else None,
                "parts": self.parts,
                "concat_header": self.concat_header,
                "offset_before": self.offset_before,
                "attempts": self.attempts,
                "result": self.result,
                "last_error": self.last_error,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> TusUpload:
        data = json.loads(raw)
        return cls(
            id=data["id"],
            owner=data["owner"],
            length=data["length"],
            offset=data["offset"],
            created_at=data["created_at"],
            expires_at=data["expires_at"],
            metadata=parse_metadata(data["metadata"]),
            phase=Phase(data["phase"]),
            concat=ConcatKind(data["concat"]) if data["concat"] else None,
            parts=list(data["parts"]),
            concat_header=data["concat_header"],
            offset_before=data["offset_before"],
            attempts=data["attempts"],
            result=data["result"],
            last_error=data["last_error"],
        )

    def as_json(self) -> dict[str, Any]:
        """The view `GET /api/v1/uploads/{id}` answers with."""
        return {
            "upload_id": self.id,
            "state": self.phase.value,
            "offset": self.offset,
            "length": self.length,
            "concat": self.concat.value if self.concat else None,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "result": self.result,
            "last_error": self.last_error,
        }


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")
