"""A finished resumable upload's `done` state, recorded with its saga's settle (`saga.commit`).

The state is what a client that sends its final `PATCH` again, or asks with `HEAD`/`GET`,
reads the result from. Written in a second step after the settle, a replica killed in between
would leave the upload `completing` with its file stored: the next replica would store it
again. Written in the settle's script, guarded by the upload's lock, it is both or neither;
a lock lost meanwhile refuses the settle, and the copy is removed (the new holder stores it).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import IngesterError
from ..saga.commit import ResultCommit, ResultUnknown, ResultWrite
from .errors import TusStoreUnavailable, UploadLocked
from .guarded_store import GuardedStore
from .locks import Lease
from .pipelined import LiveStream
from .state import Phase, TusUpload

log = logging.getLogger(__name__)


class TusResult(ResultCommit):
    """`upload`, completed with the stored file's result, written while `lease` holds it."""

    def __init__(
        self, store: GuardedStore, upload: TusUpload, lease: Lease, *, retention_s: float
    ) -> None:
        super().__init__()
        self._store = store
        self._upload = upload
        self._lease = lease
        self._retention_s = retention_s

    def done(self, result: dict[str, Any]) -> TusUpload:
        """The upload's state once `result` (the pipeline's) is its answer."""
        done = TusUpload.from_json(self._upload.to_json())
        done.completed(
            {**result, "upload_id": self._upload.id},
            now=time.time(),
            retention_s=self._retention_s,
        )
        return done

    def redis_write(self, result: dict[str, Any]) -> ResultWrite | None:
        return self._store.result_write(self.done(result), self._lease.token)

    async def write(self, result: dict[str, Any]) -> None:
        try:
            recorded = await self._store.put(self.done(result), self._lease.token)
        except IngesterError as exc:
            log.error("could not record the result of %s: %s", self._upload.id, exc)
            return
        if not recorded:
            log.error(
                "upload %s was stored as %s but its result could not be recorded",
                self._upload.id,
                result.get("file_id"),
                extra={"event": "tus_result_lost", "upload_id": self._upload.id},
            )

    def refusal(self) -> IngesterError:
        return UploadLocked("the upload's lock was lost while it was stored")

    async def recorded(self, result: dict[str, Any]) -> bool:
        try:
            state = await self._store.get(self._upload.id)
        except TusStoreUnavailable as exc:
            raise ResultUnknown(str(exc)) from exc
        return (
            state is not None
            and state.phase is Phase.DONE
            and state.result is not None
            and state.result.get("file_id") == result.get("file_id")
        )


class StreamResult(ResultCommit):
    """The commit of a pipelined store: the completion's `TusResult`, which exists once it
    hands the stream over (the stream's file, and so its saga, cannot end before)."""

    def __init__(self, stream: LiveStream) -> None:
        super().__init__()
        self._stream = stream

    def _target(self) -> ResultCommit | None:
        return self._stream.commit

    def redis_write(self, result: dict[str, Any]) -> ResultWrite | None:
        target = self._target()
        return None if target is None else target.redis_write(result)

    async def write(self, result: dict[str, Any]) -> None:
        target = self._target()
        if target is not None:
            await target.write(result)

    def refusal(self) -> IngesterError:
        target = self._target()
        return UploadLocked() if target is None else target.refusal()

    async def recorded(self, result: dict[str, Any]) -> bool:
        target = self._target()
        # Without the completion's commit nothing could have been written with the settle.
        return False if target is None else await target.recorded(result)
