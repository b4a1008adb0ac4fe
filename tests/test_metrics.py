"""What operators watch, from a real `imgq worker` on a real redis-server: its Prometheus metrics
agree with the load that was sent (issue 6), and its Celery task events reach an event receiver
the way Flower reads them."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from imgq.localredis import free_port
from imgq.shared.bundle import ModelBundle
from imgq.shared.manifest import load_manifest
from imgq.worker.client import ImgqClient
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import wait_all

pytestmark = pytest.mark.integration

MAX_BATCH = 8


@pytest.fixture
def client(redis_server) -> Iterator[ImgqClient]:
    with ImgqClient(redis_server.url) as c:
        yield c


def _image(i: int) -> bytes:
    return encode_png(colour_image(COLOURS[i % 3], size_px=20 + i % 7, seed=i))


GOOD_PNG = _image(0)
#: Bad images of known reasons (shared/errors.py reason codes).
BAD = {
    "empty": b"",
    "undecodable": b"hello, not an image",
    "truncated": GOOD_PNG[: len(GOOD_PNG) // 2],
    "too_small": encode_png(colour_image(COLOURS[0], size_px=4)),
}


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, metric: str, /, **labels: str) -> float:
    """One sample's value; 0 when the worker has not exported it."""
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_agree_with_the_load_sent(redis_server, workers, client, bundle_dir) -> None:
    """N good + M bad (known reasons) + K expired tasks and one unreadable message: the scraped
    counters and histograms equal what was sent and what the results say."""
    n_good, n_bad_each, n_expired = 45, 2, 5
    good = client.classify_many(_image(i) for i in range(n_good))
    bad = {reason: client.classify_many([data] * n_bad_each) for reason, data in BAD.items()}
    expired = client.classify_many([GOOD_PNG] * n_expired, expires_s=0.001)
    redis.Redis.from_url(redis_server.url).lpush("imgq", b"not a Celery message")
    n_tasks = n_good + n_bad_each * len(BAD) + n_expired
    port = free_port()
    worker = workers.start(
        "w1", IMGQ_METRICS_PORT=str(port), IMGQ_MAX_BATCH=str(MAX_BATCH), IMGQ_TASK_EVENTS="0"
    )
    worker.wait_ready(client.app)
    all_ids = [r.id for r in good + expired] + [r.id for rs in bad.values() for r in rs]
    records = wait_all(client.app, all_ids, timeout_s=30)
    # Tasks are counted just after their results are stored: wait until the counter has them all.
    deadline = time.monotonic() + 10
    while True:
        samples = scrape_metrics(port)
        counted = sum(v for (name, _), v in samples.items() if name == "imgq_tasks_total")
        if counted == n_tasks + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    assert _value(samples, "imgq_tasks_total", outcome="success", reason="") == n_good
    for reason in BAD:
        assert _value(samples, "imgq_tasks_total", outcome="failure", reason=reason) == n_bad_each
    assert _value(samples, "imgq_tasks_total", outcome="expired", reason="expired") == n_expired
    assert (
        _value(samples, "imgq_tasks_total", outcome="dead_letter", reason="malformed_message") == 1
    )
    assert counted == n_tasks + 1
    assert _value(samples, "imgq_images_total") == n_good

    # One model call per batch that had a good image; each result says how many shared it.
    successes = [records[r.id]["result"] for r in good]
    assert all(records[r.id]["status"] == "REVOKED" for r in expired)
    n_batches = round(sum(1 / s["batch_size"] for s in successes))
    assert n_good / MAX_BATCH <= n_batches < n_good
    assert _value(samples, "imgq_batch_size_count") == n_batches
    assert _value(samples, "imgq_batch_size_sum") == n_good
    for le in ("1.0", "4.0", "8.0"):
        in_bucket = sum(1 / s["batch_size"] for s in successes if s["batch_size"] <= float(le))
        assert _value(samples, "imgq_batch_size_bucket", le=le) == round(in_bucket)
    for name, timing in (("imgq_preprocess_seconds", "preprocess"),
                         ("imgq_inference_seconds", "infer")):  # fmt: skip
        assert _value(samples, f"{name}_count") == n_batches
        per_batch_s = sum(s["timings_ms"][timing] / s["batch_size"] for s in successes) / 1000
        assert _value(samples, f"{name}_sum") == pytest.approx(per_batch_s, abs=1e-6 * n_batches)
    # Every task sent by ImgqClient carries its enqueue time: all of them have a queue wait, and
    # the successes' waits (in their results) are part of the sum.
    assert _value(samples, "imgq_queue_wait_seconds_count") == n_tasks
    success_wait_s = sum(s["timings_ms"]["queue"] for s in successes) / 1000
    assert success_wait_s - 1e-3 <= _value(samples, "imgq_queue_wait_seconds_sum") < 60 * n_tasks

    manifest = load_manifest(bundle_dir)
    version = ModelBundle.load(bundle_dir, device="cpu", check_golden=False).version
    assert _value(samples, "imgq_model_info", name=manifest.name, sha256=manifest.model_sha256,
                  version=version, provider="CPUExecutionProvider") == 1  # fmt: skip
    assert _value(samples, "process_cpu_seconds_total") > 0
    assert _value(samples, "process_resident_memory_bytes") > 0
    assert worker.stop() == 0


class _EventLog:
    """A Celery event receiver (what Flower runs) in a thread, feeding Celery's event State."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.events.State()
        self.events: list[dict[str, Any]] = []
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.state.event(event)

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


def test_task_events_reach_an_event_receiver(redis_server, workers, client) -> None:
    """With IMGQ_TASK_EVENTS on (the default), a Celery event receiver sees task-received and
    task-succeeded / task-failed / task-revoked for the task ids sent, filed under the worker's
    node name in Celery's event State, as Flower shows them."""
    r = redis.Redis.from_url(redis_server.url)
    log = _EventLog(client.app)
    try:
        deadline = time.monotonic() + 10
        while not r.execute_command("PUBSUB", "NUMPAT"):  # the receiver has subscribed
            assert time.monotonic() < deadline, "the event receiver did not subscribe"
            time.sleep(0.02)
        good = client.classify_many(_image(i) for i in range(20))
        bad = client.classify_many([BAD["undecodable"]])
        expired = client.classify_many([GOOD_PNG], expires_s=0.001)
        worker = workers.start("w1", IMGQ_MAX_BATCH=str(MAX_BATCH))
        worker.wait_ready(client.app)
        ids = [res.id for res in good + bad + expired]
        wait_all(client.app, ids, timeout_s=30)
        deadline = time.monotonic() + 10
        while not all(i in log.state.tasks and log.state.tasks[i].ready for i in ids):
            assert time.monotonic() < deadline, "task events missing"
            time.sleep(0.05)
    finally:
        log.stop()
    tasks = log.state.tasks
    for i, res in enumerate(good):
        task = tasks[res.id]
        assert (task.state, task.name, task.worker.hostname) == ("SUCCESS", "imgq.classify",
                                                                 worker.name)  # fmt: skip
        assert task.received is not None and task.succeeded >= task.received
        assert f"'label': '{'abc'[i % 3]}'" in task.result
    (failed,) = bad
    assert tasks[failed.id].state == "FAILURE"
    assert re.match(r"""InvalidImage\(["']undecodable: """, tasks[failed.id].exception)
    (late,) = expired
    assert tasks[late.id].state == "REVOKED" and tasks[late.id].expired
    kinds = [e["type"] for e in log.events if e["type"].startswith("task-")]
    assert kinds.count("task-received") == len(ids)
    assert worker.stop() == 0
