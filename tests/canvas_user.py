"""A service's own Celery app, served by a plain ``celery worker`` (queue ``user``) in
``tests/test_canvas.py``: the tasks an imgq classification is followed by. Each records what it
received in a Redis list, so the test waits on the list (``BLPOP``) instead of sleeping.

Run as ``python -m celery -A tests.canvas_user worker -Q user`` with ``CANVAS_BROKER_URL`` set.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery

BROKER_URL = os.environ.get("CANVAS_BROKER_URL", "redis://127.0.0.1:6379/0")
#: Results in another Redis (or database) than the queue, when set.
BACKEND_URL = os.environ.get("CANVAS_BACKEND_URL", BROKER_URL)

app = Celery("user", broker=BROKER_URL, backend=BACKEND_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)
_redis = redis.Redis.from_url(BROKER_URL)


@app.task(name="user.store")
def store(value: Any) -> dict[str, Any]:
    """A link callback or chain step: stores the classification (here: records it)."""
    _redis.rpush("user:store", json.dumps(value))
    return {"stored": value["label"] if isinstance(value, dict) else value}


@app.task(name="user.failed")
def failed(task_id: str) -> str:
    """A link_error errback as Celery calls one a worker does not have: ``(task_id,)``."""
    _redis.rpush("user:failed", task_id)
    return task_id


@app.task(name="user.collect")
def collect(results: list[Any]) -> list[str]:
    """A chord's body: every part's result, in the header's order."""
    _redis.rpush("user:collect", json.dumps(results))
    return [r["label"] for r in results]
