"""Intake on a real redis-server: atomic take into a runner's lane, ack, lease, redelivery of dead
workers' messages, recovery from a lost reply."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.intake import LANES_KEY, Intake, LeaseLost


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _enqueue(r: redis.Redis, *messages: bytes, queue: str = "q") -> None:
    """As a Celery producer does: LPUSH, so the oldest message is at the right end."""
    for m in messages:
        r.lpush(queue, m)


def _intake(r: redis.Redis, worker_id: str, lease_ttl_s: float = 10.0, runners: int = 1) -> Intake:
    intake = Intake(r, "q", worker_id, lease_ttl_s, runners=runners)
    intake.renew_lease()
    return intake


def _ack(r: redis.Redis, intake: Intake, lane: int = 0) -> None:
    pipe = r.pipeline(transaction=False)
    intake.lanes[lane].ack(pipe)
    pipe.execute()
    intake.lanes[lane].settled()


@contextlib.contextmanager
def _replies_lost(error: Exception) -> Iterator[None]:
    """Inside: every pipeline runs in Redis, then its reply is lost to ``error``."""
    execute = redis.client.Pipeline.execute

    def ran_but_reply_lost(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        execute(self, *args, **kwargs)
        raise error

    with pytest.MonkeyPatch.context() as m:
        m.setattr(redis.client.Pipeline, "execute", ran_but_reply_lost)
        yield


def _wait_until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_take_moves_oldest_first_into_the_lane(r) -> None:
    """take moves the oldest messages into the runner's lane and registers the lane."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    assert lane.take(2) == [b"m1", b"m2"]
    assert r.lrange("q", 0, -1) == [b"m3"]
    assert r.lrange(lane.key, 0, -1) == [b"m2", b"m1"]  # newest left, like the queue
    assert r.hget(LANES_KEY, lane.key) == b"q"
    assert lane.held == 2


def test_take_on_empty_queue_returns_nothing(r) -> None:
    """An empty queue gives an empty list and leaves no lane behind."""
    intake = _intake(r, "w1")
    assert intake.lanes[0].take(5) == []
    assert not r.exists(intake.lanes[0].key)


def test_take_after_emptying_the_queue_takes_what_arrived(r) -> None:
    """A take that emptied the queue makes the next one size itself to the queue's length: it
    still takes everything that arrived since, up to max_n, oldest first."""
    _enqueue(r, b"m1")
    lane = _intake(r, "w1").lanes[0]
    assert lane.take(4) == [b"m1"]
    assert lane.take(4) == []
    _enqueue(r, b"m2", b"m3", b"m4", b"m5", b"m6")
    assert lane.take(4) == [b"m2", b"m3", b"m4", b"m5"]
    assert lane.take(4) == [b"m6"]


def test_ack_empties_the_lane_and_only_that_lane(r) -> None:
    """An ack deletes what its runner holds; another runner's lane of the same worker stays."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1", runners=2)
    first, second = intake.lanes
    assert first.take(2) == [b"m1", b"m2"]
    assert second.take(2) == [b"m3"]
    _ack(r, intake, 0)
    assert not r.exists(first.key) and first.held == 0
    assert r.lrange(second.key, 0, -1) == [b"m3"]


def test_no_lease_no_take(r) -> None:
    """A worker without a lease cannot take: the queue is left untouched."""
    _enqueue(r, b"m1")
    intake = Intake(r, "q", "w1", 10.0)
    with pytest.raises(LeaseLost):
        intake.lanes[0].take(1)
    assert r.llen("q") == 1


def test_no_take_once_the_lease_may_have_expired(r) -> None:
    """A lease not renewed for nearly its time to live stops the takes before Redis expires it."""
    _enqueue(r, b"m1")
    intake = _intake(r, "w1", lease_ttl_s=0.3)
    time.sleep(0.3 * 0.9 + 0.02)
    assert r.exists(intake.lease_key)  # still alive in Redis, but too close to call
    with pytest.raises(LeaseLost):
        intake.lanes[0].take(1)
    intake.renew_lease()
    assert intake.lanes[0].take(1) == [b"m1"]


def test_wait_blocks_without_consuming(r) -> None:
    """wait reports a waiting message without taking it or changing the order."""
    intake = _intake(r, "w1")
    assert intake.wait(0.05) is False
    _enqueue(r, b"m1", b"m2")
    assert intake.wait(1.0) is True
    assert r.lrange("q", 0, -1) == [b"m2", b"m1"]


def test_expired_lease_redelivers_in_order(r) -> None:
    """A worker whose lease expires gets its messages redelivered, in order, ahead of the rest."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5", b"m6")
    dead = _intake(r, "dead", lease_ttl_s=1.0, runners=2)
    dead.lanes[0].take(2)
    dead.lanes[1].take(2)
    alive = _intake(r, "alive")
    assert alive.restore_dead() == 0  # lease still valid: nothing moves
    _wait_until(lambda: not r.exists(dead.lease_key))
    assert alive.restore_dead() == 4
    assert not any(r.exists(lane.key) for lane in dead.lanes)
    assert r.hkeys(LANES_KEY) == []
    # Each lane goes back in its own order; every given-back message is served before m5, m6.
    messages = alive.lanes[0].take(10)
    assert sorted(messages[:4]) == [b"m1", b"m2", b"m3", b"m4"]
    assert messages.index(b"m1") < messages.index(b"m2")
    assert messages.index(b"m3") < messages.index(b"m4")
    assert messages[4:] == [b"m5", b"m6"]


def test_restore_leaves_live_workers_alone(r) -> None:
    """restore_dead does not touch a worker whose lease is alive."""
    _enqueue(r, b"m1")
    w1 = _intake(r, "w1")
    w1.lanes[0].take(1)
    assert _intake(r, "w2").restore_dead() == 0
    assert r.llen(w1.lanes[0].key) == 1


def test_a_lost_take_reply_is_given_back_and_never_acked(r) -> None:
    """A take that Redis ran but whose reply was lost leaves messages in the lane that the runner
    does not know of: the next ack gives them back to the queue head (not deletes them), and a
    retried ack deletes nothing more."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    assert lane.take(2) == [b"m1", b"m2"]
    with _replies_lost(redis.ConnectionError("reset")), pytest.raises(redis.ConnectionError):
        lane.take(2)  # m3, m4 are now in the lane, unknown to the runner
    assert lane.unsure and lane.held == 2
    _ack(r, intake)
    _ack(r, intake)  # a retried ack (its reply lost too) is harmless
    assert not r.exists(lane.key)
    assert r.lrange("q", 0, -1) == [b"m5", b"m4", b"m3"]  # m3 served next


def test_a_lost_take_reply_before_the_next_take(r) -> None:
    """After a lost reply with nothing held, the next take serves the unknown messages with its
    own, oldest first."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    with _replies_lost(redis.TimeoutError("timed out")), pytest.raises(redis.TimeoutError):
        lane.take(2)
    assert lane.take(3) == [b"m1", b"m2", b"m3"]
    assert lane.held == 3 and not lane.unsure


def test_a_take_retried_by_redis_py_after_a_lost_reply_loses_nothing(
    redis_server, r, monkeypatch
) -> None:
    """A client with retries (redis-py's default for ``Redis(host=...)``; none with ``from_url``)
    re-runs a transaction whose reply was lost to a connection error: the first attempt's
    messages are already in the lane when the retry runs. The take returns them too, so the
    ack that deletes the lane deletes only served messages."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5")
    retrying = redis.Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 3))
    lane = _intake(retrying, "w1").lanes[0]
    transaction = redis.client.Pipeline._execute_transaction
    failures = [redis.ConnectionError("reset (after Redis ran the transaction)")]

    def first_reply_lost(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        replies = transaction(self, *args, **kwargs)
        if failures:
            raise failures.pop()
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "_execute_transaction", first_reply_lost)
    taken = lane.take(2)
    monkeypatch.undo()
    assert not failures, "the lost reply was not retried by redis-py"
    assert taken == [b"m1", b"m2", b"m3", b"m4"]
    assert lane.held == 4 and r.llen(lane.key) == 4
    _ack(retrying, lane.intake)
    assert r.lrange("q", 0, -1) == [b"m5"]


def test_release_gives_everything_back(r) -> None:
    """At shutdown all unacked messages of every lane return to the queue head; lease and
    registration go."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4")
    intake = _intake(r, "w1", runners=2)
    intake.lanes[0].take(2)
    intake.lanes[1].take(1)
    assert intake.release() == 3
    assert sorted(r.lrange("q", 0, -1)) == [b"m1", b"m2", b"m3", b"m4"]
    assert r.lrange("q", 0, 0) == [b"m4"]  # the one never taken is served last
    assert r.lindex("q", -1) in (b"m1", b"m3")  # each lane's oldest ahead of its younger
    assert not r.exists(intake.lease_key) and r.hkeys(LANES_KEY) == []
    assert all(lane.held == 0 for lane in intake.lanes)
