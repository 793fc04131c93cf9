"""State files: how a killed `ingester upload` finds its upload again when run again.

One small JSON file per upload in progress, under `$XDG_CACHE_HOME/artstore-ingester/
uploads/` (`~/.cache/...` without it), named after a hash of what identifies the upload:
the file's absolute path, size and mtime, and the ingester's URL. A file that changed
since (another size or mtime) is a new upload. The state is written before the first byte
is sent, atomically (temporary file, fsync, rename), and removed once the file is stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, Literal

from .errors import UploadFailed

STATE_VERSION: Final = 1
APP_DIR: Final = "artstore-ingester"


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Where state files live (the XDG base directory rules: a relative XDG_CACHE_HOME is
    ignored)."""
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / APP_DIR / "uploads"


def state_key(path: Path, size: int, mtime_ns: int, target: str) -> str:
    identity = json.dumps([str(path), size, mtime_ns, target], ensure_ascii=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ResumeState:
    key: str
    kind: Literal["tus", "multipart"]
    path: str
    size: int
    mtime_ns: int
    target: str
    options: str  # Options.fingerprint() of the run that began the upload
    upload_url: str | None = None  # tus: the upload's URL
    # multipart: the request's; tus: the creation's (see client/tus.py)
    idempotency_key: str | None = None
    created_at: float = 0.0
    version: int = STATE_VERSION


class ResumeStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, key: str) -> ResumeState | None:
        """The saved state, or None; an unreadable or foreign file is dropped."""
        path = self._path(key)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            state = ResumeState(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            self.remove(key)
            return None
        if state.version != STATE_VERSION or state.key != key:
            self.remove(key)
            return None
        return state

    def save(self, state: ResumeState) -> None:
        if not state.created_at:
            state = ResumeState(**{**asdict(state), "created_at": time.time()})
        path = self._path(state.key)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(temporary, "w", encoding="utf-8") as out:
                json.dump(asdict(state), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            raise UploadFailed(
                f"cannot keep the resume state in {self.directory}: {exc.strerror} "
                "(XDG_CACHE_HOME chooses another place)"
            ) from None

    def remove(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()
