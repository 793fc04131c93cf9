"""Bearer token verification: RS256 only, keys from a PEM file or a JWKS endpoint.

PyJWT is told `algorithms=["RS256"]`, and the header's `alg` is checked before any key is
looked up, so `none`, HS256 signed with the public key as the HMAC secret (the classic
confusion attack) and every other algorithm fail without touching the key source. One RS256
verification costs well under a millisecond, so it runs on the event loop.
"""

from __future__ import annotations

import logging
import re
from typing import Final

import httpx
import jwt
import trio
from jwt.types import Options

from ..errors import Forbidden, Unauthorized
from ..settings import Settings
from .keys import JwksKeySource, KeySource, PemKeySource
from .principal import Principal, principal_from_claims

log = logging.getLogger(__name__)

ALGORITHM: Final = "RS256"
# Keycloak tokens with many roles run to a few KiB; beyond this it is not a token we issued,
# and parsing it would be work an anonymous caller gets for free.
MAX_TOKEN_LENGTH: Final = 16 * 1024
# RFC 6750 b64token, with the three JWS segments made explicit.
_BEARER_RE: Final = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *$")
# Only short alphanumeric `alg` values are echoed back; anything else could be an injection.
_PRINTABLE_ALG_RE: Final = re.compile(r"^[A-Za-z0-9+\-]{1,16}$")

# PyJWT's messages are fine for logs but not all are precise enough for a client.
_MESSAGES: Final[dict[type[jwt.PyJWTError], str]] = {
    jwt.ExpiredSignatureError: "the token has expired",
    jwt.ImmatureSignatureError: "the token is not valid yet (nbf or iat in the future)",
    jwt.InvalidSignatureError: "the token signature is invalid",
    jwt.InvalidAudienceError: "the token's audience is not accepted here",
    jwt.InvalidIssuerError: "the token's issuer is not accepted here",
    jwt.InvalidAlgorithmError: f"the token must be signed with {ALGORITHM}",
    jwt.InvalidKeyError: "the token cannot be verified with the configured key",
}


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or raises `Unauthorized` saying why."""

    def __init__(
        self,
        keys: KeySource,
        *,
        leeway_s: float = 30.0,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self.keys = keys
        self._leeway_s = leeway_s
        self._issuer = issuer
        self._audience = audience
        self._options: Options = {
            "require": ["exp", "sub"],
            "verify_signature": True,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            # Keycloak puts `aud: account` in every token: only check what was configured.
            "verify_aud": audience is not None,
            "verify_iss": issuer is not None,
            "enforce_minimum_key_length": True,
        }

    async def verify(self, token: str) -> Principal:
        if not token:
            raise Unauthorized("the bearer token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            shown = f" {alg}" if isinstance(alg, str) and _PRINTABLE_ALG_RE.match(alg) else ""
            raise Unauthorized(f"the token algorithm{shown} is not accepted; only {ALGORITHM}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("the token's 'kid' header must be a string")
        key = await self.keys.key_for(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                options=self._options,
                leeway=self._leeway_s,
                issuer=self._issuer,
                audience=self._audience,
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the token has no '{exc.claim}' claim") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(_message(exc)) from None
        return principal_from_claims(claims, token)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.keys.run(task_status=task_status)


def _message(exc: jwt.PyJWTError) -> str:
    for cls, message in _MESSAGES.items():
        if isinstance(exc, cls):
            return message
    if isinstance(exc, jwt.DecodeError):
        return "the token is not a well-formed JWT"
    return "the token is invalid"


def build_verifier(settings: Settings, http: httpx.AsyncClient) -> TokenVerifier | None:
    """The verifier the settings describe, or None when no key source is configured.

    A PEM key is read here, so a missing or broken file stops the service at start-up with
    a `ValueError` rather than failing every request later.
    """
    keys: KeySource
    if settings.auth_public_key_path is not None:
        keys = PemKeySource.load(
            settings.auth_public_key_path, interval_s=settings.auth_key_reload_interval_s
        )
        log.info(
            "verifying RS256 tokens with %s",
            settings.auth_public_key_path,
            extra={"event": "auth_configured"},
        )
    elif settings.auth_jwks_url is not None:
        keys = JwksKeySource(settings.auth_jwks_url, http, cache_s=settings.auth_jwks_cache_s)
        log.info(
            "verifying RS256 tokens with the JWKS at %s",
            settings.auth_jwks_url,
            extra={"event": "auth_configured"},
        )
    else:
        log.warning(
            "no INGESTER_AUTH_PUBLIC_KEY_PATH or INGESTER_AUTH_JWKS_URL: "
            "every authenticated call will be refused",
            extra={"event": "auth_unconfigured"},
        )
        return None
    return TokenVerifier(
        keys,
        leeway_s=settings.auth_leeway_s,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


async def bearer_from_header(value: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value.

    Async only because callers were written against an async signature; it does no I/O.
    """
    if value is None or not value.strip():
        raise Unauthorized("an Authorization: Bearer token is required", error="invalid_request")
    if len(value) > MAX_TOKEN_LENGTH + 16:
        raise Unauthorized("the Authorization header is too long", error="invalid_request")
    match = _BEARER_RE.match(value.strip())
    if match is None:
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'", error="invalid_request"
        )
    return match.group(1)


def require_upload(principal: Principal) -> None:
    if not principal.can_upload:
        roles = ", ".join(sorted(principal.roles)) or "none"
        raise Forbidden(
            f"role {roles} cannot upload; uploading needs super_admin, admin, operator or "
            "user, or the files:write scope"
        )
