"""schemathesis against a live ingester: two reference Storage Elements and the ingester
under hypercorn, real processes on loopback, driven by the OpenAPI description.

Every operation gets schemathesis's explicit examples, its coverage cases (boundaries,
missing and wrong-typed values, undeclared methods) and a bounded number of generated ones,
valid and invalid: once with a valid token, once without one (schemathesis then sends no
Authorization header or a made-up one). Every answer must not be a 5xx and must match the
description: status, media type, body schema, required headers (X-Request-ID on all,
WWW-Authenticate on 401, Retry-After on 429/503), 405 with Allow for undeclared methods, and
the bearer scheme enforced. After every request the Storage Elements hold exactly the files
of the uploads answered 201: a rejected request stores nothing.

The schemathesis tests are sync (schemathesis calls with `requests`): pytest-trio leaves
them alone, and each request has its own timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import schemathesis
import trio
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks as openapi_checks

from ingester import __version__
from ingester.http.openapi import openapi_document
from tests.conftest import Stack, TokenFactory
from tests.support.client import MultipartUpload, post_upload, text_chunks
from tests.support.processes import ManagedProcess

Case = schemathesis.Case[Any]

# Generated cases per operation and test (explicit examples and coverage cases come on top):
# the module runs in about 20 s on 2 cores.
MAX_EXAMPLES: Final = 40
SETTLE_TIMEOUT_S: Final = 3.0
REQUEST_TIMEOUT_S: Final = 30.0

# The description the ingester serves is this document (test_openapi.py checks they are
# equal); loading it at import gives one pytest test per operation.
# Resumable uploads are a stateful protocol (create, then PATCH at the right offset): their
# conformance is tested rule by rule in test_tus.py and with stock tus clients in
# tests/interop/, not by stateless fuzzing.
# Finalization moves files between elements in the background (a fuzzed id that met a stored
# file would move it, and the files-per-element check below could not tell): it is tested
# with real processes in test_finalize.py and tests/chaos/test_finalize_chaos.py.
schema = schemathesis.openapi.from_dict(openapi_document(__version__)).exclude(
    path_regex=r"^/api/v1/(uploads|finalize)"
)

# Not run: `positive_data_acceptance` (a valid form can still be refused for state, e.g. an
# X-Upload-ID already in use, or a rule across fields such as ttl_days with a permanent
# policy) and `negative_data_rejection` (the service is deliberately more lenient than the
# description: values are stripped, enumerations and booleans match case-insensitively, an
# empty value counts as not sent).
CHECKS: Final = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.ignored_auth,
    openapi_checks.unsupported_method,
    openapi_checks.allow_header_conformance,
    openapi_checks.missing_required_header,
]
FUZZ_SETTINGS: Final = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass
class Target:
    """The fuzzed ingester, and the files its Storage Elements may hold."""

    stack: Stack
    ingester: ManagedProcess
    expected: set[Path] = field(default_factory=set)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.ingester.url

    def record(self, status: int, body: bytes) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 201:
            return
        result = json.loads(body)
        element = next(
            se for se in self.stack.elements if se.element_id == result["storage_element_id"]
        )
        stored = element.data_dir / result["storage_filename"]
        self.expected |= {stored, stored.with_name(stored.name + ".attr.json")}

    def assert_only_accepted_files(self) -> None:
        """The elements hold exactly the accepted files. An aborted request's temporary file
        goes just after the answer, so allow a moment for that."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self.stack.all_files() != self.expected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.stack.all_files() == self.expected


@pytest.fixture(scope="module")
def target(stack: Stack) -> Iterator[Target]:
    # A fresh ingester with the docs page on, so its assets are fuzzed too.
    ingester = stack.start_ingester(
        "fuzzed", INGESTER_DOCS_ENABLED="true", INGESTER_CLIENT_IDLE_TIMEOUT_S="5"
    )
    try:
        fuzzed = Target(stack, ingester, expected=stack.all_files())
        yield fuzzed
        # Once more after the last request: nothing arrived late.
        fuzzed.assert_only_accepted_files()
        print(f"\nthe fuzzed ingester answered, by status: {dict(sorted(fuzzed.statuses.items()))}")
    finally:
        ingester.terminate()


def call_and_check(target: Target, case: Case, headers: dict[str, str]) -> schemathesis.Response:
    response = case.call(base_url=target.url, headers=headers, timeout=REQUEST_TIMEOUT_S)
    target.record(response.status_code, response.content)
    target.assert_only_accepted_files()
    case.validate_response(response, checks=CHECKS, headers=headers)
    return response


def secured(case: Case) -> bool:
    """A call of an operation that needs a token (not an undeclared-method probe)."""
    definition = case.operation.definition.raw
    return bool(definition.get("security")) and case.method.upper() == case.operation.method.upper()


@schema.parametrize()
@FUZZ_SETTINGS
def test_with_a_valid_token(case: Case, target: Target, token: TokenFactory) -> None:
    authorization = f"Bearer {token()}"
    response = call_and_check(target, case, {"Authorization": authorization})
    # The coverage phase also sends some of these cases without the header, on purpose.
    if response.request.headers.get("Authorization") == authorization:
        assert response.status_code != 401, "a valid token was refused"


@schema.parametrize()
@FUZZ_SETTINGS
def test_without_a_token(case: Case, target: Target) -> None:
    response = call_and_check(target, case, {})
    if secured(case):
        assert response.status_code == 401


async def test_a_late_field_that_changes_the_plan_is_stored_every_time(
    target: Target, token: TokenFactory
) -> None:
    """Found by the run above: with the file part first and `compress` after it, the upload
    is sent again from its spool; that second pass went to the same element under the same
    file id while the element still held the aborted first pass, and about half such
    uploads failed with 502 (`409 FILE_EXISTS` from the element)."""
    with trio.fail_after(60):
        async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
            for _ in range(20):
                body = MultipartUpload(
                    text_chunks(8192), fields=[("compress", "true")], file_first=True
                )
                response = await post_upload(http, target.url, token(), body)
                target.record(response.status_code, response.content)
                assert response.status_code == 201, response.text
                result = response.json()
                assert result["checksum"] == body.sha256
                assert result["compressed"] is True
                await trio.to_thread.run_sync(target.assert_only_accepted_files)
