"""Key fixtures for the pure auth tests: generated once per module, kept in memory."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ingester.auth.tokens import generate_private_key_pem, public_pem_from_private


@pytest.fixture(scope="module")
def private_pem() -> bytes:
    return generate_private_key_pem()


@pytest.fixture(scope="module")
def public_pem(private_pem: bytes) -> bytes:
    return public_pem_from_private(private_pem)


@pytest.fixture(scope="module")
def public_key(public_pem: bytes) -> RSAPublicKey:
    key = load_pem_public_key(public_pem)
    assert isinstance(key, RSAPublicKey)
    return key
