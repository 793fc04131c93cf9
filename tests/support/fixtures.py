"""Key pair and token fixtures as plain pytest fixtures, to import into a conftest or a test
module (`from tests.support.fixtures import keypair, token_factory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ingester.auth.tokens import generate_keypair, make_keycloak_token, make_token


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_path: Path
    public_path: Path
    private_pem: bytes


class TokenFactory:
    """Signs RS256 tokens with the test key pair (artStore claim layout unless told)."""

    def __init__(self, keypair: KeyPair) -> None:
        self.keypair = keypair

    def __call__(
        self,
        *,
        role: str = "user",
        sub: str = "test-user",
        ttl: int = 3600,
        token_type: str = "service_account",
        name: str | None = None,
        **extra: Any,
    ) -> str:
        return make_token(
            self.keypair.private_pem,
            sub=sub,
            role=role,
            ttl=ttl,
            token_type=token_type,
            name=name,
            extra=extra or None,
        )

    def keycloak(
        self, *, sub: str = "kc-user", roles: tuple[str, ...] = (), scope: str = ""
    ) -> str:
        return make_keycloak_token(
            self.keypair.private_pem, sub=sub, username=sub, roles=roles, scope=scope
        )

    def headers(self, **kwargs: Any) -> dict[str, str]:
        """`{"Authorization": "Bearer <token>"}` for a token made with these arguments."""
        return {"Authorization": f"Bearer {self(**kwargs)}"}


def make_keypair(directory: Path) -> KeyPair:
    private_path, public_path = generate_keypair(directory)
    return KeyPair(private_path, public_path, private_path.read_bytes())


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    """One RSA key pair for the session: `private.pem` and `public.pem` in a temp dir."""
    return make_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def token_factory(keypair: KeyPair) -> TokenFactory:
    return TokenFactory(keypair)
