"""`TokenVerifier` against an in-memory key: every way a token must fail, and how it passes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any, cast

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from ingester.auth import StaticKeySource, TokenVerifier
from ingester.auth.keys import load_public_key
from ingester.auth.principal import Principal
from ingester.auth.tokens import (
    generate_private_key_pem,
    make_keycloak_token,
    make_token,
    public_pem_from_private,
)
from ingester.auth.verifier import TokenHooks, VerifiedTokens, _Verified
from ingester.errors import Unauthorized


@pytest.fixture(scope="module")
def other_private_pem() -> bytes:
    return generate_private_key_pem()


class Tally:
    """What a verifier told its hooks, as the service's metrics hear it."""

    def __init__(self) -> None:
        self.hits = 0
        self.checks = 0

    def _hit(self) -> None:
        self.hits += 1

    def _check(self) -> None:
        self.checks += 1

    def hooks(self) -> TokenHooks:
        return TokenHooks(cache_hit=self._hit, full_check=self._check)


@pytest.fixture
def tally() -> Tally:
    return Tally()


@pytest.fixture
def verifier(public_key: RSAPublicKey, tally: Tally) -> TokenVerifier:
    return TokenVerifier(StaticKeySource(public_key), leeway_s=30, hooks=tally.hooks())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value).encode())


def valid_claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": "u-1",
        "type": "service_account",
        "role": "user",
        "name": "alice",
        "jti": "j",
        "client_id": None,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims


def sign_rs256(private_pem: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Sign by hand, for headers PyJWT refuses to produce."""
    key = load_pem_private_key(private_pem, password=None)
    assert isinstance(key, RSAPrivateKey)
    signing_input = f"{segment(header)}.{segment(claims)}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


async def assert_rejected(verifier: TokenVerifier, token: str, message: str) -> None:
    with pytest.raises(Unauthorized, match=message) as info:
        await verifier.verify(token)
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"].startswith('Bearer realm="artstore"')


async def test_valid_artstore_token(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, sub="svc", role="operator", name="Svc")
        principal = await verifier.verify(token)
        assert (principal.subject, principal.username) == ("svc", "Svc")
        assert principal.roles == frozenset({"operator"})
        assert principal.raw_token == token
        assert principal.can_upload


async def test_valid_keycloak_token(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_keycloak_token(private_pem, sub="kc", username="bob", scope="files:write")
        principal = await verifier.verify(token)
        assert principal.token_type == "keycloak"
        assert principal.username == "bob"
        assert principal.can_upload


async def test_keycloak_audience_ignored_when_not_configured(
    verifier: TokenVerifier, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, extra={"aud": "account", "iss": "https://kc/realms/x"})
        assert (await verifier.verify(token)).subject == "dev-user"


async def test_expired(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, ttl=60, now=time.time() - 120)
        await assert_rejected(verifier, token, "expired")


async def test_expired_within_leeway_accepted(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, ttl=60, now=time.time() - 75)  # expired 15 s ago
        assert (await verifier.verify(token)).subject == "dev-user"


async def test_not_yet_valid(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, now=time.time() + 120)
        await assert_rejected(verifier, token, "not valid yet")


async def test_nbf_within_leeway_accepted(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, now=time.time() + 15)
        assert (await verifier.verify(token)).subject == "dev-user"


async def test_zero_leeway(public_key: RSAPublicKey, private_pem: bytes) -> None:
    with trio.fail_after(5):
        strict = TokenVerifier(StaticKeySource(public_key), leeway_s=0)
        await assert_rejected(
            strict, make_token(private_pem, ttl=60, now=time.time() - 75), "expired"
        )
        await assert_rejected(
            strict, make_token(private_pem, now=time.time() + 15), "not valid yet"
        )


async def test_alg_none(verifier: TokenVerifier) -> None:
    with trio.fail_after(5):
        token = f"{segment({'alg': 'none', 'typ': 'JWT'})}.{segment(valid_claims())}."
        await assert_rejected(verifier, token, "algorithm none is not accepted")


async def test_alg_missing(verifier: TokenVerifier) -> None:
    with trio.fail_after(5):
        token = f"{segment({'typ': 'JWT'})}.{segment(valid_claims())}.c2ln"
        await assert_rejected(verifier, token, "only RS256")


async def test_hs256_signed_with_public_key(verifier: TokenVerifier, public_pem: bytes) -> None:
    # The confusion attack: a verifier that trusts the header would HMAC with the PEM bytes.
    with trio.fail_after(5):
        signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT'})}.{segment(valid_claims())}"
        signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url(signature)}"
        await assert_rejected(verifier, token, "algorithm HS256 is not accepted")


async def test_hs256_header_relabelled_as_rs256(verifier: TokenVerifier, public_pem: bytes) -> None:
    with trio.fail_after(5):
        signing_input = f"{segment({'alg': 'RS256', 'typ': 'JWT'})}.{segment(valid_claims())}"
        signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
        await assert_rejected(
            verifier, f"{signing_input}.{b64url(signature)}", "signature is invalid"
        )


async def test_rs512(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        key = load_pem_private_key(private_pem, password=None)
        assert isinstance(key, RSAPrivateKey)
        token = jwt.encode(valid_claims(), key, algorithm="RS512")
        await assert_rejected(verifier, token, "algorithm RS512 is not accepted")


async def test_es256(verifier: TokenVerifier) -> None:
    with trio.fail_after(5):
        token = jwt.encode(
            valid_claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"
        )
        await assert_rejected(verifier, token, "algorithm ES256 is not accepted")


async def test_signed_by_other_key(verifier: TokenVerifier, other_private_pem: bytes) -> None:
    with trio.fail_after(5):
        await assert_rejected(verifier, make_token(other_private_pem), "signature is invalid")


async def test_tampered_payload(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        header, _, signature = make_token(private_pem, role="readonly").split(".")
        forged = f"{header}.{segment(valid_claims(role='super_admin'))}.{signature}"
        await assert_rejected(verifier, forged, "signature is invalid")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b.c",
        "a.b",
        "....",
        "eyJhbGciOiJSUzI1NiJ9",
        "eyJhbGciOiJSUzI1NiJ9.!!!.xyz",
        f"{b64url(b'[1,2]')}.{b64url(b'{}')}.c2ln",
        f"{b64url(b'not json')}.{b64url(b'{}')}.c2ln",
    ],
)
async def test_garbage(verifier: TokenVerifier, token: str) -> None:
    with trio.fail_after(5):
        await assert_rejected(verifier, token, "empty|well-formed")


async def test_rs256_header_with_garbage_payload(
    verifier: TokenVerifier, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        header, _, signature = make_token(private_pem).split(".")
        await assert_rejected(verifier, f"{header}.{b64url(b'not json')}.{signature}", "invalid")


async def test_over_long_token(verifier: TokenVerifier) -> None:
    with trio.fail_after(5):
        await assert_rejected(verifier, "a" * 20_000, "longer than")


async def test_unprintable_alg_not_echoed(verifier: TokenVerifier) -> None:
    with trio.fail_after(5):
        evil_header = segment({"alg": "x\r\nSet-Cookie: a=b"})
        token = f"{evil_header}.{segment(valid_claims())}.c2ln"
        with pytest.raises(Unauthorized) as info:
            await verifier.verify(token)
        assert "\r" not in info.value.headers["WWW-Authenticate"]
        assert "Set-Cookie" not in info.value.message


async def test_non_string_kid(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = sign_rs256(private_pem, {"alg": "RS256", "kid": 5}, valid_claims())
        await assert_rejected(verifier, token, "well-formed")


@pytest.mark.parametrize("claim", ["exp", "sub"])
async def test_required_claims(verifier: TokenVerifier, private_pem: bytes, claim: str) -> None:
    with trio.fail_after(5):
        claims = valid_claims()
        del claims[claim]
        token = sign_rs256(private_pem, {"alg": "RS256", "typ": "JWT"}, claims)
        await assert_rejected(verifier, token, f"no '{claim}' claim")


async def test_refresh_token(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        await assert_rejected(
            verifier, make_token(private_pem, token_type="refresh"), "refresh token"
        )


async def test_non_numeric_exp(verifier: TokenVerifier, private_pem: bytes) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, extra={"exp": "tomorrow"})
        await assert_rejected(verifier, token, "well-formed|invalid")


async def test_issuer_and_audience_when_configured(
    public_key: RSAPublicKey, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        verifier = TokenVerifier(
            StaticKeySource(public_key), issuer="https://idp/realms/artstore", audience="ingester"
        )
        good = {"iss": "https://idp/realms/artstore", "aud": ["account", "ingester"]}
        assert (await verifier.verify(make_token(private_pem, extra=good))).subject == "dev-user"
        await assert_rejected(
            verifier, make_token(private_pem, extra={**good, "iss": "https://evil"}), "issuer"
        )
        await assert_rejected(
            verifier, make_token(private_pem, extra={**good, "aud": "account"}), "audience"
        )
        await assert_rejected(
            verifier, make_token(private_pem, extra={"aud": "ingester"}), "no 'iss' claim"
        )
        await assert_rejected(
            verifier, make_token(private_pem, extra={"iss": good["iss"]}), "no 'aud' claim"
        )


def test_static_source_refuses_non_rsa_and_small_keys() -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="not an RSA key"):
        load_public_key(ec_pem, origin="ec")
    small_pem = public_pem_from_private(generate_private_key_pem(1024))
    small = load_pem_public_key(small_pem)
    assert isinstance(small, RSAPublicKey)
    with pytest.raises(ValueError, match="1024 bits"):
        StaticKeySource(small)


# --- tokens that passed are kept ---------------------------------------------------------


class SwappableKeySource:
    """One key at a time, swapped by the test: a rotation without a file or a server."""

    def __init__(self, key: RSAPublicKey) -> None:
        self.key = key
        self.lookups = 0

    async def key_for(self, kid: str | None) -> RSAPublicKey:
        self.lookups += 1
        return self.key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


async def test_a_token_that_passed_is_answered_from_memory(
    verifier: TokenVerifier, tally: Tally, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        token = make_token(private_pem, sub="svc", role="operator")
        first = await verifier.verify(token)
        again = await verifier.verify(token)
        assert again is first
        assert (tally.hits, tally.checks) == (1, 1)
        # Another token is its own entry.
        other = await verifier.verify(make_token(private_pem, sub="svc2"))
        assert other.subject == "svc2"
        assert (tally.hits, tally.checks) == (1, 2)
        assert verifier.verified is not None
        assert len(verifier.verified) == 2


async def test_a_kept_token_is_not_served_past_its_expiry(
    public_key: RSAPublicKey, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        now = [time.time()]
        tally = Tally()
        clocked = TokenVerifier(
            StaticKeySource(public_key), leeway_s=30, clock=lambda: now[0], hooks=tally.hooks()
        )
        token = make_token(private_pem, ttl=600)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        await clocked.verify(token)
        now[0] = exp + 29.5  # within the leeway
        await clocked.verify(token)
        assert tally.hits == 1
        now[0] = exp + 30  # PyJWT's boundary: expired once exp <= now - leeway
        await clocked.verify(token)  # checked in full again (PyJWT reads the real clock)
        assert (tally.hits, tally.checks) == (1, 2)


async def test_a_rotated_key_voids_what_the_old_one_verified(
    public_key: RSAPublicKey, private_pem: bytes, other_private_pem: bytes
) -> None:
    with trio.fail_after(5):
        keys = SwappableKeySource(public_key)
        tally = Tally()
        rotating = TokenVerifier(keys, hooks=tally.hooks())
        token = make_token(private_pem)
        await rotating.verify(token)
        await rotating.verify(token)
        assert tally.hits == 1
        keys.key = load_public_key(public_pem_from_private(other_private_pem), origin="new")
        await assert_rejected(rotating, token, "signature is invalid")
        assert rotating.verified is not None
        assert len(rotating.verified) == 0
        # Tokens of the new key are kept in turn.
        fresh = make_token(other_private_pem, sub="after")
        assert (await rotating.verify(fresh)).subject == "after"
        assert (await rotating.verify(fresh)).subject == "after"
        assert tally.hits == 2


async def test_refused_tokens_are_not_kept(
    verifier: TokenVerifier, tally: Tally, private_pem: bytes
) -> None:
    with trio.fail_after(5):
        expired = make_token(private_pem, ttl=60, now=time.time() - 120)
        refresh = make_token(private_pem, token_type="refresh")
        for _ in range(2):
            await assert_rejected(verifier, expired, "expired")
            await assert_rejected(verifier, refresh, "refresh token")
        assert verifier.verified is not None
        assert len(verifier.verified) == 0
        assert (tally.hits, tally.checks) == (0, 4)


async def test_no_cache_when_its_size_is_zero(public_key: RSAPublicKey, private_pem: bytes) -> None:
    with trio.fail_after(5):
        keys = SwappableKeySource(public_key)
        tally = Tally()
        uncached = TokenVerifier(keys, cache_size=0, hooks=tally.hooks())
        token = make_token(private_pem)
        for _ in range(3):
            assert (await uncached.verify(token)).subject == "dev-user"
        assert uncached.verified is None
        assert (tally.hits, tally.checks, keys.lookups) == (0, 3, 3)


def test_verified_tokens_keep_the_most_recently_used() -> None:
    kept = VerifiedTokens(2)

    def entry(expires_at: int) -> Any:
        roles = frozenset({"user"})
        principal = Principal("s", "s", roles, frozenset(), "service_account", None, "t")
        return _Verified(principal, None, cast(RSAPublicKey, object()), expires_at)

    a, b, c = entry(1000), entry(1000), entry(1000)
    kept.put("a", a)
    kept.put("b", b)
    assert kept.get("a", 0, 30) is a  # "a" is now the most recent
    kept.put("c", c)
    assert (kept.get("b", 0, 30), kept.get("a", 0, 30), kept.get("c", 0, 30)) == (None, a, c)
    assert len(kept) == 2
    # Expiry is PyJWT's rule, and an expired entry leaves.
    assert kept.get("a", 1029.9, 30) is a
    assert kept.get("a", 1030, 30) is None
    assert len(kept) == 1
    kept.discard("c")
    kept.discard("c")
    assert len(kept) == 0
    with pytest.raises(ValueError, match="size must be >= 1"):
        VerifiedTokens(0)
