"""Errors of finalization: `IngesterError`s with their status and stable code, so the one error
mapping (`ingester.http.base`) answers them like every other error."""

from __future__ import annotations

from ..errors import IngesterError, NotFound


class FileNotFound(NotFound):
    """No temporary file with this id is known, or it is another user's (ids must not tell)."""

    code = "FILE_NOT_FOUND"
    default_message = "no such file"


class TransactionNotFound(NotFound):
    code = "TRANSACTION_NOT_FOUND"
    default_message = "no such finalization"


class AlreadyPermanent(IngesterError):
    status = 409
    code = "ALREADY_PERMANENT"
    default_message = "the file is already permanent"


class FinalizationInProgress(IngesterError):
    status = 409
    code = "FINALIZATION_IN_PROGRESS"
    default_message = "the file is being finalized"


class FinalizeStoreUnavailable(IngesterError):
    status = 503
    code = "FINALIZE_STORE_UNAVAILABLE"
    default_message = "the finalization store (Redis) cannot be reached; retry"


class AdminLookupFailed(IngesterError):
    status = 502
    code = "ADMIN_LOOKUP_FAILED"
    default_message = "the Admin Module could not say where the file is"


class AdminCommitFailed(IngesterError):
    status = 502
    code = "ADMIN_COMMIT_FAILED"
    default_message = "the Admin Module did not commit the new location"


class SourceUnavailable(IngesterError):
    status = 502
    code = "SOURCE_UNAVAILABLE"
    default_message = "the source Storage Element failed while the file was read"


class SourceChecksumMismatch(IngesterError):
    status = 502
    code = "SOURCE_CHECKSUM_MISMATCH"
    default_message = "the bytes read from the source do not match its checksum"


class Interrupted(IngesterError):
    status = 503
    code = "INTERRUPTED"
    default_message = "the ingester running the move stopped before the commit"
