"""Storing a served batch: the settle round trip, retried through Redis outages, then what follows
it (the observer's counts, metrics, follow-ups).

The engine (``worker/engine.py``) hands each served batch here, on its own thread, so that this
round trip overlaps with serving the next batch. One call, :meth:`BatchStore.store`:

1. messages a handler deferred go back to the head of the queue, and a lane after a lost take
   reply gives back what it was not served (``Lane.prepare_ack``);
2. one pipeline: the settle script (``worker/broker/settle.py``: dead letters, tasks put aside
   for their ``eta``, results first-wins, the ack, the observer's counts once), the task events
   and the observer's extras, and, when asked, the reads the next take plans with;
3. when some results were there already (a redelivered batch), the counts of the new ones alone;
   then the follow-ups of results stored new (callbacks, chains, chords), metrics, and the
   observer's ``after_settle``.

While tracing is on, the batch's trace (``worker/tracing/``) starts its task spans before the
settle, so that the follow-ups continue them, and ends them with the batch's spans after it.

Until the ack is written the messages stay in the lane, so a worker that dies meanwhile loses
nothing: the lease gives them to another.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis

from imgq.worker.broker.intake import Lane
from imgq.worker.broker.settle import Settler, WindowCounts, done_key, once_token
from imgq.worker.celeryapp.followups import Followups
from imgq.worker.handler import Observer
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.outcome import BatchOutcome
from imgq.worker.settings import WorkerSettings
from imgq.worker.wire.events import TaskEvents

__all__ = ["BatchStore", "ResultBackend", "RareLog"]

logger = logging.getLogger("imgq.worker.engine")

_LOG_EVERY_S = 10.0  # an outage or a bug that repeats every batch is logged this often


class ResultBackend(Protocol):
    """What storing uses of Celery's Redis result backend: its key names, and its client when
    results live in another Redis than the queue."""

    client: redis.Redis

    def get_key_for_task(self, task_id: str, key: str = "") -> bytes: ...


class RareLog:
    """Logs a message at most every few seconds per topic: an outage or a bug fails every batch,
    and a log line per batch would bury everything else."""

    def __init__(self) -> None:
        self._logged_s: dict[str, float] = {}

    def __call__(self, topic: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._logged_s.get(topic, -math.inf) >= _LOG_EVERY_S:
            self._logged_s[topic] = now
            logger.error(msg, *args, exc_info=exc_info)


class BatchStore:
    """Settles one runner's batches (see the module docstring).

    Args:
        settings: The worker's settings.
        redis_client: Client of the broker's Redis.
        backend: The Celery app's result backend (key names; its client when results live in
            another Redis).
        settler: Runs the settle script.
        observer: Counts the batches' observations (drift), or None.
        metrics: Where to count.
        events: Task events, or None.
        followups: Sends callbacks, chain steps and chord parts, or None.
        stop: Set when the worker stops: a failing store then gives up (the messages stay in
            flight and are given back at shutdown).
        tick: Called while retrying, so the lease is kept through an outage.
        log_rarely: The runner's rate-limited error log.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        redis_client: redis.Redis,
        backend: ResultBackend,
        settler: Settler,
        observer: Observer | None,
        metrics: WorkerMetrics,
        events: TaskEvents | None,
        followups: Followups | None,
        stop: threading.Event,
        tick: Callable[[], None],
        log_rarely: RareLog,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        same_redis = settings.results_in_broker
        self.results_redis: redis.Redis = redis_client if same_redis else backend.client
        self.backend = backend
        self.settler = settler
        self.observer = observer
        self.metrics = metrics
        self.events = events
        self.followups = followups
        self._stop = stop
        self._tick = tick
        self._log_rarely = log_rarely
        self._max_backoff_s = min(5.0, settings.lease_ttl_s / 4)

    def store(self, out: BatchOutcome, lane: Lane, probe: bool = False) -> list[int] | None:
        """Settle the batch taken into ``lane``, retrying through Redis outages until it is
        stored or the worker stops.

        Args:
            out: What the batch produced.
            lane: Its lane (acked: the lane moves on to its next batch).
            probe: Also read, on the same round trip, what the lane's next take plans with.

        Returns:
            The reads of ``probe`` (for ``Lane.take``'s ``lengths``), or None.
        """
        backoff_s = 0.1
        if out.trace is not None:
            out.trace.settling(out)
        while True:
            try:
                lengths = self._store_once(out, lane, probe)
                break
            except redis.RedisError as exc:
                if self._stop.is_set():
                    logger.warning(
                        "stopping with %d results unstored; their messages stay in flight and "
                        "are given back", len(out.records),
                    )  # fmt: skip
                    return None
                self._log_rarely("redis", "storing results failed, retrying in %.1f s: %s",
                                 backoff_s, exc)  # fmt: skip
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self._max_backoff_s)
                self._tick()
        for (outcome, reason), count in out.counts.items():
            self.metrics.tasks.labels(outcome, reason).inc(count)
        if out.dead:
            reasons = collections.Counter(d.reason for d in out.dead)
            self._log_rarely("dead", "dead letters of queue %s: %s (see `imgq dlq list`)",
                             self.settings.queue, dict(reasons))  # fmt: skip
        if out.trace is not None:
            out.trace.settled(out)
        return lengths

    def _store_once(self, out: BatchOutcome, lane: Lane, probe: bool) -> list[int] | None:
        if out.give_back:
            lane.give_back_newest(out.give_back)
            out.give_back = 0  # a retry must not give back more
        lane.prepare_ack()
        results = [
            (done_key(task_id), None)  # ignore_result: a marker for once-only, no result
            if req.ignore_result
            else (self.backend.get_key_for_task(task_id), record)
            for (task_id, record), req in zip(out.records, out.requests, strict=True)
        ]
        windows = self._windows(out, None)
        if self.results_redis is self.redis:
            pipe = self.redis.pipeline(transaction=False)
            index = self.settler.settle(
                pipe, lane, results, out.dead, windows, scheduled=out.scheduled
            )
            reply, lengths = self._execute(pipe, index, out, lane if probe else None)
            counts, flags = reply[: len(windows)], reply[len(windows) :]
            if windows and counts[0] == -1 and any(flags):
                windows, counts = self._count_new(out, flags, once_token(lane))
        else:
            rpipe = self.results_redis.pipeline(transaction=False)
            index = self.settler.settle(rpipe, None, results, [], [])
            flags = self.settler.reply(rpipe.execute(raise_on_error=False), index)
            pipe = self.redis.pipeline(transaction=False)
            windows = self._windows(out, flags) if any(flags) else []
            index = self.settler.settle(
                pipe, lane, [], out.dead, windows, once_token(lane), scheduled=out.scheduled
            )
            counts, lengths = self._execute(pipe, index, out, lane if probe else None)
        lane.settled()
        if self.followups is not None:  # once, by the worker whose results were stored new
            self.followups.after_settle(out.requests, out.records, flags, out.trace)
        if any(int(c) == -2 for c in counts):
            self._log_rarely("observer", "observer counts not stored (results are)")
        counted = {w.key: int(c) for w, c in zip(windows, counts, strict=True) if int(c) >= 0}
        if counted and self.observer is not None:
            self.observer.after_settle(counted)
        return lengths

    def _execute(
        self, pipe: Any, index: int, out: BatchOutcome, probe: Lane | None
    ) -> tuple[Any, list[int] | None]:
        """Add the extras (and ``probe``'s reads) after the settle script queued at ``index``,
        send the round trip; the script's reply (raised when Redis refused it) and the reads."""
        self._extras(pipe, out)
        at = probe.probe(pipe) if probe is not None else -1
        replies = pipe.execute(raise_on_error=False)
        return self.settler.reply(replies, index), _lengths(replies, at)

    def _windows(self, out: BatchOutcome, flags: Sequence[int] | None) -> list[WindowCounts]:
        """The observer's counts of the batch (of the results ``flags`` says were new)."""
        if self.observer is None or not out.observations:
            return []
        seen = [o for i, o in out.observations if flags is None or flags[i]]
        try:
            return list(self.observer.window_counts(seen)) if seen else []
        except Exception:
            self._log_rarely("observer", "observer counts failed; the batch is stored without",
                             exc_info=True)  # fmt: skip
            return []

    def _count_new(
        self, out: BatchOutcome, flags: Sequence[int], once: tuple[str, int]
    ) -> tuple[list[WindowCounts], list[int]]:
        """Some results of the batch were there already (a redelivery): count only the new."""
        subset = self._windows(out, flags)
        if not subset:
            return [], []
        pipe = self.redis.pipeline(transaction=False)
        index = self.settler.settle(pipe, None, [], [], subset, once)
        reply = pipe.execute(raise_on_error=False)[index]
        return subset, [-2] * len(subset) if isinstance(reply, Exception) else list(reply)

    def _extras(self, pipe: Any, out: BatchOutcome) -> None:
        """After the settle script on the same round trip: the task events, observer extras."""
        if self.events is not None:
            records = (record for _, record in out.records)
            self.events.add_to_pipeline(
                pipe, out.picked_at, zip(out.requests, records, strict=True)
            )
        if self.observer is not None and out.observations:
            try:
                self.observer.extras(pipe, [o for _, o in out.observations])
            except Exception:
                self._log_rarely("observer", "observer extras failed", exc_info=True)


def _lengths(replies: Sequence[Any], at: int) -> list[int] | None:
    """The probe's replies from index ``at`` (None when there was no probe or a read failed:
    the take then reads them itself)."""
    if at < 0:
        return None
    found = list(replies[at:])
    return None if any(isinstance(r, Exception) for r in found) else [int(r) for r in found]
