"""The project's exception tree: one class per cause, each with its HTTP status and code.

Low-level errors (httpx, Redis, the multipart parser, PyJWT) are translated into these at
the module boundary that meets them; `ingester.http.errors` turns these into responses.
"""

from __future__ import annotations

from typing import ClassVar


class IngesterError(Exception):
    """Base of every error the service reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.headers: dict[str, str] = dict(headers or {})
        # Set by a handler that already logged this error with its context.
        self.logged = False


# --- 4xx: the request is at fault -------------------------------------------------------


class BadRequest(IngesterError):
    status = 400
    code = "BAD_REQUEST"
    default_message = "bad request"


class MissingFile(BadRequest):
    code = "MISSING_FILE"
    default_message = "the multipart body has no 'file' part"


class MalformedMultipart(BadRequest):
    code = "MALFORMED_MULTIPART"
    default_message = "the multipart body is malformed"


class InvalidField(BadRequest):
    code = "INVALID_FIELD"
    default_message = "a form field has an invalid value"


class InvalidMetadata(BadRequest):
    code = "INVALID_METADATA"
    default_message = "metadata must be a JSON object"


class EmptyFile(BadRequest):
    """No Storage Element that could take the upload stores a file of zero bytes."""

    code = "EMPTY_FILE"
    default_message = "the file is empty, and no Storage Element for it stores empty files"


class DigestMismatch(BadRequest):
    code = "DIGEST_MISMATCH"
    default_message = "the body does not match its Content-Digest"


class InvalidDigestHeader(BadRequest):
    code = "INVALID_CONTENT_DIGEST"
    default_message = "Content-Digest must carry sha-256=:<base64>:"


class UnsupportedDigest(BadRequest):
    """`Content-Digest` names only algorithms we do not verify: refused rather than stored
    unverified while the client believes it was checked."""

    code = "UNSUPPORTED_CONTENT_DIGEST"
    default_message = "Content-Digest names no algorithm this server verifies"


class Unauthorized(IngesterError):
    status = 401
    code = "UNAUTHORIZED"
    default_message = "a valid bearer token is required"

    def __init__(self, message: str | None = None, *, error: str = "invalid_token"):
        description = (message or self.default_message).replace('"', "'")
        super().__init__(
            message,
            headers={
                "WWW-Authenticate": (
                    f'Bearer realm="artstore", error="{error}", error_description="{description}"'
                )
            },
        )


class Forbidden(IngesterError):
    status = 403
    code = "FORBIDDEN"
    default_message = "the token's role does not allow this"


class NotFound(IngesterError):
    status = 404
    code = "NOT_FOUND"
    default_message = "not found"


class UploadNotFound(NotFound):
    code = "UPLOAD_NOT_FOUND"
    default_message = "no such upload"


class RequestTimeout(IngesterError):
    status = 408
    code = "CLIENT_TIMEOUT"
    default_message = "the client stopped sending the body"


class ClientTooSlow(RequestTimeout):
    """The body arrived below the minimum rate (INGESTER_CLIENT_MIN_RATE_*)."""

    code = "CLIENT_TOO_SLOW"
    default_message = "the client sent the body too slowly"


class UploadIdInUse(IngesterError):
    """The caller's own `X-Upload-ID` is still in use (in flight, or finished recently)."""

    status = 409
    code = "UPLOAD_ID_IN_USE"
    default_message = "this X-Upload-ID is already in use"


class IdempotencyInProgress(IngesterError):
    status = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "an upload with this Idempotency-Key is still running"


class IdempotencyKeyReused(IngesterError):
    status = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    default_message = "this Idempotency-Key was used for another file"


class FileTooLarge(IngesterError):
    status = 413
    code = "FILE_TOO_LARGE"
    default_message = "the file is larger than the configured maximum"


class HeadersTooLarge(IngesterError):
    """The request head is over INGESTER_MAX_HEADER_BYTES or INGESTER_MAX_HEADERS. Answered
    by the connection layer (`ingester.server`) before any route runs."""

    status = 431
    code = "REQUEST_HEADERS_TOO_LARGE"
    default_message = "the request headers are too large"


class UnsupportedMediaType(IngesterError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    default_message = "the body must be multipart/form-data"


class TooManyUploads(IngesterError):
    status = 429
    code = "TOO_MANY_UPLOADS"
    default_message = "too many uploads in flight for this user"


# --- 5xx: we or a Storage Element are at fault --------------------------------------------


class ServiceBusy(IngesterError):
    status = 503
    code = "SERVICE_BUSY"
    default_message = "too many uploads in flight"


class ShuttingDown(IngesterError):
    status = 503
    code = "SHUTTING_DOWN"
    default_message = "the service is shutting down"


class NoStorageAvailable(IngesterError):
    status = 503
    code = "NO_STORAGE_AVAILABLE"
    default_message = "no writable Storage Element is available"


class UploadNotConfirmed(IngesterError):
    """The upload's saga could not be confirmed, so it is not acknowledged (and is undone)."""

    status = 503
    code = "UPLOAD_NOT_CONFIRMED"
    default_message = "the upload could not be confirmed; retry it"


class SagaTakenOver(UploadNotConfirmed):
    """This ingester lost its lease on the upload (it stalled for longer than the lease) and
    another replica is undoing it."""

    code = "UPLOAD_TAKEN_OVER"


class SagaStoreUnavailable(UploadNotConfirmed):
    """The saga store (Redis) went away while the upload ran: its record cannot be
    confirmed, and another replica could undo it."""

    code = "SAGA_STORE_UNAVAILABLE"


class SagaOutcomeUnknown(SagaStoreUnavailable):
    """The saga store went away while the upload's success was being written: it may or may
    not have been recorded. Nothing is undone here; a retry finds the result if it was."""


class AuthKeysUnavailable(IngesterError):
    """No token signing key could be fetched yet (the identity provider's JWKS is away):
    the token cannot be checked now, which says nothing against it. Retry later."""

    status = 503
    code = "AUTH_UNAVAILABLE"
    default_message = "the token signing keys are unavailable; try again later"


class IdempotencyStoreUnavailable(IngesterError):
    """An upload with an `Idempotency-Key` arrived while the key's store (Redis) could not
    be reached: run now, it could store a file a first attempt already stored (its result
    is in that store). Nothing was done; retry after `Retry-After`."""

    status = 503
    code = "IDEMPOTENCY_STORE_UNAVAILABLE"
    default_message = "the Idempotency-Key's store cannot be reached now"


class InsufficientStorage(IngesterError):
    status = 507
    code = "INSUFFICIENT_STORAGE"
    default_message = "no Storage Element has room for this file"


class StorageElementError(IngesterError):
    """A Storage Element failed the request (unreachable, 5xx, protocol error)."""

    status = 502
    code = "STORAGE_ELEMENT_ERROR"
    default_message = "the Storage Element failed"

    def __init__(
        self,
        message: str | None = None,
        *,
        element_id: str | None = None,
        upstream_status: int | None = None,
        retryable: bool = True,
    ):
        super().__init__(message)
        self.element_id = element_id
        self.upstream_status = upstream_status
        self.retryable = retryable


class StorageElementUnavailable(StorageElementError):
    """Could not connect, or the connection broke: safe to try elsewhere."""

    status = 503
    code = "STORAGE_ELEMENT_UNAVAILABLE"
    default_message = "the Storage Element is unreachable"


class StorageElementTimeout(StorageElementError):
    status = 504
    code = "STORAGE_ELEMENT_TIMEOUT"
    default_message = "the Storage Element stopped accepting data"


class StorageElementFull(StorageElementError):
    status = 507
    code = "INSUFFICIENT_STORAGE"
    default_message = "the Storage Element is full"


class StorageElementRejected(StorageElementError):
    """The element refused the request (4xx other than 507): not retryable as is."""

    status = 502
    code = "STORAGE_ELEMENT_REJECTED"
    default_message = "the Storage Element refused the upload"


class StorageElementModeRefused(StorageElementRejected):
    """The element's own mode takes no uploads (its registry entry is stale): try another."""

    def __init__(self, message: str | None = None, *, element_id: str | None = None) -> None:
        super().__init__(message, element_id=element_id, upstream_status=400, retryable=True)


class ElementChecksumMismatch(StorageElementError):
    """An element reports other bytes than it was sent: a failure of the element, which
    counts against its breaker (its copy is removed; a move or an upload goes on elsewhere,
    an upload with no failover copy fails with this)."""

    status = 502
    code = "CHECKSUM_MISMATCH"
    default_message = "the Storage Element stored different bytes than were sent"


class IntegrityError(IngesterError):
    status = 502
    code = "CHECKSUM_MISMATCH"
    default_message = "the Storage Element stored different bytes than were sent"


class AdminRegistrationFailed(IngesterError):
    """The Admin Module did not register the stored file; the copy is removed."""

    status = 502
    code = "ADMIN_REGISTRATION_FAILED"
    default_message = "the Admin Module did not register the file"


class AdminRefused(AdminRegistrationFailed):
    """The Admin Module answered the request with a refusal (`4xx`, but `408` and `429`): it
    did not apply it. Any other failure (no answer, a timeout, `5xx`) leaves unknown whether
    it did."""


class UpstreamAuthError(IngesterError):
    status = 502
    code = "SE_AUTH_FAILED"
    default_message = "could not obtain a token for the Storage Element"
