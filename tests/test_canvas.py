"""Callbacks, errbacks, chains and chords: an imgq classification followed by a task of the
user's own, served by a second, ordinary Celery worker (``tests/canvas_user.py``), all on a real
redis-server with real worker processes, sent by a stock Celery client. Every wait is on a
stored result or a Redis list the user's tasks push to, never on a sleep."""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chord
from celery.exceptions import ChordError
from prometheus_client import CollectorRegistry

from imgq.launcher import WorkerProcess
from imgq.shared.errors import InvalidImage, InvalidTask
from imgq.worker.celeryapp.followups import Followups
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.canvas import MAX_SIGNATURES, parse_canvas
from tests.hostile import envelope
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import active_task_ids, wait_all, wait_for

ROOT = Path(__file__).resolve().parents[1]
_TIMEOUT_S = 30


@pytest.fixture(params=["one-redis"])
def backend_url(request, redis_server) -> str:
    """Where results live: the queue's Redis, or (``"results-apart"``) another database, which
    takes the engine's other settle path (results stored first, their flags from there)."""
    return redis_server.url if request.param == "one-redis" else redis_server.url[:-1] + "1"


@pytest.fixture
def client(redis_server, backend_url) -> Celery:
    """A stock Celery app of another service: JSON, imgq.classify routed to queue imgq."""
    app = Celery("service", broker=redis_server.url, backend=backend_url)
    app.conf.update(task_serializer="json", task_routes={TASK_NAME: {"queue": "imgq"}})
    return app


@pytest.fixture
def user_worker(redis_server, backend_url, tmp_path, client) -> Iterator[WorkerProcess]:
    """An ordinary ``celery worker`` serving the user's tasks on queue ``user``."""
    command = [sys.executable, "-m", "celery", "-A", "tests.canvas_user", "worker", "-Q", "user",
               "--pool", "solo", "-c", "1", "-n", "user@%h", "--without-mingle",
               "--without-gossip", "-l", "info"]  # fmt: skip
    env = dict(os.environ, CANVAS_BROKER_URL=redis_server.url, CANVAS_BACKEND_URL=backend_url)
    worker = WorkerProcess("user@%h", tmp_path / "user.log", command=command, env=env, cwd=ROOT)
    try:
        worker.wait_ready(client)
        yield worker
    finally:
        worker.kill()


@pytest.fixture
def imgq_worker(workers, client, user_worker, backend_url) -> WorkerProcess:
    """One `imgq worker` on queue imgq, ready."""
    worker = workers.start("w1", IMGQ_RESULT_BACKEND=backend_url)
    worker.wait_ready(client)
    return worker


def _image(i: int) -> str:
    return base64.b64encode(encode_png(colour_image(COLOURS[i % 3], seed=i))).decode()


def _classify(client: Celery, i: int) -> Any:
    return client.signature(TASK_NAME, kwargs={"image": _image(i)}, queue="imgq")


def _user(client: Celery, name: str) -> Any:
    return client.signature(f"user.{name}", queue="user")


def _redis(url: str) -> redis.Redis:
    """A client whose reads outlast a BLPOP of ``_TIMEOUT_S`` (redis-py's default is 5 s)."""
    return redis.Redis.from_url(url, socket_timeout=_TIMEOUT_S + 10)


def _received(r: redis.Redis, name: str) -> Any:
    """The next value a user task recorded in ``user:<name>``; waits for it."""
    got = r.blpop([f"user:{name}"], timeout=_TIMEOUT_S)
    assert got is not None, f"user.{name} received nothing within {_TIMEOUT_S} s"
    return json.loads(got[1]) if name != "failed" else got[1].decode()


@pytest.mark.integration
def test_link_sends_the_result_to_the_users_task(client, imgq_worker, redis_server) -> None:
    """(a) ``link=``: the user's task receives the classification; two links both do (sent as
    one group, as Celery's worker sends them)."""
    r = _redis(redis_server.url)
    res = client.send_task(TASK_NAME, kwargs={"image": _image(1), "request_id": "r1"},
                           queue="imgq", link=_user(client, "store"))  # fmt: skip
    got = _received(r, "store")
    assert got == res.get(timeout=_TIMEOUT_S) and got["label"] == "b" and got["request_id"] == "r1"
    client.send_task(TASK_NAME, kwargs={"image": _image(2)}, queue="imgq",
                     link=[_user(client, "store"), _user(client, "store")])  # fmt: skip
    assert [_received(r, "store")["label"] for _ in range(2)] == ["c", "c"]


@pytest.mark.integration
def test_link_error_runs_with_the_task_id(client, imgq_worker, redis_server) -> None:
    """(b) ``link_error=`` on a task whose image is not an image: the errback runs with the
    task's id, and ``.get()`` raises the task's own error."""
    r = _redis(redis_server.url)
    bad = base64.b64encode(b"not an image").decode()
    res = client.send_task(
        TASK_NAME, kwargs={"image": bad}, queue="imgq",
        link=_user(client, "store"), link_error=_user(client, "failed"),
    )  # fmt: skip
    assert _received(r, "failed") == res.id
    with pytest.raises(InvalidImage, match="^undecodable: "):
        res.get(timeout=_TIMEOUT_S)
    assert r.llen("user:store") == 0  # the callback of a failed task never runs


@pytest.mark.integration
@pytest.mark.parametrize("backend_url", ["one-redis", "results-apart"], indirect=True)
def test_chain_continues_with_the_result(client, imgq_worker) -> None:
    """(c) ``classify | store``: the chain's result is what the user's task returned; a failed
    first step fails the rest of the chain instead of leaving it PENDING."""
    result = (_classify(client, 0) | _user(client, "store")).apply_async()
    assert result.get(timeout=_TIMEOUT_S) == {"stored": "a"}
    assert result.parent.get(timeout=_TIMEOUT_S)["label"] == "a"
    bad = client.signature(TASK_NAME, kwargs={"image": "bm90IGFuIGltYWdl"}, queue="imgq")
    failed = (bad | _user(client, "store")).apply_async()
    with pytest.raises(InvalidImage, match="^undecodable: "):
        failed.get(timeout=_TIMEOUT_S)


@pytest.mark.integration
def test_chord_body_fires_once_with_every_result(client, imgq_worker, redis_server) -> None:
    """(d) A chord of 5 classifications: its body on queue user fires exactly once, with the 5
    results in the header's order."""
    r = _redis(redis_server.url)
    result = chord([_classify(client, i) for i in range(5)])(_user(client, "collect"))
    assert result.get(timeout=_TIMEOUT_S) == ["a", "b", "c", "a", "b"]
    assert [x["label"] for x in _received(r, "collect")] == ["a", "b", "c", "a", "b"]
    # A second firing would be queued before this: queue user is served in order, one at a time.
    sentinel = client.send_task("user.store", args=["sentinel"], queue="user")
    assert sentinel.get(timeout=_TIMEOUT_S) == {"stored": "sentinel"}
    assert r.llen("user:collect") == 0


@pytest.mark.integration
@pytest.mark.parametrize("backend_url", ["one-redis", "results-apart"], indirect=True)
def test_chord_with_a_failed_part_fails_not_hangs(client, imgq_worker, redis_server) -> None:
    """(e) A chord with one undecodable part: its result fails with ChordError naming the
    part's error, and its body never runs."""
    r = _redis(redis_server.url)
    parts = [_classify(client, i) for i in range(4)]
    parts.insert(2, client.signature(TASK_NAME, kwargs={"image": "eHl6"}, queue="imgq"))
    result = chord(parts)(_user(client, "collect"))
    error = result.get(timeout=_TIMEOUT_S, propagate=False)  # the body's own stored result
    assert isinstance(error, ChordError) and "undecodable" in str(error), repr(error)
    assert result.state == "FAILURE"
    with pytest.raises(InvalidImage):  # .get() raises the failed part's error (Celery's order)
        result.get(timeout=_TIMEOUT_S)
    assert r.llen("user:collect") == 0


@pytest.mark.integration
def test_a_revoked_chord_part_fails_the_chord_not_hangs(client, imgq_worker, redis_server) -> None:
    """A chord part revoked before it is taken ends REVOKED and returns its part as Celery's
    worker does, so the chord fails with ChordError instead of waiting forever."""
    r = _redis(redis_server.url)
    replies = client.control.revoke("part-revoked", reply=True, timeout=30, limit=1)
    assert replies, "the imgq worker did not answer the revoke"
    parts = [_classify(client, 0), _classify(client, 1).set(task_id="part-revoked")]
    result = chord(parts)(_user(client, "collect"))
    error = result.get(timeout=_TIMEOUT_S, propagate=False)
    assert isinstance(error, ChordError) and "revoked" in str(error).lower(), repr(error)
    assert client.AsyncResult("part-revoked").state == "REVOKED"
    assert r.llen("user:collect") == 0


@pytest.mark.integration
def test_a_running_part_revoked_by_a_plain_worker_still_returns_its_part(
    client, workers, user_worker, redis_server
) -> None:
    """A mixed fleet: the plain Celery worker serving the user's tasks also gets the revoke
    broadcast and stores REVOKED at once (Celery 5.7) for a chord part an imgq worker is
    computing. The imgq worker's result is then not new, yet the part is returned (claimed
    once), so the chord fails instead of waiting forever."""
    r = _redis(redis_server.url)
    worker = workers.start("w1", IMGQ_HANDLERS="classify,null")
    worker.wait_ready(client)
    held = client.signature("imgq.null", kwargs={"hold_until": "test:go"}, queue="imgq")
    result = chord([held.set(task_id="held-part"), _classify(client, 1)])(_user(client, "collect"))
    wait_for(lambda: "held-part" in active_task_ids(client), _TIMEOUT_S)
    replies = client.control.revoke("held-part", reply=True, timeout=30, limit=2)
    assert len(replies) == 2, replies  # the imgq worker and the plain one
    assert client.AsyncResult("held-part").state == "REVOKED"  # stored by the plain worker
    r.set("test:go", 1)
    error = result.get(timeout=_TIMEOUT_S, propagate=False)
    assert isinstance(error, ChordError) and "revoked" in str(error).lower(), repr(error)
    assert r.llen("user:collect") == 0


_GOOD_SIG = {"task": "user.store", "args": [], "kwargs": {}, "options": {"queue": "user"},
             "subtask_type": None, "immutable": False}  # fmt: skip
#: Embeds and headers of the wrong type or size, each a FAILURE malformed_message naming it.
_HOSTILE: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "callbacks_not_a_list": ({"callbacks": "user.store"}, {}, "`callbacks` must be a list"),
    "callback_not_an_object": ({"callbacks": [1]}, {}, "`callbacks[0]` must be a signature"),
    "errback_without_task": ({"errbacks": [{"args": []}]}, {}, "must name its task"),
    "chain_an_object": ({"chain": _GOOD_SIG}, {}, "`chain` must be a list"),
    "chord_a_list": ({"chord": [1, 2]}, {}, "`chord` must be a signature"),
    "args_a_string": ({"callbacks": [{**_GOOD_SIG, "args": "x"}]}, {}, "`args` must be a list"),
    "group_a_number": ({"chord": _GOOD_SIG}, {"group": 5}, "`group` header must be an id"),
    "group_index_text": ({"chord": _GOOD_SIG}, {"group_index": "1"}, "`group_index` header"),
    "too_many": ({"callbacks": [_GOOD_SIG] * (MAX_SIGNATURES + 1)}, {}, "over 100"),
    "too_many_nested": (  # one callback whose own links fan out: counted too
        {"callbacks": [{**_GOOD_SIG, "options": {"link": [_GOOD_SIG] * MAX_SIGNATURES}}]},
        {},
        "holds 101 signatures, over the 100",
    ),
    "embed_a_list": ([_GOOD_SIG], {}, "embed must be an object"),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_hostile_canvas_fields_are_refused(name: str) -> None:
    """Each wrong type or size is an InvalidTask naming the field (unit, no worker)."""
    embed, headers, message = _HOSTILE[name]
    with pytest.raises(InvalidTask, match="^malformed_message: ") as info:
        parse_canvas(embed, headers, {})
    assert message in str(info.value)


def test_an_empty_canvas_is_none_whatever_the_headers() -> None:
    """The common case: an all-null embed is no canvas, and its headers are not judged."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert parse_canvas(embed, {"group": 5, "root_id": ["x"]}, {"priority": "high"}) is None
    assert parse_canvas(None, {}, {}) is None


@pytest.mark.integration
def test_hostile_canvas_fails_the_task_and_the_worker_serves_on(
    client, imgq_worker, redis_server
) -> None:
    """(f) Messages with hostile canvas fields end in FAILURE malformed_message, and a follow-up
    Celery cannot build (an unknown signature type) is counted and logged, not fatal: its task
    succeeds, and the worker serves the next chain."""
    r = _redis(redis_server.url)
    ids = []
    for embed, headers, _ in _HOSTILE.values():
        task_id = str(uuid.uuid4())
        body = json.dumps([[], {"image": _image(0)}, embed]).encode()
        r.lpush("imgq", envelope(task_id, body, **headers))
        ids.append(task_id)
    unbuildable = str(uuid.uuid4())
    embed = {"callbacks": [{**_GOOD_SIG, "subtask_type": "no-such-type"}]}
    r.lpush("imgq", envelope(unbuildable, json.dumps([[], {"image": _image(0)}, embed]).encode()))
    records = wait_all(client, [*ids, unbuildable], _TIMEOUT_S, watch=[imgq_worker])
    for (name, (_, _, message)), task_id in zip(_HOSTILE.items(), ids, strict=True):
        record = records[task_id]
        assert record["status"] == "FAILURE", name
        text = record["result"]["exc_message"][0]
        assert text.startswith("malformed_message: ") and message in text, (name, text)
    assert records[unbuildable]["status"] == "SUCCESS"
    result = (_classify(client, 1) | _user(client, "store")).apply_async()
    assert result.get(timeout=_TIMEOUT_S) == {"stored": "b"}
    assert imgq_worker.running()
    assert "the callback follow-up of task " + unbuildable in imgq_worker.log_tail(20000)


def test_without_fail_chain_the_chain_fails_as_celery_5_5_does(redis_server) -> None:
    """Celery 5.5's backends have no ``_fail_chain``: the rest of the chain gets the failure
    stored step by step, and a step that is a chord's part is returned failed."""
    calls: list[tuple[str, str | None]] = []

    class Celery55Backend:
        def store_result(self, task_id: str, exc: Exception, state: str, request: Any) -> None:
            calls.append(("store", task_id))

        def on_chord_part_return(self, request: Any, state: str, exc: Exception) -> None:
            calls.append(("chord", request.id))

    followups = Followups(Celery("w", broker=redis_server.url), WorkerMetrics(CollectorRegistry()))
    followups.backend = Celery55Backend()
    chain = [{"task": "user.store", "options": {"task_id": "s2", "chord": {"task": "x"}}},
             {"task": "user.store", "options": {"task_id": "s1"}}]  # fmt: skip
    followups._fail_chain(chain, InvalidTask("internal_error"), "FAILURE")
    assert calls == [("store", "s2"), ("chord", "s2"), ("store", "s1")]
