"""The batch in hand as Celery's worker state sees it: ``inspect active``/``reserved``/
``query_task``, ``revoke`` and ``terminate``; and the control commands that have no meaning
for imgq's engine, refused with the reason.

Celery's remote control reads and writes module-level state (``celery.worker.state``): the
requests a worker holds (``reserved_requests``, ``active_requests``, ``requests`` by id), the
revoked task ids (``revoked``, filled by the broadcast ``revoke`` command and synchronised
between workers at start-up) and the revoked stamps (``revoke_by_stamped_headers``). imgq's
engine never makes Celery ``Request`` objects, so :class:`HeldTask` stands in for one: it has
what the control commands and Celery's consumer use (``id``, ``info()``, ``terminate()``,
``cancel()``, ``stamps``, ``task.acks_late``, ``acknowledged``, ``eventer``).

What the engine does with it, as Celery's worker does:

- a task revoked before its batch starts is not computed: REVOKED (``revoked``);
- a task revoked while it runs is computed (Celery lets it finish too), unless ``terminate``
  was asked: then its result is discarded and it ends REVOKED (``terminated``); the rest of its
  batch is not disturbed (Celery would kill the process, imgq has nothing to kill but the
  answer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from celery.utils.functional import maybe_list
from celery.worker import state as worker_state
from celery.worker.control import Panel, control_command

from imgq.worker.wire.message import TaskRequest

__all__ = ["REVOKED_KEY", "HeldTask", "is_revoked", "load_revoked"]

#: Sorted set of revoked task ids (score: when), so that a worker started after a revoke honours
#: it too (Celery's workers ask each other at start, "mingle"; imgq's start without it).
REVOKED_KEY = "imgq:revoked"

logger = logging.getLogger(__name__)

_SHOWN_CHARS = 64  # longer argument strings (the image) are shown by their length


class HeldTask:
    """One task of the batch in hand, registered in Celery's worker state.

    Args:
        req: The parsed task.
        hostname: The worker's node name.
        backend: The result backend (``revoke`` reads ``request.task.backend``).
    """

    def __init__(self, req: TaskRequest, hostname: str, backend: Any) -> None:
        self.id = req.task_id
        self.name = req.task_name
        self.req = req
        self.hostname = hostname
        self.task = _TaskView(backend)
        self.stamps = req.stamps
        self.time_start: float | None = None
        self.terminated = False
        #: Read (and ``eventer`` set) by Celery's consumer for its own requests.
        self.acknowledged = False
        self.eventer: Any = None

    def reserve(self) -> None:
        """Taken, not started: ``inspect reserved`` lists it."""
        worker_state.task_reserved(self)

    def accept(self) -> None:
        """Being computed: ``inspect active`` lists it."""
        self.time_start = time.time()
        worker_state.task_accepted(self)

    def ready(self) -> None:
        """Answered: gone from the worker state."""
        worker_state.task_ready(self)

    def terminate(self, pool: Any, signal: Any = None) -> None:
        """``revoke(terminate=True)``: answer REVOKED instead of the result."""
        self.terminated = True

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels its active requests when its connection is lost or it shuts down;
        imgq's batch keeps going and settles through its own Redis client (or its messages go
        back when it cannot): nothing to do."""

    def info(self, safe: bool | None = None) -> dict[str, Any]:
        """What ``inspect active``/``reserved`` show, in the fields of Celery's ``Request.info``;
        the image by its length, not its bytes."""
        return {
            "id": self.id,
            "name": self.name,
            "args": [],
            "kwargs": {k: _shown(v) for k, v in self.req.kwargs.items()},
            "type": self.name,
            "hostname": self.hostname,
            "time_start": self.time_start,
            "acknowledged": False,
            "delivery_info": {
                "exchange": "",
                "routing_key": self.req.queue,
                "priority": None,
                "redelivered": None,
            },  # fmt: skip
            "worker_pid": None,
        }


class _TaskView:
    """``request.task`` for Celery's control commands and consumer: its result backend, and
    ``acks_late`` (imgq acks a message once its result is stored)."""

    acks_late = True

    def __init__(self, backend: Any) -> None:
        self.backend = backend


def is_revoked(req: TaskRequest) -> bool:
    """Whether ``revoke`` named the task's id, or ``revoke_by_stamped_headers`` one of its
    stamps (compared as Celery's ``Request.revoked`` compares them)."""
    if req.task_id in worker_state.revoked:
        return True
    if not req.stamps or not worker_state.revoked_stamps:
        return False
    for name, stamped in req.stamps.items():
        revoked = worker_state.revoked_stamps.get(name)
        if revoked is None:
            continue
        revoked_values = maybe_list(revoked)
        if any(_in(value, revoked_values) for value in _values(stamped)):
            return True
    return False


def _values(stamped: Any) -> Sequence[Any]:
    return stamped if isinstance(stamped, list | tuple) else [stamped]


def _in(value: Any, values: Sequence[Any]) -> bool:
    try:
        return value in values
    except Exception:  # a value that cannot be compared revokes nothing
        return False


def _shown(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"<{len(value)} chars>"
    if isinstance(value, Mapping | list):
        return f"<{type(value).__name__} of {len(value)}>"
    return value


# Celery's remote control commands that would change nothing on an imgq worker, or would start
# a second, per-message consumer beside the batch engine, answer with an error instead of "ok".
_NOT_HERE = {
    "rate_limit": "imgq workers do not rate-limit tasks; scale workers or their concurrency",
    "time_limit": "imgq workers take time limits from each task (time_limit=, soft_time_limit=)",
    "add_consumer": "an imgq worker serves one queue (IMGQ_QUEUE); start a worker per queue",
    "cancel_consumer": "an imgq worker serves one queue (IMGQ_QUEUE); stop the worker instead",
}


def _refusal(name: str, why: str) -> Any:
    def refuse(state: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
        return {"error": f"{name}: {why}"}

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__doc__ = f"Refused by imgq workers: {why}."
    return refuse


for _name, _why in _NOT_HERE.items():
    _meta = Panel.meta[_name]
    Panel.register(
        _refusal(_name, _why), name=_name, type=_meta.type, signature=_meta.signature,
        args=_meta.args, variadic=_meta.variadic,
    )  # fmt: skip


def load_revoked(client: redis.Redis) -> int:
    """Add the revokes of the last ``REVOKE_EXPIRES`` seconds (Celery's, 3 h) to this worker's
    revoked set; returns how many. Called at start."""
    now = time.time()
    client.zremrangebyscore(REVOKED_KEY, "-inf", now - worker_state.REVOKE_EXPIRES)
    ids: list[bytes] = client.zrange(REVOKED_KEY, 0, -1)  # type: ignore[assignment]
    for task_id in ids:
        worker_state.revoked.add(task_id.decode("utf-8", "replace"))
    return len(ids)


@control_command(
    variadic="task_id",
    signature="[id1 [id2 [... [idN]]]]",
)
def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
           **kwargs: Any) -> dict[str, str]:  # fmt: skip
    """Revoke tasks by id: not computed when taken; with ``terminate``, a task of a batch in
    hand is answered REVOKED instead of its result.

    Celery's own command (5.7) also stores REVOKED at once for a task no worker holds. imgq does
    not: the worker that takes the task stores it, with what Celery's worker does for a revoked
    task (a chord part returned, task events), and a task already running elsewhere keeps its
    result, as documented. The ids are kept in :data:`REVOKED_KEY` for workers started later.
    """
    ids = [i for i in maybe_list(task_id) or [] if isinstance(i, str) and 0 < len(i) <= 512]
    worker_state.revoked.update(ids)
    terminated = []
    if terminate:
        for held in (worker_state.requests.get(i) for i in ids):
            if isinstance(held, HeldTask):
                held.terminate(None, signal)
                terminated.append(held.id)
    service = getattr(state.app, "imgq_service", None)
    if service is not None and ids:
        try:
            pipe = service.redis.pipeline(transaction=False)
            pipe.zadd(REVOKED_KEY, dict.fromkeys(ids, time.time()))
            pipe.zremrangebyrank(REVOKED_KEY, 0, -worker_state.REVOKES_MAX - 1)
            pipe.expire(REVOKED_KEY, int(worker_state.REVOKE_EXPIRES))
            pipe.execute()
        except redis.RedisError as exc:
            logger.warning("revoke of %d tasks not kept in Redis (broadcast only): %s",
                           len(ids), exc)  # fmt: skip
    if terminate:
        return {"ok": f"terminate: {', '.join(terminated)}" if terminated
                else "terminate: tasks unknown"}  # fmt: skip
    return {"ok": f"tasks {set(ids)} flagged as revoked"}
