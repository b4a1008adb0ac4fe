"""Real `imgq worker` processes for integration tests, and waiting on their stored results.

Shared by the tests that start workers (``test_worker.py``, ``test_hostile.py``,
``test_faults.py``): a worker is a child process running ``python -m imgq.cli worker`` on a
private redis-server, with its log in a file the test can show when something goes wrong. The
processes are :mod:`imgq.launcher`'s; this module adds the test defaults (a short lease, no
drift, no metrics port) and the helpers that watch Redis while workers run.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from imgq.launcher import WorkerFleet, WorkerProcess, worker_env
from imgq.worker.wire import TASK_NAME

__all__ = ["LEASE_TTL_S", "RESTORE_INTERVAL_S", "REDELIVERY_BOUND_S", "Published", "Worker",
           "Workers", "active_task_ids", "freeze_holding_messages", "lanes_of", "redelivery_s",
           "send_many", "wait_all", "wait_for"]  # fmt: skip

#: Short lease settings so that tests see redelivery within seconds.
LEASE_TTL_S = 2.0
RESTORE_INTERVAL_S = 0.5
#: Documented bound on redelivery after a SIGKILL (worker/broker/intake.py).
REDELIVERY_BOUND_S = LEASE_TTL_S + RESTORE_INTERVAL_S


class Worker(WorkerProcess):
    """An `imgq worker` child process (:class:`imgq.launcher.WorkerProcess`) with the test
    defaults; its output goes to ``LOG_DIR/NAME.log``, which the test can read.

    Args:
        name: Node name before the ``@``.
        bundle: Model bundle folder.
        broker_url: Redis URL (broker and result backend).
        log_dir: Where the log file goes.
        **env: ``IMGQ_*`` variables; they override the test defaults (no metrics port, no drift,
            the short lease above).
    """

    def __init__(self, name: str, bundle: Path, broker_url: str, log_dir: Path, **env: str):
        defaults = {
            "IMGQ_METRICS_PORT": "0",
            "IMGQ_DRIFT": "0",
            "IMGQ_LEASE_TTL_S": str(LEASE_TTL_S),
            "IMGQ_RESTORE_INTERVAL_S": str(RESTORE_INTERVAL_S),
        }
        super().__init__(
            f"{name}@{os.uname().nodename}",
            log_dir / f"{name}.log",
            options=["--model", str(bundle), "--device", "cpu"],
            env=worker_env(broker_url, keep_imgq=True, **{**defaults, **env}),
        )


class Workers(WorkerFleet):
    """Starts workers on one bundle and Redis; :meth:`kill_all` ends every one (for fixtures)."""

    def __init__(self, bundle: Path, broker_url: str, log_dir: Path) -> None:
        super().__init__()
        self.bundle, self.broker_url, self.log_dir = bundle, broker_url, log_dir

    @property
    def started(self) -> list[WorkerProcess]:
        """Every worker started, in order."""
        return self.workers

    def start(self, name: str, bundle: Path | None = None, **env: str) -> Worker:
        """Start one worker (see :class:`Worker` for ``env``)."""
        w = Worker(name, bundle or self.bundle, self.broker_url, self.log_dir, **env)
        self.add(w)
        return w


def send_many(app: Celery, images: Sequence[str], queue: str = "imgq") -> list[Any]:
    """``send_task`` one ``imgq.classify`` per base64 image, on one producer."""
    with app.producer_or_acquire() as producer:
        return [
            app.send_task(TASK_NAME, kwargs={"image": img}, queue=queue, producer=producer)
            for img in images
        ]


def wait_all(
    app: Celery, ids: Sequence[str], timeout_s: float, watch: Sequence[WorkerProcess] = ()
) -> dict[str, dict]:
    """Stored result records (``status``, ``result``, ...) of every id, once all are there;
    fails at once, with its log, when a worker in ``watch`` has exited meanwhile."""
    r = redis.Redis.from_url(app.conf.result_backend)
    keys = [app.backend.get_key_for_task(i) for i in ids]
    deadline = time.monotonic() + timeout_s
    while True:
        found = [v for v in r.mget(keys) if v is not None]
        if len(found) == len(keys):
            return {i: json.loads(v) for i, v in zip(ids, found, strict=True)}
        for w in watch:
            assert w.running(), f"{w.name} exited: {w.log_tail()}"
        missing = len(keys) - len(found)
        assert time.monotonic() < deadline, f"{missing} of {len(ids)} results missing"
        time.sleep(0.05)


class Published:
    """Every result record the workers publish (Celery's Redis backend PUBLISHes each stored
    result on its key), so duplicates from redelivery are seen, not overwritten."""

    def __init__(self, app: Celery) -> None:
        self.by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        prefix = app.backend.task_keyprefix.decode()
        self._pubsub = redis.Redis.from_url(app.conf.result_backend).pubsub()
        self._pubsub.psubscribe(**{f"{prefix}*": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        record = json.loads(message["data"])
        self.by_task[record["task_id"]].append(record)

    def duplicates(self) -> dict[str, list[dict[str, Any]]]:
        return {t: records for t, records in list(self.by_task.items()) if len(records) > 1}

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()


def lanes_of(r: redis.Redis, worker: WorkerProcess) -> list[bytes]:
    """The worker's registered in-flight lists (one per batch in hand)."""
    prefix = f"imgq:inflight:{worker.name}:".encode()
    return [k for k in r.hkeys("imgq:lanes") if k.startswith(prefix)]


def freeze_holding_messages(r: redis.Redis, worker: WorkerProcess, timeout_s: float = 60.0) -> int:
    """SIGSTOP the worker at a moment when it holds unacknowledged messages; how many. Call it
    with the worker stopped (:meth:`Worker.freeze`) and its work queued: it lets the worker run
    only until it has taken some, so the test does not depend on how fast the machine drains."""
    deadline = time.monotonic() + timeout_s
    while True:
        worker.thaw()
        while not any(r.llen(lane) for lane in lanes_of(r, worker)):
            assert time.monotonic() < deadline, f"{worker.name} never held a message"
            time.sleep(0.001)
        worker.freeze()
        # One round trip first: Redis serves in a later turn of its event loop any command the
        # frozen process had already sent (an ack in flight), so the count below is final.
        r.ping()
        held = sum(int(r.llen(lane)) for lane in lanes_of(r, worker))
        if held:
            return held


def redelivery_s(r: redis.Redis, worker: WorkerProcess, since: float) -> float:
    """Seconds from ``since`` until another worker has given the worker's messages back."""
    while any(r.llen(lane) for lane in lanes_of(r, worker)):
        assert time.monotonic() - since < REDELIVERY_BOUND_S + 10, "never redelivered"
        time.sleep(0.01)
    return time.monotonic() - since


def wait_for(what: Callable[[], Any], timeout_s: float = 60.0) -> Any:
    """``what()`` once it is truthy (state polled, not a guess of how long it takes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout_s} s: {what}")


def active_task_ids(app: Celery) -> set[str]:
    """The ids ``inspect active`` lists, over every worker that answers within a second."""
    replies = app.control.inspect(timeout=1.0).active() or {}
    return {task["id"] for tasks in replies.values() for task in tasks}
