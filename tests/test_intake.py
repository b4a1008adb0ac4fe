"""Intake on a real redis-server: atomic take, ack, lease, redelivery of dead workers' messages."""

from __future__ import annotations

import time

import pytest
import redis

from worker.intake import WORKERS_KEY, Intake, LeaseLost


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _enqueue(r: redis.Redis, *messages: bytes, queue: str = "q") -> None:
    """As a Celery producer does: LPUSH, so the oldest message is at the right end."""
    for m in messages:
        r.lpush(queue, m)


def _intake(r: redis.Redis, worker_id: str, lease_ttl_s: float = 10.0) -> Intake:
    intake = Intake(r, "q", worker_id, lease_ttl_s)
    intake.renew_lease()
    return intake


def _wait_until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_take_moves_oldest_first_into_inflight(r) -> None:
    """take pops the oldest messages and records each in the in-flight hash, atomically."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    fields, messages = intake.take(2)
    assert messages == [b"m1", b"m2"]
    assert r.lrange("q", 0, -1) == [b"m3"]
    assert r.hgetall(intake.inflight_key) == {
        f.encode(): m for f, m in zip(fields, messages, strict=True)
    }
    assert r.sismember(WORKERS_KEY, "w1")


def test_take_on_empty_queue_returns_nothing(r) -> None:
    """An empty queue gives empty lists and records nothing."""
    intake = _intake(r, "w1")
    assert intake.take(5) == ([], [])
    assert not r.exists(intake.inflight_key)


def test_ack_removes_from_inflight(r) -> None:
    """Acked fields leave the in-flight hash; others stay."""
    _enqueue(r, b"m1", b"m2")
    intake = _intake(r, "w1")
    fields, _ = intake.take(2)
    pipe = r.pipeline(transaction=False)
    intake.ack(pipe, fields[:1])
    pipe.execute()
    assert list(r.hgetall(intake.inflight_key).values()) == [b"m2"]


def test_no_lease_no_take(r) -> None:
    """A worker without a lease cannot take: the queue is left untouched."""
    _enqueue(r, b"m1")
    intake = Intake(r, "q", "w1", 10.0)
    with pytest.raises(LeaseLost):
        intake.take(1)
    assert r.llen("q") == 1


def test_wait_blocks_without_consuming(r) -> None:
    """wait reports a waiting message without taking it or changing the order."""
    intake = _intake(r, "w1")
    assert intake.wait(0.05) is False
    _enqueue(r, b"m1", b"m2")
    assert intake.wait(1.0) is True
    assert r.lrange("q", 0, -1) == [b"m2", b"m1"]


def test_expired_lease_redelivers_in_order(r) -> None:
    """A worker whose lease expires gets its messages redelivered, in order, ahead of the rest."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5")
    dead = _intake(r, "dead", lease_ttl_s=1.0)
    dead.take(3)
    alive = _intake(r, "alive")
    assert alive.restore_dead() == 0  # lease still valid: nothing moves
    _wait_until(lambda: not r.exists(dead.lease_key))
    assert alive.restore_dead() == 3
    assert not r.exists(dead.inflight_key)
    assert not r.sismember(WORKERS_KEY, "dead")
    _, messages = alive.take(10)
    assert messages == [b"m1", b"m2", b"m3", b"m4", b"m5"]


def test_restore_leaves_live_workers_alone(r) -> None:
    """restore_dead does not touch a worker whose lease is alive."""
    _enqueue(r, b"m1")
    w1 = _intake(r, "w1")
    w1.take(1)
    assert _intake(r, "w2").restore_dead() == 0
    assert r.hlen(w1.inflight_key) == 1


def test_orphans_of_a_lost_reply_are_recovered(r) -> None:
    """Messages of a take whose reply never reached a runner are given back; held ones stay."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    held_fields, _ = intake.take(1)
    lost_fields, _ = intake.take(2)
    intake.settled(lost_fields)  # as if the reply had been lost: no runner holds them
    assert intake.recover_orphans() == 2
    assert r.hkeys(intake.inflight_key) == [held_fields[0].encode()]
    assert r.lrange("q", 0, -1) == [b"m3", b"m2"]


def test_release_gives_everything_back(r) -> None:
    """At shutdown all unacked messages return to the queue head; lease and registration go."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    intake.take(2)
    assert intake.release() == 2
    assert r.lrange("q", 0, -1) == [b"m3", b"m2", b"m1"]
    assert not r.exists(intake.inflight_key) and not r.exists(intake.lease_key)
    assert not r.sismember(WORKERS_KEY, "w1")
