"""Key sources with real I/O: the PEM file (reload on change) and a JWKS served over loopback.

Rules: loopback only, port 0; every test body runs under `trio.fail_after(10)`.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from ingester.auth import JwksKeySource, PemKeySource, TokenVerifier, build_verifier
from ingester.auth.tokens import (
    generate_keypair,
    generate_private_key_pem,
    jwk_from_public_pem,
    make_keycloak_token,
    make_token,
    public_pem_from_private,
)
from ingester.errors import AuthKeysUnavailable, Unauthorized
from ingester.settings import Settings
from tests.support.http_server import Request, Response, serve_http

JWKS_PATH = "/realms/artstore/protocol/openid-connect/certs"


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    """Three private keys (PEM), named a, b and c; distinct from conftest's session `keys`."""
    return {name: generate_private_key_pem() for name in ("a", "b", "c")}


def public(private_pem: bytes) -> bytes:
    return public_pem_from_private(private_pem)


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], *, within_s: float = 2
) -> None:
    """Poll `predicate` (sync or async) until it holds; fail after `within_s`."""
    with trio.fail_after(within_s):
        while True:
            result = predicate()
            if await result if isinstance(result, Awaitable) else result:
                return
            await trio.sleep(0.01)


async def accepts(verifier: TokenVerifier, token: str) -> bool:
    try:
        await verifier.verify(token)
    except Unauthorized:
        return False
    return True


# --- key pair files -------------------------------------------------------------------


def test_generate_keypair_writes_private_0600_and_is_idempotent(tmp_path: Path) -> None:
    directory = tmp_path / "keys" / "nested"
    private_path, public_path = generate_keypair(directory)
    assert (private_path, public_path) == (directory / "private.pem", directory / "public.pem")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public_path.read_bytes() == public(private_path.read_bytes())
    before = (private_path.read_bytes(), public_path.read_bytes())

    assert generate_keypair(directory) == (private_path, public_path)
    assert (private_path.read_bytes(), public_path.read_bytes()) == before

    public_path.unlink()
    generate_keypair(directory)
    assert (private_path.read_bytes(), public_path.read_bytes()) == before
    assert [p.name for p in sorted(directory.iterdir())] == ["private.pem", "public.pem"]


# --- PEM source -----------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_build_verifier_none_without_key_source() -> None:
    assert build_verifier(settings(), httpx.AsyncClient()) is None


def test_build_verifier_missing_pem_fails_loudly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=r"^cannot read the token public key .*nope\.pem") as info:
        build_verifier(settings(auth_public_key_path=missing), httpx.AsyncClient())
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"hello", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"])
def test_build_verifier_broken_pem_fails_loudly(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "public.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PEM RSA public key") as info:
        build_verifier(settings(auth_public_key_path=path), httpx.AsyncClient())
    assert "\n" not in str(info.value)


def test_build_verifier_refuses_a_private_key_file(tmp_path: Path, pems: dict[str, bytes]) -> None:
    path = tmp_path / "private.pem"
    path.write_bytes(pems["a"])
    with pytest.raises(ValueError, match="not a PEM RSA public key"):
        build_verifier(settings(auth_public_key_path=path), httpx.AsyncClient())


async def start_pem_verifier(
    nursery: trio.Nursery, path: Path, interval_s: float = 0.05, **values: Any
) -> TokenVerifier:
    s = settings(auth_public_key_path=path, auth_key_reload_interval_s=interval_s, **values)
    verifier = build_verifier(s, httpx.AsyncClient())
    assert verifier is not None
    await nursery.start(verifier.run)
    return verifier


async def test_pem_reload_on_atomic_replace(tmp_path: Path, pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        path = tmp_path / "public.pem"
        path.write_bytes(public(pems["a"]))
        old_token, new_token = make_token(pems["a"]), make_token(pems["b"], sub="after")
        async with trio.open_nursery() as nursery:
            verifier = await start_pem_verifier(nursery, path)
            assert (await verifier.verify(old_token)).subject == "dev-user"
            assert not await accepts(verifier, new_token)

            write_atomic(path, public(pems["b"]))
            await wait_until(lambda: accepts(verifier, new_token))
            assert (await verifier.verify(new_token)).subject == "after"
            with pytest.raises(Unauthorized, match="signature is invalid"):
                await verifier.verify(old_token)
            nursery.cancel_scope.cancel()


async def test_pem_reload_on_in_place_rewrite(tmp_path: Path, pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        path = tmp_path / "public.pem"
        path.write_bytes(public(pems["a"]))
        inode = path.stat().st_ino
        async with trio.open_nursery() as nursery:
            verifier = await start_pem_verifier(nursery, path)
            assert await accepts(verifier, make_token(pems["a"]))
            # Past one file-timestamp tick, as any real rotation is.
            await trio.sleep(0.05)
            path.write_bytes(public(pems["c"]))
            assert path.stat().st_ino == inode
            await wait_until(lambda: accepts(verifier, make_token(pems["c"])))
            assert not await accepts(verifier, make_token(pems["a"]))
            nursery.cancel_scope.cancel()


async def test_pem_broken_new_file_keeps_old_key(
    tmp_path: Path, pems: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingester.auth.keys")
    with trio.fail_after(10):
        path = tmp_path / "public.pem"
        path.write_bytes(public(pems["a"]))
        source = PemKeySource.load(path, interval_s=0.05)
        verifier = TokenVerifier(source)
        token_a = make_token(pems["a"])

        write_atomic(path, b"-----BEGIN PUBLIC KEY-----\ntruncated")
        assert await source.reload_if_changed() is False
        assert await accepts(verifier, token_a)
        failures = [
            r for r in caplog.records if r.__dict__.get("event") == "auth_key_reload_failed"
        ]
        assert len(failures) == 1
        assert "keeping the previous key" in failures[0].getMessage()

        # Reported once, not at every poll.
        assert await source.reload_if_changed() is False
        assert await source.reload_if_changed() is False
        assert sum(r.__dict__.get("event") == "auth_key_reload_failed" for r in caplog.records) == 1

        write_atomic(path, public(pems["b"]))
        assert await source.reload_if_changed() is True
        assert not await accepts(verifier, token_a)
        assert await accepts(verifier, make_token(pems["b"]))
        assert any(r.__dict__.get("event") == "auth_key_reloaded" for r in caplog.records)


async def test_pem_deleted_file_keeps_key_and_recovers(
    tmp_path: Path, pems: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ingester.auth.keys")
    with trio.fail_after(10):
        path = tmp_path / "public.pem"
        path.write_bytes(public(pems["a"]))
        async with trio.open_nursery() as nursery:
            verifier = await start_pem_verifier(nursery, path)
            path.unlink()
            await wait_until(
                lambda: any(r.__dict__.get("event") == "auth_key_missing" for r in caplog.records)
            )
            await trio.sleep(0.2)  # several polls: still one warning
            assert sum(r.__dict__.get("event") == "auth_key_missing" for r in caplog.records) == 1
            assert await accepts(verifier, make_token(pems["a"]))

            write_atomic(path, public(pems["b"]))
            await wait_until(lambda: accepts(verifier, make_token(pems["b"])))
            nursery.cancel_scope.cancel()


async def test_pem_verifier_applies_settings(tmp_path: Path, pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        path = tmp_path / "public.pem"
        path.write_bytes(public(pems["a"]))
        s = settings(
            auth_public_key_path=path,
            auth_issuer="artstore-admin",
            auth_audience="ingester",
            auth_leeway_s=0,
        )
        verifier = build_verifier(s, httpx.AsyncClient())
        assert verifier is not None
        claims = {"iss": "artstore-admin", "aud": "ingester"}
        assert await accepts(verifier, make_token(pems["a"], extra=claims))
        assert not await accepts(verifier, make_token(pems["a"]))
        assert not await accepts(verifier, make_token(pems["a"], extra={**claims, "aud": "x"}))
        expired_now = make_token(pems["a"], extra=claims, ttl=2, now=time.time() - 3)
        assert not await accepts(verifier, expired_now)


# --- JWKS source ----------------------------------------------------------------------


class JwksServer:
    """What the fake identity provider serves; tests change it between requests."""

    def __init__(self, *jwks: dict[str, str]) -> None:
        self.keys: list[dict[str, str]] = list(jwks)
        self.status = 200
        self.delay_s = 0.0

    async def __call__(self, request: Request) -> Response:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if request.path != JWKS_PATH:
            return Response(404)
        if self.status != 200:
            return Response.json({"error": "boom"}, status=self.status)
        return Response.json({"keys": self.keys})


def jwk(pems: dict[str, bytes], name: str, kid: str | None = None) -> dict[str, str]:
    return jwk_from_public_pem(public(pems[name]), kid or name)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Trio's clock for the test's run, at the real rate so loopback I/O and its timeouts
    behave as they do in production; `clock.jump` moves past a cache or refetch interval
    instead of sleeping through it."""
    return trio.testing.MockClock(rate=1.0)


async def test_jwks_kid_cached(pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"), jwk(pems, "b"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            verifier = TokenVerifier(JwksKeySource(server.url + JWKS_PATH, http, cache_s=60))
            for _ in range(3):
                principal = await verifier.verify(make_token(pems["a"], kid="a", sub="one"))
                assert principal.subject == "one"
                assert (await verifier.verify(make_token(pems["b"], kid="b"))).subject == "dev-user"
            assert server.count(JWKS_PATH) == 1
            assert server.requests[0].headers["accept"] == "application/json"
            # The right kid with another key's signature is still a bad signature.
            with pytest.raises(Unauthorized, match="signature is invalid"):
                await verifier.verify(make_token(pems["a"], kid="b"))
            assert server.count(JWKS_PATH) == 1


async def test_jwks_concurrent_cold_start_fetches_once(pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        idp.delay_s = 0.2
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            verifier = TokenVerifier(JwksKeySource(server.url + JWKS_PATH, http, cache_s=60))
            results: list[str] = []

            async def one(i: int) -> None:
                results.append(
                    (await verifier.verify(make_token(pems["a"], kid="a", sub=f"u{i}"))).subject
                )

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            assert sorted(results) == sorted(f"u{i}" for i in range(20))
            assert server.count(JWKS_PATH) == 1


async def test_jwks_unknown_kid_refetch_is_rate_limited(pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(server.url + JWKS_PATH, http, cache_s=60)
            verifier = TokenVerifier(source)
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            idp.keys.append(jwk(pems, "b"))
            # Within the default 10 s window garbage kids cannot reach the identity provider.
            for i in range(30):
                with pytest.raises(Unauthorized, match="no known signing key"):
                    await verifier.verify(make_token(pems["c"], kid=f"garbage-{i}"))
            assert not await accepts(verifier, make_token(pems["b"], kid="b"))
            assert server.count(JWKS_PATH) == 1


async def test_jwks_unknown_kid_triggers_refetch(
    pems: dict[str, bytes], clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=60, min_refetch_interval_s=0.2
            )
            verifier = TokenVerifier(source)
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            idp.keys.append(jwk(pems, "b"))
            clock.jump(0.25)  # past the refetch limit
            assert (
                await verifier.verify(make_token(pems["b"], kid="b", sub="new"))
            ).subject == "new"
            assert server.count(JWKS_PATH) == 2
            # Both keys now cached: no more fetches.
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            assert await accepts(verifier, make_token(pems["b"], kid="b"))
            assert server.count(JWKS_PATH) == 2


async def test_jwks_key_rotation(pems: dict[str, bytes], clock: trio.testing.MockClock) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=0.3, min_refetch_interval_s=0.1
            )
            verifier = TokenVerifier(source)
            token_a = make_token(pems["a"], kid="a")
            token_b = make_token(pems["b"], kid="b")
            assert await accepts(verifier, token_a)
            # The IdP rotates: the old key is withdrawn, the new one published.
            idp.keys = [jwk(pems, "b")]
            assert await accepts(verifier, token_a)  # cached until cache_s runs out
            clock.jump(0.35)  # past cache_s
            with pytest.raises(Unauthorized, match="no known signing key"):
                await verifier.verify(token_a)
            assert await accepts(verifier, token_b)
            assert server.count(JWKS_PATH) == 2


async def test_jwks_token_without_kid(
    pems: dict[str, bytes], clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        # Keycloak also publishes an RSA-OAEP encryption key; it must not count.
        encryption_key = {**jwk(pems, "c", "enc-1"), "use": "enc", "alg": "RSA-OAEP"}
        idp = JwksServer(jwk(pems, "a"), encryption_key)
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=60, min_refetch_interval_s=0.1
            )
            verifier = TokenVerifier(source)
            token = make_keycloak_token(pems["a"], sub="kc", username="bob", roles=["user"])
            assert (await verifier.verify(token)).username == "bob"
            with pytest.raises(Unauthorized, match="no known signing key"):
                await verifier.verify(make_token(pems["c"], kid="enc-1"))

            idp.keys.append(jwk(pems, "b"))
            clock.jump(0.15)  # past the refetch limit
            assert await accepts(verifier, make_token(pems["b"], kid="b"))  # refetched
            with pytest.raises(Unauthorized, match="no 'kid' header"):
                await verifier.verify(token)


async def test_jwks_skips_unusable_entries(
    pems: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        small = jwk_from_public_pem(public(generate_private_key_pem(1024)), "small")
        idp = JwksServer(
            small,
            {"kty": "RSA", "kid": "broken", "n": "", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "x", "y": "y"},
            {**jwk(pems, "b"), "alg": "RS512"},
            jwk(pems, "a"),
        )
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            verifier = TokenVerifier(JwksKeySource(server.url + JWKS_PATH, http, cache_s=60))
            assert await accepts(verifier, make_token(pems["a"]))  # no kid: one usable key
            for kid in ("small", "broken", "ec", "b"):
                assert not await accepts(verifier, make_token(pems["b"], kid=kid))
        bad = [r for r in caplog.records if r.__dict__.get("event") == "auth_jwks_bad_key"]
        assert len(bad) == 2  # the 1024-bit key and the empty modulus


async def test_jwks_outage_keeps_cached_keys(
    pems: dict[str, bytes], clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=0.1, min_refetch_interval_s=0.05
            )
            verifier = TokenVerifier(source)
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            idp.status = 503
            clock.jump(0.15)  # past cache_s and the refetch limit
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            assert server.count(JWKS_PATH) == 2


@pytest.mark.parametrize("failure", ["status", "garbage", "no_keys", "timeout", "refused"])
async def test_jwks_unavailable_is_a_503_not_a_refused_token(
    pems: dict[str, bytes], failure: str
) -> None:
    """No key could be fetched yet: the token cannot be checked, which says nothing against
    it. A 401 told clients their token was bad (the CLI then gave up on every file)."""
    with trio.fail_after(10):

        async def handler(request: Request) -> Response:
            if failure == "status":
                return Response(500, b"oops")
            if failure == "garbage":
                return Response(200, b"<html>", [("content-type", "text/html")])
            if failure == "no_keys":
                return Response.json({"keys": []})
            await trio.sleep(5)
            return Response.json({"keys": [jwk(pems, "a")]})

        async with serve_http(handler) as server, httpx.AsyncClient() as http:
            url = server.url + JWKS_PATH
            if failure == "refused":
                url = "http://127.0.0.1:1/certs"
            verifier = TokenVerifier(JwksKeySource(url, http, cache_s=60, timeout_s=0.3))
            with pytest.raises(AuthKeysUnavailable, match="signing keys are unavailable") as got:
                await verifier.verify(make_token(pems["a"], kid="a"))
            assert (got.value.status, got.value.code) == (503, "AUTH_UNAVAILABLE")


async def test_jwks_refetch_limit_holds_when_callers_hang_up(
    pems: dict[str, bytes], clock: trio.testing.MockClock
) -> None:
    """Found by a review: a fetch was cut with the request that started it and counted for
    nothing, so each caller that sent an unknown `kid` and hung up started a new fetch. A
    fetch now finishes whoever hung up, and the limit holds."""
    with trio.fail_after(20):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=60, min_refetch_interval_s=1
            )
            verifier = TokenVerifier(source)
            assert await accepts(verifier, make_token(pems["a"], kid="a"))
            clock.jump(1.1)  # past the limit: the next unknown kid may fetch once
            idp.delay_s = 0.3
            for i in range(10):
                with trio.move_on_after(0.05):  # the client hangs up mid-fetch
                    await accepts(verifier, make_token(pems["c"], kid=f"garbage-{i}"))
            assert server.count(JWKS_PATH) == 2


async def test_a_hung_identity_provider_delays_no_token_whose_key_is_known(
    pems: dict[str, bytes], clock: trio.testing.MockClock
) -> None:
    """Found by a review: past `cache_s` every request waited for the refetch, cached tokens
    too, so a hung identity provider cost requests its whole fetch timeout every
    `min_refetch_interval_s`. With the source running, a known key is served while it
    refetches in the background."""
    with trio.fail_after(20):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            source = JwksKeySource(
                server.url + JWKS_PATH, http, cache_s=0.2, min_refetch_interval_s=0.1,
                timeout_s=3,
            )  # fmt: skip
            verifier = TokenVerifier(source)
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run)
                await wait_until(lambda: server.count(JWKS_PATH) == 1)
                idp.delay_s = 10  # hangs from now on
                for n in range(8):
                    with trio.fail_after(1):  # never the fetch's 3 s
                        token = make_token(pems["a"], kid="a", sub=f"u{n}")
                        assert (await verifier.verify(token)).subject == f"u{n}"
                    clock.jump(0.1)
                    await trio.testing.wait_all_tasks_blocked()
                # The stale set was being fetched again, in the background.
                assert server.count(JWKS_PATH) >= 2
                clock.jump(3)  # the hung fetch ends at its own timeout, not with the test
                nursery.cancel_scope.cancel()


async def test_jwks_build_verifier_and_prefetch(pems: dict[str, bytes]) -> None:
    with trio.fail_after(10):
        idp = JwksServer(jwk(pems, "a"))
        async with serve_http(idp) as server, httpx.AsyncClient() as http:
            s = settings(auth_jwks_url=server.url + JWKS_PATH, auth_jwks_cache_s=60)
            verifier = build_verifier(s, http)
            assert verifier is not None
            async with trio.open_nursery() as nursery:
                await nursery.start(verifier.run)
                await wait_until(lambda: server.count(JWKS_PATH) == 1)
                token = make_keycloak_token(pems["a"], sub="kc", username="u", kid="a")
                assert (await verifier.verify(token)).subject == "kc"
                assert server.count(JWKS_PATH) == 1
                nursery.cancel_scope.cancel()
