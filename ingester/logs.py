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

# Characters a log line must never carry raw, whatever a client put in a token claim, a
# file name or a header: every control character (C0, DEL, C1: NEL ends a line for some
# readers, ESC starts terminal sequences), the line and paragraph separators U+2028/U+2029
# (line ends for JavaScript and some log shippers), and the bidirectional controls that make
# a viewer show text in another order than it is stored.
_UNSAFE: Final = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    *(0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)),
]
# In JSON the escapes are JSON's own (`json.dumps` already escapes C0); in text, Python's.
_JSON_ESCAPES: Final = {code: f"\\u{code:04x}" for code in _UNSAFE if code >= 0x20}
_TEXT_ESCAPES: Final = {
    code: ascii(chr(code))[1:-1] if code < 0x100 else f"\\u{code:04x}" for code in _UNSAFE
}


def escape_json(line: str) -> str:
    """A JSON document with no unsafe character raw. Such characters can only sit inside
    strings, where a `\\uXXXX` escape decodes back to the same text."""
    return line.translate(_JSON_ESCAPES)


def escape_text(text: str) -> str:
    """`text` on one line: control characters and separators shown as escapes."""
    return text.translate(_TEXT_ESCAPES)


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
        return escape_json(json.dumps(payload, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """One line per record, escaped; a traceback follows on lines indented by four spaces
    (its own text escaped too), so no text a client chose can start a line of its own."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        base = escape_text(self.formatMessage(record))
        extras = " ".join(
            f"{key}={escape_text(str(value))}"
            for key, value in record.__dict__.items()
            if key not in _RESERVED and not key.startswith("_") and value is not None
        )
        line = f"{base} {extras}" if extras else base
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n    {escape_text(part)}" for part in trace.split("\n"))
        return line


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
