"""One resumable upload's state machine: what each request may do in each state, and the
wire format. No I/O."""

from __future__ import annotations

import pytest

from ingester.errors import FileTooLarge, NoStorageAvailable
from ingester.tus.errors import FinalUploadNotPatchable, InvalidTusHeader, OffsetMismatch
from ingester.tus.state import ConcatKind, Phase, TusUpload

MAX = 1000
NOW = 1_000_000.0


def upload(length: int | None = 100, **kw: object) -> TusUpload:
    return TusUpload(
        id="0" * 32,
        owner="alice",
        length=length,
        created_at=NOW,
        expires_at=NOW + 60,
        **kw,  # type: ignore[arg-type]
    )


def test_a_new_upload_takes_bytes_at_zero() -> None:
    u = upload()
    u.check_length(None, MAX)
    u.check_offset(0)
    assert u.room(MAX) == 100
    assert not u.all_received


@pytest.mark.parametrize("offset", [1, 99, 100, 101])
def test_any_other_offset_is_409_with_the_current_one(offset: int) -> None:
    u = upload()
    with pytest.raises(OffsetMismatch) as caught:
        u.check_offset(offset)
    assert caught.value.status == 409
    assert caught.value.headers["Upload-Offset"] == "0"
    assert u.offset == 0


def test_accepting_moves_the_offset_and_the_expiry() -> None:
    u = upload()
    u.accept(40, now=NOW + 10, expiration_s=60)
    assert u.offset == 40
    assert u.expires_at == NOW + 70
    assert u.room(MAX) == 60
    u.check_offset(40)
    u.accept(60, now=NOW + 11, expiration_s=60)
    assert u.all_received
    assert u.room(MAX) == 0


def test_deferred_length_is_declared_once() -> None:
    u = upload(length=None)
    assert u.room(MAX) == MAX
    u.accept(10, now=NOW, expiration_s=60)
    u.check_length(None, MAX)
    u.check_length(30, MAX)
    u.declare_length(30)
    assert u.length == 30
    assert u.room(MAX) == 20
    u.check_length(30, MAX)  # repeating it is fine
    with pytest.raises(InvalidTusHeader):
        u.check_length(31, MAX)


def test_a_deferred_length_over_the_limit_or_below_the_offset_is_refused() -> None:
    u = upload(length=None)
    u.accept(10, now=NOW, expiration_s=60)
    with pytest.raises(FileTooLarge):
        u.check_length(MAX + 1, MAX)
    with pytest.raises(InvalidTusHeader):
        u.check_length(9, MAX)
    assert u.length is None


def test_a_final_upload_is_never_patched() -> None:
    u = upload(concat=ConcatKind.FINAL, parts=["a" * 32])
    with pytest.raises(FinalUploadNotPatchable) as caught:
        u.check_length(None, MAX)
    assert caught.value.status == 403


def test_completion_success() -> None:
    u = upload()
    u.accept(100, now=NOW, expiration_s=60)
    u.begin_completion(offset_before=60)
    assert u.phase is Phase.COMPLETING
    with pytest.raises(OffsetMismatch):
        u.check_offset(100)  # nothing more may be written while it is stored
    u.completed({"file_id": "f"}, now=NOW + 5, retention_s=3600)
    assert u.phase.value == "done"
    assert u.result == {"file_id": "f"}
    assert u.expires_at == NOW + 3605
    assert u.attempts == 1


def test_a_failed_completion_puts_the_offset_back_before_the_last_chunk() -> None:
    u = upload()
    u.accept(100, now=NOW, expiration_s=60)
    u.begin_completion(offset_before=60)
    u.completion_failed(NoStorageAvailable("none left"), now=NOW + 1, expiration_s=60)
    assert u.phase is Phase.RECEIVING
    assert u.offset == 60
    assert not u.all_received
    assert u.last_error == {"code": "NO_STORAGE_AVAILABLE", "message": "none left", "status": 503}
    assert u.attempts == 1
    u.check_offset(60)  # the client sends the last chunk again


def test_a_complete_upload_cannot_start_storing_twice_from_nothing() -> None:
    with pytest.raises(AssertionError):
        upload().begin_completion(offset_before=0)


def test_expiry() -> None:
    u = upload()
    assert not u.expired(NOW + 59)
    assert u.expired(NOW + 60)


def test_json_round_trip() -> None:
    u = upload(
        length=None,
        metadata={"filename": "é.txt".encode(), "flag": b""},
        concat=ConcatKind.PARTIAL,
        concat_header="partial",
    )
    u.accept(7, now=NOW, expiration_s=60)
    back = TusUpload.from_json(u.to_json())
    assert back == u
    done = upload()
    done.accept(100, now=NOW, expiration_s=60)
    done.begin_completion(offset_before=0)
    done.completed({"file_id": "f", "n": 1}, now=NOW, retention_s=1)
    assert TusUpload.from_json(done.to_json().encode()) == done


def test_the_json_view() -> None:
    view = upload().as_json()
    assert view["upload_id"] == "0" * 32
    assert view["state"] == "receiving"
    assert view["offset"] == 0
    assert view["length"] == 100
    assert view["expires_at"].endswith("Z")
