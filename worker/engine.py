"""The batch engine: everything between a Redis list of task messages and their stored results,
for any task kind. It knows nothing of images; handlers do (``worker/handler.py``).

A :class:`BatchEngine` thread repeats one cycle:

1. take up to ``max_batch`` messages into this batch's in-flight list (its
   :class:`~imgq.worker.broker.intake.Lane`; one transaction, bounded in bytes) — and wait up to
   ``max_wait_ms`` for more only when that is set (it pays on a GPU, not on a CPU); an idle
   engine looks again after a short pause that grows with the idle time (reads only: a wait that
   wrote would be refused by a full Redis);
2. per message: parse (``worker/wire/message.py``), poison pill, refused content, expiry, an
   ``eta`` still ahead (put aside in Redis, ``worker/broker/schedule.py``), the handler of its task
   name, a revoke (``worker/celeryapp/state.py``); then each handler's requests in one ``handle``
   call, registered in Celery's worker state meanwhile, whose outcomes are checked against the
   batch contract (and overruled by ``terminate`` or a time limit the batch ran past);
3. one Redis round trip: the settle script (dead letters, tasks put aside, results stored
   first-wins, the ack, the observers' counts once; ``worker/broker/settle.py``), the observers'
   extras and one message of Celery task events; then the follow-ups of results stored new
   (callbacks, chains, chords: ``worker/celeryapp/followups.py``).

Exactly one outcome per message: a stored result, a dead letter for a message that does not
even carry a task id, or back to the head of the queue for a request its handler deferred. An
unexpected exception anywhere in a batch fails that batch's tasks (``internal_error``, kept in
the dead letters for ``imgq dlq requeue``); it never puts them back at the head of the queue and
never stops the engine. Redis errors of any kind (a lost connection, ``OOM``, ``READONLY``,
``LOADING``, ``NOPERM``) are outages: logged, backed off, retried.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import redis
from celery.exceptions import TimeLimitExceeded

from imgq.shared.errors import InvalidTask
from imgq.worker.broker.intake import Lane, LeaseLost, Oversized, Taken
from imgq.worker.broker.settle import Settler, WindowCounts, done_key, once_token
from imgq.worker.celeryapp.followups import Followups
from imgq.worker.celeryapp.state import HeldTask, is_revoked
from imgq.worker.handler import (
    Deferred,
    Failure,
    Handler,
    Observer,
    Outcome,
    Request,
    check_outcomes,
)
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.outcome import EXPIRED, REVOKED, TERMINATED, BatchOutcome, Revoked, Scheduled
from imgq.worker.settings import WorkerSettings
from imgq.worker.wire.events import TaskEvents
from imgq.worker.wire.message import TaskRequest, find_task_id, not_due, parse_message

__all__ = ["BatchEngine", "ResultBackend"]

logger = logging.getLogger(__name__)

_IDLE_WAIT_MIN_S = 0.0005  # first pause of an idle engine; it grows with the idle time
_NO_LEASE_WAIT_S = 0.2
# Longest back-off, and at most a quarter of the lease: an engine backing off is waiting out an
# outage, not stalled, and its lease must not lapse for it.
_MAX_BACKOFF_S = 5.0
_LOG_EVERY_S = 10.0  # an outage or a bug that repeats every batch is logged this often


class ResultBackend(Protocol):
    """What the engine uses of Celery's Redis result backend: its key names, and its client
    when results live in another Redis than the queue."""

    client: redis.Redis

    def get_key_for_task(self, task_id: str, key: str = "") -> bytes: ...


class BatchEngine:
    """Serves one queue: take a batch, hand it to its handlers, settle it in one round trip.

    Run :meth:`run` in a thread; :meth:`stop` makes it finish the batch in hand and return.

    Args:
        settings: The worker's settings (queue, batch size, wait, result expiry, dead letters).
        handlers: The handler of each task name this engine serves.
        redis_client: Client of the broker's Redis (queue, in-flight list, counts).
        lane: This engine's in-flight list (:class:`~imgq.worker.broker.intake.Lane`).
        backend: The Celery app's result backend: its key names are used, and its Redis client
            when results live in another Redis than the queue.
        metrics: Where to count.
        events: The worker's :class:`~imgq.worker.wire.events.TaskEvents`, or None.
        wait_ms: How long a partial batch waits for more (``max_wait_ms``, by device).
        followups: Sends callbacks, chain steps and chord parts of results stored new, or None.

    Attributes:
        last_progress_s: ``time.monotonic()`` of the last step (each message, each item a
            handler serves, each retry); the lease is renewed only while it keeps moving, so a
            stalled engine loses its lease and its messages, and a slow but working batch keeps
            them.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        handlers: Mapping[str, Handler],
        redis_client: redis.Redis,
        lane: Lane,
        backend: ResultBackend,
        metrics: WorkerMetrics,
        events: TaskEvents | None = None,
        wait_ms: float = 0.0,
        followups: Followups | None = None,
    ) -> None:
        self.settings = settings
        self.handlers = dict(handlers)
        self.redis = redis_client
        self.lane = lane
        self.backend = backend
        self.metrics = metrics
        self.events = events
        self.followups = followups
        observers = [o for h in self.handlers.values() for o in h.observers]
        if len(observers) > 1:
            raise ValueError(
                f"the handlers {sorted(self.handlers)} bring {len(observers)} observers; one "
                "engine counts for one: serve them in separate workers"
            )
        self.observer: Observer | None = observers[0] if observers else None
        self._wait_s = wait_ms / 1000.0
        self._idle_poll_s = settings.idle_poll_ms / 1000.0
        self._max_backoff_s = min(_MAX_BACKOFF_S, settings.lease_ttl_s / 4)
        same_redis = settings.results_in_broker
        self._results_redis: redis.Redis = redis_client if same_redis else backend.client
        dead_letters = (settings.dead_letter_ttl_s, settings.dead_letter_max_entries,
                        settings.dead_letter_max_bytes)  # fmt: skip
        add_window = self.observer.lua_add_window if self.observer is not None else None
        self.settler = Settler(redis_client, self._results_redis, settings.queue_list,
                               lane.intake.worker_id, settings.result_expires_s, dead_letters,
                               add_window, wait_replicas=settings.wait_replicas,
                               wait_timeout_ms=settings.wait_timeout_ms,
                               on_shortfall=metrics.wait_shortfalls.inc)  # fmt: skip
        self._stop = threading.Event()
        #: The batch in hand's tasks in Celery's worker state (``inspect active``, ``revoke``).
        self.held: dict[int, HeldTask] = {}
        self.hostname = lane.intake.worker_id.rsplit(":", 2)[0]
        self._logged_s: dict[str, float] = {}
        self._last_busy_s = time.monotonic()
        self.last_progress_s = time.monotonic()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand is stored."""
        self._stop.set()

    def tick(self) -> None:
        """Progress: the batch in hand is moving (handlers call it per item)."""
        self.last_progress_s = time.monotonic()

    def run(self) -> None:
        """Serve until :meth:`stop`. Nothing a message or Redis does ends this loop."""
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff_s = 0.1
                continue
            except LeaseLost:
                self._stop.wait(_NO_LEASE_WAIT_S)
                continue
            except redis.RedisError as exc:
                self._log_rarely("redis", "Redis refused or unreachable, retrying in %.1f s: %s",
                                 backoff_s, exc)  # fmt: skip
            except Exception:  # a bug outside any batch: keep serving, say so
                self._log_rarely("bug", "batch engine step failed", exc_info=True)
            self._stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, self._max_backoff_s)
            self.tick()

    def run_once(self) -> int:
        """One cycle: take a batch (or pause briefly when there is none), serve it, settle it.

        Returns:
            How many messages were taken.
        """
        self.last_progress_s = now = time.monotonic()
        taken = self.lane.take(self.settings.max_batch)
        if not taken.messages and not taken.oversized:
            idle_s = now - self._last_busy_s
            self._stop.wait(min(self._idle_poll_s, max(_IDLE_WAIT_MIN_S, idle_s / 8)))
            return 0
        self._last_busy_s = now
        if self._wait_s > 0:
            self._fill(taken)
        try:
            outcome = self.serve_safely(taken)
            self._store(outcome)
        finally:
            self._release_held()
        return len(taken.messages) + len(taken.oversized)

    def _fill(self, taken: Taken) -> None:
        """Take more for up to ``max_wait_ms`` while the batch is not full. A Redis problem here
        ends the wait: the messages in hand are served."""
        deadline = time.monotonic() + self._wait_s
        try:
            while len(taken) < self.settings.max_batch:
                more = self.lane.take(self.settings.max_batch - len(taken))
                taken.extend(more)
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return
                if not more.messages:
                    self._stop.wait(min(_IDLE_WAIT_MIN_S, remaining_s))
        except (LeaseLost, redis.RedisError):
            return

    def serve_safely(self, taken: Taken) -> BatchOutcome:
        """:meth:`serve`, or, if it raises (a bug), every task of the batch failed with
        ``internal_error`` and kept in the dead letters for a requeue once fixed."""
        try:
            return self.serve(taken)
        except Exception as exc:
            self._log_rarely("bug", "serving a batch of %d failed; failing its tasks",
                             len(taken.messages), exc_info=True)  # fmt: skip
            return self._fail_all(taken, exc)

    def serve(self, taken: Taken) -> BatchOutcome:
        """Everything between taking messages and storing results; no Redis, no logging per
        message.

        Returns:
            One result or one dead letter per message, and what goes back to the queue.
        """
        self._release_held()
        out = BatchOutcome(time.time())
        raws = taken.messages
        # Per message, in lane order: its engine-level outcome now, or its handler's later.
        decided: list[Outcome | Revoked | Scheduled | None] = [None] * len(raws)
        parsed: list[TaskRequest | None] = [None] * len(raws)
        dead: list[tuple[int, InvalidTask, str]] = []  # (message, why, task id)
        by_handler: dict[str, list[tuple[int, Request]]] = collections.defaultdict(list)
        for i, raw in enumerate(raws):
            self.tick()
            try:
                req = parse_message(raw, self.settings.queue)
            except InvalidTask as exc:
                dead.append((i, exc, ""))
                continue
            parsed[i] = req
            queue_ms = None
            if req.sent_at is not None:
                wait_s = max(0.0, out.picked_at - req.sent_at)
                self.metrics.queue_wait.observe(wait_s)
                queue_ms = round(wait_s * 1000, 3)
            if taken.poisoned[i]:
                poison = self._poison()
                dead.append((i, poison, req.task_id))
                decided[i] = Failure(poison)
            elif req.error is not None:
                decided[i] = Failure(req.error)
            elif req.expires is not None and req.expires < out.picked_at:
                decided[i] = EXPIRED
            elif not_due(req, out.picked_at):
                decided[i] = Scheduled(req.eta or 0.0)
            elif req.task_name not in self.handlers:
                decided[i] = Failure(self._no_handler(req.task_name))
            elif is_revoked(req):
                decided[i] = REVOKED
            else:
                by_handler[req.task_name].append((i, Request(req.task_id, req.kwargs, queue_ms)))
                self.held[i] = HeldTask(req, self.hostname, self.backend)
                self.held[i].reserve()
        for name, items in by_handler.items():
            requests = [r for _, r in items]
            for i, _ in items:
                self.held[i].accept()
            started = time.monotonic()
            outcomes = self.handlers[name].handle(requests, self.tick)
            check_outcomes(requests, outcomes)
            elapsed_s = time.monotonic() - started
            for (i, _), outcome in zip(items, outcomes, strict=True):
                decided[i] = self._overruled(self.held[i], outcome, elapsed_s)
        deferred = [i for i, o in enumerate(decided) if isinstance(o, Deferred)]
        cut = deferred[0] if deferred else len(raws)
        out.give_back = len(raws) - cut
        for i, why, task_id in dead:
            if i < cut:
                out.dead_letter(raws[i], why, task_id)
        for i in range(cut):
            request = parsed[i]
            if request is not None:  # else dead-lettered
                out.record(request, decided[i])
        done = len(out.records) + len(out.scheduled) + out.give_back
        done += sum(1 for d in out.dead if not d.task_id)
        if done != len(raws):
            raise RuntimeError(
                f"batch contract broken: {len(raws)} messages taken but {done} outcomes made"
            )
        for big in taken.oversized:
            self._too_large(out, big)
        return out

    def _release_held(self) -> None:
        """The batch in hand is answered (or was never served): out of Celery's worker state."""
        for held in self.held.values():
            held.ready()
        self.held.clear()

    @staticmethod
    def _overruled(held: HeldTask, outcome: Outcome, elapsed_s: float) -> Outcome | Revoked:
        """A handler's outcome, unless ``revoke(terminate=True)`` reached the task meanwhile,
        or its batch ran past the task's time limit (Celery would have killed it)."""
        req = held.req
        if isinstance(outcome, Deferred):
            return outcome
        if held.terminated:
            return TERMINATED
        if req.time_limit is not None and elapsed_s > req.time_limit:
            return Failure(
                TimeLimitExceeded(
                    f"time limit {req.time_limit:g} s: the batch took {elapsed_s:.3g} s"
                )
            )
        return outcome

    def _no_handler(self, task_name: str) -> InvalidTask:
        served = ", ".join(sorted(self.handlers))
        return InvalidTask(
            "unknown_task",
            f"queue {self.settings.queue!r} serves {served}, not {task_name!r}: send it to a "
            "queue whose workers serve it",
        )

    def _poison(self) -> InvalidTask:
        """A poison pill's error (its message goes to the dead letters too)."""
        return InvalidTask(
            "redelivered_too_often",
            f"handed out {self.settings.max_deliveries} times (IMGQ_MAX_DELIVERIES) and never "
            "answered: every worker that took it died or hung. Kept in the dead letters; "
            "`imgq dlq requeue ID` sends it again",
        )

    def _too_large(self, out: BatchOutcome, big: Oversized) -> None:
        """A message Redis dead-lettered for its size: answer its task if its id can be read
        from the fragments Redis returned (kombu writes the headers after the body)."""
        task_id = find_task_id(big.tail) or find_task_id(big.head)
        exc = InvalidTask(
            "message_too_large",
            f"the message of {big.length} bytes is over the {self.settings.max_message_bytes} "
            f"a valid task can have (images up to {self.settings.decode_limits.max_bytes} "
            "bytes, IMGQ_MAX_BYTES); it was not read and is listed by `imgq dlq list`",
        )
        if task_id is None:
            out.counts["dead_letter", exc.reason] += 1
            return
        out.fail(TaskRequest(task_id, "", {}, None, None, None, self.settings.queue, b""), exc)

    def _fail_all(self, taken: Taken, cause: Exception) -> BatchOutcome:
        """The outcome of a batch whose serving raised: every task fails with
        ``internal_error``; each message is kept in the dead letters."""
        out = BatchOutcome(time.time())
        out.counts["dead_letter", "message_too_large"] += len(taken.oversized)
        exc = InvalidTask("internal_error", f"{type(cause).__name__}: {cause}"[:300])
        for raw in taken.messages:
            try:
                req = parse_message(raw, self.settings.queue)
            except Exception:
                out.dead_letter(raw, InvalidTask("malformed_message", exc.detail))
                continue
            out.fail(req, exc)
            out.dead_letter(raw, exc, req.task_id)
        return out

    # -- settling ---------------------------------------------------------------------------

    def _store(self, out: BatchOutcome) -> None:
        """Settle the batch, retrying through Redis outages: until the ack is written the
        messages stay in the in-flight list, so a worker that dies meanwhile loses nothing."""
        backoff_s = 0.1
        while True:
            try:
                self._store_once(out)
                break
            except redis.RedisError as exc:
                if self._stop.is_set():
                    logger.warning(
                        "stopping with %d results unstored; their messages stay in flight and "
                        "are given back", len(out.records),
                    )  # fmt: skip
                    return
                self._log_rarely("redis", "storing results failed, retrying in %.1f s: %s",
                                 backoff_s, exc)  # fmt: skip
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self._max_backoff_s)
                self.tick()
        for (outcome, reason), count in out.counts.items():
            self.metrics.tasks.labels(outcome, reason).inc(count)
        if out.dead:
            reasons = collections.Counter(d.reason for d in out.dead)
            self._log_rarely("dead", "dead letters of queue %s: %s (see `imgq dlq list`)",
                             self.settings.queue, dict(reasons))  # fmt: skip

    def _store_once(self, out: BatchOutcome) -> None:
        lane = self.lane
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
        if self._results_redis is self.redis:
            pipe = self.redis.pipeline(transaction=False)
            index = self.settler.settle(
                pipe, lane, results, out.dead, windows, scheduled=out.scheduled
            )
            self._extras(pipe, out)
            reply = self.settler.reply(pipe.execute(raise_on_error=False), index)
            counts, flags = reply[: len(windows)], reply[len(windows) :]
            if windows and counts[0] == -1 and any(flags):
                windows, counts = self._count_new(out, flags, once_token(lane))
        else:
            rpipe = self._results_redis.pipeline(transaction=False)
            index = self.settler.settle(rpipe, None, results, [], [])
            flags = self.settler.reply(rpipe.execute(raise_on_error=False), index)
            pipe = self.redis.pipeline(transaction=False)
            windows = self._windows(out, flags) if any(flags) else []
            index = self.settler.settle(
                pipe, lane, [], out.dead, windows, once_token(lane), scheduled=out.scheduled
            )
            self._extras(pipe, out)
            counts = self.settler.reply(pipe.execute(raise_on_error=False), index)
        lane.settled()
        if self.followups is not None:  # once, by the worker whose results were stored new
            self.followups.after_settle(out.requests, out.records, flags)
        if any(int(c) == -2 for c in counts):
            self._log_rarely("observer", "observer counts not stored (results are)")
        counted = {w.key: int(c) for w, c in zip(windows, counts, strict=True) if int(c) >= 0}
        if counted and self.observer is not None:
            self.observer.after_settle(counted)

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

    def _log_rarely(self, topic: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        """Log ``msg`` at most every few seconds per topic (an outage fails every batch)."""
        now = time.monotonic()
        if now - self._logged_s.get(topic, -math.inf) >= _LOG_EVERY_S:
            self._logged_s[topic] = now
            logger.error(msg, *args, exc_info=exc_info)
