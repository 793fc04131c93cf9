"""Token and JWK making (`ingester.auth.tokens`), checked against PyJWT and cryptography."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from ingester.auth.keys import load_public_key
from ingester.auth.tokens import (
    generate_private_key_pem,
    jwk_from_public_pem,
    make_keycloak_token,
    make_token,
    public_pem_from_private,
)


def header_of(token: str) -> dict[str, object]:
    segment = token.split(".")[0]
    decoded = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(decoded, dict)
    return decoded


def test_make_token_artstore_layout(private_pem: bytes, public_key: RSAPublicKey) -> None:
    token = make_token(
        private_pem, sub="svc-1", role="operator", ttl=600, client_id="cli", now=1_000_000
    )
    claims = jwt.decode(token, public_key, algorithms=["RS256"], options={"verify_exp": False})
    jti = claims.pop("jti")
    assert len(jti) == 36
    assert claims == {
        "sub": "svc-1",
        "type": "service_account",
        "role": "operator",
        "name": "svc-1",
        "client_id": "cli",
        "iat": 1_000_000,
        "nbf": 1_000_000,
        "exp": 1_000_600,
    }
    assert header_of(token) == {"alg": "RS256", "typ": "JWT"}


def test_make_token_options(private_pem: bytes, public_key: RSAPublicKey) -> None:
    token = make_token(
        private_pem,
        token_type="admin_user",
        name="Alice",
        kid="k1",
        extra={"iss": "artstore", "role": "admin"},
    )
    claims = jwt.decode(token, public_key, algorithms=["RS256"], issuer="artstore")
    assert claims["type"] == "admin_user"
    assert claims["name"] == "Alice"
    assert claims["role"] == "admin"
    assert claims["client_id"] is None
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["exp"] - claims["iat"] == 3600
    assert header_of(token)["kid"] == "k1"


def test_make_token_jti_unique(private_pem: bytes) -> None:
    tokens = {make_token(private_pem, now=1) for _ in range(5)}
    assert len(tokens) == 5


def test_make_keycloak_token(private_pem: bytes, public_key: RSAPublicKey) -> None:
    token = make_keycloak_token(
        private_pem,
        sub="kc-1",
        username="bob",
        roles=["user", "offline_access"],
        scope="openid files:write",
        kid="kc-key",
        now=2_000_000,
        ttl=60,
    )
    claims = jwt.decode(token, public_key, algorithms=["RS256"], options={"verify_exp": False})
    assert claims["sub"] == "kc-1"
    assert claims["preferred_username"] == "bob"
    assert claims["azp"] == "ingester"
    assert claims["realm_access"] == {"roles": ["user", "offline_access"]}
    assert claims["scope"] == "openid files:write"
    assert claims["typ"] == "Bearer"
    assert (claims["iat"], claims["exp"]) == (2_000_000, 2_000_060)
    assert header_of(token)["kid"] == "kc-key"


def test_jwk_round_trip(private_pem: bytes, public_key: RSAPublicKey) -> None:
    jwk = jwk_from_public_pem(public_pem_from_private(private_pem), "k-9")
    assert set(jwk) == {"kty", "kid", "use", "alg", "n", "e"}
    assert (jwk["kty"], jwk["kid"], jwk["use"], jwk["alg"], jwk["e"]) == (
        "RSA",
        "k-9",
        "sig",
        "RS256",
        "AQAB",
    )
    assert "=" not in jwk["n"]
    parsed = jwt.PyJWK(jwk)
    assert isinstance(parsed.key, RSAPublicKey)
    assert parsed.key.public_numbers() == public_key.public_numbers()


def test_make_token_rejects_non_key() -> None:
    with pytest.raises(ValueError, match="PEM private key"):
        make_token(b"not a key")


def test_load_public_key_formats(private_pem: bytes, public_key: RSAPublicKey) -> None:
    pem = public_pem_from_private(private_pem)
    assert load_public_key(pem, origin="x").public_numbers() == public_key.public_numbers()
    bare = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    assert load_public_key(bare, origin="x").public_numbers() == public_key.public_numbers()


def test_load_public_key_rejects(private_pem: bytes) -> None:
    with pytest.raises(ValueError, match=r"^where: not a PEM RSA public key"):
        load_public_key(
            b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", origin="where"
        )
    with pytest.raises(ValueError, match="not a PEM RSA public key"):
        load_public_key(b"", origin="where")
    # A private key in the public key's place is a mistake worth stopping at.
    with pytest.raises(ValueError, match="not a PEM RSA public key"):
        load_public_key(private_pem, origin="where")


def test_load_public_key_rejects_small_rsa() -> None:
    small = public_pem_from_private(generate_private_key_pem(1024))
    with pytest.raises(ValueError, match="1024 bits"):
        load_public_key(small, origin="where")
