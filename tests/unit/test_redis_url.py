"""`INGESTER_REDIS_URL`: the Sentinel form parsed, every bad shape refused with its reason,
and a bad URL a settings error at start-up (not a failure at the first Redis call)."""

from __future__ import annotations

import re

import pydantic
import pytest

from ingester.settings import Settings
from ingester.storage.redis_url import (
    SentinelURL,
    check_redis_url,
    is_sentinel,
    parse_sentinel_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1:26379/mymaster",
            SentinelURL((("10.0.0.1", 26379),), "mymaster"),
        ),
        (
            "redis+sentinel://a:1,b:2,c:3/svc/4",
            SentinelURL((("a", 1), ("b", 2), ("c", 3)), "svc", db=4),
        ),
        (
            "redis+sentinel://:s3cr%40t/x@h1:5000,h2/svc",
            SentinelURL((("h1", 5000), ("h2", 26379)), "svc", password="s3cr@t/x"),
        ),
        (
            "redis+sentinel://app:pw@[::1]:26380,[fe80::2]/svc/0",
            SentinelURL((("::1", 26380), ("fe80::2", 26379)), "svc", 0, "app", "pw"),
        ),
        (
            "REDIS+SENTINEL://h:7/My%20Service",
            SentinelURL((("h", 7),), "My Service"),
        ),
    ],
)
def test_good_sentinel_urls(url: str, expected: SentinelURL) -> None:
    assert is_sentinel(url)
    assert parse_sentinel_url(url) == expected
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("redis+sentinel://h:1", "no service name"),
        ("redis+sentinel://h:1/", "no service name"),
        ("redis+sentinel:///svc", "no Sentinel HOST:PORT"),
        ("redis+sentinel://h:1,,h:2/svc", "empty Sentinel address"),
        ("redis+sentinel://h:1,/svc", "empty Sentinel address"),
        ("redis+sentinel://h:0/svc", "bad port"),
        ("redis+sentinel://h:70000/svc", "bad port"),
        ("redis+sentinel://h:x/svc", "bad port"),
        ("redis+sentinel://h:/svc", "no port after ':'"),
        ("redis+sentinel://:1/svc", "no host"),
        ("redis+sentinel://[::1/svc", "bad IPv6"),
        ("redis+sentinel://[::1]x/svc", "bad Sentinel address"),
        ("redis+sentinel://h:1,h:1/svc", "listed twice"),
        ("redis+sentinel://h:1/svc/one", "database must be a number"),
        ("redis+sentinel://h:1/svc/-1", "database must be a number"),
        ("redis+sentinel://h:1/svc/0/extra", "/SERVICE or /SERVICE/DB"),
        ("redis+sentinel://h:1/svc/", "/SERVICE or /SERVICE/DB"),
        ("redis+sentinel://h:1/svc?db=2", "no query string"),
        ("redis+sentinel://pw@h:1/svc", "credentials must be"),
        ("redis+sentinel://user:@h:1/svc", "password after ':' is empty"),
    ],
)
def test_bad_sentinel_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_sentinel_url(url)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6390/0", "rediss://h:1/2", "unix:///run/redis.sock"]
)
def test_plain_urls_are_left_to_redis_py(url: str) -> None:
    assert not is_sentinel(url)
    check_redis_url(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h:1/0", "unknown scheme"),
        ("h:6379", "must start with"),
        ("sentinel://h/s", "unknown scheme"),
    ],
)
def test_other_schemes_are_refused(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_redis_url(url)


def test_a_bad_url_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTER_REDIS_URL", "redis+sentinel://h:1")
    with pytest.raises(pydantic.ValidationError, match="no service name"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_a_good_url_is_kept_and_empty_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/artstore/1"
    monkeypatch.setenv("INGESTER_REDIS_URL", url)
    assert Settings(_env_file=None).redis_url == url  # type: ignore[call-arg]
    monkeypatch.setenv("INGESTER_REDIS_URL", "")
    assert Settings(_env_file=None).redis_url is None  # type: ignore[call-arg]


def test_a_redis_timeout_too_short_for_a_replica_s_acknowledgement_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a review: a durable write waits up to 0.2 s for a replica (`WAIT`); with a
    shorter timeout every such write timed out, was taken for one that may have run, and
    failed its upload."""
    monkeypatch.setenv("INGESTER_REDIS_TIMEOUT_S", "0.1")
    with pytest.raises(pydantic.ValidationError, match=r"greater than or equal to 0\.5"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("INGESTER_REDIS_TIMEOUT_S", "0.5")
    assert Settings(_env_file=None).redis_timeout_s == 0.5  # type: ignore[call-arg]
