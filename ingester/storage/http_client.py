"""The service's one httpx client (elements, the Admin Module, JWKS): httpx's, minus two
costs it pays on every request that a service talking to its own back ends has no use for.

**The connection pool's scan of every connection against every other.** httpcore runs
`AsyncConnectionPool._assign_requests_to_connections` twice per request (when it is queued
and when its response is closed). In httpcore 1.0.9 the pass's check for surplus keep-alive
connections builds, for each idle connection, a list as long as the pool: O(N²) per pass
for N connections, and it compares the pool's size, not the idle count, with
`max_keepalive_connections` (encode/httpcore#1035). Each queued request then filters the
whole pool twice more. With 50 uploads in flight (4 KiB each, one element request per
upload) the pass was 9.4% of the ingester's CPU samples (py-spy).

`LinearPool` makes the same choices in one pass over the connections and one over the
requests:
- closed connections are dropped, those idle past the keep-alive expiry closed;
- an idle connection is polled for a close by the server (`has_expired`, a `poll` of its
  socket) only when it is about to be handed out, not on every pass: httpcore polls every
  idle socket twice per request, 4% of the ingester's CPU samples on sequential 4 KiB
  uploads (py-spy); one whose server closed it is closed and the next one tried;
- idle connections beyond `max_keepalive_connections` are closed, oldest first;
- a queued request gets the oldest available connection to its origin, else a new one
  while the pool is under `max_connections`, else one made by closing an idle connection.

Two differences, both fixes: the keep-alive limit counts idle connections, and an idle
connection already handed to a request that has not started on it yet is neither handed to
a second request in the same or a later pass nor closed (encode/httpcore#1110: the second
request would go round again on `ConnectionNotAvailable`, or find its connection closed).
HTTP/1.1 only (a connection takes one request at a time), as the service's client is.

**The cookie jar.** httpx hands every response to `http.cookiejar`, which copies its
headers into an `email.message.Message` to look for `Set-Cookie` (1.8% of the samples
above). Nothing here wants a cookie: an element or the Admin Module setting one would only
have it sent back on later calls. `NoCookies` keeps none and sends none.

httpcore is pinned (pyproject); `tests/unit/test_http_client.py` checks the pool's choices
with fake connections, `tests/integration/test_http_client.py` the client over real sockets.
"""

from __future__ import annotations

import http.cookiejar
import time
import urllib.request
from typing import Any

import httpcore
import httpx
from httpcore._async.interfaces import AsyncConnectionInterface


class LinearPool(httpcore.AsyncConnectionPool):
    """`httpcore.AsyncConnectionPool` with a linear assignment pass (see the module)."""

    def _assign_requests_to_connections(self) -> list[AsyncConnectionInterface]:
        closing: list[AsyncConnectionInterface] = []
        # Connections handed to a request that has not started on them yet (still idle).
        reserved = {id(r.connection) for r in self._requests if r.connection is not None}
        kept: list[AsyncConnectionInterface] = []
        idle: list[AsyncConnectionInterface] = []
        now = time.monotonic()
        for connection in self._connections:
            if connection.is_closed():
                continue
            if _lapsed(connection, now):
                closing.append(connection)
                continue
            kept.append(connection)
            if connection.is_idle() and id(connection) not in reserved:
                idle.append(connection)
        surplus = len(idle) - (self._max_keepalive_connections or 0)
        if surplus > 0:
            closing.extend(idle[:surplus])
            idle = idle[surplus:]
            gone = {id(c) for c in closing}
            kept = [c for c in kept if id(c) not in gone]
        # Unreserved idle connections are the available ones (HTTP/1.1), oldest first.
        available = [c for c in idle if c.is_available()]
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            chosen = None
            for candidate in [c for c in available if c.can_handle_request(origin)]:
                available.remove(candidate)
                idle.remove(candidate)
                if not candidate.has_expired():
                    chosen = candidate
                    break
                # Its server closed it while it was idle.
                kept.remove(candidate)
                closing.append(candidate)
            if chosen is None:
                if len(kept) >= self._max_connections:
                    if not idle:
                        continue
                    victim = idle.pop(0)
                    if victim in available:
                        available.remove(victim)
                    kept.remove(victim)
                    closing.append(victim)
                chosen = self.create_connection(origin)
                kept.append(chosen)
            pool_request.assign_to_connection(chosen)
        self._connections = kept
        return closing


# What `_lapsed` gets when a connection has no keep-alive expiry to read.
_UNKNOWN: Any = object()


def _lapsed(connection: AsyncConnectionInterface, now: float) -> bool:
    """Idle past the keep-alive expiry, or a connection that failed to connect: httpcore's
    `has_expired` without its poll of the socket. A connection of another kind (none in
    the service) gets the whole check."""
    inner = getattr(connection, "_connection", None)
    if inner is None:
        if hasattr(connection, "_connect_failed"):
            return bool(connection._connect_failed)
        return connection.has_expired()
    expire_at = getattr(inner, "_expire_at", _UNKNOWN)
    if expire_at is _UNKNOWN:
        return connection.has_expired()
    return expire_at is not None and now > expire_at


class LinearPoolTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a `LinearPool` built with the same settings."""

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("http2") or kwargs.get("proxy") is not None:
            raise ValueError("LinearPoolTransport is for HTTP/1.1 without a proxy")
        super().__init__(**kwargs)
        old: Any = self._pool
        self._pool = LinearPool(
            ssl_context=old._ssl_context,
            max_connections=old._max_connections,
            max_keepalive_connections=old._max_keepalive_connections,
            keepalive_expiry=old._keepalive_expiry,
            http1=True,
            http2=False,
            retries=old._retries,
            local_address=old._local_address,
            uds=old._uds,
            network_backend=old._network_backend,
            socket_options=old._socket_options,
        )


class NoCookies(http.cookiejar.CookieJar):
    """A jar that keeps no cookie and adds none to a request (see the module)."""

    def extract_cookies(self, response: Any, request: urllib.request.Request) -> None:
        return None

    def add_cookie_header(self, request: urllib.request.Request) -> None:
        return None


def build_http_client(*, max_connections: int, max_keepalive: int = 64) -> httpx.AsyncClient:
    """The service's client: HTTP/1.1 over a `LinearPool`, no cookies, no proxy from the
    environment, no redirects followed."""
    return httpx.AsyncClient(
        transport=LinearPoolTransport(
            http1=True,
            http2=False,
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_keepalive,
                keepalive_expiry=30,
            ),
        ),
        cookies=NoCookies(),
        follow_redirects=False,
        trust_env=False,
    )
