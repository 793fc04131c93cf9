"""When a durable write waits for a replica (`WAIT 1`): only with Sentinel, and a replica that
did not answer costs one timeout per window, not one per upload."""

from __future__ import annotations

from ingester.storage.redis_gateway import SKIP_AFTER_MISS_S, AckPolicy


def replicated(policy: AckPolicy) -> bool:
    # A call, so the checker does not carry one assertion's narrowing into the next.
    return policy.replicated


def test_plain_redis_never_waits() -> None:
    policy = AckPolicy(enabled=False)
    assert not policy.should_wait(0.0)
    assert not policy.should_wait(1e9)


def test_waits_while_replicas_answer() -> None:
    policy = AckPolicy(enabled=True)
    for now in (0.0, 1.0, 2.0):
        assert policy.should_wait(now)
        assert policy.acked(1, now) is None  # no change to report
    assert replicated(policy)


def test_a_miss_stops_waiting_for_a_window_then_tries_again() -> None:
    policy = AckPolicy(enabled=True)
    assert policy.acked(0, 100.0) is False  # reported once
    assert not replicated(policy)
    assert not policy.should_wait(100.0)
    assert not policy.should_wait(100.0 + SKIP_AFTER_MISS_S - 0.01)
    assert policy.should_wait(100.0 + SKIP_AFTER_MISS_S)
    # Still no replica: not reported again, and another window starts.
    assert policy.acked(0, 111.0) is None
    assert not policy.should_wait(111.0 + SKIP_AFTER_MISS_S - 0.01)
    assert policy.acked(1, 111.0 + SKIP_AFTER_MISS_S) is True
    assert replicated(policy)
    assert policy.should_wait(111.0 + SKIP_AFTER_MISS_S)
