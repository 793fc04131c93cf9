"""Where the RS256 verification keys come from: a PEM file, a JWKS endpoint, or memory.

Every source answers `key_for(kid)` and has a `run` task for the service nursery. The PEM
source polls the file and swaps the key when it changes; the JWKS source caches keys by
`kid`, refetches on an unknown `kid` (rate limited), and keeps the last good set when the
identity provider is unreachable.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey, RSAPublicNumbers
from cryptography.hazmat.primitives.serialization import (
    load_der_public_key,
    load_pem_public_key,
)

from ..boundary import describe, http_errors
from ..errors import AuthKeysUnavailable, Unauthorized

log = logging.getLogger(__name__)

# NIST SP 800-131A; PyJWT would otherwise only warn, once per token.
MIN_RSA_BITS: Final = 2048
# Garbage `kid`s must not turn every request into a call to the identity provider.
MIN_REFETCH_INTERVAL_S: Final = 10.0
# A JWKS document is tiny; an identity provider slower than this is as good as down.
JWKS_FETCH_TIMEOUT_S: Final = 5.0
# Public keys are a few hundred bytes; refuse to parse a file that is clearly something else.
MAX_KEY_FILE_BYTES: Final = 64 * 1024


class KeySource(Protocol):
    async def key_for(self, kid: str | None) -> RSAPublicKey:
        """The key that must have signed a token with this `kid`; `Unauthorized` if none."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the keys current; runs in the service nursery until cancelled."""
        ...


def load_public_key(data: bytes, *, origin: str) -> RSAPublicKey:
    """Parse an RSA public key: PEM, a PEM certificate, or bare base64 DER (Keycloak's
    console shows realm keys that way). Raise `ValueError` naming `origin`."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN CERTIFICATE-----"):
            key: object = x509.load_pem_x509_certificate(text).public_key()
        elif text.startswith(b"-----BEGIN"):
            key = load_pem_public_key(text)
        else:
            key = load_der_public_key(base64.b64decode(b"".join(text.split()), validate=True))
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValueError(f"{origin}: not a PEM RSA public key ({_first_line(exc)})") from None
    return _checked_rsa(key, origin=origin)


def _checked_rsa(key: object, *, origin: str) -> RSAPublicKey:
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"{origin}: the key is not an RSA key (only RS256 is accepted)")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{origin}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS}")
    return key


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class StaticKeySource:
    """One fixed key, whatever the `kid`: for tests and embedded use."""

    def __init__(self, key: RSAPublicKey) -> None:
        self._key = _checked_rsa(key, origin="static key")

    async def key_for(self, kid: str | None) -> RSAPublicKey:
        return self._key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()


_Stamp = tuple[int, int, int, int, int]


def _stamp(st: os.stat_result) -> _Stamp:
    # mtime alone misses a rewrite within one timestamp tick; inode, size and ctime catch
    # an atomic replace (new inode) and most in-place rewrites.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PemKeySource:
    """A PEM public key file, reloaded when it changes; a broken new file keeps the old key."""

    def __init__(self, path: Path, key: RSAPublicKey, stamp: _Stamp, *, interval_s: float):
        self.path = path
        self._key = key
        self._stamp = stamp
        self._interval_s = interval_s
        self._missing_logged = False

    @classmethod
    def load(cls, path: Path, *, interval_s: float) -> PemKeySource:
        """Read the key now (start-up, so blocking is fine); `ValueError` if unusable."""
        try:
            st = path.stat()
            data = _read_limited(path)
        except OSError as exc:
            raise ValueError(f"cannot read the token public key {path}: {exc.strerror}") from None
        key = load_public_key(data, origin=f"token public key {path}")
        return cls(path, key, _stamp(st), interval_s=interval_s)

    async def key_for(self, kid: str | None) -> RSAPublicKey:
        return self._key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self._interval_s)
            await self.reload_if_changed()

    async def reload_if_changed(self) -> bool:
        """Swap in the file's key if the file changed since the last look; True if swapped."""
        try:
            st = await trio.Path(self.path).stat()
        except OSError as exc:
            if not self._missing_logged:
                log.warning(
                    "token public key %s is unreadable (%s); keeping the loaded key",
                    self.path,
                    exc.strerror,
                    extra={"event": "auth_key_missing"},
                )
                self._missing_logged = True
            return False
        self._missing_logged = False
        stamp = _stamp(st)
        if stamp == self._stamp:
            return False
        # Remembered before parsing so a broken file is reported once, not every poll; a
        # writer finishing it changes the stamp again and we retry.
        self._stamp = stamp
        try:
            data = await trio.to_thread.run_sync(_read_limited, self.path)
            key = load_public_key(data, origin=f"token public key {self.path}")
        except (OSError, ValueError) as exc:
            log.error(
                "token public key %s changed but cannot be used: %s; keeping the previous key",
                self.path,
                _first_line(exc),
                extra={"event": "auth_key_reload_failed"},
            )
            return False
        self._key = key
        log.info("token public key %s reloaded", self.path, extra={"event": "auth_key_reloaded"})
        return True


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as handle:
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes; not a public key")
    return data


class _FetchFailed(Exception):
    pass


class JwksKeySource:
    """Keys of a JWKS endpoint, by `kid`, cached for `cache_s`.

    An unknown `kid` triggers a refetch at most once per `min_refetch_interval_s`; one fetch
    runs at a time and callers that waited for it reuse its result. When a fetch fails the
    previous keys stay in use: an identity provider outage must not reject valid tokens.

    With `run` going (the service), a known key past `cache_s` is still served while `run`
    fetches the set again: a hung identity provider made every request wait out the fetch
    timeout, cached tokens too, every `min_refetch_interval_s` (found by a review). A fetch
    is never cut by the request that started it (bounded by its own timeout): a client that
    hung up after sending an unknown `kid` made each fetch count for nothing, so anonymous
    callers could send the identity provider one request each.
    """

    def __init__(
        self,
        url: str,
        http: httpx.AsyncClient,
        *,
        cache_s: float,
        min_refetch_interval_s: float = MIN_REFETCH_INTERVAL_S,
        timeout_s: float = JWKS_FETCH_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._http = http
        self._cache_s = cache_s
        self._min_interval_s = min_refetch_interval_s
        self._timeout_s = timeout_s
        self._by_kid: dict[str, RSAPublicKey] = {}
        self._keys: list[RSAPublicKey] = []
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._attempts = 0
        self._lock = trio.Lock()
        # Set by `run` while it goes: a request that found its key stale sets this event.
        self._stale: trio.Event | None = None

    async def key_for(self, kid: str | None) -> RSAPublicKey:
        key = self._lookup(kid)
        if key is None or not (self._fresh() or self._refresh_in_background()):
            await self._refresh()
            key = self._lookup(kid)
        if key is not None:
            return key
        if not self._keys:
            raise AuthKeysUnavailable("the token signing keys are unavailable; try again later")
        if kid is None:
            raise Unauthorized("the token has no 'kid' header and the key set has several keys")
        raise Unauthorized("the token's 'kid' names no known signing key")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        # Warm the cache and report a wrong URL at start-up rather than on the first request.
        await self._refresh()
        while True:
            self._stale = trio.Event()
            await self._stale.wait()
            await self._refresh()

    def _refresh_in_background(self) -> bool:
        """Have `run` fetch the keys again; False when it is not going."""
        if self._stale is None:
            return False
        self._stale.set()
        return True

    def _fresh(self) -> bool:
        return (
            self._fetched_at is not None and trio.current_time() - self._fetched_at < self._cache_s
        )

    def _lookup(self, kid: str | None) -> RSAPublicKey | None:
        if kid is None:
            return self._keys[0] if len(self._keys) == 1 else None
        return self._by_kid.get(kid)

    async def _refresh(self) -> None:
        attempts_seen = self._attempts
        async with self._lock:
            if self._attempts != attempts_seen:
                return  # a fetch finished while we waited: use its result, do not repeat it
            started = trio.current_time()
            if (
                self._attempted_at is not None
                and started - self._attempted_at < self._min_interval_s
            ):
                return
            try:
                # Bounded by its own timeout; a caller cancelled meanwhile waits for it.
                with trio.CancelScope(shield=True):
                    by_kid, keys = await self._fetch()
            except _FetchFailed as exc:
                self._attempted_at = started
                self._attempts += 1
                log.warning(
                    "cannot fetch the JWKS from %s: %s%s",
                    self.url,
                    exc,
                    "; keeping the cached keys" if self._keys else "",
                    extra={"event": "auth_jwks_fetch_failed"},
                )
                return
            self._attempted_at = started
            self._attempts += 1
            self._by_kid, self._keys = by_kid, keys
            self._fetched_at = trio.current_time()
            log.info(
                "fetched %d signing keys from %s",
                len(keys),
                self.url,
                extra={"event": "auth_jwks_fetched"},
            )

    async def _fetch(self) -> tuple[dict[str, RSAPublicKey], list[RSAPublicKey]]:
        response: httpx.Response | None = None
        with trio.move_on_after(self._timeout_s):
            with http_errors(lambda exc: _FetchFailed(describe(exc))):
                response = await self._http.get(
                    self.url, headers={"Accept": "application/json"}, timeout=self._timeout_s
                )
        if response is None:
            raise _FetchFailed(f"no answer within {self._timeout_s:g} s")
        if response.status_code != 200:
            raise _FetchFailed(f"HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError:
            raise _FetchFailed("the answer is not JSON") from None
        entries = document.get("keys") if isinstance(document, Mapping) else None
        if not isinstance(entries, list):
            raise _FetchFailed("the answer has no 'keys' list")
        return _signing_keys(entries, origin=self.url)


def _signing_keys(
    entries: list[Any], *, origin: str
) -> tuple[dict[str, RSAPublicKey], list[RSAPublicKey]]:
    by_kid: dict[str, RSAPublicKey] = {}
    keys: list[RSAPublicKey] = []
    for entry in entries:
        # Keycloak publishes an RSA-OAEP encryption key beside the signing key: skip it.
        if not isinstance(entry, Mapping) or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
            continue
        kid = entry.get("kid")
        try:
            numbers = RSAPublicNumbers(_b64url_uint(entry["e"]), _b64url_uint(entry["n"]))
            key = _checked_rsa(numbers.public_key(), origin=f"JWKS {origin} kid {kid!r}")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            log.warning(
                "ignoring an unusable key in the JWKS of %s: %s",
                origin,
                _first_line(exc),
                extra={"event": "auth_jwks_bad_key"},
            )
            continue
        keys.append(key)
        if isinstance(kid, str):
            by_kid[kid] = key
    if not keys:
        raise _FetchFailed("the key set has no usable RS256 signing key")
    return by_kid, keys


def _b64url_uint(value: Any) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("n and e must be non-empty base64url strings")
    raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    return int.from_bytes(raw, "big")
