"""A finalization transaction: its states, its transitions, its wire format. No I/O.

    pending ──▶ copying ──▶ committing ──▶ committed ──▶ done
       │           │            │
       └───────────┴────────────┴──▶ rolling_back ──▶ rolled_back

- `copying`: the target element is written into `copies` before its first byte, so whoever
  continues the transaction knows every element that may hold a (partial) copy.
- `committing`: the copy is verified; the Admin Module is being told the new location. (Without
  an Admin Module the transaction goes straight to `committed`.)
- `committed`: the new location is the file's; the source copy goes after `delete_after`.
- `rolling_back`: the copies on `rw` elements are being removed; the source is never touched.

Recovery (a transaction whose ingester died) follows the commit point: before it (`pending`,
`copying`) the transaction is rolled back; `committing` retries the commit (the Admin Module may
have applied it: removing the target then could lose the file), and rolls back only if the
commit is refused; after it, the source copy is deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from ..saga.record import Copy, Landing


class TxState(StrEnum):
    PENDING = "pending"
    COPYING = "copying"
    COMMITTING = "committing"
    COMMITTED = "committed"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


TERMINAL: Final = frozenset({TxState.DONE, TxState.ROLLED_BACK})
_NEXT: Final[dict[TxState, frozenset[TxState]]] = {
    TxState.PENDING: frozenset({TxState.COPYING, TxState.ROLLING_BACK}),
    TxState.COPYING: frozenset(
        {TxState.COPYING, TxState.COMMITTING, TxState.COMMITTED, TxState.ROLLING_BACK}
    ),
    TxState.COMMITTING: frozenset({TxState.COMMITTED, TxState.ROLLING_BACK}),
    TxState.COMMITTED: frozenset({TxState.DONE}),
    TxState.ROLLING_BACK: frozenset({TxState.ROLLED_BACK}),
    TxState.DONE: frozenset(),
    TxState.ROLLED_BACK: frozenset(),
}


class InvalidTransition(Exception):
    pass


@dataclass(slots=True)
class SourceFile:
    """What the source element says about the file; copied to the target as it is."""

    original_filename: str
    content_type: str
    checksum: str
    file_size: int
    description: str | None = None
    version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    uploaded_by: str = ""


@dataclass(slots=True)
class Transaction:
    transaction_id: str
    file_id: str
    owner: str
    requested_by: str
    source: Copy
    file: SourceFile
    state: TxState = TxState.PENDING
    target: Copy | None = None
    # Every rw element that was sent bytes (the target included): what a rollback removes.
    copies: list[Copy] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    finalized_at: float | None = None
    delete_after: float | None = None
    source_deleted: bool = False
    error_code: str | None = None
    error_message: str | None = None
    history: list[tuple[str, float]] = field(default_factory=list)
    # With INGESTER_SE_AUTH=forward, the caller's token (another replica acts with it).
    authorization: str | None = None
    # Copies whose element got the whole copy and never answered (`Landing`).
    landing: Landing = field(default_factory=lambda: Landing({}))

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def move(self, state: TxState, now: float) -> None:
        if state not in _NEXT[self.state]:
            raise InvalidTransition(f"{self.state.value} -> {state.value}")
        if state is not self.state:
            self.history.append((state.value, now))
        self.state = state
        self.updated_at = now

    def sending_to(self, copy: Copy) -> None:
        self.target = copy
        if copy not in self.copies:
            self.copies.append(copy)

    def forget(self, copy: Copy) -> None:
        """`copy` is gone (removed, or never sent a byte): out of the record."""
        self.copies = [c for c in self.copies if c != copy]
        if self.target == copy:
            self.target = None

    def fail(self, code: str, message: str, now: float) -> None:
        self.error_code, self.error_message = code, message
        self.move(TxState.ROLLING_BACK, now)

    def abandoned(self) -> list[Copy]:
        """Copies that are not the kept one (after the commit) or all of them (rollback)."""
        if self.state in (TxState.COMMITTED, TxState.DONE):
            return [c for c in self.copies if c != self.target]
        return list(self.copies)

    # --- answers --------------------------------------------------------------------------

    def public(self) -> dict[str, Any]:
        located = self.state in (TxState.COMMITTED, TxState.DONE) and self.target is not None
        return {
            "transaction_id": self.transaction_id,
            "file_id": self.file_id,
            "status": self.state.value,
            "source_storage_element_id": self.source.element_id,
            "target_storage_element_id": None if self.target is None else self.target.element_id,
            "storage_element_id": self.target.element_id if located and self.target else None,
            "storage_element_url": self.target.api_url if located and self.target else None,
            "download_url": (
                f"{self.target.api_url}/api/v1/files/{self.file_id}/download"
                if located and self.target
                else None
            ),
            "original_filename": self.file.original_filename,
            "checksum": self.file.checksum,
            "file_size": self.file.file_size,
            "requested_by": self.requested_by,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "finalized_at": iso(self.finalized_at),
            "source_delete_after": iso(self.delete_after),
            "source_deleted": self.source_deleted,
            "error": None
            if self.error_code is None
            else {"code": self.error_code, "message": self.error_message},
            "history": [{"state": state, "at": iso(at)} for state, at in self.history],
        }

    # --- wire format ----------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "transaction_id": self.transaction_id,
                "file_id": self.file_id,
                "owner": self.owner,
                "requested_by": self.requested_by,
                "source": [self.source.element_id, self.source.api_url],
                "file": {
                    "original_filename": self.file.original_filename,
                    "content_type": self.file.content_type,
                    "checksum": self.file.checksum,
                    "file_size": self.file.file_size,
                    "description": self.file.description,
                    "version": self.file.version,
                    "metadata": self.file.metadata,
                    "uploaded_by": self.file.uploaded_by,
                },
                "state": self.state.value,
                "target": None if self.target is None else [*_pair(self.target)],
                "copies": [[*_pair(c)] for c in self.copies],
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "finalized_at": self.finalized_at,
                "delete_after": self.delete_after,
                "source_deleted": self.source_deleted,
                "error_code": self.error_code,
                "error_message": self.error_message,
                "history": [[s, t] for s, t in self.history],
                "authorization": self.authorization,
                "landing": self.landing.until,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Transaction:
        """Parse a stored transaction; ValueError when it is not one."""
        try:
            data: Any = json.loads(raw)
            f = data["file"]
            target = data.get("target")
            return cls(
                transaction_id=str(data["transaction_id"]),
                file_id=str(data["file_id"]),
                owner=str(data["owner"]),
                requested_by=str(data["requested_by"]),
                source=Copy(str(data["source"][0]), str(data["source"][1])),
                file=SourceFile(
                    original_filename=str(f["original_filename"]),
                    content_type=str(f["content_type"]),
                    checksum=str(f["checksum"]),
                    file_size=int(f["file_size"]),
                    description=f.get("description"),
                    version=f.get("version"),
                    metadata=dict(f.get("metadata") or {}),
                    uploaded_by=str(f.get("uploaded_by", "")),
                ),
                state=TxState(data["state"]),
                target=None if target is None else Copy(str(target[0]), str(target[1])),
                copies=[Copy(str(e), str(u)) for e, u in data.get("copies", [])],
                created_at=float(data.get("created_at", 0.0)),
                updated_at=float(data.get("updated_at", 0.0)),
                finalized_at=data.get("finalized_at"),
                delete_after=data.get("delete_after"),
                source_deleted=bool(data.get("source_deleted", False)),
                error_code=data.get("error_code"),
                error_message=data.get("error_message"),
                history=[(str(s), float(t)) for s, t in data.get("history", [])],
                authorization=data.get("authorization"),
                landing=Landing.from_json(data.get("landing")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a finalization record: {exc}") from exc


def _pair(copy: Copy) -> tuple[str, str]:
    return copy.element_id, copy.api_url


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
