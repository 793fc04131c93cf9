"""Small trio helpers every part shares: what a nursery's exception group reports, and the
scope of a cleanup that must run even when its caller was cancelled.

Below every feature (it knows only the project's error tree), so any part may use it.
"""

from __future__ import annotations

import logging

import trio

from .errors import IngesterError

log = logging.getLogger(__name__)


def only_cancelled(exc: BaseException) -> bool:
    """A `Cancelled`, or a group holding nothing else: the request itself was cancelled."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_cancelled(inner) for inner in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def leaves(exc: BaseException) -> list[BaseException]:
    """The errors in `exc`, groups (nested ones too) opened; `[exc]` for a plain error."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def collapse(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report for a nursery's group: the first project error, else the first one.

    A group of nothing but `Cancelled` is the caller's own cancellation and goes on as is.
    """
    errors = [exc for exc in leaves(group) if not isinstance(exc, trio.Cancelled)]
    if not errors:
        return group
    chosen = next((e for e in errors if isinstance(e, IngesterError)), errors[0])
    # What is not reported must not vanish: a bug beside an element failure, say.
    for other in errors:
        if other is chosen:
            continue
        if isinstance(other, IngesterError):
            log.info(
                "also failed: %s (%s), reported: %s",
                other.code,
                other,
                getattr(chosen, "code", type(chosen).__name__),
                extra={"event": "error_not_reported"},
            )
        else:
            log.error(
                "unexpected error beside the reported one (%s)",
                getattr(chosen, "code", type(chosen).__name__),
                exc_info=other,
                extra={"event": "error_not_reported"},
            )
    return chosen


def cleanup_scope(timeout_s: float) -> trio.CancelScope:
    """For a cleanup (a removal, a release, a close) that must run when its caller was
    cancelled too, but not forever: shielded, and cancelled `timeout_s` from now. A cleanup
    cut by the deadline ends quietly (`cancelled_caught` says so); what it left is a
    janitor's, or a lease's that runs out."""
    return trio.CancelScope(shield=True, deadline=trio.current_time() + timeout_s)
