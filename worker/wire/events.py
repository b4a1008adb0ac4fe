"""Celery task events for the tasks a worker serves, published with each batch's results.

Celery's own worker sends ``task-received``, ``task-succeeded``/``task-failed`` and
``task-revoked`` one by one, buffered by its event loop; its ``EventDispatcher`` flushes a buffer
as one message holding a list of events (routing key ``task.multi``), which Flower and
``app.events.Receiver`` unpack. :class:`TaskEvents` builds exactly that message for a whole batch
and adds its ``PUBLISH`` to the pipeline that stores the batch's results, after them: no extra
round trip, and a monitor never sees a task succeed before its result exists. The envelope is
kombu's on kombu's Redis fanout topic ``/<db>.<event exchange>/task.multi``. Publishing through
kombu instead builds a new redis-py client per message and costs a round trip.

Everything here is total: the values come from hostile messages (already validated, but a
monitor's convenience must never cost a batch), so a time that cannot be formatted shows as
None and a batch whose events cannot be built sends none (logged).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pybase64
from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset

from imgq.worker.wire.codec import json_dumps
from imgq.worker.wire.message import TaskRequest

__all__ = ["TaskEvents"]

logger = logging.getLogger(__name__)

_REPR_MAX_CHARS = 1024  # Celery's limit on argument and result reprs in events


class TaskEvents:
    """Builds one Celery events message per batch.

    Args:
        app: The worker's Celery app (event exchange name, Lamport clock).
        hostname: The worker's Celery node name, so that Flower files the tasks under it.
        broker_db: The Redis database number of the broker (part of the topic).
    """

    def __init__(self, app: Celery, hostname: str, broker_db: int) -> None:
        self.hostname = hostname
        self._clock = app.clock
        exchange = app.conf.event_exchange
        self._topic = f"/{broker_db}.{exchange}/task.multi"
        self._delivery_info = {"exchange": exchange, "routing_key": "task.multi"}
        self._pid = os.getpid()

    def add_to_pipeline(
        self,
        pipe: Any,
        picked_at: float,
        finished: Iterable[tuple[TaskRequest, Mapping[str, Any]]],
    ) -> None:
        """Queue the ``PUBLISH`` of a batch's events (received, then the outcome, per task).

        Args:
            pipe: The pipeline that stores the batch's results (the publish goes after them).
            picked_at: When the batch was taken (epoch seconds).
            finished: Each task's request and its result record (``status``, ``result``).
        """
        try:
            events = self._events(picked_at, finished)
            if not events:
                return
            body = pybase64.b64encode(json_dumps(events)).decode("ascii")
        except Exception:  # a monitor's convenience must never cost a batch
            logger.exception("task events of a batch could not be built; none sent")
            return
        message = {
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": self.hostname},
            "properties": {
                "body_encoding": "base64",
                "delivery_info": self._delivery_info,
                "delivery_mode": 1,
                "delivery_tag": str(uuid.uuid4()),
                "priority": 0,
            },
        }
        pipe.publish(self._topic, json_dumps(message))

    def _events(
        self, picked_at: float, finished: Iterable[tuple[TaskRequest, Mapping[str, Any]]]
    ) -> list[dict[str, Any]]:
        now = time.time()
        common = {"hostname": self.hostname, "utcoffset": utcoffset(), "pid": self._pid}
        forward = self._clock.forward
        events: list[dict[str, Any]] = []
        for req, meta in finished:
            task_id = req.task_id
            received = Event(
                "task-received", **common, clock=forward(), timestamp=picked_at,
                uuid=task_id, name=req.task_name, args="()", kwargs=kwargs_repr(req.kwargs),
                root_id=task_id, parent_id=None, retries=0, eta=None, expires=iso(req.expires),
            )  # fmt: skip
            state, result = meta["status"], meta["result"]
            fields: dict[str, Any]
            if state == "SUCCESS":
                kind = "task-succeeded"
                shown = _result_repr(result)
                fields = {"result": shown, "runtime": now - picked_at}
            elif state == "FAILURE":
                kind = "task-failed"
                shown = f"{result['exc_type']}({result['exc_message'][0]!r})"[:_REPR_MAX_CHARS]
                fields = {"exception": shown, "traceback": None}
            else:  # REVOKED: expired, revoked or terminated (Celery's reason is the message)
                kind = "task-revoked"
                reason = result["exc_message"][0]
                fields = {"terminated": reason == "terminated", "signum": None,
                          "expired": reason == "expired"}  # fmt: skip
            done = Event(kind, **common, clock=forward(), timestamp=now, uuid=task_id, **fields)
            events += (received, done)
        return events


def _result_repr(result: Any) -> str:
    """A result for monitors: a classification's label and score, any other handler's result
    as it is, cut short.

    >>> _result_repr({"label": "cat", "score": 0.5, "top_k": []}), _result_repr({"ok": True})
    ("{'label': 'cat', 'score': 0.5}", "{'ok': True}")
    """
    if isinstance(result, dict) and "label" in result and "score" in result:
        result = {"label": result["label"], "score": result["score"]}
    return repr(result)[:_REPR_MAX_CHARS]


def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """The task's arguments for monitors: the image's base64 length instead of its base64.

    >>> kwargs_repr({"image": "aGk=", "top_k": 2})
    "{'image': '<4 base64 chars>', 'top_k': 2}"
    """
    image = kwargs.get("image")
    shown = dict(kwargs, image=f"<{len(image)} base64 chars>") if isinstance(image, str) else kwargs
    return repr(shown)[:_REPR_MAX_CHARS]


def iso(epoch_s: float | None) -> str | None:
    """ISO 8601 (UTC) of epoch seconds, as Celery's events carry ``expires``; None for None and
    for any time a datetime cannot hold (so no header value can crash a batch).

    >>> iso(0.0), iso(1.7e12), iso(float("nan"))
    ('1970-01-01T00:00:00+00:00', None, None)
    """
    if epoch_s is None:
        return None
    try:
        return datetime.fromtimestamp(epoch_s, UTC).isoformat()
    except (ValueError, OverflowError, OSError):
        return None
