"""Would artStore's Storage Element take the token we send it? Its claims read, nothing
verified, no I/O. Its rules (read in its code): `sub, type, role, name, jti, iat, exp, nbf`
present, a `type` of its four, and no `aud` at all."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from ingester.storage.se_auth import StaticTokenProvider, artstore_token_problems

GOOD = {
    "sub": "ingester-svc",
    "type": "service_account",
    "role": "service",
    "name": "ingester-svc",
    "jti": "1",
    "iat": 1,
    "exp": 2,
    "nbf": 1,
}


def jwt(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


def test_a_token_of_its_shape_has_no_problem() -> None:
    assert artstore_token_problems(jwt(GOOD)) == []
    assert artstore_token_problems("Bearer " + jwt(GOOD)) == []


@pytest.mark.parametrize(
    ("claims", "problem"),
    [
        ({**GOOD, "aud": "account"}, "it has an aud claim, which it refuses whatever its value"),
        ({k: v for k, v in GOOD.items() if k not in ("jti", "nbf")}, "it lacks jti, nbf"),
        (
            {**GOOD, "type": "user"},
            "its type 'user' is not one of ['access', 'admin_user', 'refresh', 'service_account']",
        ),
    ],
)
def test_what_it_would_refuse_is_named(claims: dict[str, object], problem: str) -> None:
    assert artstore_token_problems(jwt(claims)) == [problem]


def test_what_is_not_a_jwt_is_said_so() -> None:
    assert artstore_token_problems("opaque-token") == ["it is not a JWT"]
    assert artstore_token_problems("a.%%%.c") == ["its claims cannot be read"]
    assert artstore_token_problems(jwt([1, 2])) == ["its claims are not a JSON object"]


def test_a_static_token_it_would_refuse_is_warned_about_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ingester.storage.se_auth"):
        StaticTokenProvider(jwt(GOOD))
        assert not caplog.records
        StaticTokenProvider(jwt({**GOOD, "aud": "account"}))
    (record,) = caplog.records
    assert "aud" in record.getMessage()
