"""What one reference Storage Element is told at start-up, and what each mode allows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..settings import SEMode

# hypercorn's own default is 3 s; an upload in flight deserves longer to finish on SIGTERM.
DEFAULT_GRACEFUL_TIMEOUT_S: Final = 10.0
# A client that sends nothing for this long holds a capacity reservation for nothing.
DEFAULT_CLIENT_IDLE_TIMEOUT_S: Final = 60.0
DEFAULT_PRIORITY: Final = 100


@dataclass(frozen=True, slots=True)
class ElementConfig:
    element_id: str
    mode: SEMode
    data_dir: Path
    public_key: Path
    host: str = "127.0.0.1"
    # 0 binds a free port; `run_storage_element` reports the bound URL through task_status.
    port: int = 0
    priority: int = DEFAULT_PRIORITY
    # None: the data directory's file system is the limit (see `FileStore`).
    capacity_bytes: int | None = None
    graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S
    client_idle_timeout_s: float = DEFAULT_CLIENT_IDLE_TIMEOUT_S
    # Answer as artStore's own element does where it differs from ours (see `compat`).
    artstore_compat: bool = False
    # With it: the temporary disk FastAPI spools forms to (`compat.TempSpace`); None: unbounded.
    artstore_tmp_bytes: int | None = None
    # With it: how long its write of the file after the last byte takes (`compat.upload`).
    artstore_write_delay_s: float = 0.0

    @property
    def allows_upload(self) -> bool:
        return self.mode in (SEMode.EDIT, SEMode.RW)

    @property
    def allows_delete(self) -> bool:
        return self.mode is SEMode.EDIT

    @property
    def allows_read(self) -> bool:
        # Archive elements keep their files on media that is not served online.
        return self.mode is not SEMode.AR
