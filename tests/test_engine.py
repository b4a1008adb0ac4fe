"""The batch engine with the classification handler and a fake model on a real redis-server: one
outcome per message, bad images fail alone, a failing model fails its whole batch visibly,
expired tasks are revoked, a bug fails its batch without stopping the engine, the first stored
result wins and drift counts once."""

from __future__ import annotations

import base64
import json
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

from imgq.localredis import LocalRedis
from imgq.shared.decode import DecodeLimits
from imgq.shared.errors import InvalidImage, InvalidTask
from imgq.shared.imagestats import IMAGE_FEATURES
from imgq.shared.manifest import load_manifest
from imgq.shared.reference import RangeCheck
from imgq.worker.broker.deadletters import DeadLetters
from imgq.worker.broker.intake import Intake
from imgq.worker.broker.settle import WindowCounts
from imgq.worker.drift.recorder import BatchDrift
from imgq.worker.engine import BatchEngine
from imgq.worker.handlers.classify import ClassifyHandler
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png, make_tiny_bundle
from tests.workerproc import wait_for


class FakeBundle:
    """The tiny bundle's manifest with a model we control: fixed probabilities, or an error."""

    provider = "CPUExecutionProvider"
    version = "0123456789ab"

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
    """An observer that records what the engine hands it; its window is a plain counter."""

    lua_add_window = (
        "local function add_window(key, n, pairs, ttl) return redis.call('INCRBY', key, n) end\n"
    )
    novelty = None  # no novelty model: the handler asks the model for probabilities only
    range_check: RangeCheck | None = None  # the bundle's, where _runner sets it

    def __init__(self) -> None:
        self.added: list[list[Any]] = []
        self.replies: list[Any] = []
        self.thumbnails: list[list[str]] = []

    def observe_batch(self, inputs, features, probs, penultimate, *, sampled=-1):  # type: ignore[no-untyped-def]
        """The batch as the recorder sees it: its image features and their range check."""
        out = self.range_check(features) if self.range_check else [[] for _ in probs]
        drift = [{"out_of_range": o} for o in out]
        none = np.zeros(len(probs), bool)
        return BatchDrift(features, probs, none, out, None, None, inputs, sampled, drift)

    def window_counts(self, observations: list[Any]) -> list[WindowCounts]:
        self.added.append(list(observations))
        return [WindowCounts("drift-count", len(observations), "", 0)]

    def sample_due(self) -> bool:
        return False

    def after_settle(self, counted: dict[str, int]) -> None:
        self.replies.append(counted["drift-count"])

    def extras(self, pipe: Any, observations: list[Any]) -> None:
        for batch, row in observations:
            if batch.out_of_range[row]:
                self.thumbnails.append(batch.out_of_range[row])
                return

    def close(self) -> None:
        pass


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


def _runner(redis_server, client, bundle, *, drift=None, **settings: Any) -> BatchEngine:
    s = WorkerSettings(broker_url=redis_server.url, queue="imgq", **settings)
    r = redis.Redis.from_url(redis_server.url)
    intake = Intake(r, "imgq", "test-worker", lease_ttl_s=30, max_message_bytes=s.max_message_bytes)
    intake.renew_lease()
    metrics = WorkerMetrics(CollectorRegistry())
    if isinstance(drift, FakeDrift):
        drift.range_check = RangeCheck(bundle.manifest.reference, IMAGE_FEATURES)
    handler = ClassifyHandler(bundle, s, metrics, drift)
    return BatchEngine(s, {TASK_NAME: handler}, r, intake.lanes[0], client.backend, metrics,
                       wait_ms=s.wait_ms_for(bundle.provider))  # fmt: skip


def _send(client: Celery, **kwargs: Any) -> Any:
    return client.send_task(TASK_NAME, kwargs=kwargs, queue="imgq")


def _count(runner: BatchEngine, outcome: str, reason: str) -> float:
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
        assert value["model"] == {"name": "tiny", "sha256": manifest.model_sha256,
                                  "version": FakeBundle.version}  # fmt: skip
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
    (entry,) = DeadLetters(r, "imgq").list()
    assert (entry.reason, entry.head, entry.body) == ("malformed_message", b"\x00garbage", "kept")
    assert r.keys("imgq:inflight:*") == []
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
    (observations,) = drift.added
    assert [b.features[i].shape for b, i in observations] == [(len(IMAGE_FEATURES),)] * 2
    assert [b.probs[i].shape for b, i in observations] == [(3,)] * 2
    assert drift.replies == [2]  # the window's count after the batch
    assert normal.get(timeout=5)["drift"] == {"out_of_range": []}
    wide_out = wide.get(timeout=5)["drift"]["out_of_range"]
    assert "width" in wide_out and drift.thumbnails == [wide_out]


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
            with caplog.at_level(logging.ERROR, logger="imgq.worker.engine"):
                assert runner.run_once() == 3
            assert [res.get(timeout=5)["label"] for res in results] == ["b"] * 3
            assert r.keys("imgq:inflight:*") == []  # acknowledged
        assert drift.replies == []  # the refused update was not taken for a window count
        logged = [rec for rec in caplog.records if "counts not stored" in rec.getMessage()]
        assert len(logged) == 1
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
    from imgq.shared.bundle import ModelBundle
    from imgq.shared.decode import decode_image

    bundle = ModelBundle.load(make_tiny_bundle(tmp_path), device="cpu")
    images = [decode_image(encode_png(colour_image(c))) for c in COLOURS]
    assert bundle.classify_images(images).argmax(axis=1).tolist() == [0, 1, 2]


def _published(redis_server, client) -> tuple[Any, list[bytes]]:
    """Subscribe to every result key's channel; the records published are appended to a list."""
    seen: list[bytes] = []
    prefix = client.backend.task_keyprefix.decode()
    pubsub = redis.Redis.from_url(redis_server.url).pubsub()
    pubsub.psubscribe(**{f"{prefix}*": lambda m: seen.append(m["data"])})
    thread = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
    return thread, seen


def test_the_first_stored_result_wins(redis_server, client, manifest) -> None:
    """A task whose result is already stored (another worker answered it first) keeps that
    result, and nothing is published for it again (issue 14, item 6)."""
    r = redis.Redis.from_url(redis_server.url)
    first = _send(client, image=GOOD)
    key = client.backend.get_key_for_task(first.id)
    earlier = b'{"status": "SUCCESS", "result": {"label": "a"}, "task_id": "x"}'
    r.set(key, earlier)
    runner = _runner(redis_server, client, FakeBundle(manifest))
    thread, seen = _published(redis_server, client)
    try:
        other = _send(client, image=GOOD)
        assert runner.run_once() == 2
        assert other.get(timeout=5)["label"] == "b"
    finally:
        thread.stop()
        thread.join(5)
    assert r.get(key) == earlier
    assert [b'"label":"b"' in m for m in seen] == [True]  # only the new result was announced


def test_a_resent_settle_counts_nothing_twice(redis_server, client, manifest, monkeypatch) -> None:
    """The batch's round trip runs in Redis but its reply is lost: the runner sends it again.
    Results are stored and published once, drift counts are added once, dead letters once
    (issue 14, item 6: 5 images were counted as 10)."""
    r = redis.Redis.from_url(redis_server.url)
    r.delete("drift-count")
    results = [_send(client, image=GOOD) for _ in range(5)]
    r.lpush("imgq", b"\x00garbage")
    drift = FakeDrift()
    runner = _runner(redis_server, client, FakeBundle(manifest), drift=drift)
    execute = redis.client.Pipeline.execute
    lost = [redis.ConnectionError("reply lost after Redis ran it")]

    def once_lost(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        settling = any(c[0][0] == "EVAL" for c in self.command_stack)
        replies = execute(self, *args, **kwargs)
        if lost and settling:
            raise lost.pop()
        return replies

    thread, seen = _published(redis_server, client)
    monkeypatch.setattr(redis.client.Pipeline, "execute", once_lost)
    try:
        assert runner.run_once() == 6
    finally:
        monkeypatch.undo()
        thread.stop()
        thread.join(5)
    assert not lost, "the reply was never lost"
    assert [res.get(timeout=5)["label"] for res in results] == ["b"] * 5
    assert int(r.get("drift-count")) == 5
    assert len(seen) == 5
    assert len(DeadLetters(r, "imgq").list()) == 1
    assert r.keys("imgq:inflight:*") == [] and r.hkeys("imgq:lanes") == []


def test_a_redelivered_batch_counts_only_its_new_results(redis_server, client, manifest) -> None:
    """Some tasks of a batch were answered already (a stalled worker woke up): only the others
    are counted in the drift window, once even if that count is sent twice."""
    r = redis.Redis.from_url(redis_server.url)
    r.delete("drift-count")
    results = [_send(client, image=GOOD) for _ in range(4)]
    for res in results[:3]:
        r.set(client.backend.get_key_for_task(res.id), b'{"status": "SUCCESS"}')
    runner = _runner(redis_server, client, FakeBundle(manifest), drift=FakeDrift())
    assert runner.run_once() == 4
    assert int(r.get("drift-count")) == 1
    assert results[3].get(timeout=5)["label"] == "b"


def test_a_bug_fails_its_batch_keeps_it_and_the_runner_serves_on(
    redis_server, client, manifest, monkeypatch
) -> None:
    """An unexpected exception while serving fails that batch's tasks with internal_error and
    keeps each message in the dead letters for a requeue once fixed; it does not put them back
    at the head of the queue, and the next batch is served (issue 14, item 1)."""
    r = redis.Redis.from_url(redis_server.url)
    victims = [_send(client, image=GOOD) for _ in range(2)]
    runner = _runner(redis_server, client, FakeBundle(manifest), drift=FakeDrift())

    def broken(*args: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(runner.handlers[TASK_NAME], "_drift_statistics", broken)
    assert runner.run_once() == 2
    monkeypatch.undo()
    for res in victims:
        with pytest.raises(InvalidTask, match="^internal_error: ZeroDivisionError: a bug"):
            res.get(timeout=5)
    entries = DeadLetters(r, "imgq").list()
    assert {e.task_id for e in entries} == {v.id for v in victims}
    assert {(e.reason, e.body) for e in entries} == {("internal_error", "kept")}
    assert r.llen("imgq") == 0
    after = _send(client, image=GOOD)
    assert runner.run_once() == 1 and after.get(timeout=5)["label"] == "b"


def test_a_poison_pill_fails_and_is_kept(redis_server, client, manifest) -> None:
    """A message the intake flags as delivered too often is not computed: FAILURE
    redelivered_too_often, and its message kept in the dead letters."""
    r = redis.Redis.from_url(redis_server.url)
    pill = _send(client, image=GOOD)
    r.rpush("imgq:poison:imgq", r.rpop("imgq"))
    bundle = FakeBundle(manifest)
    runner = _runner(redis_server, client, bundle)
    assert runner.run_once() == 1
    with pytest.raises(InvalidTask, match="^redelivered_too_often: "):
        pill.get(timeout=5)
    assert bundle.calls == []
    (entry,) = DeadLetters(r, "imgq").list()
    assert (entry.reason, entry.task_id, entry.body) == ("redelivered_too_often", pill.id, "kept")


def test_a_batch_over_its_pixel_budget_is_served_in_parts(redis_server, client, manifest) -> None:
    """Past IMGQ_BATCH_PIXELS of decoded images, the rest of the batch goes back to the head of
    the queue (not counted as a delivery) and is served by the next batch, in order."""
    r = redis.Redis.from_url(redis_server.url)
    big = _b64(encode_png(colour_image(COLOURS[1], size_px=100)))  # 10,000 pixels each
    results = [_send(client, image=big, request_id=i) for i in range(5)]
    bundle = FakeBundle(manifest)
    limits = DecodeLimits(max_pixels=10_000)
    runner = _runner(redis_server, client, bundle, decode_limits=limits, batch_pixels=25_000)
    assert runner.run_once() == 5  # took 5, served 2
    assert bundle.calls == [2] and r.llen("imgq") == 3
    while r.llen("imgq"):
        runner.run_once()
    assert bundle.calls == [2, 2, 1]
    assert [res.get(timeout=5)["request_id"] for res in results] == [0, 1, 2, 3, 4]
    assert r.keys("imgq:deliveries:*") == []


@pytest.mark.parametrize(
    "headers",
    [
        {"expires": 1_764_000_000_000},  # epoch milliseconds, as a JavaScript client sends
        {"expires": "9999-12-31T23:59:59+00:00"},
        {"expires": 1e308},
        {"expires": "0001-01-01T00:00:00"},
        {"imgq_sent_at": -1e20},
    ],
)
def test_time_headers_that_cannot_be_formatted_fail_their_task_only(
    redis_server, client, manifest, headers
) -> None:
    """Times a datetime cannot hold fail their own task with a reason (or are served when they
    are valid); batch-mates are served and task events are built (issue 14, item 1: a header in
    epoch milliseconds stopped every worker in turn)."""
    from celery import Celery

    from imgq.worker.wire.events import TaskEvents

    odd = client.send_task(TASK_NAME, kwargs={"image": GOOD}, queue="imgq", headers=headers)
    mate = _send(client, image=GOOD)
    runner = _runner(redis_server, client, FakeBundle(manifest))
    runner.events = TaskEvents(Celery("events", broker=redis_server.url), "w@h", 0)
    assert runner.run_once() == 2
    assert mate.get(timeout=5)["label"] == "b"
    try:
        value = odd.get(timeout=5)
    except InvalidTask as exc:
        assert str(exc).startswith("malformed_message: a time header")
    except TaskRevokedError:
        assert headers.get("expires") == "0001-01-01T00:00:00"
    else:
        assert value["label"] == "b"


def test_results_in_another_redis_are_stored_once_and_counted_once(
    redis_server, manifest, monkeypatch
) -> None:
    """With results in another Redis database than the queue, the results are stored there
    first-wins, the ack and the drift counts follow on the broker, and a re-sent broker round
    trip counts nothing twice (the runner's high-water mark of batch numbers)."""
    results_url = redis_server.url.rsplit("/", 1)[0] + "/1"
    client = Celery("client", broker=redis_server.url, backend=results_url)
    broker = redis.Redis.from_url(redis_server.url)
    broker.delete("drift-count")
    sent = [_send(client, image=GOOD) for _ in range(3)]
    s = WorkerSettings(broker_url=redis_server.url, result_backend=results_url, queue="imgq")
    intake = Intake(broker, "imgq", "w-elsewhere", lease_ttl_s=30)
    intake.renew_lease()
    metrics = WorkerMetrics(CollectorRegistry())
    handler = ClassifyHandler(FakeBundle(manifest), s, metrics, FakeDrift())  # type: ignore[arg-type]
    runner = BatchEngine(s, {TASK_NAME: handler}, broker, intake.lanes[0], client.backend, metrics)
    execute = redis.client.Pipeline.execute
    lost = [redis.ConnectionError("reply lost after Redis ran it")]

    def broker_reply_lost(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        on_broker = self.connection_pool.connection_kwargs.get("db", 0) == 0
        settling = any(c[0][0] == "EVAL" for c in self.command_stack)
        replies = execute(self, *args, **kwargs)
        if lost and on_broker and settling:
            raise lost.pop()
        return replies

    monkeypatch.setattr(redis.client.Pipeline, "execute", broker_reply_lost)
    assert runner.run_once() == 3
    monkeypatch.undo()
    assert not lost
    assert [res.get(timeout=5)["label"] for res in sent] == ["b"] * 3
    assert broker.keys("celery-task-meta-*") == []
    assert int(broker.get("drift-count")) == 3
    assert broker.keys("imgq:inflight:*") == []


def test_a_requeued_poison_pill_can_be_answered(redis_server, client, manifest) -> None:
    """`imgq dlq requeue` of a poison pill after the fix: the FAILURE the quarantine stored is
    cleared first (the first stored result wins), so the task is answered and its client told
    (issue 14: the requeued task was recomputed but its FAILURE stayed)."""
    r = redis.Redis.from_url(redis_server.url)
    pill = _send(client, image=GOOD)
    r.rpush("imgq:poison:imgq", r.rpop("imgq"))
    runner = _runner(redis_server, client, FakeBundle(manifest))
    assert runner.run_once() == 1
    with pytest.raises(InvalidTask, match="^redelivered_too_often: "):
        pill.get(timeout=5)
    letters = DeadLetters(r, "imgq")
    (entry,) = letters.list()
    letters.requeue(entry.id)
    assert runner.run_once() == 1
    stored = json.loads(r.get(client.backend.get_key_for_task(pill.id)))
    assert stored["status"] == "SUCCESS" and stored["result"]["label"] == "b"


def test_a_requeue_never_clears_an_earned_result(redis_server, client, manifest) -> None:
    """The requeue deletes only a FAILURE with the dead letter's own reason."""
    r = redis.Redis.from_url(redis_server.url)
    key = client.backend.get_key_for_task("t-earned")
    r.set(key, b'{"status": "SUCCESS", "result": {"label": "a"}}')
    letters = DeadLetters(r, "imgq")
    letters.add(b'{"headers": {"id": "t-earned"}}', "redelivered_too_often", "x", "t-earned")
    letters.requeue(letters.list()[0].id)
    assert r.get(key) == b'{"status": "SUCCESS", "result": {"label": "a"}}'


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_settle_waits_for_replicas_and_a_shortfall_loses_nothing(
    redis_server, client, manifest, tmp_path, replicas: int
) -> None:
    """IMGQ_WAIT_REPLICAS=1: with a replica following, each settle is acknowledged; without
    one, the WAIT times out, is counted, and the batch is stored and acked all the same."""
    replica = None
    if replicas:
        args = ["--replicaof", "127.0.0.1", str(redis_server.port)]
        replica = LocalRedis(tmp_path / "replica", appendonly=False, args=args).start()
    try:
        if replica is not None:
            wait_for(lambda: redis.Redis(port=replica.port).info("replication").get(
                "master_link_status") == "up", timeout_s=30)  # fmt: skip
        pending = [_send(client, image=GOOD) for _ in range(3)]
        # An acknowledged WAIT returns at once: a long timeout costs only the case without one.
        runner = _runner(redis_server, client, FakeBundle(manifest), wait_replicas=1,
                         wait_timeout_ms=10_000 if replicas else 200)  # fmt: skip
        assert runner.run_once() == 3
        assert [p.get(timeout=5)["label"] for p in pending] == ["b"] * 3
        assert redis.Redis.from_url(redis_server.url).hlen("imgq:lanes") == 0  # acked
        shortfalls = runner.metrics.registry.get_sample_value("imgq_wait_shortfalls_total")
        assert (runner.settler.shortfalls, shortfalls) == ((0, 0.0) if replicas else (1, 1.0))
        if replica is not None:
            key = client.backend.get_key_for_task(pending[0].id)
            assert redis.Redis(port=replica.port).exists(key)  # on the replica once acked
    finally:
        if replica is not None:
            replica.stop()
