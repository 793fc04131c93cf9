"""Saga records: what an upload has put where, and what undoing it takes. No I/O.

An upload's saga goes

    receiving ──▶ stored ──▶ done                 (201 sent; abandoned copies, if any, go)
        │            │
        └────────────┴──▶ compensating ──▶ (record deleted when every copy is gone)

`copies` lists every Storage Element that was sent bytes for the upload. The element that
holds the acknowledged copy (`kept`) is never compensated once the saga is `done`; in every
other state all copies are removed: the client was not told the upload succeeded.

`landing` names the copies whose element was sent the whole body and never answered: it may
still be writing the file (artStore's element writes it after the last byte, and finishes
what it started whoever hung up), so until the time noted a removal that finds nothing
proves nothing, and the copy is checked again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class SagaState(StrEnum):
    RECEIVING = "receiving"
    STORED = "stored"
    DONE = "done"
    COMPENSATING = "compensating"


class Removal(StrEnum):
    """What an element said of a removal (compensation) it carried out."""

    # It held the file, or its upload in flight, and removed it (it will not be stored).
    REMOVED = "removed"
    # It held nothing under the id: conclusive unless the copy may still land.
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Copy:
    element_id: str
    api_url: str


@dataclass(slots=True)
class Landing:
    """Copies whose element was sent the whole body and never answered, and until when
    (wall clock) each may still commit it: artStore's element writes the file after the last
    byte and finishes whoever hung up. Until then, a removal that finds nothing proves
    nothing. Keyed by element id."""

    until: dict[str, float]

    def note(self, copy: Copy, until: float) -> None:
        self.until[copy.element_id] = max(until, self.until.get(copy.element_id, 0.0))

    def open_until(self, copy: Copy, now: float) -> float | None:
        """Until when a removal of `copy` that finds nothing proves nothing; None once it
        does."""
        until = self.until.get(copy.element_id)
        return until if until is not None and now < until else None

    def closed(self, copy: Copy) -> None:
        """`copy` is confirmed gone, or kept."""
        self.until.pop(copy.element_id, None)

    def confirms(self, copy: Copy, removal: Removal | None, now: float) -> bool:
        """Whether `removal` of `copy` (None: it could not be carried out) confirms it gone:
        not when its element held nothing while the copy may still land. Closes the copy's
        window when it does."""
        if removal is None:
            return False
        if removal is Removal.ABSENT and self.open_until(copy, now) is not None:
            return False
        self.closed(copy)
        return True

    def next_end(self, copies: list[Copy], now: float) -> float | None:
        """Seconds until the first open window of `copies` closes, if one is open."""
        ends = [u for c in copies if (u := self.open_until(c, now)) is not None]
        return min(ends) - now if ends else None

    @classmethod
    def from_json(cls, raw: Any) -> Landing:
        return cls({str(e): float(t) for e, t in (raw or {}).items()})


@dataclass(slots=True)
class SagaRecord:
    upload_id: str
    file_id: str
    owner: str
    user: str = ""
    state: SagaState = SagaState.RECEIVING
    copies: list[Copy] = field(default_factory=list)
    kept: Copy | None = None
    # Compensation attempts so far (for the backoff) and the last failure, for operators.
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    # With INGESTER_SE_AUTH=forward, the caller's token: another replica compensating the
    # record acts with it (until it expires). None with a service credential.
    authorization: str | None = None
    # Copies whose element may still commit the upload (`Landing`).
    landing: Landing = field(default_factory=lambda: Landing({}))

    def add_copy(self, copy: Copy) -> bool:
        """Note that `copy`'s element is being sent bytes. False when it already was."""
        if copy in self.copies:
            return False
        self.copies.append(copy)
        return True

    def targets(self) -> list[Copy]:
        """The copies that compensation must remove in the record's current state."""
        if self.state is SagaState.DONE:
            return [c for c in self.copies if c != self.kept]
        return list(self.copies)

    def settle_success(self, kept: Copy) -> None:
        """The upload is acknowledged on `kept`: only the copies it abandoned remain to go."""
        self.kept = kept
        self.state = SagaState.DONE
        self.copies = [c for c in self.copies if c != kept]
        self.landing.closed(kept)
        if self.copies:
            self.state = SagaState.COMPENSATING

    def settle_failure(self) -> None:
        """The upload failed (or its owner died): every copy goes, the one a success being
        confirmed had set aside as kept included (the confirmation failed)."""
        if self.kept is not None and self.kept not in self.copies:
            self.copies.append(self.kept)
        self.kept = None
        self.state = SagaState.COMPENSATING

    def forget(self, copy: Copy) -> None:
        """`copy` is confirmed gone."""
        self.copies = [c for c in self.copies if c != copy]
        self.landing.closed(copy)

    @property
    def finished(self) -> bool:
        """Nothing is left to undo (or to watch): the record can be deleted."""
        return self.state is SagaState.COMPENSATING and not self.copies

    # --- wire format ----------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "upload_id": self.upload_id,
                "file_id": self.file_id,
                "owner": self.owner,
                "user": self.user,
                "state": self.state.value,
                "copies": [[c.element_id, c.api_url] for c in self.copies],
                "kept": None if self.kept is None else [self.kept.element_id, self.kept.api_url],
                "attempts": self.attempts,
                "last_error": self.last_error,
                "created_at": self.created_at,
                "authorization": self.authorization,
                "landing": self.landing.until,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> SagaRecord:
        """Parse a stored record; ValueError when it is not one."""
        try:
            data: Any = json.loads(raw)
            kept = data.get("kept")
            return cls(
                upload_id=str(data["upload_id"]),
                file_id=str(data["file_id"]),
                owner=str(data["owner"]),
                user=str(data.get("user", "")),
                state=SagaState(data["state"]),
                copies=[Copy(str(e), str(u)) for e, u in data.get("copies", [])],
                kept=None if kept is None else Copy(str(kept[0]), str(kept[1])),
                attempts=int(data.get("attempts", 0)),
                last_error=data.get("last_error"),
                created_at=float(data.get("created_at", 0.0)),
                authorization=data.get("authorization"),
                landing=Landing.from_json(data.get("landing")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a saga record: {exc}") from exc
