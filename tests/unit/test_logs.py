"""Log lines carry whatever clients put in names, claims and headers: no character of it may
end a line, forge one, or reach a terminal raw, in either format. Pure, no I/O."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from ingester.logs import JsonFormatter, TextFormatter, escape_json, escape_text

# Every character that must never appear raw in a log line.
UNSAFE = (
    [chr(c) for c in range(0x00, 0x20)]
    + [chr(c) for c in range(0x7F, 0xA0)]
    + ["\u2028", "\u2029", "\u061c", "\u200e", "\u200f"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
HOSTILE = "eve" + "".join(UNSAFE) + 'é "quoted" \\ end'


def record(message: str = "upload by %s", *args: object, **extra: object) -> logging.LogRecord:
    item = logging.LogRecord("ingester.test", logging.INFO, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(item, key, value)
    return item


def assert_safe(line: str) -> None:
    raw = [c for c in UNSAFE if c in line]
    assert raw == [], f"raw {raw!r} in {line!r}"


def test_json_lines_escape_every_unsafe_character_and_decode_back() -> None:
    line = JsonFormatter().format(record("upload by %s", HOSTILE, user=HOSTILE, note=HOSTILE))
    assert_safe(line)
    decoded = json.loads(line)
    assert decoded["message"] == f"upload by {HOSTILE}"
    assert decoded["user"] == HOSTILE
    assert decoded["note"] == HOSTILE


def test_json_keeps_ordinary_text_as_it_is() -> None:
    line = JsonFormatter().format(record("café ünïcode 日本", user="zoë"))
    assert "café ünïcode 日本" in line
    assert '"user": "zoë"' in line


def test_json_exceptions_are_one_line_too() -> None:
    try:
        raise ValueError(f"bad {HOSTILE}")
    except ValueError:
        item = record("failed")
        item.exc_info = sys.exc_info()
    line = JsonFormatter().format(item)
    assert_safe(line)
    assert HOSTILE in json.loads(line)["exception"]


def test_text_lines_escape_every_unsafe_character() -> None:
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    line = formatter.format(record("upload by %s", HOSTILE, user=HOSTILE))
    assert_safe(line)
    assert line.startswith("INFO ingester.test: upload by eve\\x00\\x01")
    for escape in ("\\n", "\\u2028", "\\x1b", "\\x85"):
        assert escape in line
    assert line.count("user=eve") == 1


def test_text_traceback_lines_are_indented_so_none_can_pose_as_a_record() -> None:
    try:
        raise ValueError("first\nFAKE 2030-01-01 INFO forged\u2028line")
    except ValueError:
        item = record("failed")
        item.exc_info = sys.exc_info()
    lines = TextFormatter("%(levelname)s %(message)s").format(item).split("\n")
    assert lines[0] == "INFO failed"
    assert len(lines) > 2
    assert all(line.startswith("    ") for line in lines[1:])
    assert not any(line.lstrip().startswith("FAKE") and line[:4] != "    " for line in lines)
    assert_safe("\n".join(lines).replace("\n", ""))


@pytest.mark.parametrize("char", UNSAFE)
def test_each_unsafe_character_has_an_escape(char: str) -> None:
    assert char not in escape_text(f"a{char}b")
    if ord(char) >= 0x20:
        # json.dumps escapes C0 itself; the rest is ours, and decodes back.
        escaped = escape_json(json.dumps(f"a{char}b", ensure_ascii=False))
        assert char not in escaped
        assert json.loads(escaped) == f"a{char}b"
