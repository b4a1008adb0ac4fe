"""Redis overlapped with serving (issue 24): while a batch is served the next one is already
taken into the runner's second lane, under the same lease and redelivery as any; a stop gives
that batch back at once, uncounted, and finishes the batch in hand. On a real redis-server,
with a handler of the test's own that holds its batch until the test lets it go."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from imgq.worker.broker.intake import LANES_KEY, Intake, Lane, deliveries_key
from imgq.worker.engine import BatchEngine
from imgq.worker.handler import Outcome, Request, Success
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from tests.workerproc import wait_for

QUEUE = "q"


class Gate:
    """Answers each request with its ``n``; each batch waits until the test opens the gate."""

    task_name = "test.gate"
    observers: Sequence[Any] = ()

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.serving = threading.Event()
        self.release = threading.Event()

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        self.batches.append([r.kwargs["n"] for r in requests])
        self.serving.set()
        assert self.release.wait(30), "the test never let the batch go"
        return [Success({"n": r.kwargs["n"]}) for r in requests]

    def close(self) -> None:
        pass


@pytest.fixture
def app(redis_server) -> Celery:
    return Celery("client", broker=redis_server.url, backend=redis_server.url)


@pytest.fixture
def r(redis_server) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


def _engine(redis_server, app: Celery, handler: Gate, **settings: Any) -> BatchEngine:
    s = WorkerSettings(broker_url=redis_server.url, queue=QUEUE, max_batch=4, **settings)
    client = redis.Redis.from_url(redis_server.url)
    intake = Intake(client, QUEUE, "w-prefetch", lease_ttl_s=30)
    intake.renew_lease()
    return BatchEngine(s, {handler.task_name: handler}, client, intake.lanes[0], app.backend,
                       WorkerMetrics(CollectorRegistry()))  # fmt: skip


@pytest.fixture
def running(redis_server, app) -> Iterator[tuple[BatchEngine, Gate, threading.Thread]]:
    gate = Gate()
    engine = _engine(redis_server, app, gate)
    thread = threading.Thread(target=engine.run, name="test-engine")
    yield engine, gate, thread
    gate.release.set()
    engine.stop()
    if thread.is_alive():
        thread.join(30)


def _send(app: Celery, count: int, start: int = 0) -> list[Any]:
    return [app.send_task("test.gate", kwargs={"n": start + i}, queue=QUEUE) for i in range(count)]


def _lanes(r: redis.Redis) -> dict[str, int]:
    """Registered lanes of the test's worker -> how many messages each holds."""
    return {k.decode(): int(r.llen(k)) for k in r.hkeys(LANES_KEY) if b"w-prefetch" in k}


def test_the_next_batch_is_taken_while_one_is_served(r, app, running) -> None:
    """While the first batch is held by its handler, the second is already in the runner's
    other lane (registered, so a dead worker's redelivery covers it); every task is answered
    once, in order of the batches."""
    engine, gate, thread = running
    sent = _send(app, 8)
    thread.start()
    assert gate.serving.wait(30)
    wait_for(lambda: sorted(_lanes(r).values()) == [4, 4])
    assert len(_lanes(r)) == 2 and r.llen(QUEUE) == 0
    gate.release.set()
    assert [s.get(timeout=30) for s in sent] == [{"n": i} for i in range(8)]
    assert gate.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    wait_for(lambda: not any(_lanes(r).values()))


def _start_holding_two_batches(r, app, running) -> tuple[list[Any], BatchEngine, Gate, Any]:
    """Eight tasks, the engine started: one batch held by the gate, the next taken ahead."""
    engine, gate, thread = running
    sent = _send(app, 8)
    thread.start()
    assert gate.serving.wait(30)
    wait_for(lambda: sorted(_lanes(r).values()) == [4, 4])
    return sent, engine, gate, thread


def test_stop_gives_the_batch_taken_ahead_back_at_once(r, app, running) -> None:
    """A stop while a batch is served: the batch taken ahead goes back to the head of the queue
    before the batch in hand is finished, without counting a delivery; the batch in hand is
    then stored and run() returns."""
    sent, engine, gate, thread = _start_holding_two_batches(r, app, running)
    engine.stop()
    wait_for(lambda: r.llen(QUEUE) == 4)
    thread.join(0.2)
    assert thread.is_alive()  # the batch in hand is held by its handler
    assert list(_lanes(r).values()) == [4]
    waiting = r.lrange(QUEUE, 0, -1)
    assert not any(r.exists(deliveries_key(_sha1(m))) for m in waiting)  # not counted
    gate.release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert [s.get(timeout=10) for s in sent[:4]] == [{"n": i} for i in range(4)]
    assert all(s.state == "PENDING" for s in sent[4:])
    # Given back to the consuming end in their order: the next worker serves them first, oldest
    # first.
    assert [int(_n(m)) for m in reversed(r.lrange(QUEUE, 0, -1))] == [4, 5, 6, 7]
    assert _lanes(r) == {}


def test_a_new_engine_serves_what_a_stopped_one_gave_back(redis_server, r, app, running) -> None:
    """After a stop, another engine picks the given-back batch up: nothing is lost."""
    sent, engine, gate, thread = _start_holding_two_batches(r, app, running)
    engine.stop()
    wait_for(lambda: r.llen(QUEUE) == 4)
    gate.release.set()
    thread.join(30)
    second = Gate()
    second.release.set()
    other = _engine(redis_server, app, second)
    assert other.run_once() == 4
    assert [s.get(timeout=10) for s in sent] == [{"n": i} for i in range(8)]


def test_serial_mode_takes_one_batch_at_a_time(redis_server, r, app) -> None:
    """IMGQ_PREFETCH=false: nothing is taken while a batch is served (the comparison mode)."""
    gate = Gate()
    engine = _engine(redis_server, app, gate, prefetch=False)
    sent = _send(app, 8)
    thread = threading.Thread(target=engine.run)
    thread.start()
    try:
        assert gate.serving.wait(30)
        time.sleep(0.3)  # a take ahead would have happened by now; none may
        assert r.llen(QUEUE) == 4 and sorted(_lanes(r).values()) == [4]
        gate.release.set()
        assert [s.get(timeout=30) for s in sent] == [{"n": i} for i in range(8)]
    finally:
        gate.release.set()
        engine.stop()
        thread.join(30)


def test_twin_lanes_share_the_runner_s_batch_numbers(r) -> None:
    """A runner's two lanes number their batches from one sequence, so the keeper's stale-lane
    check (a lane older than the runner's oldest unacked batch was acked already) holds."""
    intake = Intake(r, QUEUE, "w-twins", lease_ttl_s=30)
    first: Lane = intake.lanes[0]
    second = first.twin()
    assert (first.seq, second.seq) == (0, 1)
    first.settled()
    assert first.seq == 2
    r.lpush(QUEUE, b"m1")
    intake.renew_lease()
    assert second.take(4).messages == [b"m1"]
    # Redis came back with the lane of batch 0, long acked: given back as stale.
    r.hset(LANES_KEY, "imgq:inflight:w-twins:0:b0", QUEUE)
    r.lpush("imgq:inflight:w-twins:0:b0", b"old")
    assert intake.restore_dead() == (0, 1)
    # The batch in the second lane (b1) is the runner's oldest unacked one: not stale.
    assert r.llen(second.key) == 1


def _sha1(message: bytes) -> str:
    import hashlib

    return hashlib.sha1(message).hexdigest()


def _n(message: bytes) -> int:
    from imgq.worker.wire.message import parse_message

    return int(parse_message(message, QUEUE).kwargs["n"])


class Unstorable(Gate):
    """Answers with a result no JSON encoder takes: a bug in a handler that only storing finds."""

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        return [Success({"n": r.kwargs["n"], "oops": object()}) for r in requests]


def test_a_batch_storing_cannot_encode_fails_visibly(redis_server, r, app) -> None:
    """A bug found while storing fails the batch's tasks with internal_error (kept in the dead
    letters, as a bug found while serving), acks the batch, and the engine serves on."""
    from imgq.shared.errors import InvalidTask

    engine = _engine(redis_server, app, Unstorable())
    sent = _send(app, 3)
    assert engine.run_once() == 3
    for s in sent:
        with pytest.raises(InvalidTask, match="^internal_error: "):
            s.get(timeout=10)
    assert _lanes(r) == {}
    assert r.llen(QUEUE) == 0


def test_the_take_ahead_waits_for_the_end_of_the_batch_in_hand() -> None:
    """Pace: with estimates, a take ahead goes out two takes' time and a quarter of the batch
    before the batch in hand is expected to end, not when it starts; without them, at once; an
    idle runner or a stop lets it go at once (the wait is on the clock the pace reads, not a
    guess of the machine's speed)."""
    from imgq.worker.roundtrips import Pace

    stop = threading.Event()
    pace = Pace()
    first = pace.serving(10)
    assert pace.hold(first - 1, stop) is False  # no estimates yet: at once
    pace.served(10, 1.0)  # 0.1 s per message
    pace.took(0.01)
    started = time.monotonic()
    ordinal = pace.serving(4)  # expected to end 0.4 s from now
    assert pace.hold(ordinal - 1, stop) is True
    waited = time.monotonic() - started
    # Held until just before the end (an Event's wait never ends early; a busy machine may
    # wake it late, hence the upper bound's slack).
    assert 0.4 - 2 * 0.01 - 0.25 * 0.4 - 0.05 <= waited < 2.0
    # The take for the batch after the next one waits for that batch to start; an idle turn
    # (nothing in hand) lets it go at once.
    releaser = threading.Timer(0.01, lambda: pace.serving(0))
    releaser.start()
    assert pace.hold(ordinal, stop) is False
    releaser.join()
    stop.set()
    pace.serving(100)  # 10 s ahead: a stop does not wait it out
    started = time.monotonic()
    pace.hold(pace.serving(100) - 1, stop)
    assert time.monotonic() - started < 1.0


def test_a_held_take_goes_when_the_batch_in_hand_ends_early(monkeypatch) -> None:
    """Pace: a take held for the estimated end of the batch in hand goes as soon as that batch
    ends, however far off the estimate was: after one slow batch (a model's first run, a huge
    image) the estimate stays high for several batches, and the runner must not sit idle
    waiting out each of them. A stop (with ``wake``) ends a hold too."""
    from imgq.worker import roundtrips

    monkeypatch.setattr(roundtrips, "_MAX_HOLD_S", 600.0)
    stop = threading.Event()
    pace = roundtrips.Pace()
    pace.serving(4)
    pace.served(4, 400.0)  # one very slow batch: 100 s per message
    ordinal = pace.serving(4)  # estimated to end in 400 s; it will end at once
    held = threading.Thread(target=pace.hold, args=(ordinal - 1, stop), daemon=True)
    held.start()
    pace.served(4, 0.001)
    held.join(30)
    assert not held.is_alive(), "the take waited for the estimate, not the batch's end"
    ordinal = pace.serving(4)
    held = threading.Thread(target=pace.hold, args=(ordinal - 1, stop), daemon=True)
    held.start()
    stop.set()
    pace.wake()
    held.join(30)
    assert not held.is_alive(), "a stop did not end the hold"
