"""The backlog a scaler reads (worker/broker/backlog.py): `imgq backlog`, `imgq exporter` and the
workers' own metrics, on a real redis-server; the whole count with real `imgq worker` processes
frozen (SIGSTOP) while they hold batches and tasks wait for their `eta`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from celery import Celery

from imgq.localredis import LocalRedis, free_port
from imgq.worker.broker.backlog import FRAGMENT_BYTES, BacklogReader
from imgq.worker.broker.intake import LANES_KEY, poison_key, suspect_key
from imgq.worker.broker.priority import QueueLists
from imgq.worker.broker.schedule import eta_key
from imgq.worker.client import ImgqClient
from imgq.worker.wire import SENT_AT_HEADER, TASK_NAME
from tests.blocked_imports import run_without
from tests.hostile import good_png
from tests.test_metrics import scrape_metrics
from tests.workerproc import freeze_holding_messages, lanes_of, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
#: Seconds from sending the tasks with an `eta` that must become due while every worker is
#: frozen, to that `eta`: the workers take and put them aside, then are frozen holding batches
#: (about a second on 2 busy cores), all before it; their keepers must not release them.
SOON_S = 8.0


@pytest.fixture
def r(redis_server: LocalRedis) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


@pytest.fixture
def app(redis_server: LocalRedis) -> Celery:
    """A plain Celery app of another service, as docs/tasks.md routes it."""
    return Celery("service", broker=redis_server.url, backend=redis_server.url)


def _send(app: Celery, count: int, priority: int, timed: bool = True, **options: Any) -> list[str]:
    """``count`` classify tasks by Celery's ``send_task``, with the enqueue time header when
    ``timed`` (as ``ImgqClient`` sends it; Celery's own messages carry no time)."""
    ids = []
    with app.producer_or_acquire() as producer:
        for i in range(count):
            headers = {SENT_AT_HEADER: time.time()} if timed else {}
            ids.append(
                app.send_task(TASK_NAME, kwargs={"image": _b64(i)}, queue="imgq", producer=producer,
                              priority=priority, headers=headers, **options).id
            )  # fmt: skip
    return ids


def _b64(i: int) -> str:
    import base64

    return base64.b64encode(good_png(i)).decode()


def _backlog_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    return subprocess.run(
        [sys.executable, "-m", "imgq.cli", "backlog", *args],
        env=env | {"IMGQ_BROKER_URL": url}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _unanswered(r: redis.Redis, ids: Sequence[str]) -> int:
    """How many of ``ids`` have no stored result."""
    return sum(v is None for v in r.mget([f"celery-task-meta-{i}" for i in ids]))


class Exporter:
    """An `imgq exporter` process on a free port."""

    def __init__(self, url: str, *args: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgq.cli", "exporter", "--port", str(self.port), *args],
            env=env | {"IMGQ_BROKER_URL": url}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for(self._answers, timeout_s=60)

    def _answers(self) -> bool:
        assert self.process.poll() is None, self.process.communicate()[0]
        try:
            self.scrape()
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def scrape(self) -> Samples:
        return scrape_metrics(self.port)

    def scrape_until(self, what: Callable[[dict[str, float]], bool]) -> Samples:
        """The first scrape whose backlog of queue imgq (:func:`_exported`) satisfies ``what``."""
        found: list[Samples] = []

        def check() -> bool:
            found[:] = [self.scrape()]
            return what(_exported(found[0]))

        wait_for(check)
        return found[0]

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out = self.process.communicate(timeout=30)[0].decode(errors="replace")
        return self.process.returncode, out


@pytest.fixture
def exporter(redis_server: LocalRedis) -> Iterator[Exporter]:
    e = Exporter(redis_server.url)
    yield e
    e.stop()


def _exported(samples: Samples) -> dict[str, float]:
    """The backlog of queue imgq as exported: state -> count, and the oldest age."""
    out = {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "imgq_queue_backlog" and dict(labels)["queue"] == "imgq"
    }
    age = samples.get(("imgq_queue_oldest_age_seconds", (("queue", "imgq"),)))
    if age is not None:
        out["oldest_age_s"] = age
    return out


# ----------------------------------------------------------------------------- the whole count


@pytest.mark.integration
def test_backlog_adds_up_to_everything_unanswered_with_workers_frozen_holding_batches(
    app, workers, r, redis_server, exporter
) -> None:
    """Two workers (batches of 8, each runner taking its next batch while it serves one) put
    tasks with an `eta` aside (3 an hour ahead, 4 a few seconds ahead), then are frozen holding
    batches while a wave waits on three priority levels (some tasks without a sent time). With
    the `eta` of 4 come: `imgq backlog --json` says ready + in flight + due + scheduled = every
    task sent and not answered, exactly; in flight is what the workers' lanes hold; the oldest
    wait lies between the newest and the oldest send. The exporter says the same. Thawed, they
    serve everything but the 3 scheduled tasks, and the backlog and the workers' own metrics
    say so."""
    metrics_port = free_port()
    w1 = workers.start("w1", IMGQ_MAX_BATCH="8", IMGQ_METRICS_PORT=str(metrics_port))
    w2 = workers.start("w2", IMGQ_MAX_BATCH="8")
    w1.wait_ready(app)
    w2.wait_ready(app)
    w1.freeze()
    w2.freeze()

    first_sent = time.time()
    later = _send(app, 3, priority=0, countdown=3600)
    soon = _send(app, 4, priority=0, countdown=SOON_S)
    soon_at = time.time() + SOON_S
    with ImgqClient(redis_server.url) as client:
        wave = [p.id for p in client.classify_many([good_png(i) for i in range(100)])]
    wave += _send(app, 60, priority=9) + _send(app, 20, priority=5) + _send(app, 10, 3, timed=False)
    last_sent = time.time()
    ids = later + soon + wave

    # The first take serves the highest level: the 7 tasks with an eta, sent first.
    w1.thaw()
    wait_for(lambda: r.zcard(eta_key("imgq")) == 7, timeout_s=60)
    w1.freeze()
    freeze_holding_messages(r, w1)
    freeze_holding_messages(r, w2)
    assert time.time() < soon_at, "the workers froze after the eta: the machine stalled"
    assert r.zcard(eta_key("imgq")) == 7, "a keeper released tasks before their eta"
    reader = BacklogReader(r, "imgq")
    wait_for(lambda: reader.read().due == 4, timeout_s=SOON_S + 30)  # Redis's clock passes it

    out = _backlog_cli(redis_server.url, "--json")
    assert out.returncode == 0, out.stderr
    backlog = json.loads(out.stdout)
    unanswered = _unanswered(r, ids)
    held = sum(int(r.llen(lane)) for w in (w1, w2) for lane in lanes_of(r, w))
    states = {s: backlog[s] for s in ("ready", "in_flight", "due", "scheduled")}
    print(
        f"{unanswered} of {len(ids)} unanswered: {states}, oldest {backlog['oldest_age_s']:.2f} s"
    )
    assert sum(states.values()) == unanswered
    assert states["in_flight"] == held > 0
    assert states["due"] == 4 and states["scheduled"] == 3 and states["ready"] > 0
    assert backlog["oldest_age_from"] == "sent_at"
    now = backlog["read_at"]
    assert now - last_sent <= backlog["oldest_age_s"] <= now - first_sent + 0.5
    assert _exported(exporter.scrape()) == pytest.approx(
        {**states, "oldest_age_s": backlog["oldest_age_s"]}, abs=2.0
    )
    assert {k: v for k, v in _exported(exporter.scrape()).items() if k != "oldest_age_s"} == states

    w1.thaw()
    w2.thaw()
    wait_for(lambda: _unanswered(r, ids) == len(later), timeout_s=120)
    assert _unanswered(r, later) == len(later)
    drained = json.loads(_backlog_cli(redis_server.url, "--json").stdout)
    assert {s: drained[s] for s in states} == {"ready": 0, "in_flight": 0, "due": 0, "scheduled": 3}
    assert drained["oldest_age_s"] == 0 and drained["oldest_age_from"] == ""
    assert _exported(scrape_metrics(metrics_port)) == {
        "ready": 0, "in_flight": 0, "due": 0, "scheduled": 3, "oldest_age_s": 0
    }  # fmt: skip


# ----------------------------------------------------------------------------- one read


def _envelope(headers: dict[str, Any], body_bytes: int = 100) -> bytes:
    """A message as kombu writes it: the body first, then the headers."""
    return json.dumps(
        {"body": "A" * body_bytes, "content-type": "application/json", "headers": headers,
         "properties": {"delivery_tag": str(time.monotonic())}}
    ).encode()  # fmt: skip


def test_every_list_lane_and_eta_of_the_queue_counts_and_nothing_else(r: redis.Redis) -> None:
    """Ready: every priority list (kombu's names under the clients' key prefix), the suspects and
    the poison list; in flight: lanes registered for this queue only; due and scheduled: the
    `eta` set split at Redis's clock. Another queue's lists and lanes do not count."""
    lists = QueueLists.from_transport_options({"global_keyprefix": "shop:"})
    home = lists.home("imgq")
    now = time.time()
    r.rpush(home, _envelope({}))
    r.rpush(lists.list_for("imgq", 9), _envelope({}), _envelope({}))
    r.rpush(suspect_key(home), _envelope({}))
    r.rpush(poison_key(home), _envelope({}))
    r.rpush("imgq", _envelope({}))  # the bare queue: another tenant's
    r.rpush("imgq:inflight:w1@h:1:0:b3", _envelope({}), _envelope({}))
    r.rpush("imgq:inflight:w2@h:2:0:b8", _envelope({}))
    r.rpush("imgq:inflight:w3@h:3:0:b1", _envelope({}))
    r.hset(LANES_KEY, mapping={"imgq:inflight:w1@h:1:0:b3": home, "imgq:inflight:w2@h:2:0:b8": home,
                               "imgq:inflight:w3@h:3:0:b1": "other"})  # fmt: skip
    r.zadd(eta_key(home), {b"a": now - 60, b"b": now - 1, b"c": now + 3600})
    backlog = BacklogReader(r, "imgq", lists).read()
    assert (backlog.ready, backlog.in_flight, backlog.due, backlog.scheduled) == (5, 3, 2, 1)
    assert backlog.ready_lists[lists.list_for("imgq", 9)] == 2
    assert backlog.untimed == 5 and backlog.oldest_age_s == 0


def test_the_oldest_wait_by_sent_time_eta_and_watch(r: redis.Redis) -> None:
    """The wait of the oldest ready message: from its sent time, or its `eta` when that came
    later; against Redis's clock. Without a time it is unknown to a first read and timed from
    the first sighting by a reader that keeps watching; a producer's clock ahead of Redis's
    reads 0, then the watched time. Both ends of every list are looked at."""
    now = float(r.time()[0])
    r.lpush("imgq", _envelope({SENT_AT_HEADER: now - 30}), _envelope({SENT_AT_HEADER: now - 2}))
    r.lpush("imgq\x06\x169", _envelope({SENT_AT_HEADER: now - 300, "eta": _iso(now - 5)}))
    first = BacklogReader(r, "imgq").read()
    assert first.oldest_age_from == "sent_at" and 30 <= first.oldest_age_s < 40
    r.delete("imgq")
    second = BacklogReader(r, "imgq").read()
    assert second.oldest_age_from == "eta" and 5 <= second.oldest_age_s < 15

    r.delete("imgq\x06\x169")
    r.lpush("imgq\x06\x163", _envelope({}))
    r.lpush("imgq:suspect:imgq", _envelope({SENT_AT_HEADER: now + 1000}))  # a clock ahead
    watcher = BacklogReader(r, "imgq")
    once = watcher.read()
    assert once.untimed == 1 and once.oldest_age_s == 0 and once.oldest_age_from == "sent_at"
    wait_for(lambda: float(r.time()[0]) >= now + 2, timeout_s=10)
    watched = watcher.read()
    assert watched.untimed == 0 and watched.oldest_age_from == "observed"
    assert watched.oldest_age_s >= 1


def _iso(epoch_s: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def test_hostile_messages_and_huge_ones_cost_a_bounded_read(r: redis.Redis) -> None:
    """Garbage, times no datetime holds, a key in a header's text and a 4 MB message with its
    headers at the end: each is read as a wait or as no time, and no read carries more than a
    fragment of any message."""
    now = float(r.time()[0])
    big = _envelope({SENT_AT_HEADER: now - 7}, body_bytes=4 << 20)
    r.lpush("imgq", big)
    r.lpush("imgq\x06\x163", b"\xff\x00 not json", b'{"headers": {"imgq_sent_at": 1e400}}')
    r.lpush("imgq\x06\x166", _envelope({"kwargsrepr": f'{{"imgq_sent_at": {now - 9999}}}'}))
    r.lpush("imgq\x06\x169", _envelope({SENT_AT_HEADER: "soon", "eta": "yesterday"}))
    reader = BacklogReader(r, "imgq")
    sent: list[int] = []
    original = reader._script

    def measured(**kwargs: Any) -> Any:
        reply = original(**kwargs)
        sent.append(len(repr(reply)))
        return reply

    reader._script = measured  # type: ignore[assignment]
    backlog = reader.read()
    assert backlog.ready == 5 and backlog.untimed == 4
    assert backlog.oldest_age_from == "sent_at" and 7 <= backlog.oldest_age_s < 17
    assert sent[0] < 4 * 2 * 2 * FRAGMENT_BYTES * 4  # not the 4 MB message


def test_a_queue_key_of_another_type_fails_the_read_clearly(r: redis.Redis, redis_server) -> None:
    """A key Redis refuses to read as a list: `imgq backlog` exits 1 and says which; so does a
    lane registered for the queue that is no list."""
    r.set("imgq\x06\x166", "a string")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE imgq\x06\x166 is a string"):
        BacklogReader(r, "imgq").read()
    out = _backlog_cli(redis_server.url)
    assert out.returncode == 1 and "WRONGTYPE" in out.stderr and out.stdout == ""
    r.delete("imgq\x06\x166")
    r.hset(LANES_KEY, "imgq:inflight:w:1:b0", "imgq")
    r.set("imgq:inflight:w:1:b0", "a string")
    with pytest.raises(redis.ResponseError, match="imgq:inflight:w:1:b0 is a string, not a list"):
        BacklogReader(r, "imgq").read()
    bad = _backlog_cli(redis_server.url, "--queue", "two words")
    assert bad.returncode == 2 and "IMGQ_QUEUE" in bad.stderr


def test_backlog_prints_one_line_per_state(r: redis.Redis, redis_server) -> None:
    r.lpush("imgq", _envelope({SENT_AT_HEADER: time.time() - 4}))
    out = _backlog_cli(redis_server.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("queue imgq at ")
    assert [ln.split()[:2] for ln in lines[1:6]] == [
        ["ready", "1"], ["in_flight", "0"], ["due", "0"], ["scheduled", "0"], ["total", "1"]
    ]  # fmt: skip
    assert lines[6].split()[0] == "oldest_age" and float(lines[6].split()[1]) >= 4


# ----------------------------------------------------------------------------- the exporter


def test_exporter_imports_no_model_nor_celery() -> None:
    """The exporter and `imgq backlog` run without Celery, kombu, numpy, OpenCV, onnxruntime:
    a scaler's process that starts in a moment."""
    run_without(
        ["celery", "kombu", "numpy", "cv2", "onnxruntime", "tensorflow"],
        "from imgq.cli import build_parser\n"
        "import imgq.worker.commands.exporter, imgq.worker.commands.backlog\n"
        "from imgq.worker.settings import WorkerSettings\n"
        "WorkerSettings.from_env({})\n",
    )


@pytest.mark.integration
def test_exporter_serves_a_fleet_at_zero_and_outlives_redis(
    redis_server: LocalRedis, r: redis.Redis, exporter: Exporter
) -> None:
    """With no worker at all: the queue's backlog, its oldest wait growing, and the fleet's
    gauges (no worker, the last loss recorded). Redis gone: the scrape still answers, without
    the backlog (no series, not a 0 that would scale down) and with the error counted; back,
    the backlog is back. SIGTERM ends it with status 0."""
    r.zadd("imgq:workers:lost", {"w0@h:1:abc": 1_700_000_000})
    with ImgqClient(redis_server.url) as client:
        client.classify_many([good_png(i) for i in range(40)])
    # Scrapes within a second share one read: the first may be older than the tasks.
    first = exporter.scrape_until(lambda backlog: backlog.get("ready") == 40)
    assert _exported(first)["in_flight"] == 0
    assert first[("imgq_fleet_workers", ())] == 0
    assert first[("imgq_fleet_worker_lost_timestamp_seconds", ())] == 1_700_000_000
    waited = _exported(first)["oldest_age_s"]
    exporter.scrape_until(lambda backlog: backlog["oldest_age_s"] > waited)

    redis_server.stop()
    down = exporter.scrape_until(lambda backlog: backlog == {})
    assert ("imgq_fleet_workers", ()) not in down
    assert down[("imgq_backlog_read_errors_total", ())] >= 1
    redis_server.start()
    exporter.scrape_until(lambda backlog: backlog.get("ready") == 40)
    status, log = exporter.stop()
    assert status == 0, log
    assert "exporting" in log


def test_exporter_refuses_a_bad_port_or_queue(redis_server: LocalRedis) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    for args, says in ((["--port", "0"], "IMGQ_EXPORTER_PORT"), (["--queue", ""], "IMGQ_QUEUE")):
        out = subprocess.run(
            [sys.executable, "-m", "imgq.cli", "exporter", *args],
            env=env | {"IMGQ_BROKER_URL": redis_server.url}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert out.returncode == 2 and says in out.stderr, out.stderr
