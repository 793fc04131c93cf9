"""Making keys and tokens: for `ingester token`, `ingester dev` and tests, never the server.

Everything here is synchronous and does blocking file I/O; async callers wrap it in
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import base64
import functools
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

# The size every current IdP defaults to; verifiers refuse anything smaller.
KEY_BITS: Final = 2048
PRIVATE_KEY_NAME: Final = "private.pem"
PUBLIC_KEY_NAME: Final = "public.pem"


def generate_private_key_pem(bits: int = KEY_BITS) -> bytes:
    """A new RSA private key as unencrypted PKCS#8 PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem_from_private(private_key_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of an RSA private key."""
    return (
        _private_key(private_key_pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def generate_keypair(directory: Path) -> tuple[Path, Path]:
    """Make `private.pem` (mode 0600) and `public.pem` in `directory` unless they exist.

    Idempotent: an existing private key is kept, and a missing public key is derived from
    it, so tokens signed before the call stay valid.
    """
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    if not private_path.exists():
        _write_atomic(private_path, generate_private_key_pem(), mode=0o600)
    if not public_path.exists():
        _write_atomic(public_path, public_pem_from_private(private_path.read_bytes()), mode=0o644)
    return private_path, public_path


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    # The private key must never exist, even briefly, with wider permissions or half written.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_token(
    private_key_pem: bytes,
    *,
    sub: str = "dev-user",
    role: str = "user",
    ttl: int = 3600,
    token_type: str = "service_account",
    name: str | None = None,
    kid: str | None = None,
    client_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """An RS256 token in artStore's claim layout; `extra` adds or overrides claims."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "type": token_type,
        "role": role,
        "name": name or sub,
        "jti": str(uuid.uuid4()),
        "client_id": client_id,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
    }
    claims.update(extra or {})
    return _sign(private_key_pem, claims, kid)


def make_keycloak_token(
    private_key_pem: bytes,
    *,
    sub: str,
    username: str,
    roles: Sequence[str] = (),
    scope: str = "",
    azp: str = "ingester",
    ttl: int = 3600,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """An RS256 token shaped like a Keycloak access token."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        "typ": "Bearer",
        "preferred_username": username,
        "azp": azp,
        "realm_access": {"roles": list(roles)},
        "scope": scope,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "exp": issued + ttl,
    }
    return _sign(private_key_pem, claims, kid)


def _sign(private_key_pem: bytes, claims: Mapping[str, Any], kid: str | None) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(dict(claims), _private_key(private_key_pem), "RS256", headers=headers)


# Loading validates the RSA key (tens of ms); tests and `ingester dev` sign many tokens.
@functools.lru_cache(maxsize=16)
def _private_key(private_key_pem: bytes) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("the private key is not an RSA key; tokens are RS256")
    return key


def jwk_from_public_pem(public_pem: bytes, kid: str) -> dict[str, str]:
    """The RSA public JWK (RFC 7517) of a PEM public key, as a JWKS lists it."""
    # No size floor here: tests need JWKs of keys the verifier must refuse.
    key = serialization.load_pem_public_key(public_pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the public key is not an RSA key")
    numbers = key.public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": _b64url_uint(numbers.n),
        "e": _b64url_uint(numbers.e),
    }


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
