"""Structured logging: JSON lines carrying the request's context on every line.

The context lives in contextvars. Trio copies the context into each task when it is spawned,
so the tasks of an upload's nursery log with the request's `request_id`, `user` and
`upload_id` without passing them around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

CONTEXT_FIELDS: Final = ("request_id", "upload_id", "user", "storage_element_id")

_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "ingester_log_context", default=MappingProxyType({})
)


def bind(**fields: str | None) -> None:
    """Add fields to the current task's log context (and to tasks it spawns later)."""
    current = dict(_context.get())
    for key, value in fields.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    _context.set(current)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _context.get()
        for key in CONTEXT_FIELDS:
            if not hasattr(record, key):
                setattr(record, key, ctx.get(key))
        return True


_RESERVED: Final = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        # The request context is on every line, null where not known (yet), so a log query
        # on any of them never has to guess whether the key exists.
        for key in CONTEXT_FIELDS:
            payload[key] = getattr(record, key, None)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and value is not None:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _RESERVED and not key.startswith("_") and value is not None
        )
        return f"{base} {extras}" if extras else base


def configure(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # hypercorn's access log duplicates ours; its error log stays.
    logging.getLogger("hypercorn.access").disabled = True
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
