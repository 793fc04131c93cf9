"""The Admin Module's file registry: the saga's second step (`INGESTER_ADMIN_URL`).

`POST {admin_url}/api/v1/files` with the upload's record. `2xx` is registered, and so is `409`
(a retried request found the file already there: registration is keyed by `file_id`).
Connect errors, timeouts and `5xx` are retried with full-jitter backoff, a few times within
`INGESTER_ADMIN_TIMEOUT_S`; anything else fails at once. A registration that fails ends the
upload with `502 ADMIN_REGISTRATION_FAILED`, and the saga removes the stored copy; unless the
last failure was no refusal and `GET {admin_url}/api/v1/files/{id}` then shows the file: it
took, its answer was lost, and the upload goes on.

A finalization's commit (`PUT`) tells a refusal (`AdminRefused`: nothing applied) from an
unclear failure (it may have been applied): the finalizer rolls back only on the first.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from ..boundary import describe, http_errors
from ..errors import AdminRefused, AdminRegistrationFailed
from ..resilience.retry import RetryPolicy, backoff_s

log = logging.getLogger(__name__)

FILES_PATH: Final = "/api/v1/files"
# 4xx answers that refuse nothing: the request may be sent again as it is.
NOT_REFUSALS: Final = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class _Failure:
    """What went wrong last; `refused` when the answer was a refusal (nothing applied)."""

    message: str
    refused: bool


class AdminRegistry:
    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        timeout_s: float,
        policy: RetryPolicy,
    ) -> None:
        self._http = http
        self.url = base_url.rstrip("/") + FILES_PATH
        self._timeout_s = timeout_s
        self._policy = policy
        self._random = random.Random()

    async def register(self, record: dict[str, Any], *, authorization: str | None) -> None:
        """Register `record`; raises `AdminRegistrationFailed`."""
        # 409: a retried request found the file already registered (keyed by file_id).
        failure = await self._send("POST", self.url, record, authorization, also_ok=409)
        if failure is None:
            return
        if not failure.refused and await self._registered(record, authorization):
            # The last answer was lost or a 5xx, but the registration took: undoing the
            # upload now would leave the Admin Module naming a removed file.
            log.info(
                "Admin Module registration of %s took, though unanswered (%s)",
                record.get("file_id"),
                failure.message,
                extra={"event": "admin_registered_late", "file_id": record.get("file_id")},
            )
            return
        log.warning(
            "Admin Module registration of %s failed: %s",
            record.get("file_id"),
            failure.message,
            extra={"event": "admin_registration_failed", "file_id": record.get("file_id")},
        )
        raise AdminRegistrationFailed(
            f"the Admin Module did not register the file ({failure.message})"
        )

    async def _send(
        self,
        method: str,
        url: str,
        body: dict[str, Any],
        authorization: str | None,
        *,
        also_ok: int | None = None,
    ) -> _Failure | None:
        """Send `body`, retrying connect errors, timeouts and 5xx with full-jitter backoff,
        all within the registry timeout. None when applied, else what went wrong last."""
        headers = {"Authorization": authorization} if authorization else {}
        last = "no attempt"
        refused = False
        with trio.move_on_after(self._timeout_s) as deadline:
            for attempt in range(self._policy.max_attempts):
                if attempt:
                    await trio.sleep(backoff_s(attempt - 1, self._policy, self._random.random))
                try:
                    response = await self._http.request(
                        method,
                        url,
                        json=body,
                        headers=headers,
                        timeout=httpx.Timeout(self._timeout_s),
                    )
                except httpx.HTTPError as exc:
                    last = describe(exc)
                    continue
                if response.is_success or response.status_code == also_ok:
                    return None
                last = f"HTTP {response.status_code}"
                if response.status_code < 500:
                    refused = response.status_code not in NOT_REFUSALS
                    break
        if deadline.cancelled_caught:
            last = f"no answer within {self._timeout_s:g} s (last: {last})"
        return _Failure(last, refused)

    async def _registered(self, record: dict[str, Any], authorization: str | None) -> bool:
        """Whether the Admin Module holds `record`'s file (False when it cannot say)."""
        try:
            found = await self.lookup(str(record.get("file_id")), authorization=authorization)
        except AdminRegistrationFailed:
            return False
        return found is not None

    async def lookup(self, file_id: str, *, authorization: str | None) -> dict[str, Any] | None:
        """`GET {admin}/api/v1/files/{id}`: the file's record, None when unknown (404).
        Raises `AdminRegistrationFailed` when the Admin Module cannot answer."""
        headers = {"Authorization": authorization} if authorization else {}
        try:
            with (
                trio.fail_after(self._timeout_s),
                http_errors(
                    lambda exc: AdminRegistrationFailed(f"Admin Module lookup failed: {exc!r}")
                ),
            ):
                response = await self._http.get(
                    f"{self.url}/{file_id}", headers=headers, timeout=self._timeout_s
                )
        except trio.TooSlowError as exc:
            raise AdminRegistrationFailed(f"Admin Module lookup failed: {exc!r}") from exc
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise AdminRegistrationFailed(f"Admin Module lookup: HTTP {response.status_code}")
        try:
            payload = response.json()
        except ValueError as exc:
            raise AdminRegistrationFailed("Admin Module lookup: not JSON") from exc
        return payload if isinstance(payload, dict) else None

    async def commit(
        self, file_id: str, changes: dict[str, Any], *, authorization: str | None
    ) -> None:
        """`PUT {admin}/api/v1/files/{id}` with `changes` (finalization's commit), retried
        like `register`. Raises `AdminRefused` when the Admin Module refused it (the last
        answer; an earlier attempt's may have been lost after it applied it), and
        `AdminRegistrationFailed` when it is unknown whether the commit was applied."""
        failure = await self._send("PUT", f"{self.url}/{file_id}", changes, authorization)
        if failure is None:
            return
        message = f"the Admin Module did not commit {file_id} ({failure.message})"
        if failure.refused:
            raise AdminRefused(message)
        raise AdminRegistrationFailed(message)
