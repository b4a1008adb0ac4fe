"""docs/tasks.md's compatibility table, row by row: what a stock Celery client sets is honoured
by real `imgq worker` processes on a real redis-server, or refused with a reason at once."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import Workers

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server) -> Celery:
    """A plain Celery app of another service, routed to imgq's queue as docs/tasks.md says."""
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    app.conf.task_routes = {TASK_NAME: {"queue": "imgq"}}
    return app


@pytest.fixture
def workers(redis_server, bundle_dir, tmp_path) -> Iterator[Any]:
    fleet = Workers(bundle_dir, redis_server.url, tmp_path)
    yield fleet.start
    fleet.kill_all()


def _kwargs(i: int) -> dict[str, Any]:
    png = encode_png(colour_image(COLOURS[i % 3], size_px=20 + i % 7, seed=i))
    return {"image": base64.b64encode(png).decode()}


def _done_at(r: redis.Redis, task_id: str) -> datetime.datetime:
    meta = json.loads(r.get(f"celery-task-meta-{task_id}"))
    assert meta["status"] == "SUCCESS", meta
    return datetime.datetime.fromisoformat(meta["date_done"])


def test_priority_lists_are_served_higher_first_without_starving(client, workers, redis_server):
    """`priority=` puts a task on kombu's list of its step; urgent tasks queued behind a backlog
    are served first, and every batch keeps a place for the backlog."""
    r = redis.Redis.from_url(redis_server.url)
    low = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=9) for i in range(40)]
    mid = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=5) for i in range(4)]
    high = [client.send_task(TASK_NAME, kwargs=_kwargs(i), priority=0) for i in range(8)]
    assert r.llen("imgq\x06\x169") == 40 and r.llen("imgq\x06\x163") == 4 and r.llen("imgq") == 8
    worker = workers("w1", IMGQ_MAX_BATCH="4")
    for res in high + mid + low:
        res.get(timeout=60)
    high_done = max(_done_at(r, res.id) for res in high)
    mid_done = max(_done_at(r, res.id) for res in mid)
    low_done = sorted(_done_at(r, res.id) for res in low)
    # Batches of 4 keep one place for lower levels: the 8 urgent tasks take 3 batches, the 4
    # middle ones the next 2; the backlog moved all along (one task per batch), not after.
    assert high_done < low_done[len(low) // 4] and mid_done < low_done[len(low) // 4]
    assert low_done[0] < high_done
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
    workers("w1", IMGQ_BROKER_TRANSPORT_OPTIONS=json.dumps(options))
    assert res.get(timeout=30)["label"] == "b"
