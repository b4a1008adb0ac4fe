"""Real `imgq worker` processes for integration tests, and waiting on their stored results.

Shared by the tests that start workers (``test_worker.py``, ``test_hostile.py``,
``test_faults.py``): a worker is a child process running ``python -m imgq.cli worker`` on a
private redis-server, with its log in a file the test can show when something goes wrong.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from imgq.worker.wire import TASK_NAME

__all__ = ["LEASE_TTL_S", "RESTORE_INTERVAL_S", "REDELIVERY_BOUND_S", "Published", "Worker",
           "Workers", "freeze_holding_messages", "lanes_of", "redelivery_s", "send_many",
           "wait_all"]  # fmt: skip

#: Short lease settings so that tests see redelivery within seconds.
LEASE_TTL_S = 2.0
RESTORE_INTERVAL_S = 0.5
#: Documented bound on redelivery after a SIGKILL (worker/intake.py).
REDELIVERY_BOUND_S = LEASE_TTL_S + RESTORE_INTERVAL_S


class Worker:
    """An `imgq worker` child process; its output goes to a file the test can read.

    Args:
        name: Node name before the ``@``.
        bundle: Model bundle folder.
        broker_url: Redis URL (broker and result backend).
        log_dir: Where the log file goes.
        **env: ``IMGQ_*`` variables; they override the test defaults (no metrics port, no drift,
            the short lease above).
    """

    def __init__(self, name: str, bundle: Path, broker_url: str, log_dir: Path, **env: str):
        self.name = f"{name}@{os.uname().nodename}"
        self.log = log_dir / f"{name}.log"
        environ = dict(os.environ)
        environ.update(
            IMGQ_BROKER_URL=broker_url,
            IMGQ_METRICS_PORT="0",
            IMGQ_DRIFT="0",
            IMGQ_LEASE_TTL_S=str(LEASE_TTL_S),
            IMGQ_RESTORE_INTERVAL_S=str(RESTORE_INTERVAL_S),
        )
        environ.update(env)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "imgq.cli", "worker", "--model", str(bundle),
                 "--hostname", self.name, "--device", "cpu"],
                env=environ, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self, app: Celery, timeout_s: float = 60.0) -> None:
        """Until the worker answers a Celery ping (it has loaded and checked its model)."""
        deadline = time.monotonic() + timeout_s
        while not app.control.ping(destination=[self.name], timeout=0.5):
            assert self.process.poll() is None, f"worker exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "worker did not answer a ping in time"

    def stop(self, timeout_s: float = 30.0) -> int:
        """Warm shutdown (SIGTERM); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def freeze(self) -> None:
        """SIGSTOP, and wait until every thread has stopped: ``kill`` returns before the signal
        takes effect, and a thread still running on the other core could send one more command
        (an ack seen landing 10 ms after the freeze)."""
        os.kill(self.process.pid, signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        deadline = time.monotonic() + 5.0
        while True:
            states = []
            for task in tasks.iterdir():
                try:
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
                except (OSError, IndexError):
                    continue  # a thread that just ended
            if all(state in "tT" for state in states):
                return
            assert time.monotonic() < deadline, f"worker {self.name} did not stop: {states}"
            time.sleep(0.0005)

    def kill(self) -> None:
        """SIGKILL, and reap the process."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Workers:
    """Starts workers on one bundle and Redis; :meth:`kill_all` ends every one (for fixtures)."""

    def __init__(self, bundle: Path, broker_url: str, log_dir: Path) -> None:
        self.bundle, self.broker_url, self.log_dir = bundle, broker_url, log_dir
        self.started: list[Worker] = []

    def start(self, name: str, bundle: Path | None = None, **env: str) -> Worker:
        """Start one worker (see :class:`Worker` for ``env``)."""
        w = Worker(name, bundle or self.bundle, self.broker_url, self.log_dir, **env)
        self.started.append(w)
        return w

    def kill_all(self) -> None:
        for w in self.started:
            w.kill()


def send_many(app: Celery, images: Sequence[str], queue: str = "imgq") -> list[Any]:
    """``send_task`` one ``imgq.classify`` per base64 image, on one producer."""
    with app.producer_or_acquire() as producer:
        return [
            app.send_task(TASK_NAME, kwargs={"image": img}, queue=queue, producer=producer)
            for img in images
        ]


def wait_all(
    app: Celery, ids: Sequence[str], timeout_s: float, watch: Sequence[Worker] = ()
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
            assert w.process.poll() is None, f"{w.name} exited: {w.log.read_text()[-3000:]}"
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


def lanes_of(r: redis.Redis, worker: Worker) -> list[bytes]:
    """The worker's registered in-flight lists (one per batch in hand)."""
    prefix = f"imgq:inflight:{worker.name}:".encode()
    return [k for k in r.hkeys("imgq:lanes") if k.startswith(prefix)]


def freeze_holding_messages(r: redis.Redis, worker: Worker, timeout_s: float = 60.0) -> int:
    """SIGSTOP the worker at a moment when it holds unacknowledged messages; how many. Call it
    with the worker stopped (:meth:`Worker.freeze`) and its work queued: it lets the worker run
    only until it has taken some, so the test does not depend on how fast the machine drains."""
    deadline = time.monotonic() + timeout_s
    while True:
        os.kill(worker.process.pid, signal.SIGCONT)
        worker.freeze()
        # One round trip first: Redis serves in a later turn of its event loop any command the
        # frozen process had already sent (an ack in flight), so the count below is final.
        r.ping()
        held = sum(int(r.llen(lane)) for lane in lanes_of(r, worker))
        if held:
            return held
        assert time.monotonic() < deadline, f"{worker.name} never held a message"


def redelivery_s(r: redis.Redis, worker: Worker, since: float) -> float:
    """Seconds from ``since`` until another worker has given the worker's messages back."""
    while any(r.llen(lane) for lane in lanes_of(r, worker)):
        assert time.monotonic() - since < REDELIVERY_BOUND_S + 10, "never redelivered"
        time.sleep(0.01)
    return time.monotonic() - since
