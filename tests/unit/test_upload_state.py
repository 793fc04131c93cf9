"""Admission caps, progress records, plan settlement and error collapsing: no I/O."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ingester.concurrency import collapse, only_cancelled
from ingester.errors import InvalidField, ServiceBusy, ShuttingDown, TooManyUploads
from ingester.upload.admission import Admission
from ingester.upload.form import plan_is_settled
from ingester.upload.progress import ProgressBook, UploadState


def test_admission_caps_per_user_before_global() -> None:
    admission = Admission(max_in_flight=2, max_per_user=1, retry_after_s=7)
    with admission.admit("a"):
        with pytest.raises(TooManyUploads) as same_user, admission.admit("a"):
            pass
        assert same_user.value.headers == {"Retry-After": "7"}
        with admission.admit("b"):
            assert admission.in_flight == 2
            with pytest.raises(TooManyUploads), admission.admit("b"):
                pass
            with pytest.raises(ServiceBusy), admission.admit("c"):
                pass
    assert admission.in_flight == 0


def test_admission_releases_on_error_and_refuses_while_draining() -> None:
    admission = Admission(max_in_flight=1, max_per_user=1, retry_after_s=1)
    with pytest.raises(RuntimeError), admission.admit("a"):
        raise RuntimeError("boom")
    assert admission.in_flight == 0
    admission.draining = True
    with pytest.raises(ShuttingDown), admission.admit("a"):
        pass


async def test_wait_idle_returns_when_the_last_upload_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(max_in_flight=4, max_per_user=4, retry_after_s=1)
    with trio.fail_after(2):
        await admission.wait_idle()
        ended = trio.Event()

        async def upload() -> None:
            with admission.admit("u"):
                await trio.sleep(0.05)
            ended.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await trio.sleep(0.01)
            await admission.wait_idle()
            assert ended.is_set()


def test_progress_lifecycle_and_expiry() -> None:
    now = [1000.0]
    book = ProgressBook(retention_s=60, clock=lambda: now[0])
    entry = book.start("u1", "alice", expected_bytes=1000)
    entry.bytes_received = 250
    now[0] += 5
    view = book.get("u1")
    assert view is not None
    snapshot = view.as_json(now[0])
    assert snapshot["percent"] == 25.0
    assert snapshot["bytes_per_second"] == 50
    assert book.in_flight() == 1
    book.finish(entry, UploadState.DONE, result={"file_id": "f"})
    assert book.in_flight() == 0
    assert entry.as_json(now[0])["percent"] == 100.0
    now[0] += 59
    assert book.expire() == 0
    now[0] += 2
    assert book.expire() == 1
    assert book.get("u1") is None


@pytest.mark.parametrize(
    ("fields", "settled"),
    [
        ({}, False),
        ({"retention_policy": "temporary"}, False),
        ({"compress": "false"}, False),
        ({"retention_policy": "temporary", "compress": "false"}, True),
        ({"storage_mode": "rw", "compress": "no"}, True),
        ({"retention_policy": "permanent", "compress": "true"}, False),
        (
            {"retention_policy": "permanent", "compress": "TRUE", "compression_algorithm": "gzip"},
            True,
        ),
    ],
)
def test_plan_is_settled(fields: dict[str, str], settled: bool) -> None:
    assert plan_is_settled(fields) is settled


def test_collapse_prefers_project_errors_and_keeps_pure_cancellation() -> None:
    error = InvalidField("x")
    group = BaseExceptionGroup("g", [ValueError("v"), ExceptionGroup("inner", [error])])
    assert collapse(group) is error
    plain = BaseExceptionGroup("g", [KeyError("k")])
    assert isinstance(collapse(plain), KeyError)


async def test_only_cancelled_recognises_groups_of_cancellations() -> None:
    with trio.fail_after(2):
        caught: list[BaseException] = []
        with trio.CancelScope() as scope:
            try:
                scope.cancel()
                await trio.sleep(1)
            except trio.Cancelled as exc:
                caught.append(exc)
                raise
        cancelled = caught[0]
        assert only_cancelled(cancelled)
        assert only_cancelled(
            BaseExceptionGroup("g", [cancelled, BaseExceptionGroup("h", [cancelled])])
        )
        assert not only_cancelled(BaseExceptionGroup("g", [cancelled, ValueError()]))
        assert collapse(BaseExceptionGroup("g", [cancelled])).__class__ is BaseExceptionGroup
