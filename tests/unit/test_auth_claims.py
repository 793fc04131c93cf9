"""Claims to `Principal`, role checks and the Authorization header: pure logic, no keys."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from ingester.auth import (
    ADMIN_ROLES,
    UPLOAD_ROLES,
    Principal,
    bearer_from_header,
    principal_from_claims,
    require_upload,
)
from ingester.errors import Forbidden, Unauthorized


def artstore_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "u-42",
        "type": "service_account",
        "role": "user",
        "name": "alice",
        "jti": "6f1c",
        "client_id": "sa-uploader",
        "iat": 1_700_000_000,
        "nbf": 1_700_000_000,
        "exp": 1_700_003_600,
    }
    claims.update(overrides)
    return claims


def keycloak_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "kc-7",
        "typ": "Bearer",
        "preferred_username": "bob",
        "azp": "artstore-web",
        "realm_access": {"roles": ["offline_access", "user"]},
        "scope": "openid profile email",
        "aud": "account",
        "exp": 1_700_003_600,
    }
    claims.update(overrides)
    return claims


def test_artstore_layout() -> None:
    principal = principal_from_claims(artstore_claims(), "raw.token.value")
    assert principal == Principal(
        subject="u-42",
        username="alice",
        roles=frozenset({"user"}),
        scopes=frozenset(),
        token_type="service_account",
        client_id="sa-uploader",
        raw_token="raw.token.value",
    )
    assert principal.can_upload
    assert not principal.is_admin


def test_artstore_admin_user_without_name_uses_sub() -> None:
    claims = artstore_claims(type="admin_user", role="admin", client_id=None)
    del claims["name"]
    principal = principal_from_claims(claims, "t")
    assert principal.username == "u-42"
    assert principal.token_type == "admin_user"
    assert principal.client_id is None
    assert principal.is_admin


def test_keycloak_layout() -> None:
    principal = principal_from_claims(keycloak_claims(), "kc.raw")
    assert principal.subject == "kc-7"
    assert principal.username == "bob"
    assert principal.roles == frozenset({"offline_access", "user"})
    assert principal.scopes == frozenset({"openid", "profile", "email"})
    assert principal.token_type == "keycloak"
    assert principal.client_id == "artstore-web"
    assert principal.raw_token == "kc.raw"
    assert principal.can_upload


def test_keycloak_username_falls_back_to_name_then_sub() -> None:
    claims = keycloak_claims(name="Bob B.")
    del claims["preferred_username"]
    assert principal_from_claims(claims, "t").username == "Bob B."
    del claims["name"]
    assert principal_from_claims(claims, "t").username == "kc-7"


@pytest.mark.parametrize(
    ("role", "can_upload", "is_admin"),
    [
        ("super_admin", True, True),
        ("admin", True, True),
        ("operator", True, False),
        ("user", True, False),
        ("auditor", False, False),
        ("readonly", False, False),
        ("something_new", False, False),
    ],
)
def test_every_artstore_role(role: str, can_upload: bool, is_admin: bool) -> None:
    principal = principal_from_claims(artstore_claims(role=role), "t")
    assert principal.roles == frozenset({role})
    assert principal.can_upload is can_upload
    assert principal.is_admin is is_admin
    if can_upload:
        require_upload(principal)
    else:
        with pytest.raises(Forbidden) as info:
            require_upload(principal)
        assert info.value.status == 403
        assert role in info.value.message


@pytest.mark.parametrize("role", sorted(UPLOAD_ROLES | {"auditor", "readonly"}))
def test_every_keycloak_realm_role(role: str) -> None:
    principal = principal_from_claims(keycloak_claims(realm_access={"roles": [role]}), "t")
    assert principal.can_upload is (role in UPLOAD_ROLES)
    assert principal.is_admin is (role in ADMIN_ROLES)


def test_files_write_scope_allows_upload_without_role() -> None:
    claims = keycloak_claims(realm_access={"roles": ["readonly"]}, scope="openid files:write")
    principal = principal_from_claims(claims, "t")
    assert principal.scopes == frozenset({"openid", "files:write"})
    assert principal.can_upload
    require_upload(principal)


def test_other_scope_does_not_allow_upload() -> None:
    claims = keycloak_claims(realm_access={"roles": []}, scope="files:read files:writer")
    principal = principal_from_claims(claims, "t")
    assert not principal.can_upload
    with pytest.raises(Forbidden):
        require_upload(principal)


def test_keycloak_without_roles_or_scope() -> None:
    claims = keycloak_claims()
    del claims["realm_access"], claims["scope"]
    principal = principal_from_claims(claims, "t")
    assert principal.roles == frozenset()
    assert principal.scopes == frozenset()
    assert not principal.can_upload


def test_refresh_token_rejected() -> None:
    with pytest.raises(Unauthorized, match="refresh token") as info:
        principal_from_claims(artstore_claims(type="refresh"), "t")
    assert info.value.status == 401
    assert 'error="invalid_token"' in info.value.headers["WWW-Authenticate"]


@pytest.mark.parametrize("typ", ["Refresh", "ID", "Offline", 7])
def test_keycloak_non_access_tokens_rejected(typ: object) -> None:
    with pytest.raises(Unauthorized, match="access tokens"):
        principal_from_claims(keycloak_claims(typ=typ), "t")


@pytest.mark.parametrize("sub", [None, "", 42])
def test_missing_or_bad_sub_rejected(sub: object) -> None:
    claims = artstore_claims(sub=sub)
    with pytest.raises(Unauthorized, match="'sub'"):
        principal_from_claims(claims, "t")
    del claims["sub"]
    with pytest.raises(Unauthorized, match="'sub'"):
        principal_from_claims(claims, "t")


def test_unknown_layout_rejected() -> None:
    with pytest.raises(Unauthorized, match="neither"):
        principal_from_claims({"sub": "x", "exp": 1, "role": "admin"}, "t")


# A list or an object (found by a review: unhashable, it raised TypeError, a 500).
@pytest.mark.parametrize("token_type", ["access", "user", "", None, ["admin_user"], {"a": 1}, 7])
def test_unknown_artstore_type_rejected(token_type: object) -> None:
    claims = artstore_claims(type=token_type)
    if token_type is None:
        # No `type`, but `role` alone is no known layout either.
        with pytest.raises(Unauthorized, match="neither"):
            principal_from_claims(claims, "t")
    else:
        with pytest.raises(Unauthorized, match="'type'"):
            principal_from_claims(claims, "t")


@pytest.mark.parametrize("role", [None, "", ["admin"]])
def test_artstore_without_usable_role_rejected(role: object) -> None:
    with pytest.raises(Unauthorized, match="'role'"):
        principal_from_claims(artstore_claims(role=role), "t")


@pytest.mark.parametrize(
    "realm_access", [{"roles": "admin"}, {"roles": [1, 2]}, ["admin"], "admin"]
)
def test_malformed_realm_roles_rejected(realm_access: object) -> None:
    with pytest.raises(Unauthorized, match="realm_access"):
        principal_from_claims(keycloak_claims(realm_access=realm_access), "t")


def test_malformed_scope_rejected() -> None:
    with pytest.raises(Unauthorized, match="'scope'"):
        principal_from_claims(keycloak_claims(scope=["files:write"]), "t")


def test_raw_token_not_in_repr() -> None:
    principal = principal_from_claims(artstore_claims(), "secret.token.value")
    assert "secret.token.value" not in repr(principal)
    assert "alice" in repr(principal)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER   a-b_c.d+e/f.g==", "a-b_c.d+e/f.g=="),
        ("  Bearer abc.def.ghi  ", "abc.def.ghi"),
    ],
)
async def test_bearer_from_header(header: str, token: str) -> None:
    with trio.fail_after(5):
        assert await bearer_from_header(header) == token


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearerabc.def.ghi",
        "Bearer abc def",
        "Bearer abc\r\nX-Evil: 1",
        "Token abc.def.ghi",
        "Bearer " + "a" * 20_000,
    ],
)
async def test_bearer_from_header_rejects(header: str | None) -> None:
    with trio.fail_after(5):
        with pytest.raises(Unauthorized) as info:
            await bearer_from_header(header)
        assert info.value.status == 401
        assert 'error="invalid_request"' in info.value.headers["WWW-Authenticate"]
