"""Validation of the upload form's text fields (`POST /api/v1/files/upload`). No I/O.

Rules common to every field:

- values are stripped of surrounding whitespace, and a value that is empty after that counts
  as not sent (an HTML form sends its empty inputs);
- enumerated values (`retention_policy`, `compression_algorithm`, `storage_mode`) and booleans
  are matched case-insensitively;
- unknown field names are ignored, so older and newer clients keep working;
- an invalid value raises `InvalidField` whose message names the field and the rule
  (`InvalidMetadata` for `metadata`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from ..errors import InvalidField, InvalidMetadata
from ..settings import SEMode
from .compression import DEFAULT_ALGORITHM, Algorithm


class RetentionPolicy(StrEnum):
    TEMPORARY = "temporary"
    PERMANENT = "permanent"

    @property
    def target_mode(self) -> SEMode:
        """Temporary files go where they can be deleted later; permanent ones where not."""
        return SEMode.EDIT if self is RetentionPolicy.TEMPORARY else SEMode.RW


DEFAULT_TTL_DAYS: Final = 30
MIN_TTL_DAYS: Final = 1
MAX_TTL_DAYS: Final = 365
MAX_METADATA_BYTES: Final = 64 * 1024
MAX_METADATA_DEPTH: Final = 8
# The pipeline adds its own facts under this key of the stored metadata.
RESERVED_METADATA_KEY: Final = "_ingester"

TRUE_WORDS: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})
# ASCII digits only: int() would also take "1_0", "+5" and non-ASCII digits such as "٣".
_TTL_RE: Final = re.compile(r"[0-9]{1,6}")
# Control characters other than tab and line breaks have no place in a description and
# upset log viewers and terminals downstream.
_DESCRIPTION_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_STORAGE_MODES: Final[Mapping[str, RetentionPolicy]] = {
    "edit": RetentionPolicy.TEMPORARY,
    "rw": RetentionPolicy.PERMANENT,
}


@dataclass(frozen=True, slots=True)
class UploadOptions:
    description: str | None
    retention_policy: RetentionPolicy
    # Days until a temporary file may be removed; None for permanent files.
    ttl_days: int | None
    compress: bool
    # The algorithm to use when `compress` is true (the default filled in); None otherwise.
    compression_algorithm: Algorithm | None
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def target_mode(self) -> SEMode:
        return self.retention_policy.target_mode


def parse_upload_fields(fields: Mapping[str, str], *, max_description_length: int) -> UploadOptions:
    """Validate the form fields into `UploadOptions`.

    - `description`: at most `max_description_length` characters, no control characters
      other than tab, CR and LF.
    - `retention_policy`: `temporary` (default) or `permanent`.
    - `storage_mode` (deprecated): `edit` means temporary, `rw` permanent; `ro` and `ar` are
      refused (no upload can go there), as is a value contradicting `retention_policy`.
    - `ttl_days`: an integer 1-365, temporary only (default 30); sent with a permanent
      policy it is an error rather than silently dropped, since the caller expected expiry.
    - `compress`: true/false, 1/0, yes/no, on/off; default false.
    - `compression_algorithm`: `gzip` or `brotli`. It does not turn compression on by itself:
      with `compress` false a valid value is ignored (it still must be valid, so a typo is
      reported). With `compress` true and no algorithm, the default (brotli) is filled in,
      so that a later field naming the default does not change the storage plan.
    - `metadata`: a JSON object, at most 64 KiB, nesting at most 8 deep, without the
      reserved key `_ingester`; default `{}`.
    """
    values = {name: value.strip() for name, value in fields.items()}

    def get(name: str) -> str | None:
        return values.get(name) or None

    retention_policy = _retention_policy(get("retention_policy"), get("storage_mode"))
    ttl_days = _ttl_days(get("ttl_days"), retention_policy)
    compress = _bool("compress", get("compress"))
    # Validated even when unused, so a typo is reported rather than silently ignored.
    algorithm = _algorithm(get("compression_algorithm"))
    effective = (algorithm or DEFAULT_ALGORITHM) if compress else None
    return UploadOptions(
        description=_description(get("description"), max_description_length),
        retention_policy=retention_policy,
        ttl_days=ttl_days,
        compress=compress,
        compression_algorithm=effective,
        metadata=_metadata(get("metadata")),
    )


def _description(value: str | None, max_length: int) -> str | None:
    if value is None:
        return None
    if len(value) > max_length:
        raise InvalidField(
            f"description must be at most {max_length} characters (got {len(value)})"
        )
    if _DESCRIPTION_CONTROL_RE.search(value):
        raise InvalidField("description must not contain control characters")
    return value


def _retention_policy(value: str | None, storage_mode: str | None) -> RetentionPolicy:
    policy: RetentionPolicy | None = None
    if value is not None:
        try:
            policy = RetentionPolicy(value.lower())
        except ValueError:
            raise InvalidField(
                f"retention_policy must be 'temporary' or 'permanent', not {_show(value)}"
            ) from None
    if storage_mode is None:
        return policy or RetentionPolicy.TEMPORARY
    mode = storage_mode.lower()
    if mode in (SEMode.RO, SEMode.AR):
        raise InvalidField(
            f"storage_mode '{mode}' does not accept uploads; "
            "use retention_policy 'temporary' or 'permanent'"
        )
    implied = _STORAGE_MODES.get(mode)
    if implied is None:
        raise InvalidField(
            f"storage_mode must be 'edit' or 'rw' (deprecated; use retention_policy), "
            f"not {_show(storage_mode)}"
        )
    if policy is not None and policy is not implied:
        raise InvalidField(
            f"storage_mode '{mode}' conflicts with retention_policy '{policy}'; "
            "send retention_policy only"
        )
    return implied


def _ttl_days(value: str | None, policy: RetentionPolicy) -> int | None:
    if value is None:
        return DEFAULT_TTL_DAYS if policy is RetentionPolicy.TEMPORARY else None
    if not _TTL_RE.fullmatch(value) or not MIN_TTL_DAYS <= int(value) <= MAX_TTL_DAYS:
        raise InvalidField(
            f"ttl_days must be an integer between {MIN_TTL_DAYS} and {MAX_TTL_DAYS}, "
            f"not {_show(value)}"
        )
    if policy is not RetentionPolicy.TEMPORARY:
        raise InvalidField("ttl_days applies only to retention_policy 'temporary'")
    return int(value)


def _bool(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidField(
        f"{name} must be a boolean (true/false, 1/0, yes/no, on/off), not {_show(value)}"
    )


def _algorithm(value: str | None) -> Algorithm | None:
    if value is None:
        return None
    try:
        return Algorithm(value.lower())
    except ValueError:
        raise InvalidField(
            f"compression_algorithm must be 'gzip' or 'brotli', not {_show(value)}"
        ) from None


def _metadata(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    # Checked before parsing so an oversized field costs no parse.
    if len(value.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    try:
        parsed = loads_strict_json(value)
    except RecursionError:
        raise InvalidMetadata(
            f"metadata must not nest deeper than {MAX_METADATA_DEPTH} levels"
        ) from None
    except ValueError as exc:  # JSONDecodeError, and int() past its digit limit
        detail = (
            f"{exc.msg} at position {exc.pos}" if isinstance(exc, json.JSONDecodeError) else exc
        )
        raise InvalidMetadata(f"metadata is not valid JSON: {detail}") from None
    if not isinstance(parsed, dict):
        raise InvalidMetadata(f"metadata must be a JSON object, not {_json_kind(parsed)}")
    if _depth(parsed) > MAX_METADATA_DEPTH:
        raise InvalidMetadata(f"metadata must not nest deeper than {MAX_METADATA_DEPTH} levels")
    if RESERVED_METADATA_KEY in parsed:
        raise InvalidMetadata(f"metadata key '{RESERVED_METADATA_KEY}' is reserved")
    # What is stored is our serialization, which may differ in size from what was sent.
    serialized = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
    try:
        encoded = serialized.encode("utf-8")
    except UnicodeEncodeError:
        # JSON's escapes can spell a lone UTF-16 surrogate ("\ud800"), which no UTF-8
        # text (nor any element's JSON) can hold.
        raise InvalidMetadata(
            "metadata must be valid Unicode text: it holds a lone surrogate escape"
        ) from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return parsed


def loads_strict_json(text: str) -> Any:
    """`json.loads` that refuses what is not JSON though Python accepts it (NaN, Infinity,
    numbers that overflow to infinity). Raises ValueError (or RecursionError)."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _refuse_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which a strict reader
    # of the stored metadata would reject.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(value: Any) -> int:
    """Containers count one level each: `{}` is 1, `{"a": [1]}` is 2. Iterative, no recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_METADATA_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _show(value: str) -> str:
    """The offending value, quoted and cut short, for an error message."""
    return repr(value if len(value) <= 40 else value[:40] + "...")
