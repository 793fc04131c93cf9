"""`LinearPool`'s assignment pass with fake connections: which connection each queued request
gets, which connections close, and the two cases where it differs from httpcore 1.0.9 (the
keep-alive limit counts idle connections; a connection handed to a request that has not
started on it is not handed out again or closed). No I/O: the pass is synchronous, and its
requests are fakes too (httpcore's set a trio event when handed a connection)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpcore
import pytest

from ingester.storage.http_client import LinearPool

A = "http://a.example"
B = "http://b.example"


class Fake:
    """A connection in one of httpcore's states, to one origin."""

    def __init__(self, name: str, state: str = "idle", origin: str = A) -> None:
        self.name = name
        self.state = state
        self.origin = httpcore.URL(origin).origin

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return origin == self.origin

    def is_available(self) -> bool:
        return self.state == "idle"

    def is_idle(self) -> bool:
        return self.state == "idle"

    def is_closed(self) -> bool:
        return self.state == "closed"

    def has_expired(self) -> bool:
        return self.state == "expired"

    def __repr__(self) -> str:
        return f"<{self.name} {self.state}>"


class Polled(Fake):
    """An idle connection as httpcore builds them: its keep-alive expiry readable without
    I/O (`_connection._expire_at`), and `has_expired` a poll of its socket (counted) that
    finds whether its server closed it."""

    def __init__(
        self, name: str, *, server_closed: bool = False, expire_at: float | None = None
    ) -> None:
        super().__init__(name)
        self._connection = SimpleNamespace(_expire_at=expire_at)
        self.server_closed = server_closed
        self.polls = 0

    def has_expired(self) -> bool:
        self.polls += 1
        return self.server_closed


def pool(*connections: Fake, max_connections: int = 4, keepalive: int = 4) -> LinearPool:
    p = LinearPool(max_connections=max_connections, max_keepalive_connections=keepalive)
    p._connections = list(connections)  # type: ignore[arg-type]
    return p


class Queued:
    """A request in the pool, as the pass sees it (httpcore's `AsyncPoolRequest`)."""

    def __init__(self, origin: str) -> None:
        self.request = httpcore.Request("GET", origin + "/")
        self.connection: object = None

    def assign_to_connection(self, connection: object) -> None:
        self.connection = connection

    def is_queued(self) -> bool:
        return self.connection is None


def queue(p: LinearPool, origin: str = A) -> Queued:
    request = Queued(origin)
    p._requests.append(request)  # type: ignore[arg-type]
    return request


def names(connections: object) -> list[str]:
    return [getattr(c, "name", "new") for c in connections]  # type: ignore[attr-defined]


def test_a_queued_request_gets_the_oldest_idle_connection_to_its_origin() -> None:
    busy, old, young, other = (
        Fake("busy", "active"),
        Fake("old"),
        Fake("young"),
        Fake("other", origin=B),
    )
    p = pool(busy, other, old, young)
    request = queue(p)
    assert p._assign_requests_to_connections() == []
    assert request.connection is old


def test_two_requests_in_one_pass_never_share_a_connection() -> None:
    only = Fake("only")
    p = pool(only, max_connections=4)
    first, second = queue(p), queue(p)
    p._assign_requests_to_connections()
    assert first.connection is only
    # httpcore hands `only` to both; the loser retries on ConnectionNotAvailable.
    assert second.connection is not None
    assert second.connection is not only
    assert len(p._connections) == 2


def test_a_connection_handed_out_but_not_started_is_not_handed_out_again() -> None:
    waiting = Fake("waiting")
    p = pool(waiting, max_connections=1)
    first = queue(p)
    p._assign_requests_to_connections()
    assert first.connection is waiting
    # The next pass (another request queued) before `first` started on it: still idle.
    second = queue(p)
    assert p._assign_requests_to_connections() == []
    assert second.is_queued()
    assert first.connection is waiting


def test_closed_connections_are_dropped_and_expired_ones_closed() -> None:
    closed, expired, idle = Fake("closed", "closed"), Fake("expired", "expired"), Fake("idle")
    p = pool(closed, expired, idle)
    assert names(p._assign_requests_to_connections()) == ["expired"]
    assert names(p._connections) == ["idle"]


def test_idle_sockets_are_polled_only_when_one_is_handed_out() -> None:
    old, young = Polled("old"), Polled("young")
    p = pool(old, young)
    assert p._assign_requests_to_connections() == []
    assert (old.polls, young.polls) == (0, 0)
    request = queue(p)
    assert p._assign_requests_to_connections() == []
    assert request.connection is old
    assert (old.polls, young.polls) == (1, 0)


def test_a_connection_its_server_closed_is_closed_when_chosen_and_the_next_one_taken() -> None:
    dead, live = Polled("dead", server_closed=True), Polled("live")
    p = pool(dead, live)
    request = queue(p)
    assert names(p._assign_requests_to_connections()) == ["dead"]
    assert request.connection is live
    assert names(p._connections) == ["live"]


def test_a_connection_idle_past_its_keepalive_expiry_closes_without_a_poll() -> None:
    lapsed = Polled("lapsed", expire_at=time.monotonic() - 1)
    fresh = Polled("fresh", expire_at=time.monotonic() + 60)
    p = pool(lapsed, fresh)
    assert names(p._assign_requests_to_connections()) == ["lapsed"]
    assert names(p._connections) == ["fresh"]
    assert (lapsed.polls, fresh.polls) == (0, 0)


def test_the_keepalive_limit_counts_idle_connections_and_closes_the_oldest() -> None:
    active = [Fake(f"active{i}", "active") for i in range(3)]
    idle = [Fake(f"idle{i}") for i in range(3)]
    p = pool(*active, *idle, max_connections=10, keepalive=2)
    # httpcore compares the pool's 6 connections with the limit and closes every idle one.
    assert names(p._assign_requests_to_connections()) == ["idle0"]
    assert names(p._connections) == ["active0", "active1", "active2", "idle1", "idle2"]


def test_a_full_pool_closes_an_idle_connection_to_another_origin_to_make_room() -> None:
    busy, elsewhere = Fake("busy", "active"), Fake("elsewhere", origin=B)
    p = pool(busy, elsewhere, max_connections=2)
    request = queue(p)
    assert names(p._assign_requests_to_connections()) == ["elsewhere"]
    assert request.connection is not None
    assert request.connection not in (busy, elsewhere)
    assert len(p._connections) == 2


def test_a_full_pool_with_nothing_idle_leaves_the_request_queued() -> None:
    p = pool(Fake("one", "active"), Fake("two", "active"), max_connections=2)
    request = queue(p)
    assert p._assign_requests_to_connections() == []
    assert request.is_queued()
    assert names(p._connections) == ["one", "two"]


def test_requests_already_on_a_connection_are_left_alone() -> None:
    running = Fake("running", "active")
    p = pool(running, Fake("idle"))
    started = queue(p)
    started.assign_to_connection(running)
    assert p._assign_requests_to_connections() == []
    assert started.connection is running


@pytest.mark.parametrize("kwargs", [{"http2": True}, {"proxy": "http://proxy.example:3128"}])
def test_the_transport_refuses_what_the_pool_does_not_do(kwargs: dict[str, object]) -> None:
    from ingester.storage.http_client import LinearPoolTransport

    with pytest.raises(ValueError, match=r"HTTP/1\.1 without a proxy"):
        LinearPoolTransport(**kwargs)
