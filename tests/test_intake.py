"""Intake on a real redis-server: atomic take into a batch's lane, ack by identity, lease,
redelivery of dead workers' messages with delivery counting, poison pills, bounded reads,
recovery from a lost reply, and Redis coming back with older data."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator

import pytest
import redis

from imgq.worker.broker.deadletters import DeadLetters
from imgq.worker.broker.intake import (
    LANES_KEY,
    Intake,
    LeaseLost,
    deliveries_key,
    poison_key,
    suspect_key,
)
from imgq.worker.broker.settle import Settler

DEAD_LETTERS = (3600, 100, 1 << 20)


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _enqueue(r: redis.Redis, *messages: bytes, queue: str = "q") -> None:
    """As a Celery producer does: LPUSH, so the oldest message is at the right end."""
    for m in messages:
        r.lpush(queue, m)


def _intake(
    r: redis.Redis,
    worker_id: str,
    lease_ttl_s: float = 10.0,
    runners: int = 1,
    max_message_bytes: int = 1 << 20,
    max_deliveries: int = 3,
) -> Intake:
    intake = Intake(r, "q", worker_id, lease_ttl_s, runners=runners,
                    max_message_bytes=max_message_bytes, max_deliveries=max_deliveries,
                    dead_letters=DEAD_LETTERS)  # fmt: skip
    intake.renew_lease()
    return intake


def _ack(r: redis.Redis, intake: Intake, lane: int = 0) -> None:
    """The ack as a runner sends it: the settle script with no results."""
    the_lane = intake.lanes[lane]
    the_lane.prepare_ack()
    pipe = r.pipeline(transaction=False)
    Settler(r, r, "q", intake.worker_id, 60, DEAD_LETTERS).settle(pipe, the_lane, [], [], [])
    pipe.execute()
    the_lane.settled()


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
    """take moves the oldest messages into the batch's lane and registers the lane."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    assert lane.take(2).messages == [b"m1", b"m2"]
    assert r.lrange("q", 0, -1) == [b"m3"]
    assert r.lrange(lane.key, 0, -1) == [b"m2", b"m1"]  # newest left, like the queue
    assert r.hget(LANES_KEY, lane.key) == b"q"
    assert lane.held == 2


def test_take_on_empty_queue_returns_nothing(r) -> None:
    """An empty queue gives an empty take and leaves no lane behind."""
    intake = _intake(r, "w1")
    taken = intake.lanes[0].take(5)
    assert taken.messages == [] and taken.oversized == []
    assert not r.exists(intake.lanes[0].key)


def test_take_after_emptying_the_queue_takes_what_arrived(r) -> None:
    """A take that emptied the queue makes the next one size itself to the queue's length: it
    still takes everything that arrived since, up to max_n, oldest first."""
    _enqueue(r, b"m1")
    lane = _intake(r, "w1").lanes[0]
    assert lane.take(4).messages == [b"m1"]
    assert lane.take(4).messages == []
    _enqueue(r, b"m2", b"m3", b"m4", b"m5", b"m6")
    assert lane.take(4).messages == [b"m2", b"m3", b"m4", b"m5"]
    assert lane.take(4).messages == [b"m6"]


def test_each_batch_takes_into_a_new_lane(r) -> None:
    """The ack deletes the batch's lane and unregisters it; the next batch has a new lane."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    lane.take(2)
    first = lane.key
    _ack(r, intake)
    assert not r.exists(first) and r.hkeys(LANES_KEY) == []
    assert lane.key != first and lane.held == 0
    assert lane.take(2).messages == [b"m3"]
    assert r.lrange(lane.key, 0, -1) == [b"m3"]


def test_ack_empties_the_lane_and_only_that_lane(r) -> None:
    """An ack deletes what its runner holds; another runner's lane of the same worker stays."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1", runners=2)
    first, second = intake.lanes
    assert first.take(2).messages == [b"m1", b"m2"]
    assert second.take(2).messages == [b"m3"]
    _ack(r, intake, 0)
    assert first.held == 0
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
    intake = _intake(r, "w1", lease_ttl_s=10.0)
    # As if renewed 9.5 s ago (the worker's own clock, not a sleep a slow machine stretches):
    # within the last tenth of the time to live.
    intake._lease_until = time.monotonic() + 0.5
    assert r.exists(intake.lease_key)  # still alive in Redis, but too close to call
    with pytest.raises(LeaseLost):
        intake.lanes[0].take(1)
    intake.renew_lease()
    assert intake.lanes[0].take(1).messages == [b"m1"]


def test_queued_reads_without_consuming(r) -> None:
    """queued reports a waiting message (in the queue or the poison list) without taking it."""
    intake = _intake(r, "w1")
    assert intake.queued() is False
    _enqueue(r, b"m1", b"m2")
    assert intake.queued() is True
    assert r.lrange("q", 0, -1) == [b"m2", b"m1"]
    r.delete("q")
    r.lpush(poison_key("q"), b"p")
    assert intake.queued() is True


def test_queued_works_on_a_redis_that_refuses_writes(r) -> None:
    """The idle look is a read: a Redis at maxmemory with noeviction still answers it
    (issue 14: an idle worker's BLMOVE was refused with OOM and ended the worker)."""
    _enqueue(r, b"m1")
    intake = _intake(r, "w1")
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            r.set("x", "1")
        assert intake.queued() is True
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            intake.lanes[0].take(1)
    finally:
        r.config_set("maxmemory", 0)
    assert intake.lanes[0].take(1).messages == [b"m1"]


def test_expired_lease_redelivers_in_order(r) -> None:
    """A worker whose lease expires gets its messages redelivered, each counted as one delivery
    without a result: they become suspects, served one per take ahead of the rest, each lane
    in its own order."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5", b"m6")
    dead = _intake(r, "dead", lease_ttl_s=1.0, runners=2)
    dead.lanes[0].take(2)
    dead.lanes[1].take(2)
    alive = _intake(r, "alive")
    assert alive.restore_dead() == (0, 0)  # lease still valid: nothing moves
    _wait_until(lambda: not r.exists(dead.lease_key))
    assert alive.restore_dead() == (4, 0)
    assert not any(r.exists(lane.key) for lane in dead.lanes)
    assert r.hkeys(LANES_KEY) == []
    assert sorted(r.lrange(suspect_key("q"), 0, -1)) == [b"m1", b"m2", b"m3", b"m4"]
    lane = alive.lanes[0]
    served = []
    for _ in range(4):
        taken = lane.take(10).messages
        assert len(taken) == 1, taken  # a suspect comes alone
        served += taken
        _ack(r, alive)
    assert served.index(b"m1") < served.index(b"m2")
    assert served.index(b"m3") < served.index(b"m4")
    assert lane.take(10).messages == [b"m5", b"m6"]
    for m in (b"m1", b"m4"):
        assert r.get(deliveries_key(hashlib.sha1(m).hexdigest())) == b"1"
    assert r.get(deliveries_key(hashlib.sha1(b"m5").hexdigest())) is None


def test_a_message_whose_result_exists_is_not_counted(r) -> None:
    """A lease lost to a Redis outage, not a death: messages already answered go back to the
    queue uncounted (their result exists), the others become suspects."""
    answered = b'{"body": "x", "headers": {"task": "t", "id": "done-1"}}'
    pending = b'{"body": "y", "headers": {"task": "t", "id": "todo-1"}}'
    _enqueue(r, answered, pending)
    r.set("celery-task-meta-done-1", b"{}")
    dead = _intake(r, "dead", lease_ttl_s=0.3)
    dead.lanes[0].take(2)
    _wait_until(lambda: not r.exists(dead.lease_key))
    assert _intake(r, "alive").restore_dead() == (2, 0)
    assert r.lrange("q", 0, -1) == [answered]
    assert r.lrange(suspect_key("q"), 0, -1) == [pending]
    assert r.get(deliveries_key(hashlib.sha1(answered).hexdigest())) is None


def test_restore_leaves_live_workers_alone(r) -> None:
    """restore_dead does not touch a worker whose lease is alive."""
    _enqueue(r, b"m1")
    w1 = _intake(r, "w1")
    w1.lanes[0].take(1)
    assert _intake(r, "w2").restore_dead() == (0, 0)
    assert r.llen(w1.lanes[0].key) == 1


def test_a_message_that_kills_its_workers_becomes_a_poison_pill(r) -> None:
    """Delivered max_deliveries times with its worker dying each time, a message goes to the
    poison list instead of the queue; the next take brings it flagged (the runner then fails
    it with redelivered_too_often), ahead of the queue."""
    _enqueue(r, b"pill", b"m2")
    alive = _intake(r, "alive")
    for round_ in range(3):
        victim = _intake(r, f"victim{round_}", lease_ttl_s=0.3)
        assert victim.lanes[0].take(1).messages == [b"pill"]
        _wait_until(lambda v=victim: not r.exists(v.lease_key))  # type: ignore[misc]
        assert alive.restore_dead() == (1, 0)
    assert r.lrange(poison_key("q"), 0, -1) == [b"pill"]
    assert r.lrange("q", 0, -1) == [b"m2"]
    taken = alive.lanes[0].take(5)
    assert taken.messages == [b"pill", b"m2"] and taken.poisoned == [True, False]


def test_a_lost_take_reply_is_given_back_and_never_acked(r) -> None:
    """A take that Redis ran but whose reply was lost leaves messages in the lane that the runner
    does not know of: the next ack gives them back to the queue head (not deletes them), and a
    retried ack deletes nothing more."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    assert lane.take(2).messages == [b"m1", b"m2"]
    key = lane.key
    with _replies_lost(redis.ConnectionError("reset")), pytest.raises(redis.ConnectionError):
        lane.take(2)  # m3, m4 are now in the lane, unknown to the runner
    assert lane.unsure and lane.held == 2
    _ack(r, intake)
    assert not r.exists(key)
    assert r.lrange("q", 0, -1) == [b"m5", b"m4", b"m3"]  # m3 served next


def test_a_lost_take_reply_before_the_next_take(r) -> None:
    """After a lost reply with nothing held, the next take serves the unknown messages first,
    oldest first, without counting them as deliveries."""
    _enqueue(r, b"m1", b"m2", b"m3")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    with _replies_lost(redis.TimeoutError("timed out")), pytest.raises(redis.TimeoutError):
        lane.take(2)
    assert lane.take(3).messages == [b"m1", b"m2"]
    assert lane.held == 2 and not lane.unsure
    assert lane.take(3).messages == [b"m3"]
    assert r.keys("imgq:deliveries:*") == []


def test_the_take_client_never_retries_by_itself(r) -> None:
    """A take whose reply is lost is not re-run by redis-py (that would move more messages than
    the runner knows of); the runner finds out and sorts out the lane."""
    intake = _intake(r, "w1")
    retry = intake.take_redis.connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == 0


def test_oversized_message_is_never_read_and_is_dead_lettered(r) -> None:
    """A message over the limit is not read by the worker: its reply is refused at the cap,
    Redis moves it to the dead letters (metadata only) and returns its ends; the messages around
    it are served, in order (issue 14: 100 MiB messages were read whole)."""
    limit = 128 * 1024  # past the reply cap (limit + 256 KiB), under a recovery's read limit
    big = b'{"body": "' + b"A" * (7 * limit // 2) + b'", "headers": {"task": "x", "id": "big-1"}}'
    _enqueue(r, b"m1", big, b"m2")
    intake = _intake(r, "w1", max_message_bytes=limit)
    taken = intake.lanes[0].take(3)
    assert taken.messages == [b"m1", b"m2"]
    (over,) = taken.oversized
    assert over.length == len(big) and over.sha1 == hashlib.sha1(big).hexdigest()
    assert over.tail.endswith(b'"id": "big-1"}}') and over.head.startswith(b'{"body"')
    (entry,) = DeadLetters(r, "q").list()
    assert entry.reason == "message_too_large" and entry.length == len(big)
    assert entry.body != "kept" and r.keys("imgq:dlq:q:body:*") == []
    assert r.lrange(intake.lanes[0].key, 0, -1) == [b"m2", b"m1"]


def test_a_recovery_reads_at_most_four_limits_of_bytes(r) -> None:
    """Sorting out a lane copies each message it reads into Lua, blocking Redis meanwhile: one
    call reads at most four message limits of bytes and gives the rest back unread, in order, so
    a queue of oversized messages is dead-lettered a few at a time."""
    limit = 16 * 1024
    ends = [b'", "headers": {"id": "b%d"}}' % i for i in range(40)]
    bigs = [b'{"body": "' + bytes([65 + i % 26]) * (2 * limit) + end for i, end in enumerate(ends)]
    _enqueue(r, *bigs, b"m1")
    lane = _intake(r, "w1", max_message_bytes=limit).lanes[0]
    first = lane.take(41)
    assert [o.tail[-len(e) :] for o, e in zip(first.oversized, ends, strict=False)] == ends[:2]
    assert len(first.oversized) == 2 and first.messages == [] and r.llen("q") == 39
    rest = lane.take(41)  # sized down by what it just met; one take or several
    while r.llen("q"):
        rest.extend(lane.take(41))
    assert [o.tail[-len(e) :] for o, e in zip(rest.oversized, ends[2:], strict=False)] == ends[2:]
    assert len(rest.oversized) == 38 and rest.messages == [b"m1"]
    assert len(DeadLetters(r, "q").list(100)) == 40


def test_a_recovery_never_writes_a_message_back(r) -> None:
    """Sorting out a lane moves messages with LMOVE and removes oversized ones by a tombstone:
    no command carries a message's bytes, so neither the append-only file nor a replica
    receives them again (a GB of near-limit messages rewritten stalled Redis for seconds)."""
    limit = 400_000
    big = b'{"body": "' + b"B" * (2 * limit) + b'", "headers": {"id": "big"}}'
    messages = [b"A" * 300_000, big, b"C" * 300_000, b"D" * 300_000]
    _enqueue(r, *messages)
    lane = _intake(r, "w1", max_message_bytes=limit).lanes[0]
    r.config_resetstat()
    taken = lane.take(4)
    assert taken.messages == messages[:1] and [o.length for o in taken.oversized] == [len(big)]
    assert r.lrange("q", 0, -1) == [messages[3], messages[2]]
    assert r.lrange(lane.key, 0, -1) == messages[:1]
    stats = r.info("commandstats")
    writes = {"cmdstat_rpush", "cmdstat_lpush", "cmdstat_lpop", "cmdstat_rpop"}
    assert not writes & set(stats), {k: stats[k] for k in writes & set(stats)}


def test_release_gives_everything_back_counted(r) -> None:
    """At shutdown all unacked messages of every lane return to the queue head, counted as
    deliveries without a result; lease and registrations go."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4")
    intake = _intake(r, "w1", runners=2)
    intake.lanes[0].take(2)
    intake.lanes[1].take(1)
    assert intake.release() == 3
    assert sorted(r.lrange(suspect_key("q"), 0, -1)) == [b"m1", b"m2", b"m3"]
    assert r.lrange("q", 0, -1) == [b"m4"]  # the one never taken
    assert r.lindex(suspect_key("q"), -1) in (b"m1", b"m3")  # each lane's oldest first
    assert not r.exists(intake.lease_key) and r.hkeys(LANES_KEY) == []
    assert all(lane.held == 0 for lane in intake.lanes)
    assert r.get(deliveries_key(hashlib.sha1(b"m1").hexdigest())) == b"1"


def test_give_back_newest_serves_a_batch_in_parts(r) -> None:
    """The newest messages of a batch go back to the queue head, in order, not counted."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4", b"m5")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    assert lane.take(4).messages == [b"m1", b"m2", b"m3", b"m4"]
    assert lane.give_back_newest(2) == 2
    assert lane.held == 2
    assert r.lrange("q", 0, -1) == [b"m5", b"m4", b"m3"]
    _ack(r, intake)
    assert r.keys("imgq:deliveries:*") == []


def test_lanes_of_acked_batches_that_come_back_are_given_back(r) -> None:
    """Redis restarted with older data can hold a lane of a batch this worker has since acked:
    the worker's restore gives it back (ack by identity: nothing deletes it), while the lane of
    the batch in hand is left alone (issue 14, item 3)."""
    _enqueue(r, b"m1", b"m2", b"m3", b"m4")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    lane.take(2)
    snapshot_key, snapshot = lane.key, r.lrange(lane.key, 0, -1)
    _ack(r, intake)
    lane.take(1)  # the batch in hand: m3
    # What an older append-only file brings back: the acked batch's lane, registered.
    r.rpush(snapshot_key, *snapshot)
    r.hset(LANES_KEY, snapshot_key, "q")
    assert intake.restore_dead() == (0, 2)
    assert not r.exists(snapshot_key) and r.lrange(lane.key, 0, -1) == [b"m3"]
    assert r.lrange("q", 0, -1) == [b"m4", b"m2", b"m1"]
    _ack(r, intake)  # deletes m3 only
    assert r.lrange("q", 0, -1) == [b"m4", b"m2", b"m1"]


def test_a_suspect_is_served_alone_so_it_kills_no_batch_mate(r) -> None:
    """A suspect (given back without a result) comes alone: a take that also moved fresh
    messages gives them straight back to the queue head, in order, uncounted (issue 14: a
    poison pill took its 31 batch-mates to the dead letters with it)."""
    _enqueue(r, b"f1", b"f2", b"f3")
    r.rpush(suspect_key("q"), b"s1")
    intake = _intake(r, "w1")
    lane = intake.lanes[0]
    taken = lane.take(8)
    assert taken.messages == [b"s1"] and lane.held == 1
    assert r.lrange(lane.key, 0, -1) == [b"s1"]
    assert r.lrange("q", 0, -1) == [b"f3", b"f2", b"f1"]
    _ack(r, intake)
    assert lane.take(8).messages == [b"f1", b"f2", b"f3"]
    assert r.keys("imgq:deliveries:*") == []


def test_priority_levels_share_takes_so_none_starves(r, monkeypatch) -> None:
    """Takes serve the highest level first; a lower level that waits gets places in every batch
    (and every eighth take of one message), and an urgent batch is not filled with backlog."""
    # Not a race with the clock:
    monkeypatch.setattr("imgq.worker.broker.intake.URGENT_WINDOW_S", 3600.0)
    levels = ["q", "q\x06\x163", "q\x06\x169"]
    intake = Intake(r, "q", "w", 10.0, dead_letters=DEAD_LETTERS, lists=levels)
    intake.renew_lease()
    _enqueue(r, *(b"hi%d" % i for i in range(40)), queue=levels[0])
    _enqueue(r, *(b"lo%d" % i for i in range(20)), queue=levels[2])
    lane = intake.lanes[0]
    taken = lane.take(8)
    assert taken.messages == [b"hi%d" % i for i in range(7)] + [b"lo0"]
    _ack(r, intake)
    singles = []
    for _ in range(16):
        singles += lane.take(1).messages
        _ack(r, intake)
    assert sum(m.startswith(b"lo") for m in singles) == 2  # every eighth
    r.delete(levels[0])
    assert len(lane.take(8).messages) == 4  # backlog alone, right after urgent work: half
