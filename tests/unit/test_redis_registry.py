"""parse_registry: the contract's registry document → element configs, or a precise error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ingester.settings import SEMode
from ingester.storage.redis_registry import parse_registry, reconnect_wait_s


def document(*elements: dict[str, Any]) -> str:
    return json.dumps(
        {
            "version": 7,
            "timestamp": "2026-01-01T00:00:00Z",
            "count": len(elements),
            "storage_elements": list(elements),
        }
    )


def element(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": "1",
        "element_id": "se-01",
        "name": "Storage 01",
        "api_url": "http://se-01:8010/",
        "mode": "edit",
        "status": "online",
        "capacity_bytes": 1000,
        "used_bytes": 10,
        "priority": 3,
        "is_writable": True,
        "is_available": True,
        "health_status": "healthy",  # fields we do not know are ignored
    }
    entry.update(overrides)
    return entry


def test_contract_shape() -> None:
    [parsed] = parse_registry(document(element()).encode())
    assert parsed.id == "se-01"  # element_id wins over the numeric id
    assert parsed.api_url == "http://se-01:8010"
    assert parsed.mode is SEMode.EDIT
    assert parsed.status == "online"
    assert (parsed.priority, parsed.capacity_bytes, parsed.used_bytes) == (3, 1000, 10)


def test_minimal_entry_takes_defaults_and_id() -> None:
    [parsed] = parse_registry(document({"id": "se-x", "api_url": "https://x", "mode": "rw"}))
    assert (parsed.id, parsed.mode, parsed.status, parsed.priority) == (
        "se-x",
        SEMode.RW,
        "online",
        100,
    )
    assert parsed.capacity_bytes is None
    assert parse_registry(document()) == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"status": "degraded"}, "degraded"),
        ({"status": "maintenance", "is_available": False}, "maintenance"),
        ({"status": "online", "is_available": False}, "offline"),
        ({"status": "online", "is_writable": False}, "offline"),
        ({"status": "online", "is_writable": False, "mode": "ro"}, "online"),
        ({"status": "offline", "is_available": True}, "offline"),
    ],
)
def test_status_mapping(overrides: dict[str, Any], expected: str) -> None:
    [parsed] = parse_registry(document(element(**overrides)))
    assert parsed.status == expected


def test_without_status_the_flags_decide() -> None:
    entry = element(is_available=False)
    del entry["status"]
    [parsed] = parse_registry(document(entry))
    assert parsed.status == "offline"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('{"version": 1}', "no storage_elements list"),
        (document("se"), r"storage_elements\[0\] must be an object"),  # type: ignore[arg-type]
        (document(element(element_id=None, id=None)), "needs a non-empty element_id or id"),
        (document(element(mode="write")), r"\(se-01\): mode must be edit, rw, ro or ar"),
        (document(element(status="up")), "status must be one of"),
        (document(element(api_url="se-01:8010")), "api_url"),
        (document(element(priority="high")), "priority"),
        (document(element(used_bytes=-1)), "used_bytes"),
        (document(element(), element()), "duplicate id"),
    ],
)
def test_invalid_documents_are_rejected_precisely(raw: str | bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_registry(raw)


def test_backoff_grows_and_is_capped() -> None:
    delays = [reconnect_wait_s(n) for n in range(1, 10)]
    assert delays[:3] == [0.25, 0.5, 1.0]
    assert delays == sorted(delays)
    assert max(delays) == 5.0
