"""The batch engine: everything between a Redis list of task messages and their stored results,
for any task kind. It knows nothing of images; handlers do (``worker/handler.py``).

A :class:`BatchEngine` thread repeats one cycle:

1. take up to ``max_batch`` messages into this batch's in-flight list (its
   :class:`~imgq.worker.broker.intake.Lane`; one transaction, bounded in bytes) — and wait up to
   ``max_wait_ms`` for more only when that is set (it pays on a GPU, not on a CPU); an idle
   engine looks again after a short pause that grows with the idle time (reads only: a wait that
   wrote would be refused by a full Redis);
2. per message: parse (``worker/wire/message.py``), poison pill, refused content, expiry, an
   ``eta`` still ahead (put aside in Redis, ``worker/broker/schedule.py``), the handler of its
   task name, a revoke (``worker/celeryapp/state.py``); then each handler's requests in one
   ``handle`` call, registered in Celery's worker state meanwhile, whose outcomes are checked
   against the batch contract (and overruled by ``terminate`` or a time limit the batch ran past);
3. one Redis round trip stores it (``worker/storing.py``: the settle script, task events, the
   observer's extras), then the follow-ups of results stored new.

Redis is not waited for while there is work in hand: the round trips run in order on the
runner's own thread (``worker/roundtrips.py``) and overlap with serving. While a batch is
served the next one is taken into a second lane (its own in-flight list, under the same lease,
delivery counting and redelivery as any), just in time for the end of the batch in hand
(``Pace``); so a runner waits on Redis only when the queue was empty. A stopping engine takes
nothing more, gives the batch it took ahead back to the head of the queue at once (not counted
as a delivery), finishes and stores the batch in hand, and returns.

Exactly one outcome per message: a stored result, a dead letter for a message that does not
even carry a task id, or back to the head of the queue for a request its handler deferred. An
unexpected exception anywhere in a batch fails that batch's tasks (``internal_error``, kept in
the dead letters for ``imgq dlq requeue``); it never puts them back at the head of the queue and
never stops the engine. Redis errors of any kind (a lost connection, ``OOM``, ``READONLY``,
``LOADING``, ``NOPERM``) are outages: logged, backed off, retried.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING

import redis

from imgq.shared.errors import InvalidTask
from imgq.worker.broker.intake import Lane, LeaseLost, Oversized, Taken
from imgq.worker.broker.settle import Settler
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
from imgq.worker.outcome import (
    EXPIRED,
    REVOKED,
    BatchOutcome,
    Revoked,
    Scheduled,
    fail_all,
    overruled,
    poison_pill,
    too_large,
    unknown_task,
)
from imgq.worker.roundtrips import Pace, RoundTrips
from imgq.worker.settings import WorkerSettings
from imgq.worker.storing import BatchStore, RareLog, ResultBackend
from imgq.worker.wire.events import TaskEvents
from imgq.worker.wire.message import TaskRequest, find_task_id, not_due, parse_message

if TYPE_CHECKING:
    from imgq.worker.tracing.spans import BatchTracer

__all__ = ["BatchEngine", "ResultBackend"]

logger = logging.getLogger(__name__)

_IDLE_WAIT_MIN_S = 0.0005  # first pause of an idle engine; it grows with the idle time
_NO_LEASE_WAIT_S = 0.2
# Longest back-off, and at most a quarter of the lease: an engine backing off is waiting out an
# outage, not stalled, and its lease must not lapse for it.
_MAX_BACKOFF_S = 5.0


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
        tracing: The worker's tracer (``worker/tracing/``), or None when tracing is off.

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
        tracing: BatchTracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing
        self.handlers = dict(handlers)
        self.redis = redis_client
        self.lane = lane
        self.backend = backend
        self.metrics = metrics
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
        dead_letters = (settings.dead_letter_ttl_s, settings.dead_letter_max_entries,
                        settings.dead_letter_max_bytes)  # fmt: skip
        add_window = self.observer.lua_add_window if self.observer is not None else None
        self.settler = Settler(redis_client, redis_client if same_redis else backend.client,
                               settings.queue_list, lane.intake.worker_id,
                               settings.result_expires_s, dead_letters, add_window,
                               wait_replicas=settings.wait_replicas,
                               wait_timeout_ms=settings.wait_timeout_ms,
                               on_shortfall=metrics.wait_shortfalls.inc)  # fmt: skip
        self._stop = threading.Event()
        self._log_rarely = RareLog()
        self.store = BatchStore(settings, redis_client, backend, self.settler, self.observer,
                                metrics, events, followups, self._stop, self.tick,
                                self._log_rarely)  # fmt: skip
        #: The batch in hand's tasks in Celery's worker state (``inspect active``, ``revoke``).
        self.held: dict[int, HeldTask] = {}
        self.hostname = lane.intake.worker_id.rsplit(":", 2)[0]
        self._last_busy_s = time.monotonic()
        self.last_progress_s = time.monotonic()
        # Lanes with nothing in them and no take on the way, and lanes whose take (or settle
        # and take) is on its way, oldest first. With prefetch a runner has two.
        self._prefetch = settings.prefetch
        self._free = [lane.twin(), lane] if self._prefetch else [lane]
        self._coming: collections.deque[tuple[Lane, Future[Taken]]] = collections.deque()
        # Batches taken ahead and not yet claimed by the cycle; at stop, those that can go back
        # go back at once. Guarded by _handover: a batch is either claimed or given back.
        self._ahead: dict[Lane, Taken] = {}
        self._handover = threading.Lock()
        self._io = RoundTrips(f"imgq-redis-{lane.index}")
        self._pace = Pace()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand is stored; the batch taken ahead
        goes back to the head of the queue now (not counted as a delivery)."""
        self._stop.set()
        self._pace.wake()
        self._io.submit(self._give_back_ahead)

    def tick(self) -> None:
        """Progress: the batch in hand is moving (handlers call it per item)."""
        self.last_progress_s = time.monotonic()

    def run(self) -> None:
        """Serve until :meth:`stop`. Nothing a message or Redis does ends this loop."""
        backoff_s = 0.1
        try:
            while not self._stop.is_set():
                try:
                    self._cycle(self._prefetch)
                    backoff_s = 0.1
                    continue
                except LeaseLost:
                    self._stop.wait(_NO_LEASE_WAIT_S)
                    continue
                except redis.RedisError as exc:
                    self._log_rarely("redis", "Redis refused or unreachable, retrying in %.1f s: "
                                     "%s", backoff_s, exc)  # fmt: skip
                except Exception:  # a bug outside any batch: keep serving, say so
                    self._log_rarely("bug", "batch engine step failed", exc_info=True)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, self._max_backoff_s)
                self.tick()
        finally:
            self._finish()

    def run_once(self) -> int:
        """One cycle without taking ahead: take a batch (or pause briefly when there is none),
        serve it, and store it before returning (a test's or a benchmark's step).

        Returns:
            How many messages were taken.
        """
        return self._cycle(prefetch=False)

    def _cycle(self, prefetch: bool) -> int:
        """Take (or receive the batch taken ahead), serve, and hand the batch to the round-trip
        thread to store; with ``prefetch``, the next batch is on its way meanwhile and the
        store takes the one after it."""
        self.last_progress_s = now = time.monotonic()
        lane, taken = self._next_batch()
        if not taken.messages and not taken.oversized:
            self._free.append(lane)
            self._pace.serving(0)
            idle_s = now - self._last_busy_s
            self._stop.wait(min(self._idle_poll_s, max(_IDLE_WAIT_MIN_S, idle_s / 8)))
            return 0
        self._last_busy_s = now
        if self._wait_s > 0:
            self._fill(lane, taken)
        ordinal = self._pace.serving(len(taken.messages))
        if prefetch and self._free and not self._stop.is_set():
            ahead = self._free.pop()
            self._coming.append(
                (ahead, self._io.submit(self._take_ahead, ahead, None, ordinal - 1))
            )
        started = time.monotonic()
        try:
            outcome = self._serve_traced(lane, taken)
        finally:
            self._release_held()
        self._pace.served(len(taken.messages), time.monotonic() - started)
        take_after = prefetch and not self._stop.is_set()
        stored = self._io.submit(self._store_and_take, lane, outcome, taken, take_after, ordinal)
        if take_after:
            self._coming.append((lane, stored))
        else:
            try:
                stored.result()
            finally:
                self._reuse(lane)
        return len(taken.messages) + len(taken.oversized)

    def _next_batch(self) -> tuple[Lane, Taken]:
        """The batch whose take was started first, or, when none is on its way, one taken now.
        A batch taken ahead that a stop gave back meanwhile comes as an empty one."""
        if not self._coming:
            lane = self._free.pop()
            try:
                return lane, self._take(lane)
            except BaseException:
                self._reuse(lane)
                raise
        lane, future = self._coming.popleft()
        try:
            taken = future.result()
        except BaseException:
            self._reuse(lane)
            raise
        with self._handover:
            if self._ahead.pop(lane, None) is None:
                return lane, Taken()  # none taken, or given back by stop()
            if self._stop.is_set() and self._give_back(lane, taken):
                return lane, Taken()
        return lane, taken

    def _reuse(self, lane: Lane) -> None:
        """A lane back among the free ones after a failure; one whose batch was not acked (its
        store failed) is left as it is, registered with its messages, given back at release or
        by the lease, and a new lane of the runner takes its place: a take into it would have
        its ack delete them unanswered."""
        self._free.append(lane if not lane.held else lane.twin())

    def _take(self, lane: Lane, lengths: list[int] | None = None) -> Taken:
        started_ns = time.time_ns()
        taken = lane.take(self.settings.max_batch, lengths)
        self._pace.took((time.time_ns() - started_ns) / 1e9)
        if self.tracing is not None:
            self.tracing.took(lane, started_ns)
        return taken

    def _take_ahead(self, lane: Lane, lengths: list[int] | None, after: int) -> Taken:
        """On the round-trip thread: take the batch that follows batch ``after`` (its ordinal
        in :class:`~imgq.worker.roundtrips.Pace`), just in time for it, unless stopping."""
        if self._pace.hold(after, self._stop):
            lengths = None  # read before the wait: the take reads them again
        if self._stop.is_set():
            return Taken()
        taken = self._take(lane, lengths)
        with self._handover:
            if self._stop.is_set() and self._give_back(lane, taken):
                return Taken()
            if taken.messages or taken.oversized:
                self._ahead[lane] = taken
        return taken

    def _store_and_take(
        self, lane: Lane, outcome: BatchOutcome, taken: Taken, take_after: bool, ordinal: int
    ) -> Taken:
        """On the round-trip thread: store the batch served from ``lane`` (a bug in storing
        fails its tasks visibly, as one in serving does); then, with ``take_after``, take the
        batch that follows the next one (batch ``ordinal`` + 1) into it, planned by reads made
        on the store's round trip when it goes out at once."""
        try:
            lengths = self.store.store(outcome, lane, probe=take_after)
        except Exception as exc:
            self._log_rarely("bug", "storing a batch of %d failed; failing its tasks",
                             len(taken.messages), exc_info=True)  # fmt: skip
            failed = fail_all(taken.messages, len(taken.oversized), exc, self.settings.queue)
            failed.trace = outcome.trace
            lengths = self.store.store(failed, lane)
        return self._take_ahead(lane, lengths, ordinal) if take_after else Taken()

    def _give_back(self, lane: Lane, taken: Taken) -> bool:
        """A batch taken and not started, back to the head of the queue, not counted as a
        delivery; unless it holds what must be answered or served alone (a poison pill, a
        suspect, an oversized message's failure). Returns whether it went back."""
        if not taken.messages or taken.oversized or taken.suspect or any(taken.poisoned):
            return False
        try:
            lane.give_back_all()
        except redis.RedisError as exc:  # the lane stays registered: given back at release
            logger.warning("could not give back a batch taken ahead: %s", exc)
            return False
        return True

    def _give_back_ahead(self) -> None:
        """At stop, on the round-trip thread: every batch taken ahead and not claimed goes back."""
        with self._handover:
            for lane, taken in list(self._ahead.items()):
                if self._give_back(lane, taken):
                    del self._ahead[lane]

    def _finish(self) -> None:
        """After the loop: what was taken ahead and could not go back is served and stored;
        then every round trip has ended."""
        while self._coming:
            try:
                lane, taken = self._next_batch()
            except Exception as exc:  # its messages stay in flight, given back at release
                logger.warning("a take ahead failed while stopping: %s", exc)
                continue
            if taken.messages or taken.oversized:
                outcome = self._serve_traced(lane, taken)
                self._release_held()
                with contextlib.suppress(Exception):  # logged; given back at release
                    self._io.submit(self._store_and_take, lane, outcome, taken, False, 0).result()
            self._reuse(lane)
        self._io.close()

    def _fill(self, lane: Lane, taken: Taken) -> None:
        """Take more for up to ``max_wait_ms`` while the batch is not full. A Redis problem here
        ends the wait: the messages in hand are served."""
        deadline = time.monotonic() + self._wait_s
        try:
            while len(taken) < self.settings.max_batch:
                more = lane.take(self.settings.max_batch - len(taken))
                taken.extend(more)
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return
                if not more.messages:
                    self._stop.wait(min(_IDLE_WAIT_MIN_S, remaining_s))
        except (LeaseLost, redis.RedisError):
            return

    def _serve_traced(self, lane: Lane, taken: Taken) -> BatchOutcome:
        """:meth:`serve_safely`, and, while tracing is on, the batch's trace: its take and the
        steps its handlers report (``worker/tracing/``); the settle ends it."""
        if self.tracing is None:
            return self.serve_safely(taken)
        trace = self.tracing.batch(lane, len(taken.messages))
        with trace.serving():
            outcome = self.serve_safely(taken)
        outcome.trace = trace
        return outcome

    def serve_safely(self, taken: Taken) -> BatchOutcome:
        """:meth:`serve`, or, if it raises (a bug), every task of the batch failed with
        ``internal_error`` and kept in the dead letters for a requeue once fixed."""
        try:
            return self.serve(taken)
        except Exception as exc:
            self._log_rarely("bug", "serving a batch of %d failed; failing its tasks",
                             len(taken.messages), exc_info=True)  # fmt: skip
            return fail_all(taken.messages, len(taken.oversized), exc, self.settings.queue)

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
                poison = poison_pill(self.settings.max_deliveries)
                dead.append((i, poison, req.task_id))
                decided[i] = Failure(poison)
            elif req.error is not None:
                decided[i] = Failure(req.error)
            elif req.expires is not None and req.expires < out.picked_at:
                decided[i] = EXPIRED
            elif not_due(req, out.picked_at):
                decided[i] = Scheduled(req.eta or 0.0)
            elif req.task_name not in self.handlers:
                decided[i] = Failure(
                    unknown_task(self.settings.queue, self.handlers, req.task_name)
                )
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
                decided[i] = overruled(self.held[i], outcome, elapsed_s)
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

    def _too_large(self, out: BatchOutcome, big: Oversized) -> None:
        """A message Redis dead-lettered for its size: answer its task if its id can be read
        from the fragments Redis returned (kombu writes the headers after the body)."""
        task_id = find_task_id(big.tail) or find_task_id(big.head)
        exc = too_large(big.length, self.settings.max_message_bytes,
                        self.settings.decode_limits.max_bytes)  # fmt: skip
        if task_id is None:
            out.counts["dead_letter", exc.reason] += 1
            return
        out.fail(TaskRequest(task_id, "", {}, None, None, None, self.settings.queue, b""), exc)
