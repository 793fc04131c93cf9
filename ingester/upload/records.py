"""What one upload is while it runs: the request as it came, the plan fixed before the
first byte leaves, the facts the transformer learns, and the state its tasks share. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from ..auth.principal import Principal
from ..saga.book import Saga
from ..saga.commit import ResultCommit
from ..storage.selection import Candidate
from .budget import UploadBudget
from .compression import Algorithm, CompressionDecision
from .digest import DigestHashing, ExpectedDigest
from .fields import RetentionPolicy, UploadOptions
from .progress import UploadProgress
from .spool import Spool


@dataclass(slots=True)
class UploadRequest:
    upload_id: str
    principal: Principal
    # What the source declares it will read (a form's Content-Length, a file's length).
    content_length: int | None
    expected_digest: ExpectedDigest | None
    # The file's bytes already on disk (a resumable upload's data files): the spool then.
    source_copy: Spool | None = None
    # The file's exact size, known before the first byte (a finished resumable upload):
    # with its options final (`FileStart.final`) and nothing compressed, the element body
    # goes with a Content-Length.
    file_size: int | None = None
    # Records the result for the client's retries, with the saga's settle (`saga.commit`).
    commit: ResultCommit | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What must be fixed before the first byte goes out."""

    retention_policy: RetentionPolicy
    compress: bool
    algorithm: Algorithm | None

    @classmethod
    def of(cls, options: UploadOptions) -> Plan:
        return cls(options.retention_policy, options.compress, options.compression_algorithm)


@dataclass(slots=True)
class FileFacts:
    """What the transformer learned about the bytes."""

    original_size: int = 0
    stored_size: int = 0
    sha256: str = ""
    stored_sha256: str = ""
    compressed: bool = False
    algorithm: Algorithm | None = None
    decision_reason: str = "not_requested"
    # Content-Digest's other algorithms (sha-512), hashed in the same pass.
    digests: DigestHashing | None = None


@dataclass(slots=True, eq=False)
class Upload:
    """State shared by the tasks of one upload's nursery (hashed by identity)."""

    request: UploadRequest
    progress: UploadProgress
    file_id: str
    # No field after the file part can change the plan (`FileStart.settled`).
    settled: bool
    filename: str
    content_type: str
    plan: Plan
    budget: UploadBudget
    fields_complete: trio.Event = field(default_factory=trio.Event)
    options: UploadOptions | None = None
    facts: FileFacts = field(default_factory=FileFacts)
    spool: Spool | None = None
    # Compress or not, settled from the start of the file (None until then).
    compression: CompressionDecision | None = None
    # Original bytes the spool held at the end of the live pass.
    spooled_bytes: int = 0
    element: Candidate | None = None
    # Set while a piece handed to httpx has not been written yet: the stall watchdog's clock.
    in_flight_since: float | None = None
    # The current element attempt, which the stall watchdog or a breaker trip cancels.
    attempt: trio.CancelScope | None = None
    tripped: bool = False
    saga: Saga | None = None
    # trio clock time by which the upload must end (INGESTER_UPLOAD_DEADLINE_S), or None.
    deadline: float | None = None
    # The Authorization header for element calls (None when elements need none).
    authorization: str | None = None
    # Set by the hasher with its first batch (or at its end): the file is then known to be
    # empty or not, compressed or not, and the streamer may choose an element.
    data_ready: trio.Event = field(default_factory=trio.Event)
    # The name and media type the current element is given (`placement.stored_identity`).
    stored_as: tuple[str, str] | None = None

    def trip(self) -> None:
        """The element's breaker opened: end this attempt (the upload fails over)."""
        self.tripped = True
        if self.attempt is not None:
            self.attempt.cancel()
