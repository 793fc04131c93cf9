"""`INGESTER_REDIS_URL` → how to reach Redis. Pure: no sockets here.

Two shapes:

  redis://[[USER]:PASSWORD@]HOST:PORT[/DB]   (also rediss://, unix://) one server, as redis-py
                                              reads it
  redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]
                                              the master of SERVICE, asked of these Sentinels
                                              (26379 when a port is left out)

The password is the data nodes' (master and replicas); the Sentinels are asked without one.
redis-py's own URL parser does not know the Sentinel form (several hosts), hence this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

SENTINEL_SCHEME: Final = "redis+sentinel"
PLAIN_SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
DEFAULT_SENTINEL_PORT: Final = 26379


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.partition("://")[0].lower() == SENTINEL_SCHEME


def check_redis_url(url: str) -> None:
    """`ValueError` saying what is wrong with `url`; nothing when it can be used."""
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise ValueError(f"must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}://")
    if scheme.lower() == SENTINEL_SCHEME:
        parse_sentinel_url(url)
    elif scheme.lower() not in PLAIN_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme!r}: use redis://, rediss://, unix:// or {SENTINEL_SCHEME}://"
        )


def parse_sentinel_url(url: str) -> SentinelURL:
    """A `redis+sentinel://` URL's parts; `ValueError` naming the first problem."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"a Sentinel URL starts with {SENTINEL_SCHEME}://")
    if "?" in rest or "#" in rest:
        raise ValueError("a Sentinel URL takes no query string or fragment")
    # The password may contain '/' or ','; the last '@' ends it (percent-encode '@' in it).
    credentials, at, location = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        if not colon:
            raise ValueError("credentials must be :PASSWORD@ or USER:PASSWORD@")
        username = unquote(user) or None
        password = unquote(secret)
        if not password:
            raise ValueError("the password after ':' is empty")
    hosts_part, slash, path = location.partition("/")
    if not hosts_part:
        raise ValueError("no Sentinel HOST:PORT before the service name")
    sentinels = tuple(_host_port(item) for item in hosts_part.split(","))
    if len(set(sentinels)) != len(sentinels):
        raise ValueError("a Sentinel is listed twice")
    segments = path.split("/") if slash else []
    if not segments or not segments[0]:
        raise ValueError("no service name: redis+sentinel://HOST:PORT/SERVICE[/DB]")
    if len(segments) > 2 or (len(segments) == 2 and not segments[1]):
        raise ValueError("the path must be /SERVICE or /SERVICE/DB")
    service = unquote(segments[0])
    db = 0
    if len(segments) == 2:
        if not segments[1].isdigit():
            raise ValueError(f"the database must be a number, got {segments[1]!r}")
        db = int(segments[1])
    return SentinelURL(sentinels, service, db, username, password)


def _host_port(item: str) -> tuple[str, int]:
    if not item:
        raise ValueError("an empty Sentinel address (two commas, or a trailing one)")
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not host:
            raise ValueError(f"bad IPv6 Sentinel address {item!r}")
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad Sentinel address {item!r}")
        port_text = tail[1:] if tail else ""
    else:
        host, colon, port_text = item.partition(":")
        if not host:
            raise ValueError(f"no host in Sentinel address {item!r}")
        if colon and not port_text:
            raise ValueError(f"no port after ':' in Sentinel address {item!r}")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in Sentinel address {item!r}")
    return host, int(port_text)
