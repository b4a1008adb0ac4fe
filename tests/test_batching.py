"""The batch runner with a fake model on a real redis-server: one outcome per message, bad images
fail alone, a failing model fails its whole batch visibly, expired tasks are revoked."""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from prometheus_client import CollectorRegistry

from shared.errors import InvalidImage, InvalidTask
from shared.imagestats import IMAGE_FEATURES
from shared.manifest import load_manifest
from tests.tinymodel import COLOURS, colour_image, encode_png, make_tiny_bundle
from worker.batching import BatchRunner, dead_letter_key
from worker.intake import Intake
from worker.messages import TASK_NAME
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings


class FakeBundle:
    """The tiny bundle's manifest with a model we control: fixed probabilities, or an error."""

    provider = "CPUExecutionProvider"

    def __init__(self, manifest: Any, fail: Exception | None = None, rows: int | None = None):
        self.manifest = manifest
        self.fail = fail
        self.rows = rows
        self.calls: list[int] = []

    def predict(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.fail is not None:
            raise self.fail
        n = len(batch) if self.rows is None else self.rows
        return np.tile(np.asarray([[0.1, 0.7, 0.2]], np.float32), (n, 1))


class FakeDrift:
    """Records what the runner hands to the drift recorder."""

    def __init__(self) -> None:
        self.added: list[tuple[np.ndarray, np.ndarray]] = []
        self.replies: list[Any] = []
        self.thumbnails: list[list[str]] = []

    def out_of_range(self, image_features: np.ndarray) -> list[list[str]]:
        wide = image_features[:, IMAGE_FEATURES.index("width")] > 100
        return [["width"] if w else [] for w in wide]

    def add_to_pipeline(self, pipe: Any, image_features: np.ndarray, probs: np.ndarray) -> int:
        self.added.append((image_features, probs))
        index = len(pipe)
        pipe.incrby("drift-count", len(image_features))
        return index

    def add_out_of_range_thumbnail(self, pipe: Any, rgb: np.ndarray, features: list[str]) -> bool:
        self.thumbnails.append(features)
        return True

    def after_pipeline(self, reply: Any) -> None:
        self.replies.append(reply)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_manifest(make_tiny_bundle(tmp_path_factory.mktemp("tiny")))


@pytest.fixture
def client(redis_server) -> Celery:
    """A plain Celery app: it sends tasks and reads results like any other service."""
    app = Celery("client", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    return app


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = _b64(encode_png(colour_image(COLOURS[1])))
WIDE = _b64(encode_png(colour_image(COLOURS[0], size_px=120)))


def _runner(redis_server, client, bundle, *, drift=None, **settings: Any) -> BatchRunner:
    s = WorkerSettings(broker_url=redis_server.url, queue="imgq", **settings)
    r = redis.Redis.from_url(redis_server.url)
    intake = Intake(r, "imgq", "test-worker", lease_ttl_s=30)
    intake.renew_lease()
    metrics = WorkerMetrics(CollectorRegistry())
    return BatchRunner(s, bundle, r, intake.lanes[0], client.backend, metrics, drift)


def _send(client: Celery, **kwargs: Any) -> Any:
    return client.send_task(TASK_NAME, kwargs=kwargs, queue="imgq")


def _count(runner: BatchRunner, outcome: str, reason: str) -> float:
    value = runner.metrics.registry.get_sample_value(
        "imgq_tasks_total", {"outcome": outcome, "reason": reason}
    )
    return value or 0.0


def test_one_bad_image_fails_only_itself(redis_server, client, manifest) -> None:
    """A corrupt image among good ones fails alone; the others share one model call."""
    good = [_send(client, image=GOOD, top_k=2, request_id=i) for i in range(3)]
    bad = _send(client, image=_b64(b"definitely not an image"))
    bundle = FakeBundle(manifest)
    runner = _runner(redis_server, client, bundle)
    assert runner.run_once() == 4
    assert bundle.calls == [3]
    for i, res in enumerate(good):
        value = res.get(timeout=5)
        assert (value["label"], value["batch_size"], value["request_id"]) == ("b", 3, i)
        assert value["top_k"] == [{"label": "b", "score": pytest.approx(0.7)},
                                  {"label": "c", "score": pytest.approx(0.2)}]  # fmt: skip
        assert value["model"] == {"name": "tiny", "sha256": manifest.model_sha256}
        assert set(value["timings_ms"]) == {"queue", "preprocess", "infer"}
    with pytest.raises(InvalidImage, match="^undecodable: "):
        bad.get(timeout=5)
    assert _count(runner, "success", "") == 3 and _count(runner, "failure", "undecodable") == 1


def test_model_failure_fails_every_task_visibly(redis_server, client, manifest) -> None:
    """When the model call raises, every task of the batch ends in FAILURE (none stays PENDING)."""
    results = [_send(client, image=GOOD) for _ in range(3)]
    runner = _runner(redis_server, client, FakeBundle(manifest, fail=RuntimeError("GPU fell off")))
    runner.run_once()
    for res in results:
        with pytest.raises(RuntimeError, match="GPU fell off"):
            res.get(timeout=5)
    assert _count(runner, "failure", "RuntimeError") == 3


def test_wrong_number_of_model_rows_fails_the_batch(redis_server, client, manifest) -> None:
    """A model answer with the wrong row count is refused, naming both numbers."""
    results = [_send(client, image=GOOD) for _ in range(2)]
    runner = _runner(redis_server, client, FakeBundle(manifest, rows=1))
    runner.run_once()
    for res in results:
        with pytest.raises(RuntimeError, match=r"shape \(1, 3\) for 2 images"):
            res.get(timeout=5)


def test_expired_task_is_revoked_not_computed(redis_server, client, manifest) -> None:
    """A task whose expiry passed before pick-up ends REVOKED and is counted, not computed."""
    expired = client.send_task(TASK_NAME, kwargs={"image": GOOD}, queue="imgq", expires=-1)
    bundle = FakeBundle(manifest)
    runner = _runner(redis_server, client, bundle)
    runner.run_once()
    with pytest.raises(TaskRevokedError, match="expired"):
        expired.get(timeout=5)
    assert expired.state == "REVOKED"
    assert bundle.calls == []
    assert _count(runner, "expired", "expired") == 1


def test_exactly_one_outcome_per_message(redis_server, client, manifest) -> None:
    """Good, bad-argument, refused and unreadable messages each get one outcome; all are acked."""
    r = redis.Redis.from_url(redis_server.url)
    ok = _send(client, image=GOOD)
    missing = _send(client, top_k=1)
    pickled = client.send_task(TASK_NAME, kwargs={"image": GOOD}, queue="imgq", serializer="pickle")
    r.lpush("imgq", b"\x00garbage")
    runner = _runner(redis_server, client, FakeBundle(manifest))
    assert runner.run_once() == 4
    assert ok.get(timeout=5)["label"] == "b"
    with pytest.raises(InvalidTask, match="^missing_argument: "):
        missing.get(timeout=5)
    with pytest.raises(InvalidTask, match="^content_refused: "):
        pickled.get(timeout=5)
    assert r.lrange(dead_letter_key("imgq"), 0, -1) == [b"\x00garbage"]
    assert r.llen(runner.lane.key) == 0
    assert _count(runner, "dead_letter", "malformed_message") == 1


def test_partial_batch_waits_for_more_when_asked(redis_server, client, manifest) -> None:
    """With max_wait_ms, a partial batch takes the tasks that arrive while it waits."""
    bundle = FakeBundle(manifest)
    runner = _runner(redis_server, client, bundle, max_batch=3, max_wait_ms=5000)
    r = redis.Redis.from_url(redis_server.url)
    first = _send(client, image=GOOD)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (runner.run_once(), done.set()))
    thread.start()
    try:
        while r.llen("imgq"):  # the runner has taken the first task and is waiting for more
            pass
        later = [_send(client, image=GOOD) for _ in range(2)]
        assert done.wait(10)
    finally:
        thread.join(10)
    assert bundle.calls == [3]
    assert [res.get(timeout=5)["batch_size"] for res in [first, *later]] == [3, 3, 3]


def test_drift_gets_features_and_its_reply(redis_server, client, manifest) -> None:
    """The drift recorder gets the batch's features and probabilities in the same pipeline, and
    each result lists its out-of-range features."""
    drift = FakeDrift()
    normal, wide = _send(client, image=GOOD), _send(client, image=WIDE)
    runner = _runner(redis_server, client, FakeBundle(manifest), drift=drift)
    runner.run_once()
    ((features, probs),) = drift.added
    assert features.shape == (2, len(IMAGE_FEATURES)) and probs.shape == (2, 3)
    assert drift.replies == [2]
    assert drift.thumbnails == [["width"]]
    assert normal.get(timeout=5)["drift"] == {"out_of_range": []}
    assert wide.get(timeout=5)["drift"] == {"out_of_range": ["width"]}


def test_a_failing_drift_update_costs_no_result(redis_server, client, manifest, caplog) -> None:
    """Drift counts that Redis refuses (here a key of the wrong type) are logged, once; the
    batch's results and acks are stored and the worker goes on serving."""
    r = redis.Redis.from_url(redis_server.url)
    r.delete("drift-count")
    r.rpush("drift-count", "not a counter")  # INCRBY on a list: WRONGTYPE
    drift = FakeDrift()
    runner = _runner(redis_server, client, FakeBundle(manifest), drift=drift)
    try:
        for _ in range(2):
            results = [_send(client, image=GOOD) for _ in range(3)]
            with caplog.at_level(logging.ERROR, logger="worker.batching"):
                assert runner.run_once() == 3
            assert [res.get(timeout=5)["label"] for res in results] == ["b"] * 3
            assert r.llen(runner.lane.key) == 0  # acknowledged
        assert drift.replies == []  # the refused update was not taken for a window count
        logged = [rec for rec in caplog.records if "drift counts not stored" in rec.getMessage()]
        assert len(logged) == 1 and "WRONGTYPE" in logged[0].getMessage()
    finally:
        r.delete("drift-count")


def test_results_expire(redis_server, client, manifest) -> None:
    """Stored results carry the configured time to live."""
    res = _send(client, image=GOOD)
    runner = _runner(redis_server, client, FakeBundle(manifest), result_expires_s=123)
    runner.run_once()
    ttl = redis.Redis.from_url(redis_server.url).ttl(client.backend.get_key_for_task(res.id))
    assert 0 < ttl <= 123


def test_stop_ends_run(redis_server, client, manifest) -> None:
    """run() returns after stop(), also while idle on an empty queue."""
    runner = _runner(redis_server, client, FakeBundle(manifest))
    thread = threading.Thread(target=runner.run)
    thread.start()
    runner.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_tinymodel_helpers_make_distinct_classes(tmp_path: Path) -> None:
    """The tiny bundle classifies each reference colour as its own class (sanity of the helper)."""
    from shared.decode import decode_image
    from worker.bundle import ModelBundle

    bundle = ModelBundle.load(make_tiny_bundle(tmp_path), device="cpu")
    images = [decode_image(encode_png(colour_image(c))) for c in COLOURS]
    assert bundle.classify_images(images).argmax(axis=1).tolist() == [0, 1, 2]
