"""Real `imgq worker` processes on a real redis-server, driven by a plain Celery client."""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_image
from imgq.shared.errors import InvalidImage, InvalidTask
from imgq.shared.manifest import load_manifest, save_manifest
from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import REDELIVERY_BOUND_S, Workers, send_many, wait_all

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server) -> Celery:
    """A plain Celery app of another service: JSON, nothing of imgq's."""
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    return app


@pytest.fixture
def workers(redis_server, bundle_dir, tmp_path) -> Iterator[Any]:
    """Start workers with ``start(name, bundle=..., **env)``; every one is killed after the test."""
    fleet = Workers(bundle_dir, redis_server.url, tmp_path)
    yield fleet.start
    fleet.kill_all()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image(i: int) -> bytes:
    return encode_png(colour_image(COLOURS[i % 3], size_px=20 + i % 7, seed=i))


def test_send_task_gets_the_documented_result(client, workers, bundle_dir) -> None:
    """A plain Celery send_task gets the contract's result, equal to the in-process prediction."""
    worker = workers("w1")
    worker.wait_ready(client)
    data = _image(1)
    res = client.send_task(
        TASK_NAME, kwargs={"image": _b64(data), "top_k": 2, "request_id": "req-7"}, queue="imgq"
    )
    value = res.get(timeout=10)
    expected = ModelBundle.load(bundle_dir, device="cpu").classify_images([decode_image(data)])[0]
    labels = load_manifest(bundle_dir).labels
    assert value["label"] == labels[int(expected.argmax())] == "b"
    assert value["score"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert [t["label"] for t in value["top_k"]] == [labels[i] for i in expected.argsort()[::-1][:2]]
    assert value["request_id"] == "req-7"
    assert value["model"]["sha256"] == load_manifest(bundle_dir).model_sha256
    assert value["batch_size"] == 1
    assert set(value["timings_ms"]) == {"queue", "preprocess", "infer"}
    assert worker.stop() == 0


def test_burst_with_corrupt_images(client, workers) -> None:
    """Exactly the corrupt tasks fail, with InvalidImage and their reason; batches are shared;
    the worker keeps serving afterwards."""
    good = _image(0)
    corrupt = {
        5: (b"", "empty"),
        17: (b"hello, not an image", "undecodable"),
        30: (good[: len(good) // 2], "truncated"),
        44: (encode_png(colour_image(COLOURS[0], size_px=4)), "too_small"),
    }
    images = [_b64(corrupt[i][0] if i in corrupt else _image(i)) for i in range(60)]
    results = send_many(client, images)  # queued before the worker starts: batches > 1
    worker = workers("w1")
    worker.wait_ready(client)
    records = wait_all(client, [r.id for r in results], timeout_s=30)
    for i, res in enumerate(results):
        if i in corrupt:
            with pytest.raises(InvalidImage) as info:
                res.get(timeout=5)
            assert info.value.reason == corrupt[i][1], (i, str(info.value))
        else:
            assert res.get(timeout=5)["label"] == "abc"[i % 3]
    assert (
        max(r["result"].get("batch_size", 0) for r in records.values() if r["status"] == "SUCCESS")
        > 1
    )
    after = client.send_task(TASK_NAME, kwargs={"image": _b64(good)}, queue="imgq")
    assert after.get(timeout=10)["label"] == "a"


def test_pickle_message_is_not_executed(client, workers, tmp_path) -> None:
    """A pickle-serialised message ends in FAILURE content_refused and is never unpickled."""
    from tests.test_messages import _Trap

    trap = tmp_path / "unpickled"
    worker = workers("w1")
    worker.wait_ready(client)
    res = client.send_task(
        TASK_NAME, kwargs={"image": _Trap(trap)}, queue="imgq", serializer="pickle"
    )
    with pytest.raises(InvalidTask, match="^content_refused: "):
        res.get(timeout=10)
    assert not trap.exists()


def test_celery_inspect_ping_sees_the_worker(client, workers, redis_server) -> None:
    """`celery inspect ping` (Celery's own command line) gets a pong from the worker."""
    worker = workers("w1")
    worker.wait_ready(client)
    celery = Path(sys.executable).with_name("celery")
    out = subprocess.run(
        [str(celery), "-b", redis_server.url, "inspect", "ping", "-d", worker.name, "-t", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert worker.name in out.stdout and "pong" in out.stdout


def test_sigkill_mid_load_loses_nothing(client, workers, redis_server) -> None:
    """Two workers share a queue; one is SIGKILLed holding messages; every task still completes,
    the dead worker's messages being redelivered within lease TTL + restore interval.
    (tests/test_faults.py has the 2,000-tasks-in-flight version of issue 7.)"""
    r = redis.Redis.from_url(redis_server.url)
    images = [_b64(_image(i)) for i in range(40)]
    results = send_many(client, [images[i % 40] for i in range(3000)])
    # w1 starts alone and is frozen at a moment when it holds messages (between two batches its
    # in-flight list is empty, and Redis deletes an empty list); then w2 joins the same queue.
    # The freeze loop runs from w1's start: an idle machine drains 3,000 tasks in seconds.
    w1 = workers("w1", IMGQ_MAX_BATCH="8")
    deadline = time.monotonic() + 60
    while True:
        w1.freeze()
        held_keys = [k for k in r.keys(f"imgq:inflight:{w1.name}:*") if r.llen(k)]
        if held_keys:
            (inflight,) = held_keys
            break
        os.kill(w1.process.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "w1 never held messages"
        time.sleep(0.002)
    held = r.llen(inflight)
    w2 = workers("w2", IMGQ_MAX_BATCH="8")
    w2.wait_ready(client)
    w1.kill()
    killed_at = time.monotonic()
    while r.exists(inflight):
        assert time.monotonic() - killed_at < REDELIVERY_BOUND_S + 1.0, "not redelivered in time"
        time.sleep(0.02)
    records = wait_all(client, [res.id for res in results], timeout_s=60)
    assert held > 0
    assert {rec["status"] for rec in records.values()} == {"SUCCESS"}
    # w2 gave back exactly w1's held messages, each counted once (it served them as suspects).
    assert len(r.keys("imgq:deliveries:*")) == held
    assert w2.stop() == 0


def test_inspect_stats_says_what_the_worker_serves(client, workers) -> None:
    """``celery inspect stats`` carries imgq's view of each worker: its id, queue, tasks, model,
    and how long since its runners last made progress (over the lease TTL: stuck)."""
    w = workers("w1")
    w.wait_ready(client)
    stats = client.control.inspect(destination=[w.name], timeout=5).stats()
    (node,) = stats.values()
    imgq = node["imgq"]
    assert imgq["queue"] == "imgq" and imgq["tasks"] == ["imgq.classify"]
    assert imgq["worker_id"].startswith(w.name) and imgq["sha256"]
    assert 0 <= imgq["since_progress_s"] < 10.0  # idle polling is progress; the lease is 10 s
    assert w.stop() == 0


def test_a_protocol_1_client_gets_a_failure_not_a_hang(client, workers, redis_server) -> None:
    """A stock Celery client with ``task_protocol=1``: ``.get()`` raises at once with the
    reason, and nothing is left in the dead letters."""
    old = Celery("old", broker=redis_server.url, backend=redis_server.url)
    old.conf.update(task_serializer="json", task_protocol=1)
    workers("w1").wait_ready(client)
    result = old.send_task(TASK_NAME, kwargs={"image": _b64(_image(0))}, queue="imgq")
    with pytest.raises(Exception, match=r"unsupported: Celery message protocol 1"):
        result.get(timeout=30)
    assert redis.Redis.from_url(redis_server.url).exists("imgq:dlq:imgq") == 0


def test_warm_shutdown_returns_untaken_work(client, workers, redis_server) -> None:
    """SIGTERM mid-load: the worker finishes its batch and exits 0; every task is either answered
    or back in the queue, nothing is left in flight."""
    r = redis.Redis.from_url(redis_server.url)
    results = send_many(client, [_b64(_image(i % 30)) for i in range(3000)])
    worker = workers("w1")
    worker.wait_ready(client)
    while r.llen("imgq") == 3000:
        time.sleep(0.01)
    assert worker.stop() == 0
    answered = sum(r.exists(client.backend.get_key_for_task(res.id)) for res in results)
    assert answered + r.llen("imgq") == 3000
    assert r.keys("imgq:inflight:*") == [] and r.keys("imgq:lease:*") == []


def test_bundle_with_wrong_sha_is_refused(client, workers, bundle_dir, tmp_path) -> None:
    """A bundle whose model does not hash to the manifest's sha256 stops the worker at start,
    with a message naming the mismatch."""
    bad = tmp_path / "bad-bundle"
    shutil.copytree(bundle_dir, bad)
    manifest = load_manifest(bad)
    wrong = "0" * 64
    save_manifest(dataclasses.replace(manifest, model_sha256=wrong), bad)
    worker = workers("w1", bundle=bad)
    assert worker.process.wait(60) == 2
    log = worker.log.read_text()
    assert "sha256" in log and wrong in log and manifest.model_sha256 in log
