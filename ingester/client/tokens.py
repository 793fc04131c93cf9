"""What is wrong with the token, when the ingester answered 401 or 403.

The server's answer says which check failed; the token's own claims (read here without
checking the signature: the client has no key, and only explains) say what the user can do
about it: an expired token needs a new one, a refresh token is the wrong kind, a role that
may not upload needs another token.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import Any, Final

_DESCRIPTION_RE: Final = re.compile(r'error_description="([^"]*)"')
FRESH_TOKEN_HINT: Final = "get a new one (dev stack: ingester token --key .dev/keys/private.pem)"


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, without any check; None when it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def explain_rejection(
    status: int, answer: str, www_authenticate: str | None, token: str, now: float | None = None
) -> str:
    """One line: the server's answer, then what it means for this token."""
    from ..auth.principal import UPLOAD_ROLES, UPLOAD_SCOPE

    now = time.time() if now is None else now
    claims = unverified_claims(token)
    described = _DESCRIPTION_RE.search(www_authenticate or "")
    if described and described.group(1) not in answer:
        answer = f"{answer} ({described.group(1)})"
    if status == 403:
        role = None if claims is None else claims.get("role")
        role_note = f"; its role is {role}" if isinstance(role, str) else ""
        return (
            f"the token may not upload ({answer}){role_note}: ask for a token with role "
            f"{_either(sorted(UPLOAD_ROLES))}, or the {UPLOAD_SCOPE} scope"
        )
    prefix = f"the server refused the token ({answer})"
    if claims is None:
        return f"{prefix}: it is not a JWT; check --token or INGESTER_TOKEN"
    expires = claims.get("exp")
    if isinstance(expires, int | float) and expires <= now:
        return f"{prefix}: it expired {_ago(now - expires)} ago; {FRESH_TOKEN_HINT}"
    if claims.get("type") == "refresh":
        return f"{prefix}: it is a refresh token; uploads need an access token"
    not_before = claims.get("nbf")
    if isinstance(not_before, int | float) and not_before > now:
        return f"{prefix}: it is not valid for another {_ago(not_before - now)}"
    return (
        f"{prefix}: it is not one this ingester accepts (signed with another key, or for "
        f"another issuer or audience); {FRESH_TOKEN_HINT}"
    )
