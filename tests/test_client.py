"""The Python client (worker/client.py) and `imgq classify`, against a real redis-server and a real
`imgq worker` process."""

from __future__ import annotations

import argparse
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as ResultTimeout
from kombu.exceptions import OperationalError

from imgq.launcher import WorkerProcess, worker_env
from imgq.localredis import LocalRedis
from imgq.shared.errors import InvalidImage
from imgq.worker.client import EnqueueNotConfirmed, ImgqClient
from imgq.worker.commands.classify import classify_main
from imgq.worker.wire import SENT_AT_HEADER, TASK_NAME
from tests.blocked_imports import run_without
from tests.tinymodel import COLOURS, colour_image, encode_png, make_tiny_bundle

#: Generous bound on how long publishing may take to fail while Redis is down (the client's
#: own bound is ~2 s for a refused connection; this leaves room for a busy machine).
DOWN_LIMIT_S = 15.0


def _queued(url: str, queue: str = "imgq") -> list[bytes]:
    """The raw messages in a queue, oldest (next to be taken) first."""
    return list(reversed(redis.Redis.from_url(url).lrange(queue, 0, -1)))


def _without_volatile(raw: bytes) -> Any:
    """A raw message, parsed, with its per-task values (ids, delivery tag, times) replaced by
    'X' wherever they occur."""
    message = json.loads(raw)
    headers, properties = message["headers"], message["properties"]
    volatile = {headers["id"], properties["delivery_tag"], headers[SENT_AT_HEADER]}
    if headers["expires"]:
        volatile.add(headers["expires"])

    def replace(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        if isinstance(value, list):
            return [replace(v) for v in value]
        return "X" if isinstance(value, (str, float)) and value in volatile else value

    return replace(message)


def test_client_imports_with_only_celery_and_redis() -> None:
    """worker.client imports and builds messages with numpy, OpenCV, onnxruntime, TF unavailable,
    and without its optional accelerators (pybase64, orjson) or OpenTelemetry."""
    blocked = ["numpy", "cv2", "onnxruntime", "tensorflow", "keras", "PIL", "scipy", "shared",
               "pybase64", "orjson", "opentelemetry"]  # fmt: skip
    (message,) = run_without(
        blocked,
        """
from imgq.worker.client import EnqueueNotConfirmed, ImgqClient, caller_trace_context
from imgq.worker.wire.envelope import MessageTemplate
client = ImgqClient("redis://127.0.0.1:1/0")
assert caller_trace_context() == {}
_, message = MessageTemplate(client.app, "imgq.classify", "imgq", 1, None).fill(b"abc")
print(message.decode())
""",
    )
    body = json.loads(base64.b64decode(json.loads(message)["body"]))
    assert base64.b64decode(body[1]["image"]) == b"abc"


@pytest.mark.parametrize("expires_s", [None, 30.0])
def test_bulk_message_equals_send_task_message(redis_server: LocalRedis, expires_s: float) -> None:
    """classify_many's raw message is send_task's, as JSON, apart from ids and times."""
    image = encode_png(colour_image(COLOURS[0]))
    with ImgqClient(redis_server.url) as client:
        single = client.classify(image, top_k=2, expires_s=expires_s)
        (bulk,) = client.classify_many([image], top_k=2, expires_s=expires_s)
    sent, pushed = _queued(redis_server.url)
    assert json.loads(sent)["headers"]["id"] == single.id
    assert json.loads(pushed)["headers"]["id"] == bulk.id
    assert _without_volatile(pushed) == _without_volatile(sent)
    headers = json.loads(pushed)["headers"]
    assert headers["task"] == TASK_NAME and headers["root_id"] == bulk.id
    assert abs(headers[SENT_AT_HEADER] - time.time()) < 60
    body = json.loads(base64.b64decode(json.loads(pushed)["body"]))
    assert body[:2] == [[], {"image": base64.b64encode(image).decode(), "top_k": 2}]


def test_bulk_keeps_order_across_chunks(redis_server: LocalRedis) -> None:
    """Bulk tasks reach the queue in order, across several LPUSH chunks, first one taken first."""
    images = [b"%d" % i for i in range(1234)]
    with ImgqClient(redis_server.url, queue="q1") as client:
        pending = client.classify_many(iter(images))
    queued = _queued(redis_server.url, "q1")
    assert [json.loads(m)["headers"]["id"] for m in queued] == [r.id for r in pending]
    first = json.loads(base64.b64decode(json.loads(queued[0])["body"]))[1]["image"]
    assert base64.b64decode(first) == b"0"


def test_results_reads_celery_result_records(redis_server: LocalRedis) -> None:
    """results() returns each task's dict or exception, in order, from records Celery wrote."""
    with ImgqClient(redis_server.url) as client:
        ids = ["t-ok", "t-bad", "t-revoked", "t-missing"]
        backend = client.app.backend
        backend.store_result("t-ok", {"label": "a", "score": 0.9}, states.SUCCESS)
        backend.store_result("t-bad", InvalidImage("undecodable", "not an image"), states.FAILURE)
        backend.store_result("t-revoked", TaskRevokedError("expired"), states.REVOKED)
        seen = []
        outcomes = client.results(
            [client.app.AsyncResult(i) for i in ids], timeout_s=0.2,
            progress=lambda done, total: seen.append((done, total)),
        )  # fmt: skip
    assert outcomes[0] == {"label": "a", "score": 0.9}
    assert isinstance(outcomes[1], InvalidImage) and outcomes[1].reason == "undecodable"
    assert isinstance(outcomes[2], TaskRevokedError)
    assert isinstance(outcomes[3], ResultTimeout) and "t-missing" in str(outcomes[3])
    assert seen == [(3, 4)]


def test_results_finds_tasks_that_finish_out_of_order(redis_server: LocalRedis) -> None:
    """Results behind more than a poll's worth of unfinished older tasks (another queue, a
    redelivery) are still collected; only the unfinished ones time out."""
    with ImgqClient(redis_server.url) as client:
        ids = [f"t-{i}" for i in range(700)]
        for i in ids[400:]:
            client.app.backend.store_result(i, {"label": i}, states.SUCCESS)
        outcomes = client.results([client.app.AsyncResult(i) for i in ids], timeout_s=0.3)
    assert all(isinstance(o, ResultTimeout) for o in outcomes[:400])
    assert outcomes[400:] == [{"label": i} for i in ids[400:]]


def test_bad_arguments_are_refused_before_enqueueing(redis_server: LocalRedis) -> None:
    """A str image or a bad top_k raises at once and enqueues nothing."""
    with ImgqClient(redis_server.url) as client:
        with pytest.raises(TypeError, match="encoded file's bytes"):
            client.classify("cat.jpg")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="top_k must be an integer >= 1, got 0"):
            client.classify_many([b"x"], top_k=0)
    assert _queued(redis_server.url) == []


def test_redis_down_fails_fast_and_recovers(redis_server: LocalRedis) -> None:
    """With Redis stopped, publishing and reading results raise OperationalError within a bound;
    once Redis is back the same client works again."""
    with ImgqClient(redis_server.url) as client:
        client.classify(b"warm up")  # connections and pub/sub exist before Redis goes away
        redis_server.stop()
        for name, call in [
            ("classify", lambda: client.classify(b"x")),
            ("classify_many", lambda: client.classify_many([b"x"] * 3)),
            ("results", lambda: client.results([client.app.AsyncResult("t")], timeout_s=60)),
        ]:
            started = time.monotonic()
            with pytest.raises(OperationalError, match="cannot .* Redis at redis://127.0.0.1"):
                call()
            assert time.monotonic() - started < DOWN_LIMIT_S, name
        redis_server.start()
        client.classify(b"y")
        assert len(client.classify_many([b"z"] * 2)) == 2
    assert len(_queued(redis_server.url)) >= 3


# -- enqueues a replica acknowledged (wait_replicas) -----------------------------------------------


def test_an_enqueue_no_replica_acknowledged_is_reported(redis_server: LocalRedis) -> None:
    """wait_replicas=1 and no replica: the first chunk is on the master but unconfirmed, the
    images after it are not sent, and the error is an OperationalError."""
    with ImgqClient(redis_server.url, wait_replicas=1, wait_timeout_ms=100) as client:
        with pytest.raises(EnqueueNotConfirmed, match="0 of the 1 replicas") as info:
            client.classify_many([b"%d" % i for i in range(600)])  # a chunk of 500, then 100
    assert isinstance(info.value, OperationalError)
    assert info.value.confirmed == [] and len(info.value.unconfirmed) == 500
    queued = _queued(redis_server.url)
    assert [json.loads(m)["headers"]["id"] for m in queued] == [
        r.id for r in info.value.unconfirmed
    ]


def test_enqueues_a_replica_acknowledged_are_confirmed(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    """With a replica following, every chunk is confirmed, and is on the replica by then."""
    args = ["--replicaof", "127.0.0.1", str(redis_server.port)]
    with LocalRedis(tmp_path / "replica", appendonly=False, args=args) as replica:
        follower = redis.Redis(port=replica.port)
        deadline = time.monotonic() + 30
        while follower.info("replication").get("master_link_status") != "up":
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        with ImgqClient(redis_server.url, wait_replicas=1, wait_timeout_ms=10_000) as client:
            pending = client.classify_many([b"%d" % i for i in range(600)])
            single = client.classify(b"one")
        assert len(pending) == 600
        assert follower.llen("imgq") == 601
        assert json.loads(follower.lindex("imgq", 0) or b"{}")["headers"]["id"] == single.id


def test_a_confirmed_classify_sends_send_tasks_message(redis_server: LocalRedis) -> None:
    """With wait_replicas, classify pushes the message itself (a WAIT waits for its own
    connection's writes): send_task's message all the same, request_id and expiry included."""
    image = encode_png(colour_image(COLOURS[0]))
    options: dict[str, Any] = {"top_k": 2, "request_id": "r-1", "expires_s": 30.0}
    with ImgqClient(redis_server.url) as client:
        client.classify(image, **options)
        client.wait_replicas, client.wait_timeout_ms = 1, 50  # the same app: the same reply_to
        with pytest.raises(EnqueueNotConfirmed) as info:
            client.classify(image, **options)
    sent, pushed = _queued(redis_server.url)
    assert json.loads(pushed)["headers"]["id"] == info.value.unconfirmed[0].id
    assert _without_volatile(pushed) == _without_volatile(sent)


def test_sentinel_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads the same variables as the workers: the Sentinel options reach its
    Celery app (broker and results); a sentinel URL without master_name is refused."""
    monkeypatch.setenv("IMGQ_BROKER_URL", "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2")
    monkeypatch.setenv("IMGQ_BROKER_TRANSPORT_OPTIONS", '{"master_name": "m", "x": 1}')
    with ImgqClient() as client:
        assert client.app.conf.broker_transport_options["master_name"] == "m"
        assert "x" not in client.app.conf.broker_transport_options  # only Sentinel's are read
        assert client.app.conf.result_backend_transport_options["master_name"] == "m"
    monkeypatch.setenv("IMGQ_BROKER_TRANSPORT_OPTIONS", "{}")
    with pytest.raises(ValueError, match="master_name in IMGQ_BROKER_TRANSPORT_OPTIONS"):
        ImgqClient()


# -- with a real worker ----------------------------------------------------------------------------


@pytest.fixture
def worker(redis_server: LocalRedis, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A real `imgq worker` serving the tiny colour model; tasks wait in Redis until it is up."""
    bundle = make_tiny_bundle(tmp_path / "bundle")
    proc = WorkerProcess(
        "imgq@%h",
        tmp_path / "imgq.worker.log",
        options=["--model", str(bundle), "--max-batch", "8"],
        env=worker_env(redis_server.url, IMGQ_LOG_FORMAT="text", IMGQ_METRICS_PORT="0"),
    )
    yield proc
    proc.stop()


@pytest.mark.integration
def test_worker_answers_bulk_and_single_tasks(
    redis_server: LocalRedis, worker: WorkerProcess
) -> None:
    """A real worker answers classify_many and classify; a corrupt image fails only its own task."""
    images = [encode_png(colour_image(COLOURS[i % 3], seed=i)) for i in range(30)]
    images[7] = b"this is not an image"
    with ImgqClient(redis_server.url) as client:
        pending = client.classify_many(images, top_k=2)
        single = client.classify(images[1], top_k=3, request_id="r-1")
        outcomes = client.results(pending, timeout_s=120)
        answer = single.get(timeout=60)
    assert worker.running()
    for i, outcome in enumerate(outcomes):
        if i == 7:
            assert isinstance(outcome, InvalidImage) and outcome.reason == "undecodable"
            continue
        assert isinstance(outcome, dict), outcome
        assert outcome["label"] == "abc"[i % 3] and len(outcome["top_k"]) == 2
    assert answer["label"] == "b" and answer["request_id"] == "r-1" and len(answer["top_k"]) == 3


@pytest.mark.integration
def test_classify_command_prints_one_line_per_file(
    redis_server: LocalRedis,
    worker: WorkerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`imgq classify DIR` prints a JSON line per image in order, the error with its reason for a
    bad one, and exits 1 because one failed."""
    folder = tmp_path / "images"
    folder.mkdir()
    for k, colour in enumerate(COLOURS):
        (folder / f"{k}.png").write_bytes(encode_png(colour_image(colour, seed=k)))
    (folder / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not picked up: not an image suffix")
    monkeypatch.setenv("IMGQ_BROKER_URL", redis_server.url)
    monkeypatch.delenv("IMGQ_RESULT_BACKEND", raising=False)
    args = argparse.Namespace(paths=[str(folder)], top_k=1, timeout=120.0, queue=None)

    assert classify_main(args) == 1

    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [Path(line["file"]).name for line in lines] == ["0.png", "1.png", "2.png", "3.png"]
    assert [line["result"]["label"] for line in lines[:3]] == ["a", "b", "c"]
    assert lines[3]["error"]["type"] == "InvalidImage"
    assert lines[3]["error"]["reason"] in ("truncated", "corrupt", "undecodable")
    assert "4/4" in out.err  # the progress bar


def test_classify_command_reports_missing_path(capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist stops `imgq classify` with status 2 before anything is sent."""
    args = argparse.Namespace(paths=["/no/such/file.jpg"], top_k=1, timeout=1.0, queue=None)
    assert classify_main(args) == 2
    assert "no such file or directory" in capsys.readouterr().err
