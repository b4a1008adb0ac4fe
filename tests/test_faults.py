"""Faults (issue 7): a worker killed mid-load, Redis restarted under load, tasks past their
deadline. Real redis-server, real `imgq worker` processes; nothing may be lost."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from kombu.exceptions import OperationalError
from prometheus_client.parser import text_string_to_metric_families

from imgq.localredis import free_port
from imgq.worker.client import ImgqClient
from imgq.worker.wire import TASK_NAME
from tests.hostile import b64, good_png
from tests.workerproc import (
    REDELIVERY_BOUND_S,
    Published,
    freeze_holding_messages,
    redelivery_s,
)

pytestmark = pytest.mark.integration

#: Slack on the redelivery bound for this test's polling and a busy (or slow) machine.
REDELIVERY_SLACK_S = 3.0
#: Redis stays down at least this long (longer while the producer's calls are failing).
MIN_DOWN_S = 2.0
#: Longest a producer may take to report that Redis is down (the client's own bound is ~2 s).
PRODUCER_ERROR_LIMIT_S = 15.0


@pytest.fixture
def app(redis_server) -> Celery:
    """A plain Celery app of another service: JSON, nothing of imgq's."""
    return Celery("service", broker=redis_server.url, backend=redis_server.url)


@pytest.mark.slow
def test_sigkill_one_of_two_workers_with_2000_in_flight(redis_server, app, workers) -> None:
    """Two workers. Wave 1: one stalls holding messages (SIGSTOP); they are redelivered within
    IMGQ_LEASE_TTL_S + IMGQ_RESTORE_INTERVAL_S; woken up, it stores its stale batch too, which
    changes no stored answer and publishes nothing twice. Wave 2: 2,000 tasks are queued while
    both are stopped, one is let go and SIGKILLed as soon as it holds messages (so most of the
    wave is still queued, however fast the machine), and the other serves everything. Every
    task ends in SUCCESS with its right label, each published once (issue 14, item 7: the
    test used to depend on how fast the machine drained)."""
    r = redis.Redis.from_url(redis_server.url)
    w1 = workers.start("w1", IMGQ_MAX_BATCH="8")
    w2 = workers.start("w2", IMGQ_MAX_BATCH="8")
    w1.wait_ready(app)
    w2.wait_ready(app)
    published = Published(app)
    try:
        with ImgqClient(redis_server.url) as client:
            w1.freeze()
            wave_1 = client.classify_many([good_png(i) for i in range(1000)])
            held = freeze_holding_messages(r, w1)
            stalled_at = time.monotonic()
            stall_redelivery_s = redelivery_s(r, w1, stalled_at)
            os.kill(w1.process.pid, signal.SIGCONT)

            w2.freeze()
            w1.freeze()
            wave_2 = client.classify_many([good_png(i) for i in range(2000)])
            killed_held = freeze_holding_messages(r, w1)
            queued = r.llen("imgq")
            assert queued > 0, "nothing left queued at the kill"
            w1.kill()
            killed_at = time.monotonic()
            os.kill(w2.process.pid, signal.SIGCONT)
            kill_redelivery_s = redelivery_s(r, w1, killed_at)
            outcomes = client.results(wave_1 + wave_2, timeout_s=120)
    finally:
        published.close()
    print(
        f"stall: {held} held, redelivered after {stall_redelivery_s:.2f} s; SIGKILL: "
        f"{killed_held} held, {queued} queued, redelivered after {kill_redelivery_s:.2f} s; "
        f"bound {REDELIVERY_BOUND_S} s; {len(published.duplicates())} tasks published twice"
    )
    assert stall_redelivery_s <= REDELIVERY_BOUND_S + REDELIVERY_SLACK_S
    assert kill_redelivery_s <= REDELIVERY_BOUND_S + REDELIVERY_SLACK_S
    labels = ["abc"[i % 3] for i in range(1000)] + ["abc"[i % 3] for i in range(2000)]
    for outcome, label in zip(outcomes, labels, strict=True):
        assert isinstance(outcome, dict) and outcome["label"] == label, outcome
    assert published.duplicates() == {}
    assert r.keys("imgq:inflight:*") == [] and not r.exists("imgq:dlq:imgq")
    assert w2.stop() == 0


def test_redis_restart_under_load_loses_nothing(redis_server, app, workers) -> None:
    """Redis (append-only) goes down mid-load: a producer gets a clear OperationalError within a
    bound instead of hanging; when Redis is back the same worker processes carry on by
    themselves, and every task, queued or in flight at the outage, ends in SUCCESS."""
    r = redis.Redis.from_url(redis_server.url)
    assert r.config_get("appendonly") == {"appendonly": "yes"}
    w1, w2 = workers.start("w1", IMGQ_MAX_BATCH="8"), workers.start("w2", IMGQ_MAX_BATCH="8")
    w1.wait_ready(app)
    w2.wait_ready(app)
    with ImgqClient(redis_server.url) as client:
        pending = client.classify_many([good_png(i) for i in range(1500)])
        keys = [app.backend.get_key_for_task(p.id) for p in pending]
        while sum(v is not None for v in r.mget(keys[:200])) < 50:
            time.sleep(0.01)

        queued = r.llen("imgq")
        assert queued > 0, "the load finished before the outage; send more tasks"
        redis_server.stop()
        down_at = time.monotonic()
        for name, call in [
            ("classify", lambda: client.classify(good_png(0))),
            ("classify_many", lambda: client.classify_many([good_png(0)] * 3)),
            ("results", lambda: client.results(pending[:1], timeout_s=60)),
        ]:
            started = time.monotonic()
            with pytest.raises(OperationalError, match="cannot .* Redis at redis://127.0.0.1"):
                call()
            assert time.monotonic() - started < PRODUCER_ERROR_LIMIT_S, name
        while time.monotonic() - down_at < MIN_DOWN_S:
            time.sleep(0.05)
        down_s = time.monotonic() - down_at
        redis_server.start()

        outcomes = client.results(pending, timeout_s=120)
        after = client.classify(good_png(1))
        assert after.get(timeout=30)["label"] == "b"
    print(f"Redis down for {down_s:.1f} s with {queued} tasks queued")
    assert r.llen("imgq") == 0 and r.keys("imgq:inflight:*") == []
    for i, outcome in enumerate(outcomes):
        assert isinstance(outcome, dict) and outcome["label"] == "abc"[i % 3], (i, outcome)
    assert w1.process.poll() is None and w2.process.poll() is None


def _scrape(port: int) -> dict[tuple[str, str], float]:
    """``imgq_tasks_total`` by (outcome, reason) from the worker's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.labels["outcome"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "imgq_tasks"
        for s in family.samples
        if s.name == "imgq_tasks_total"
    }


def test_expired_tasks_are_revoked_uncomputed_and_counted(redis_server, app, workers) -> None:
    """Tasks whose `expires` passed while they waited end REVOKED without reaching the model (the
    live tasks of the same batch count only themselves in `batch_size`), and the worker's
    metrics endpoint counts them as imgq_tasks_total{outcome="expired"}."""
    with ImgqClient(redis_server.url) as client:
        short = client.classify_many([good_png(i) for i in range(6)], expires_s=0.5)
        expires_at = time.time() + 0.5
        live = [app.send_task(TASK_NAME, kwargs={"image": b64(good_png(i))}, queue="imgq",
                              expires=600) for i in range(4)]  # fmt: skip
        while time.time() <= expires_at:  # the deadline passes before any worker exists
            time.sleep(0.05)
        port = free_port()
        worker = workers.start("w1", IMGQ_METRICS_PORT=str(port))
        worker.wait_ready(app)
        outcomes = client.results(short + live, timeout_s=30)
    for outcome in outcomes[:6]:
        assert isinstance(outcome, TaskRevokedError) and "expired" in str(outcome), outcome
    assert [o["label"] for o in outcomes[6:]] == ["a", "b", "c", "a"]  # type: ignore[index]
    assert {o["batch_size"] for o in outcomes[6:]} == {4}  # type: ignore[index]
    deadline = time.monotonic() + 10
    while (counts := _scrape(port)).get(("expired", "expired")) != 6:
        assert time.monotonic() < deadline, counts
        time.sleep(0.05)
    assert counts[("success", "")] == 4
