"""The client's exceptions: what ends the command, a file, or only an attempt."""

from __future__ import annotations


class ClientError(Exception):
    """Base of the client's errors; the message is the one line the user reads."""


class UsageError(ClientError):
    """The command line is wrong: nothing was sent (exit code 2)."""


class UploadFailed(ClientError):
    """This file was not stored; the next one is tried (exit code 1 in the end)."""


class TokenRejected(UploadFailed):
    """401 or 403: every other file would be refused the same way, so none is tried."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class GaveUp(UploadFailed):
    """Attempts ran out with no progress: the server may have the file or part of it, so
    what lets a rerun resume is kept."""


class Retryable(ClientError):
    """This attempt failed in a way another attempt may not: a dropped connection, a
    timeout, `5xx`, `429`, `423`. `retry_after` is the server's `Retry-After`, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UploadGone(ClientError):
    """The resumable upload is not on the server any more (expired, removed, another
    user's): start it afresh."""
