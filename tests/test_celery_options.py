"""docs/tasks.md's compatibility table, row by row: what a stock Celery client sets is honoured
by real `imgq worker` processes on a real redis-server, or refused with a reason at once."""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import TaskRevokedError, TimeLimitExceeded

from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import active_task_ids, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server) -> Celery:
    """A plain Celery app of another service, routed to imgq's queue as docs/tasks.md says."""
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    app.conf.task_routes = {"imgq.*": {"queue": "imgq"}}
    return app


NULL = "imgq.null"


def _kwargs(i: int) -> dict[str, Any]:
    png = encode_png(colour_image(COLOURS[i % 3], size_px=20 + i % 7, seed=i))
    return {"image": base64.b64encode(png).decode()}


def _done_at(r: redis.Redis, task_id: str) -> datetime.datetime:
    meta = json.loads(r.get(f"celery-task-meta-{task_id}"))
    assert meta["status"] == "SUCCESS", meta
    return datetime.datetime.fromisoformat(meta["date_done"])


def test_priority_lists_are_served_higher_first_without_starving(client, workers, redis_server):
    """`priority=` puts a task on kombu's list of its step; urgent tasks queued behind a backlog
    are served first, and every batch keeps places for each lower level that has work."""
    r = redis.Redis.from_url(redis_server.url)
    low = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=9) for i in range(40)]
    mid = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=5) for i in range(4)]
    high = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=0) for i in range(8)]
    assert r.llen("imgq\x06\x169") == 40 and r.llen("imgq\x06\x163") == 4 and r.llen("imgq") == 8
    worker = workers.start("w1", IMGQ_MAX_BATCH="16")
    for res in high + mid + low:
        res.get(timeout=60)
    high_done = max(_done_at(r, res.id) for res in high)
    mid_done = max(_done_at(r, res.id) for res in mid)
    low_done = sorted(_done_at(r, res.id) for res in low)
    # Batches of 16 keep two places for lower levels, one per level: the 8 urgent tasks and one
    # of each lower level go first, then the middle ones; the backlog moved all along.
    assert high_done < mid_done < low_done[len(low) // 4]
    assert low_done[0] < mid_done
    assert r.llen("imgq\x06\x169") == r.llen("imgq\x06\x163") == r.llen("imgq") == 0
    assert worker.stop() == 0


def test_priority_steps_come_from_the_clients_transport_options(redis_server, workers):
    """A client with other `priority_steps` and a worker given the same options agree."""
    options = {"priority_steps": [0, 5]}
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.update(task_routes={TASK_NAME: {"queue": "imgq"}}, broker_transport_options=options)
    r = redis.Redis.from_url(redis_server.url)
    res = app.send_task(TASK_NAME, kwargs=_kwargs(1), priority=7)
    assert r.llen("imgq\x06\x165") == 1
    workers.start("w1", IMGQ_BROKER_TRANSPORT_OPTIONS=json.dumps(options))
    assert res.get(timeout=30)["label"] == "b"


def _ask(command: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """A remote-control command, once the (single) worker has answered it: replies are waited
    for, not assumed to come within Celery's default second."""
    replies = command(*args, reply=True, timeout=30, limit=1, **kwargs)
    assert replies, f"no worker answered {command.__name__}{args}"
    return replies


def test_inspect_revoke_and_terminate_as_celery_does(client, workers, redis_server) -> None:
    """`inspect active` lists the batch in hand; `revoke(terminate=True)` of a task in it ends
    it REVOKED without disturbing the rest; a plain revoke of a running task lets it finish; a
    task revoked before it is taken is never computed."""
    r = redis.Redis.from_url(redis_server.url)
    held = client.send_task(NULL, kwargs={"hold_until": "test:go", "note": "x" * 100})
    doomed, running = client.send_task(NULL), client.send_task(NULL)
    worker = workers.start("w1", IMGQ_HANDLERS="null")
    batch = {held.id, doomed.id, running.id}
    wait_for(lambda: batch <= active_task_ids(client))
    info = next(t for t in client.control.inspect(timeout=30, limit=1).active()[worker.name]
                if t["id"] == held.id)  # fmt: skip
    assert info["name"] == NULL and info["kwargs"]["note"] == "<100 chars>"
    assert info["hostname"] == worker.name and info["time_start"] > 0
    assert client.control.inspect(timeout=30, limit=1).reserved() == {worker.name: []}
    _ask(client.control.revoke, doomed.id, terminate=True)
    _ask(client.control.revoke, running.id)
    later = client.send_task(NULL)  # waits in the queue behind the batch in hand
    _ask(client.control.revoke, later.id)
    stamped = client.send_task(NULL, stamped_headers=["batch"], batch="b-17")
    _ask(client.control.revoke_by_stamped_headers, {"batch": "b-17"})
    after = client.send_task(NULL)
    r.set("test:go", 1)
    assert held.get(timeout=30) == {"ok": True} and running.get(timeout=30) == {"ok": True}
    with pytest.raises(TaskRevokedError, match="terminated"):
        doomed.get(timeout=30)
    assert after.get(timeout=30) == {"ok": True}  # taken after `later` (same queue, in order)
    for revoked in (later, stamped):
        with pytest.raises(TaskRevokedError, match="revoked"):
            revoked.get(timeout=30)
    # Celery's `total` counts the tasks a worker started: the two revoked ones never were.
    stats = client.control.inspect(timeout=30, limit=1).stats()[worker.name]
    assert stats["total"] == {NULL: 4}
    # Control commands with no meaning for the batch engine say so instead of "ok".
    (reply,) = _ask(client.control.rate_limit, NULL, "1/s")
    assert "do not rate-limit" in reply[worker.name]["error"]
    assert worker.stop() == 0


def test_ignore_result_stores_nothing_but_runs_once(client, workers, redis_server) -> None:
    """`ignore_result=True`: computed, no result stored (only a short-lived marker that keeps
    a redelivered task from being counted twice)."""
    r = redis.Redis.from_url(redis_server.url)
    ignored = client.send_task(TASK_NAME, kwargs=_kwargs(1), ignore_result=True)
    kept = client.send_task(TASK_NAME, kwargs=_kwargs(2))
    workers.start("w1")
    assert kept.get(timeout=30)["label"] == "c"  # taken with or after `ignored`, in order
    assert r.exists(f"celery-task-meta-{ignored.id}") == 0
    assert 0 < r.ttl(f"imgq:done:{ignored.id}") <= 3600
    assert r.exists(f"celery-task-meta-{kept.id}") == 1


def test_a_time_limit_the_batch_overran_fails_the_task(client, workers, redis_server) -> None:
    """`time_limit`/`soft_time_limit`: a task whose batch ran past its limit fails with
    TimeLimitExceeded (Celery would have killed it); its batch-mates are answered."""
    r = redis.Redis.from_url(redis_server.url)
    limited = client.send_task(NULL, kwargs={"hold_until": "test:go"}, soft_time_limit=0.5)
    roomy = client.send_task(NULL, time_limit=600)
    workers.start("w1", IMGQ_HANDLERS="null")
    wait_for(lambda: {limited.id, roomy.id} <= active_task_ids(client))
    time.sleep(1.0)  # the batch is now held past 0.5 s whatever the machine's speed
    r.set("test:go", 1)
    with pytest.raises(TimeLimitExceeded):
        limited.get(timeout=30)
    assert roomy.get(timeout=30) == {"ok": True}


def test_what_imgq_does_not_honour_fails_at_once_with_the_reason(client, workers) -> None:
    """Rows of the table that are refused: each `.get()` raises at once with its reason code,
    instead of a PENDING that never ends."""
    refused = {
        "content_refused": client.send_task(TASK_NAME, kwargs=_kwargs(1), compression="gzip"),
        "bad_argument": client.send_task(TASK_NAME, args=[_kwargs(1)["image"]]),
        "unknown_task": client.send_task("someone.else", queue="imgq"),
    }
    served = client.send_task(TASK_NAME, kwargs=_kwargs(1))
    workers.start("w1")
    for reason, res in refused.items():
        with pytest.raises(Exception, match=reason):
            res.get(timeout=30)
    assert served.get(timeout=30)["label"] == "b"


def test_a_worker_started_after_a_revoke_honours_it(client, workers, redis_server) -> None:
    """Revokes are kept in Redis: a worker that was not running when the broadcast went out
    still does not compute the task (Celery's own workers learn it only from live peers)."""
    first = workers.start("w1")
    first.wait_ready(client)
    _ask(client.control.revoke, "order-66")
    assert first.stop() == 0
    doomed = client.send_task(TASK_NAME, kwargs=_kwargs(1), task_id="order-66")
    after = client.send_task(TASK_NAME, kwargs=_kwargs(2))
    second = workers.start("w2")
    assert after.get(timeout=30)["label"] == "c"
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=30)
    second.wait_ready(client)  # its remote control starts after its batch engine
    assert client.control.inspect(timeout=30, limit=1).stats()[second.name]["total"] == {
        TASK_NAME: 1
    }


def test_a_countdown_waits_in_redis_survives_a_killed_worker_and_runs_on_time(
    client, workers, redis_server
) -> None:
    """`countdown=`/`eta=`: a task taken before its time waits in Redis (not in a worker), so a
    worker SIGKILLed meanwhile loses nothing; it runs after its time, never before; a due or
    past `eta` runs at once."""
    r = redis.Redis.from_url(redis_server.url)
    first = workers.start("w1")
    first.wait_ready(client)
    sent = time.time()
    later = client.send_task(TASK_NAME, kwargs=_kwargs(1), countdown=8)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=5)
    due = client.send_task(TASK_NAME, kwargs=_kwargs(2), eta=past)
    assert due.get(timeout=30)["label"] == "c"
    # Taken and put aside in Redis (or, on a machine slower than 8 s for this, already run).
    wait_for(lambda: r.zcard("imgq:eta:imgq") == 1 or r.exists(f"celery-task-meta-{later.id}"))
    first.kill()
    workers.start("w2")
    assert later.get(timeout=60)["label"] == "b"
    assert _done_at(r, later.id).timestamp() >= sent + 8
    assert r.zcard("imgq:eta:imgq") == 0


def test_key_prefixes_of_the_clients_transport_options(redis_server, workers) -> None:
    """A client that prefixes its broker and result keys (`global_keyprefix`, usual on a shared
    Redis) is served by workers given the same options, and only it: tasks waiting for their
    `eta` stay under the prefix too."""
    options = {"global_keyprefix": "shop:"}
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.update(task_routes={TASK_NAME: {"queue": "imgq"}}, broker_transport_options=options,
                    result_backend_transport_options=options)  # fmt: skip
    r = redis.Redis.from_url(redis_server.url)
    other_tenant = Celery("other", broker=redis_server.url, backend=redis_server.url)
    theirs = other_tenant.send_task(TASK_NAME, kwargs=_kwargs(2), queue="imgq")
    res = app.send_task(TASK_NAME, kwargs=_kwargs(1), priority=9)
    later = app.send_task(TASK_NAME, kwargs=_kwargs(1), countdown=1)
    assert r.llen("shop:imgq\x06\x169") == 1 and r.llen("imgq") == 1
    workers.start("w1", IMGQ_BROKER_TRANSPORT_OPTIONS=json.dumps(options),
                  IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS=json.dumps(options))  # fmt: skip
    assert res.get(timeout=30)["label"] == "b" and later.get(timeout=30)["label"] == "b"
    assert r.exists(f"shop:celery-task-meta-{res.id}") == 1
    # Another tenant's task on the bare list is not this fleet's, even when due tasks come back.
    assert r.llen("imgq") == 1 and theirs.state == "PENDING"
