"""Attacks on the logs (B9): a token whose `name` claim carries line and paragraph separators,
escape sequences and other control characters, trying to forge or break log lines."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests.conftest import Stack, TokenFactory
from tests.hostile.common import Spawn, assert_unharmed
from tests.support.client import MultipartUpload, post_upload
from tests.support.processes import ManagedProcess

# U+2028/U+2029 end a line for JavaScript and some log shippers; NEL (U+0085) for others;
# ESC starts terminal escape sequences; CR and LF forge lines in text logs.
EVIL_NAME = (
    'eve\u2028{"level":"critical","message":"forged"}\u2029'
    "\x1b[31mred\x1b[0m\r\nFAKE 2030-01-01 INFO forged line\x85\x7f\x00end"
)
RAW_FORBIDDEN = ("\u2028", "\u2029", "\x1b", "\x85", "\x7f", "\x00", "\r")


@pytest.fixture(scope="module", params=["json", "text"])
def logged(request: pytest.FixtureRequest, spawn: Spawn) -> ManagedProcess:
    return spawn(f"logs-{request.param}", INGESTER_LOG_FORMAT=request.param)


async def test_a_name_claim_full_of_control_characters_cannot_forge_log_lines(
    stack: Stack, logged: ManagedProcess, token: TokenFactory
) -> None:
    with trio.fail_after(30):
        before = stack.all_files()
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            # A bad field: answered 400 and logged (with the user's name), nothing stored.
            response = await post_upload(
                http, logged.url, token(sub="eve", name=EVIL_NAME),
                MultipartUpload([b"x"], fields=[("ttl_days", "0")]),
            )  # fmt: skip
            assert response.status_code == 400, response.text
        await assert_unharmed(stack, logged.url, before)
        raw = logged.log_path.read_text(encoding="utf-8")
        for char in RAW_FORBIDDEN:
            assert char not in raw, f"raw {char!r} in the log"
        lines = raw.split("\n")
        assert not any(line.startswith("FAKE") for line in lines)
        if logged.env["INGESTER_LOG_FORMAT"] == "json":
            mine = []
            for line in lines:
                if line.startswith("{"):
                    record = json.loads(line)  # every line is one whole JSON document
                    if record.get("user") == EVIL_NAME:
                        mine.append(record)
            # The name is intact once decoded: escaped, not stripped.
            assert mine, "no line carried the user's name"
        else:
            assert any("\\u2028" in line and "\\x1b" in line for line in lines)
