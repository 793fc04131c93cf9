"""Who is calling: the verified claims of a bearer token, reduced to what the ingester needs.

Two claim layouts reach us. artStore's Admin Module issues `sub, type, role, name, jti,
client_id, iat, nbf, exp`; Keycloak issues `sub, preferred_username, azp, realm_access.roles,
scope`. `principal_from_claims` is pure: it runs after the signature and times were checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import Unauthorized

UPLOAD_ROLES: Final = frozenset({"super_admin", "admin", "operator", "user"})
ADMIN_ROLES: Final = frozenset({"super_admin", "admin"})
# A Keycloak client granted this scope may upload whatever its realm roles are.
UPLOAD_SCOPE: Final = "files:write"

# artStore's `type` values an API call may carry; `refresh` only buys new access tokens.
ARTSTORE_ACCESS_TYPES: Final = frozenset({"service_account", "admin_user"})
KEYCLOAK_TOKEN_TYPE: Final = "keycloak"
# Keycloak marks its tokens with `typ`; ID and refresh tokens are not meant for resource servers.
_KEYCLOAK_ACCESS_TYP: Final = "bearer"
_KEYCLOAK_MARKERS: Final = ("realm_access", "preferred_username", "azp", "scope")


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    username: str
    roles: frozenset[str]
    scopes: frozenset[str]
    token_type: str
    client_id: str | None
    # Kept out of repr so a logged principal never leaks a usable credential.
    raw_token: str = field(repr=False)

    @property
    def can_upload(self) -> bool:
        return bool(self.roles & UPLOAD_ROLES) or UPLOAD_SCOPE in self.scopes

    @property
    def is_admin(self) -> bool:
        return bool(self.roles & ADMIN_ROLES)


def principal_from_claims(claims: Mapping[str, Any], raw_token: str) -> Principal:
    """Build the principal of verified `claims`; raise `Unauthorized` for unusable tokens."""
    token_type = claims.get("type")
    if token_type == "refresh":
        raise Unauthorized("a refresh token cannot be used to call the API")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Unauthorized("the token has no 'sub' claim")
    if token_type is not None:
        return _artstore(claims, subject, token_type, raw_token)
    if any(marker in claims for marker in _KEYCLOAK_MARKERS):
        return _keycloak(claims, subject, raw_token)
    raise Unauthorized("the token's claims match neither the artStore nor the Keycloak layout")


def _artstore(claims: Mapping[str, Any], subject: str, token_type: Any, raw: str) -> Principal:
    if not isinstance(token_type, str) or token_type not in ARTSTORE_ACCESS_TYPES:
        raise Unauthorized("the token's 'type' claim must be service_account or admin_user")
    role = claims.get("role")
    if not isinstance(role, str) or not role:
        raise Unauthorized("the token has no 'role' claim")
    return Principal(
        subject=subject,
        username=_first_text(claims, "name", "preferred_username") or subject,
        roles=frozenset({role}),
        scopes=frozenset(),
        token_type=token_type,
        client_id=_first_text(claims, "client_id", "azp"),
        raw_token=raw,
    )


def _keycloak(claims: Mapping[str, Any], subject: str, raw: str) -> Principal:
    typ = claims.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() != _KEYCLOAK_ACCESS_TYP):
        raise Unauthorized("only access tokens are accepted (the token's 'typ' is not Bearer)")
    return Principal(
        subject=subject,
        username=_first_text(claims, "preferred_username", "name") or subject,
        roles=_realm_roles(claims.get("realm_access")),
        scopes=_scopes(claims.get("scope")),
        token_type=KEYCLOAK_TOKEN_TYPE,
        client_id=_first_text(claims, "azp", "client_id"),
        raw_token=raw,
    )


def _realm_roles(realm_access: Any) -> frozenset[str]:
    if realm_access is None:
        return frozenset()
    roles = realm_access.get("roles", []) if isinstance(realm_access, Mapping) else None
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        raise Unauthorized("the token's 'realm_access.roles' claim must be a list of strings")
    return frozenset(roles)


def _scopes(scope: Any) -> frozenset[str]:
    if scope is None:
        return frozenset()
    if not isinstance(scope, str):
        raise Unauthorized("the token's 'scope' claim must be a space-separated string")
    return frozenset(scope.split())


def _first_text(claims: Mapping[str, Any], *names: str) -> str | None:
    for name in names:
        value = claims.get(name)
        if isinstance(value, str) and value:
            return value
    return None
