"""Hardening II (issue 14): what an adversary did to the fleet, each through real `imgq worker`
processes on a real redis-server. Every test here failed on e243b1d.

1. header values no worker can format (epoch milliseconds, far-out or non-finite times, an
   unencodable task id) fail their own task; no worker stops;
2. a batch slower than the lease keeps it (progress per image) and is answered once;
3. Redis restarted from an older snapshot: every task that exists after the restart is answered;
4. a Redis at ``maxmemory`` with ``noeviction`` is an outage: workers stay up, a new one waits,
   all serve once memory is freed;
5. memory stays bounded, and messages over the size limit are never read;
6. a redelivered batch is counted once, its first stored answer kept.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis
from celery import Celery

from imgq.localredis import LocalRedis
from imgq.worker.broker.deadletters import DeadLetters
from imgq.worker.client import ImgqClient
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.message import parse_message
from tests.hostile import b64, envelope, good_png, json_body
from tests.workerproc import (
    LEASE_TTL_S,
    Published,
    Workers,
    freeze_holding_messages,
    redelivery_s,
    wait_all,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def app(redis_server) -> Celery:
    """A plain Celery app of another service: JSON, nothing of imgq's."""
    return Celery("service", broker=redis_server.url, backend=redis_server.url)


def _wait(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _oom_errors(r: redis.Redis) -> int:
    """How many commands Redis has refused for lack of memory."""
    return int(r.info("errorstats").get("errorstat_OOM", {}).get("count", 0))


def test_header_values_no_worker_can_format_fail_only_their_task(
    redis_server, app, workers
) -> None:
    """Item 1: a task whose `expires` is epoch milliseconds (JavaScript's Date.now() + 30000)
    stopped the worker that took it, whose release put it back at the head of the queue for the
    next worker. Now each such header fails its own task with a reason, an unencodable task id
    goes to the dead letters, batch-mates succeed and both workers stay up."""
    r = redis.Redis.from_url(redis_server.url)
    body = json_body([], {"image": b64(good_png(0))})
    now_ms = int(time.time() * 1000)
    odd_headers: list[dict[str, object]] = [
        {"expires": now_ms + 30_000},
        {"expires": float("inf")},
        {"expires": float("nan")},
        {"expires": "+99999-01-01T00:00:00"},
        {"expires": -1e300},
        {"imgq_sent_at": 1e300},
        {"expires": 10**400},
    ]
    odd_ids = [f"odd-{i}" for i in range(len(odd_headers))]
    good = []
    for task_id, headers in zip(odd_ids, odd_headers, strict=True):
        good.append(app.send_task(TASK_NAME, kwargs={"image": b64(good_png(1))}, queue="imgq"))
        r.lpush("imgq", envelope(task_id, body, **headers))  # type: ignore[arg-type]
    surrogate = envelope("placeholder", body).replace(b'"id": "placeholder"', b'"id": "\\ud800"')
    r.lpush("imgq", surrogate)
    w1, w2 = workers.start("w1"), workers.start("w2")
    w1.wait_ready(app)
    w2.wait_ready(app)
    records = wait_all(app, odd_ids + [g.id for g in good], timeout_s=60, watch=[w1, w2])
    for task_id in odd_ids:
        assert records[task_id]["status"] == "FAILURE", records[task_id]
        message = records[task_id]["result"]["exc_message"][0]
        assert message.startswith("malformed_message: a time header"), message
    assert "milliseconds" in records["odd-0"]["result"]["exc_message"][0]
    for g in good:
        assert records[g.id]["result"]["label"] == "b"
    _wait(lambda: DeadLetters(r, "imgq").list(), 30, "the unencodable id was not dead-lettered")
    (entry,) = DeadLetters(r, "imgq").list()
    assert entry.reason == "malformed_message" and entry.body == "kept"
    after = app.send_task(TASK_NAME, kwargs={"image": b64(good_png(2))}, queue="imgq")
    assert after.get(timeout=30)["label"] == "c"
    assert w1.process.poll() is None and w2.process.poll() is None


def _flat_rgba_png(width: int, height: int) -> bytes:
    """A large image that compresses to little (the adversary's kind: costly to decode)."""
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 128
    ok, png = cv2.imencode(".png", rgba, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return png.tobytes()


def test_a_batch_slower_than_the_lease_keeps_it_and_is_answered_once(
    redis_server, app, workers
) -> None:
    """Item 2: 32 large RGBA PNGs make one batch last longer than the 2 s lease. Progress is
    counted per image, so the worker keeps its lease: every task is answered once, none is
    redelivered or counted as a delivery, and an ordinary task queued behind is answered."""
    r = redis.Redis.from_url(redis_server.url)
    big = _flat_rgba_png(4000, 2500)  # 10 MP, ~0.1-0.3 s each to decode
    with ImgqClient(redis_server.url) as client:
        slow = client.classify_many([big] * 32)
        behind = client.classify(good_png(1))
        published = Published(app)
        try:
            worker = workers.start("slow", IMGQ_BATCH_PIXELS=str(10**10))
            worker.wait_ready(app)
            outcomes = client.results([*slow, behind], timeout_s=300)
        finally:
            published.close()
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert outcomes[-1]["label"] == "b"  # type: ignore[index]
    assert max(o["batch_size"] for o in outcomes[:-1]) > 8  # type: ignore[index]
    assert published.duplicates() == {}
    assert r.keys("imgq:deliveries:*") == [], "a batch was redelivered"
    assert worker.process.poll() is None


def test_redis_back_with_older_data_loses_no_task(tmp_path: Path, bundle_dir: Path) -> None:
    """Item 3: Redis is killed mid-load and comes back from a snapshot taken while the worker
    held a batch (appendfsync everysec and a host crash, or a failover to a lagging replica).
    The snapshot's in-flight list holds messages the worker has since acked, whose results are
    gone with the newer data; the worker must not delete them. Every task that exists in Redis
    after the restart (queued, in flight, or answered) ends with a result."""
    server = LocalRedis(tmp_path / "redis", appendonly=False).start()
    fleet = Workers(bundle_dir, server.url, tmp_path)
    try:
        app = Celery("service", broker=server.url, backend=server.url)
        r = redis.Redis.from_url(server.url)
        worker = fleet.start("w1", IMGQ_MAX_BATCH="8")
        worker.wait_ready(app)
        with ImgqClient(server.url) as client:
            worker.freeze()
            pending = client.classify_many([good_png(i) for i in range(1500)])
            keys = [app.backend.get_key_for_task(p.id) for p in pending]
            freeze_holding_messages(r, worker)
            before = r.info("persistence")["rdb_last_save_time"]
            r.bgsave()
            _wait(
                lambda: (
                    r.info("persistence")["rdb_last_save_time"] != before
                    and not r.info("persistence")["rdb_bgsave_in_progress"]
                ),
                30,
                "no snapshot",
            )
            shutil.copy(tmp_path / "redis" / "dump.rdb", tmp_path / "older.rdb")
            answered = sum(v is not None for v in r.mget(keys))
            os.kill(worker.process.pid, signal.SIGCONT)
            _wait(lambda: sum(v is not None for v in r.mget(keys)) >= answered + 100, 60,
                  "the worker did not go on after the snapshot")  # fmt: skip
            worker.freeze()  # nothing moves while the test reads what Redis came back with
            server.kill()
            shutil.copy(tmp_path / "older.rdb", tmp_path / "redis" / "dump.rdb")
            server.start()
            present = _tasks_in_redis(r, keys, [p.id for p in pending])
            in_flight = [
                m for lane in r.hkeys("imgq:lanes") for m in r.lrange(lane, 0, -1)
            ]  # fmt: skip
            assert in_flight, "the snapshot holds no in-flight message"
            os.kill(worker.process.pid, signal.SIGCONT)
            _wait(lambda: all(r.exists(keys[i]) for i in present), 120,
                  "tasks that exist in Redis were never answered")  # fmt: skip
        assert worker.process.poll() is None
        assert r.keys("imgq:inflight:*") == [] or all(
            r.llen(k) == 0 for k in r.keys("imgq:inflight:*")
        )
    finally:
        fleet.kill_all()
        server.stop()


def _tasks_in_redis(r: redis.Redis, keys: list[bytes], ids: list[str]) -> list[int]:
    """Indexes of the tasks whose message (queued or in flight) or result exists in Redis."""
    index = {task_id: i for i, task_id in enumerate(ids)}
    messages = r.lrange("imgq", 0, -1)
    for lane in r.hkeys("imgq:lanes"):
        messages += r.lrange(lane, 0, -1)
    found = {index[parse_message(m, "imgq").task_id] for m in messages}
    found |= {i for i, v in enumerate(r.mget(keys)) if v is not None}
    return sorted(found)


def test_a_full_redis_is_an_outage_not_a_crash(redis_server, app, workers) -> None:
    """Item 4: Redis at maxmemory with noeviction refuses every write (takes, stores) under
    load, for longer than a lease, and the workers' connections are dropped meanwhile (a network
    blip, a Redis restart): the serving worker stays up and retries, its lease survives (no live
    worker's batch is redelivered and counted), a worker started meanwhile waits with a clear
    log line instead of exiting, and both serve everything once memory is freed."""
    r = redis.Redis.from_url(redis_server.url)
    w1 = workers.start("w1", IMGQ_MAX_BATCH="4")
    w1.wait_ready(app)
    with ImgqClient(redis_server.url) as client:
        pending = client.classify_many([good_png(i) for i in range(600)])
        keys = [app.backend.get_key_for_task(p.id) for p in pending]
        _wait(lambda: sum(v is not None for v in r.mget(keys)) >= 20, 60, "nothing served")
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", 1)
        refused = _oom_errors(r)
        w2 = workers.start("w2")
        _wait(lambda: _oom_errors(r) >= refused + 10, 60, "the workers never met a full Redis")
        _wait(lambda: b"waiting for Redis" in w2.log.read_bytes(), 60, "w2 did not say why")
        time.sleep(LEASE_TTL_S * 1.5)  # longer than a lease: renewals must not need memory
        refused = _oom_errors(r)
        admin = redis.Redis.from_url(redis_server.url, single_connection_client=True)
        admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    r = admin  # this test's other connections were dropped too
    _wait(lambda: _oom_errors(r) >= refused + 10, 60, "w1 did not come back after a reconnect")
    assert w1.process.poll() is None, w1.log.read_text()[-3000:]
    assert w2.process.poll() is None, w2.log.read_text()[-3000:]
    r.config_set("maxmemory", 0)
    with ImgqClient(redis_server.url) as client:
        outcomes = client.results(pending, timeout_s=120)
        w2.wait_ready(client.app)  # a new app: the old one's connections were dropped
        after = [client.classify(good_png(i)) for i in range(6)]
        assert [a.get(timeout=30)["label"] for a in after] == ["a", "b", "c"] * 2
    assert all(isinstance(o, dict) and o["label"] == "abc"[i % 3] for i, o in enumerate(outcomes))
    assert w1.process.poll() is None and w2.process.poll() is None
    assert r.keys("imgq:deliveries:*") == [], "a live worker's batch was counted as a delivery"


def _peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _noise_jpeg(side_px: int) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (side_px, side_px, 3), np.uint8)
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 60])
    assert ok
    return jpeg.tobytes()


def test_memory_is_bounded_and_oversized_messages_are_never_read(
    redis_server, app, workers
) -> None:
    """Item 5: eight 64 MiB messages (over the size limit) and three photos of ~36 MP close to
    the byte limit, at the default limits: the worker never reads the oversized ones (Redis
    moves them to the dead letters as metadata, and their tasks fail with message_too_large),
    the photos are served, and the worker's peak RSS stays under 1 GiB."""
    r = redis.Redis.from_url(redis_server.url)
    photo = _noise_jpeg(6000)
    assert 5 << 20 < len(photo) < 20 << 20
    huge_ids = [f"huge-{i}" for i in range(8)]
    filler = b64(b"\0" * (48 << 20))
    for task_id in huge_ids:
        r.lpush("imgq", envelope(task_id, json_body([], {"image": filler})))
    assert r.llen("imgq") == 8 and len(r.lindex("imgq", 0) or b"") > 64 << 20
    photos = [app.send_task(TASK_NAME, kwargs={"image": b64(photo)}, queue="imgq")
              for _ in range(3)]  # fmt: skip
    worker = workers.start("mem")
    worker.wait_ready(app)
    records = wait_all(app, huge_ids + [p.id for p in photos], timeout_s=180, watch=[worker])
    for task_id in huge_ids:
        message = records[task_id]["result"]["exc_message"][0]
        assert message.startswith("message_too_large: "), message
    for p in photos:
        assert records[p.id]["status"] == "SUCCESS", records[p.id]
    peak = _peak_rss_bytes(worker.process.pid)
    print(f"worker peak RSS {peak / 2**20:.0f} MiB")
    assert peak < 1 << 30
    entries = DeadLetters(r, "imgq").list(20)
    assert sorted(e.task_id or "" for e in entries) == huge_ids
    assert {e.body for e in entries} == {"too_large"}
    assert r.keys("imgq:dlq:imgq:body:*") == []


def test_a_redelivered_batch_is_counted_once(redis_server, app, workers, bundle_dir) -> None:
    """Item 6: a worker stalls holding a batch; the other serves those tasks again. Woken up,
    the stalled worker stores its copy of the batch: no stored answer changes, nothing is
    published twice, and the drift window counts every task exactly once."""
    from imgq.shared.manifest import load_manifest
    from imgq.worker.drift import DriftKeys

    r = redis.Redis.from_url(redis_server.url)
    drift = {"IMGQ_DRIFT": "1", "IMGQ_DRIFT_WINDOW": "1000000", "IMGQ_DRIFT_WINDOW_S": "3600",
             "IMGQ_MAX_BATCH": "8"}  # fmt: skip
    w1, w2 = workers.start("w1", **drift), workers.start("w2", **drift)
    w1.wait_ready(app)
    w2.wait_ready(app)
    published = Published(app)
    try:
        with ImgqClient(redis_server.url) as client:
            w1.freeze()
            w2.freeze()
            pending = client.classify_many([good_png(i) for i in range(300)])
            held = freeze_holding_messages(r, w1)
            os.kill(w2.process.pid, signal.SIGCONT)
            redelivery_s(r, w1, time.monotonic())
            os.kill(w1.process.pid, signal.SIGCONT)
            outcomes = client.results(pending, timeout_s=120)
            assert w1.stop() == 0  # a warm shutdown stores the batch in hand first
    finally:
        published.close()
    assert held > 0
    assert all(isinstance(o, dict) for o in outcomes)
    assert published.duplicates() == {}
    window = r.get(DriftKeys(load_manifest(bundle_dir).drift_id).open) or b""
    assert int.from_bytes(window[:8], "big", signed=True) == 300
