"""How the ingester authenticates to Storage Elements (`INGESTER_SE_AUTH`).

`forward` passes the caller's own token on, `static` sends one configured token, and
`client_credentials` obtains a token of its own from an OAuth 2 token endpoint (RFC 6749
section 4.4) and caches it until shortly before it expires.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from typing import Any, Final, Protocol

import httpx
import trio

from ..auth.principal import Principal
from ..boundary import http_errors
from ..errors import UpstreamAuthError
from ..settings import SEAuthMode, Settings

log = logging.getLogger(__name__)

# A token endpoint that has not answered in this long is down; the upload should fail fast.
TOKEN_REQUEST_TIMEOUT_S: Final = 10.0
# RFC 6749 makes `expires_in` optional; assume a short life so a revoked secret shows soon.
DEFAULT_LIFETIME_S: Final = 60.0
# Refresh this early at least, so a token never expires between our check and the upload.
MIN_REFRESH_MARGIN_S: Final = 10.0
# ... or this share of the lifetime, for long-lived tokens and skewed clocks.
REFRESH_MARGIN_FRACTION: Final = 0.1


class SETokenProvider(Protocol):
    async def authorization(self, principal: Principal | None) -> str | None:
        """The `Authorization` header value for a Storage Element call, or None for none."""
        ...


def refresh_margin(lifetime_s: float) -> float:
    """How long before expiry a token of this lifetime is replaced."""
    return max(MIN_REFRESH_MARGIN_S, REFRESH_MARGIN_FRACTION * lifetime_s)


class ForwardTokenProvider:
    """Storage Elements see the caller's own token (they verify it with the same key)."""

    async def authorization(self, principal: Principal | None) -> str | None:
        return None if principal is None else f"Bearer {principal.raw_token}"


# What artStore's element requires of a token (its `UnifiedJWTPayload`, read in the eleventh
# session): these claims, a `type` of these, no `aud` at all (it passes PyJWT no audience,
# which then refuses any token that has one), and no clock leeway.
ARTSTORE_CLAIMS: Final = ("sub", "type", "role", "name", "jti", "iat", "exp", "nbf")
ARTSTORE_TOKEN_TYPES: Final = frozenset({"admin_user", "service_account", "access", "refresh"})


def artstore_token_problems(token: str) -> list[str]:
    """Why artStore's element would refuse `token` (its claims read, not verified): empty
    when it would take it, as far as its claims tell. No I/O."""
    raw = token[7:] if token[:7].lower() == "bearer " else token
    parts = raw.split(".")
    if len(parts) != 3:
        return ["it is not a JWT"]
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return ["its claims cannot be read"]
    if not isinstance(claims, dict):
        return ["its claims are not a JSON object"]
    problems = []
    missing = [name for name in ARTSTORE_CLAIMS if name not in claims]
    if missing:
        problems.append(f"it lacks {', '.join(missing)}")
    if "type" in claims and claims["type"] not in ARTSTORE_TOKEN_TYPES:
        problems.append(f"its type {claims['type']!r} is not one of {sorted(ARTSTORE_TOKEN_TYPES)}")
    if "aud" in claims:
        problems.append("it has an aud claim, which it refuses whatever its value")
    return problems


def warn_if_artstore_would_refuse(token: str, source: str) -> None:
    problems = artstore_token_problems(token)
    if problems:
        log.warning(
            "the %s would be refused by artStore's Storage Element: %s (see the README, "
            '"artStore\'s Storage Element"); elements that take it are unaffected',
            source,
            "; ".join(problems),
            extra={"event": "se_token_not_artstore", "problems": problems},
        )


class StaticTokenProvider:
    def __init__(self, token: str) -> None:
        self._value = token if token[:7].lower() == "bearer " else f"Bearer {token}"
        warn_if_artstore_would_refuse(token, "Storage Element token (INGESTER_SE_TOKEN)")

    async def authorization(self, principal: Principal | None) -> str | None:
        return self._value


class ClientCredentialsProvider:
    """A service token from the token endpoint, shared by all uploads.

    One refresh runs at a time; callers that arrive meanwhile wait for it and share its
    outcome, so a burst of uploads costs one token request, even when that request fails.
    A token in its refresh window is still used if the refresh fails.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        http: httpx.AsyncClient,
        *,
        timeout_s: float = TOKEN_REQUEST_TIMEOUT_S,
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._http = http
        self._timeout_s = timeout_s
        self._token: str | None = None
        self._expires_at = 0.0
        self._refresh_at = 0.0
        self._lock = trio.Lock()
        self._attempts = 0
        self._last_error: UpstreamAuthError | None = None
        # Its first token's claims are checked against artStore's rules, once.
        self._checked = False

    async def authorization(self, principal: Principal | None) -> str | None:
        return f"Bearer {await self.token()}"

    async def token(self) -> str:
        now = trio.current_time()
        if self._token is not None and now < self._refresh_at:
            return self._token
        if self._token is not None and now < self._expires_at and self._lock.locked():
            return self._token  # still valid: no need to wait for the refresh in progress
        attempts_seen = self._attempts
        async with self._lock:
            if self._attempts == attempts_seen:
                await self._refresh()
            # Our refresh or the one we waited for has decided; share its outcome.
            if self._token is not None and trio.current_time() < self._expires_at:
                return self._token
            raise self._last_error or UpstreamAuthError()

    async def _refresh(self) -> None:
        try:
            token, lifetime = await self._request()
        except UpstreamAuthError as exc:
            # Counted only once decided: a refresh cancelled with its caller's request must
            # leave the next waiter to try again, not to inherit a failure.
            self._attempts += 1
            self._last_error = exc
            usable = self._token is not None and trio.current_time() < self._expires_at
            log.warning(
                "Storage Element token refresh failed: %s%s",
                exc.message,
                "; using the current token until it expires" if usable else "",
                extra={"event": "se_token_refresh_failed"},
            )
            return
        self._attempts += 1
        now = trio.current_time()
        self._token = token
        self._expires_at = now + lifetime
        self._refresh_at = now + lifetime - refresh_margin(lifetime)
        self._last_error = None
        log.info(
            "obtained a Storage Element token valid for %g s",
            lifetime,
            extra={"event": "se_token_refreshed"},
        )
        if not self._checked:
            self._checked = True
            warn_if_artstore_would_refuse(token, "Storage Element token from the token endpoint")

    async def _request(self) -> tuple[str, float]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        response: httpx.Response | None = None
        with trio.move_on_after(self._timeout_s):
            with http_errors(
                lambda exc: UpstreamAuthError(f"token endpoint unreachable: {type(exc).__name__}")
            ):
                response = await self._http.post(
                    self.token_url,
                    data=form,
                    headers={"Accept": "application/json"},
                    timeout=self._timeout_s,
                )
        if response is None:
            raise UpstreamAuthError(f"token endpoint did not answer within {self._timeout_s:g} s")
        body = _json_object(response)
        if response.status_code != 200:
            # RFC 6749 5.2: `error` names the cause (invalid_client, unauthorized_client...).
            reason = body.get("error") if body is not None else None
            detail = f" ({reason})" if isinstance(reason, str) and reason.isprintable() else ""
            raise UpstreamAuthError(
                f"token endpoint answered HTTP {response.status_code}{detail}"[:200]
            )
        if body is None:
            raise UpstreamAuthError("token endpoint answered with something other than JSON")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise UpstreamAuthError("token endpoint answered without an access_token")
        token_type = body.get("token_type", "Bearer")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise UpstreamAuthError("token endpoint issued a token that is not a Bearer token")
        return token, _lifetime(body.get("expires_in"))


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        value = response.json()
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _lifetime(expires_in: Any) -> float:
    if expires_in is None:
        return DEFAULT_LIFETIME_S
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
        raise UpstreamAuthError("token endpoint answered with a non-numeric expires_in")
    try:
        lifetime = float(expires_in)
    except ValueError:
        raise UpstreamAuthError("token endpoint answered with a non-numeric expires_in") from None
    if not (math.isfinite(lifetime) and lifetime > 0):
        raise UpstreamAuthError("token endpoint answered with an unusable expires_in")
    return lifetime


def build_se_token_provider(settings: Settings, http: httpx.AsyncClient) -> SETokenProvider:
    if settings.se_auth is SEAuthMode.FORWARD:
        return ForwardTokenProvider()
    if settings.se_auth is SEAuthMode.STATIC:
        # Settings validation guarantees these; re-checked so a bypass fails here, not later.
        if not settings.se_token:
            raise ValueError("INGESTER_SE_AUTH=static needs INGESTER_SE_TOKEN")
        return StaticTokenProvider(settings.se_token)
    if not (settings.se_token_url and settings.se_client_id and settings.se_client_secret):
        raise ValueError(
            "INGESTER_SE_AUTH=client_credentials needs INGESTER_SE_TOKEN_URL, "
            "INGESTER_SE_CLIENT_ID and INGESTER_SE_CLIENT_SECRET"
        )
    return ClientCredentialsProvider(
        settings.se_token_url, settings.se_client_id, settings.se_client_secret, http
    )
