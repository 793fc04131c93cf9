"""Tokens for Storage Element calls: forward, static, and client credentials against a real
token endpoint on loopback.

Rules: loopback only, port 0; every test body runs under `trio.fail_after(10)`.
"""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
import trio

from ingester.auth import Principal
from ingester.errors import UpstreamAuthError
from ingester.settings import SEAuthMode, Settings
from ingester.storage.se_auth import (
    ClientCredentialsProvider,
    ForwardTokenProvider,
    StaticTokenProvider,
    build_se_token_provider,
    refresh_margin,
)
from tests.support.http_server import DropConnection, Request, Response, serve_http

TOKEN_PATH = "/realms/artstore/protocol/openid-connect/token"


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def principal(raw_token: str) -> Principal:
    return Principal(
        subject="u",
        username="u",
        roles=frozenset({"user"}),
        scopes=frozenset(),
        token_type="service_account",
        client_id=None,
        raw_token=raw_token,
    )


class TokenEndpoint:
    """A token endpoint issuing tok-1, tok-2, ...; tests switch its behaviour."""

    def __init__(self, expires_in: Any = 300) -> None:
        self.expires_in = expires_in
        self.delay_s = 0.0
        self.failure: str | None = None
        self._serial = itertools.count(1)

    async def __call__(self, request: Request) -> Response:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if self.failure == "drop":
            raise DropConnection
        if self.failure == "invalid_client":
            return Response.json({"error": "invalid_client"}, status=401)
        if self.failure == "500":
            return Response(500, b"internal error")
        if self.failure == "html":
            return Response(200, b"<html>login</html>", [("content-type", "text/html")])
        if self.failure == "no_token":
            return Response.json({"token_type": "Bearer", "expires_in": 60})
        if self.failure == "mac":
            return Response.json({"access_token": "x", "token_type": "mac", "expires_in": 60})
        if self.failure == "bad_expiry":
            return Response.json({"access_token": "x", "expires_in": "soon"})
        body: dict[str, Any] = {"access_token": f"tok-{next(self._serial)}", "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return Response.json(body)


def provider(url: str, http: httpx.AsyncClient, **kwargs: Any) -> ClientCredentialsProvider:
    return ClientCredentialsProvider(url + TOKEN_PATH, "ingester", "s3cret&=", http, **kwargs)


def test_refresh_margin() -> None:
    assert refresh_margin(11) == 10
    assert refresh_margin(60) == 10
    assert refresh_margin(100) == 10
    assert refresh_margin(300) == 30
    assert refresh_margin(3600) == 360


async def test_forward_uses_the_callers_token() -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            forward = build_se_token_provider(settings(se_auth="forward"), http)
            assert isinstance(forward, ForwardTokenProvider)
            assert await forward.authorization(principal("abc.def.ghi")) == "Bearer abc.def.ghi"
            assert await forward.authorization(None) is None


async def test_static_token() -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            static = build_se_token_provider(settings(se_auth="static", se_token="svc-tok"), http)
            assert isinstance(static, StaticTokenProvider)
            assert await static.authorization(principal("caller")) == "Bearer svc-tok"
            assert await static.authorization(None) == "Bearer svc-tok"
            prefixed = StaticTokenProvider("Bearer already")
            assert await prefixed.authorization(None) == "Bearer already"


async def test_client_credentials_request_and_cache() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint(expires_in=300)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            s = settings(
                se_auth=SEAuthMode.CLIENT_CREDENTIALS,
                se_token_url=server.url + TOKEN_PATH,
                se_client_id="ingester",
                se_client_secret="s3cret&=",
            )
            cc = build_se_token_provider(s, http)
            assert isinstance(cc, ClientCredentialsProvider)
            for _ in range(5):
                assert await cc.authorization(principal("caller")) == "Bearer tok-1"
            assert await cc.authorization(None) == "Bearer tok-1"
            assert server.count(TOKEN_PATH, "POST") == 1
            request = server.requests[0]
            assert request.headers["content-type"] == "application/x-www-form-urlencoded"
            assert request.form() == {
                "grant_type": "client_credentials",
                "client_id": "ingester",
                "client_secret": "s3cret&=",
            }


async def test_client_credentials_refreshes_before_expiry() -> None:
    with trio.fail_after(10):
        # 11 s lifetime, 10 s margin: fresh for about one second, usable for eleven.
        endpoint = TokenEndpoint(expires_in=11)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            assert await cc.token() == "tok-1"
            assert await cc.token() == "tok-1"
            assert server.count(TOKEN_PATH) == 1
            await trio.sleep(1.1)
            assert await cc.token() == "tok-2"
            assert await cc.token() == "tok-2"
            assert server.count(TOKEN_PATH) == 2


async def test_client_credentials_twenty_concurrent_callers_one_request() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint()
        endpoint.delay_s = 0.3
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            results: list[str | None] = []

            async def call() -> None:
                results.append(await cc.authorization(None))

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(call)
            assert results == ["Bearer tok-1"] * 20
            assert server.count(TOKEN_PATH) == 1


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("invalid_client", r"HTTP 401 \(invalid_client\)"),
        ("500", "HTTP 500"),
        ("html", "other than JSON"),
        ("no_token", "without an access_token"),
        ("mac", "not a Bearer token"),
        ("bad_expiry", "non-numeric expires_in"),
        ("drop", "unreachable"),
        ("slow", "did not answer within 0.3 s"),
    ],
)
async def test_client_credentials_failure_is_upstream_auth_error(
    failure: str, message: str
) -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint()
        endpoint.failure = failure
        if failure == "slow":
            endpoint.delay_s = 5
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http, timeout_s=0.3)
            with pytest.raises(UpstreamAuthError, match=message) as info:
                await cc.authorization(None)
            assert info.value.status == 502
            assert "s3cret" not in info.value.message


async def test_client_credentials_unreachable_endpoint() -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient() as http:
            cc = ClientCredentialsProvider("http://127.0.0.1:1/token", "a", "b", http)
            with pytest.raises(UpstreamAuthError, match="unreachable"):
                await cc.token()


async def test_client_credentials_concurrent_failure_costs_one_request() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint()
        endpoint.failure = "500"
        endpoint.delay_s = 0.2
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            errors: list[str] = []

            async def call() -> None:
                try:
                    await cc.token()
                except UpstreamAuthError as exc:
                    errors.append(exc.message)

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(call)
            assert errors == ["token endpoint answered HTTP 500"] * 20
            assert server.count(TOKEN_PATH) == 1

            # A later call tries again, and recovers once the endpoint does.
            endpoint.failure = None
            endpoint.delay_s = 0
            assert await cc.token() == "tok-1"
            assert server.count(TOKEN_PATH) == 2


async def test_client_credentials_failed_refresh_keeps_valid_token() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint(expires_in=11)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            assert await cc.token() == "tok-1"
            await trio.sleep(1.1)
            endpoint.failure = "500"
            # In the refresh window, the refresh fails, the token has ten seconds left.
            assert await cc.token() == "tok-1"
            assert server.count(TOKEN_PATH) == 2


async def test_client_credentials_valid_token_served_while_refreshing() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint(expires_in=11)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            assert await cc.token() == "tok-1"
            await trio.sleep(1.1)
            endpoint.delay_s = 0.5
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cc.token)  # starts the slow refresh
                await trio.sleep(0.1)
                with trio.fail_after(0.2):
                    assert await cc.token() == "tok-1"  # does not wait for it
            assert await cc.token() == "tok-2"
            assert server.count(TOKEN_PATH) == 2


async def test_client_credentials_cancelled_refresh_does_not_fail_waiters() -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint()
        endpoint.delay_s = 0.3
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            results: list[str] = []

            async def first() -> None:
                with trio.move_on_after(0.1):  # this caller's request goes away mid-refresh
                    await cc.token()
                    raise AssertionError("the first caller should have been cancelled")

            async def waiter() -> None:
                results.append(await cc.token())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.sleep(0.05)  # `first` holds the lock, its request in flight
                nursery.start_soon(waiter)
            # The waiter made its own request instead of inheriting a failure.
            assert len(results) == 1
            assert results[0].startswith("tok-")
            assert server.count(TOKEN_PATH) == 2


@pytest.mark.parametrize("expires_in", [None, "300", 300.5])
async def test_client_credentials_expires_in_variants(expires_in: Any) -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint(expires_in=expires_in)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            cc = provider(server.url, http)
            assert await cc.token() == "tok-1"
            assert await cc.token() == "tok-1"
            assert server.count(TOKEN_PATH) == 1


@pytest.mark.parametrize("expires_in", [0, -5, "nan", "inf", True, [60]])
async def test_client_credentials_unusable_expires_in(expires_in: Any) -> None:
    with trio.fail_after(10):
        endpoint = TokenEndpoint(expires_in=expires_in)
        async with serve_http(endpoint) as server, httpx.AsyncClient() as http:
            with pytest.raises(UpstreamAuthError, match="expires_in"):
                await provider(server.url, http).token()
