"""Errors of resumable uploads: each an `IngesterError` with its status and stable code, so
the one error mapping (`ingester.http.base`) answers them like every other error."""

from __future__ import annotations

from ..errors import BadRequest, FileTooLarge, IngesterError


class TusVersionUnsupported(IngesterError):
    """`Tus-Resumable` is missing or names a version we do not speak (the request is not run)."""

    status = 412
    code = "TUS_VERSION_UNSUPPORTED"
    default_message = "Tus-Resumable must be 1.0.0"


class InvalidTusHeader(BadRequest):
    code = "INVALID_TUS_HEADER"
    default_message = "a tus header has an invalid value"


class WrongContentType(IngesterError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    default_message = "PATCH bodies must be application/offset+octet-stream"


class OffsetMismatch(IngesterError):
    """The request's `Upload-Offset` is not the upload's: nothing was changed."""

    status = 409
    code = "UPLOAD_OFFSET_MISMATCH"
    default_message = "Upload-Offset does not match the upload's offset"


class ChecksumMismatch(IngesterError):
    """The chunk does not match its `Upload-Checksum`: it was discarded."""

    status = 460
    code = "UPLOAD_CHECKSUM_MISMATCH"
    default_message = "the chunk does not match its Upload-Checksum; it was discarded"


class ChunkOverrun(FileTooLarge):
    """A body without Content-Length went past the upload's end: refused whole, nothing of
    it kept (413 FILE_TOO_LARGE, like a Content-Length over the room left)."""


class FinalUploadNotPatchable(IngesterError):
    status = 403
    code = "FINAL_UPLOAD_NOT_PATCHABLE"
    default_message = "a final (concatenated) upload cannot be patched"


class UploadExpired(IngesterError):
    status = 410
    code = "UPLOAD_EXPIRED"
    default_message = "the upload expired; start a new one"


class UploadDataLost(IngesterError):
    """The state says more bytes are stored than the data file holds (it was removed or cut
    outside the ingester): the upload cannot go on."""

    status = 410
    code = "UPLOAD_DATA_LOST"
    default_message = "the upload's data is gone; start a new one"


class UploadLocked(IngesterError):
    """Another request holds the upload and did not let go in time."""

    status = 423
    code = "UPLOAD_LOCKED"
    default_message = "another request is working on this upload; retry shortly"


class TooManyOpenUploads(IngesterError):
    """The user has INGESTER_TUS_MAX_UPLOADS_PER_USER unfinished uploads: finish, terminate
    or let some expire first."""

    status = 429
    code = "TOO_MANY_OPEN_UPLOADS"
    default_message = "too many unfinished resumable uploads for this user"


class UploadQuotaExceeded(IngesterError):
    """The user's unfinished uploads would declare more than INGESTER_TUS_MAX_BYTES_PER_USER."""

    status = 429
    code = "UPLOAD_QUOTA_EXCEEDED"
    default_message = "the user's unfinished uploads would declare too many bytes"


class UploadCompleting(IngesterError):
    status = 503
    code = "UPLOAD_COMPLETING"
    default_message = "the upload is being stored; ask again shortly"


class TusStoreUnavailable(IngesterError):
    """The upload state store (Redis) could not be reached: nothing was changed."""

    status = 503
    code = "TUS_STORE_UNAVAILABLE"
    default_message = "the resumable upload state store is unavailable"
