"""The Celery bootstep that serves ``imgq.classify`` in batches inside a real Celery worker.

Celery's consumer blueprint normally has a ``Tasks`` step that consumes task messages one by one
and hands each to the pool; that per-message path costs several times a small model's own work
per task (``docs/benchmarks.md``). :class:`BulkConsumer` is Celery's consumer with that one step
replaced by :class:`BulkTasks`, which

- gives Celery an empty task consumer (no queues), so the event loop, remote control
  (``inspect ping``/``stats``), heartbeats and events (Flower) keep working unchanged;
- builds the handlers of ``IMGQ_HANDLERS`` once per process when the worker is built (the
  classification handler loads and checks its model bundle: one that fails its checks stops
  the worker before it connects, with the bundle's message);
- runs ``concurrency`` :class:`~imgq.worker.engine.BatchEngine` threads and one keeper thread that
  renews the lease (only while every runner makes progress), gives back dead workers' and
  orphaned messages, records workers lost without a clean shutdown
  (``worker/broker/fleet.py``), and queues the tasks whose ``eta`` has come
  (``worker/broker/schedule.py``); the runners send the Celery task events of their batches
  under the worker's node name (``IMGQ_TASK_EVENTS``), so Flower lists the tasks as for any
  Celery worker;
- on warm shutdown (SIGTERM) stops taking, finishes the batch in hand, stores its results and
  pushes anything still unacked back to the queue.

Nothing goes to Celery's pool (the app uses the solo pool).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import threading
import time
import uuid
from typing import Any

import redis
from celery.worker.consumer import Consumer
from celery.worker.consumer.control import Control
from celery.worker.consumer.delayed_delivery import DelayedDelivery
from celery.worker.consumer.tasks import Tasks
from kombu import Consumer as KombuConsumer
from kombu.common import QoS

from imgq.worker.broker.connection import follow
from imgq.worker.broker.fleet import Fleet
from imgq.worker.broker.intake import Intake
from imgq.worker.broker.schedule import release_due
from imgq.worker.celeryapp.app import ImgqCelery
from imgq.worker.celeryapp.followups import Followups
from imgq.worker.celeryapp.misrouting import advice, misrouted
from imgq.worker.celeryapp.state import load_revoked
from imgq.worker.celeryapp.status import imgq_status  # noqa: F401 (registers the control command)
from imgq.worker.engine import BatchEngine
from imgq.worker.handler import HandlerContext, load_handler
from imgq.worker.metrics import process_metrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.tracing import start_tracing
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.events import TaskEvents

__all__ = ["BulkConsumer", "BulkControl", "BulkDelayedDelivery", "BulkService", "BulkTasks"]

logger = logging.getLogger(__name__)

#: Longest a warm shutdown waits for a runner to finish its batch.
_JOIN_TIMEOUT_S = 60.0
_STALL_LOG_EVERY_S = 60.0  # a stalled runner is logged this often, not every keeper tick
#: Redis client socket timeout; must exceed the longest blocking wait (max_wait_ms <= 5 s).
_SOCKET_TIMEOUT_S = 15.0


def _freeze_startup_objects() -> None:
    """Move everything allocated at start-up (Celery, onnxruntime, numpy, scipy: ~10^5 objects)
    out of the garbage collector's reach. Python's full collections otherwise walk all of it, a
    pause of tens of milliseconds that every task of the batch in hand waits out
    (``docs/benchmarks.md``). The objects stay alive for the process's life anyway."""
    gc.collect()
    gc.freeze()


class BulkService:
    """The model, the intake and the threads of one worker process.

    Args:
        app: The worker's Celery app (settings, result backend).
        hostname: The Celery node name, part of the worker id.

    Raises:
        ImgqError: tracing is asked for without OpenTelemetry installed, or a handler cannot
            be built (the classification handler: no model folder given, or the bundle fails
            its checks).
    """

    def __init__(self, app: ImgqCelery, hostname: str) -> None:
        settings: WorkerSettings = app.settings
        self.settings = settings
        app.imgq_service = self  # for `imgq worker`'s exit status
        self.worker_id = f"{hostname}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.redis = settings.broker_client(
            socket_timeout=_SOCKET_TIMEOUT_S, health_check_interval=30
        )
        if not settings.results_in_broker:  # the engine stores results with Celery's client
            follow(app.backend.client)
        self.metrics = process_metrics()
        #: The process's tracer while OTEL_TRACES_EXPORTER names an exporter (worker/tracing/).
        self.tracing = start_tracing(settings, hostname)
        context = HandlerContext(settings, app, self.redis, self.metrics)
        self.handlers = {}
        for name in settings.handlers:
            handler = load_handler(name, context)
            self.handlers[handler.task_name] = handler
        self.intake = Intake(
            self.redis,
            settings.queue_list,
            self.worker_id,
            settings.lease_ttl_s,
            runners=settings.concurrency,
            max_message_bytes=settings.max_message_bytes,
            max_deliveries=settings.max_deliveries,
            dead_letters=(settings.dead_letter_ttl_s, settings.dead_letter_max_entries,
                          settings.dead_letter_max_bytes),
            result_key_prefix=(
                app.backend.task_keyprefix.decode()
                if settings.results_in_broker else ""
            ),
            lists=settings.queue_lists.names(settings.queue),
        )  # fmt: skip
        self.fleet = Fleet(self.redis, grace_s=settings.lease_ttl_s)
        events = None
        if settings.task_events:
            broker_db = int(self.redis.connection_pool.connection_kwargs.get("db", 0))
            events = TaskEvents(app, hostname, broker_db)
        providers = {getattr(h, "provider", "CPUExecutionProvider") for h in self.handlers.values()}
        wait_ms = max(settings.wait_ms_for(p) for p in providers)
        followups = Followups(app, self.metrics)  # callbacks, chains, chords (sent on demand)
        self.runners = [
            BatchEngine(
                settings,
                self.handlers,
                self.redis,
                lane,
                app.backend,
                self.metrics,
                events,
                wait_ms,
                followups,
                self.tracing,
            )  # fmt: skip
            for lane in self.intake.lanes
        ]
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        #: Set when a thread died of a bug: the worker shuts down and exits non-zero.
        self.fault: str | None = None

    def start(self) -> None:
        """Take the lease and start the threads; idempotent (Celery restarts steps on
        reconnect, the threads keep running across it)."""
        if self._threads:
            return
        _freeze_startup_objects()
        self.intake.renew_lease()
        try:
            load_revoked(self.redis)
        except redis.RedisError as exc:
            logger.warning("could not read earlier revokes (broadcasts still arrive): %s", exc)
        self._threads = [
            threading.Thread(target=self._guard, args=(r.run,), name=f"imgq-batch-{i}", daemon=True)
            for i, r in enumerate(self.runners)
        ]
        self._threads.append(
            threading.Thread(
                target=self._guard, args=(self._keep,), name="imgq-keeper", daemon=True
            )
        )
        for t in self._threads:
            t.start()
        self._warn_misrouted()
        logger.info(
            "serving",
            extra={"queue": self.settings.queue, "worker_id": self.worker_id,
                   "concurrency": self.settings.concurrency, "max_batch": self.settings.max_batch},
        )  # fmt: skip

    def _warn_misrouted(self) -> None:
        """Log imgq tasks waiting in Celery's default queue, which this worker does not serve."""
        try:
            found = misrouted(
                self.intake.redis,
                sorted(self.handlers),
                self.settings.queue,
                lists=self.settings.queue_lists,
            )
        except redis.RedisError as exc:
            logger.debug("could not look for misrouted tasks: %s", exc)
            return
        for queue, count in found.items():
            logger.warning(
                advice(queue, count, self.settings.queue, "/".join(sorted(self.handlers))),
                extra={"event": "misrouted_tasks", "queue": queue, "count": count},
            )

    def stop(self) -> None:
        """Warm shutdown: runners finish the batch in hand, unacked messages go back to the queue.
        Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        for r in self.runners:
            r.stop()
        for t in self._threads:
            t.join(_JOIN_TIMEOUT_S)
        try:
            released = self.intake.release()
        except redis.RedisError as exc:
            logger.warning("could not give back in-flight messages (the lease will): %s", exc)
        else:
            logger.info("stopped", extra={"released": released, "worker_id": self.worker_id})
        for handler in self.handlers.values():
            handler.close()
        if self.tracing is not None:
            self.tracing.close()  # exports the spans still buffered

    def info(self) -> dict[str, Any]:
        """For ``celery inspect stats``: what this worker serves."""
        info: dict[str, Any] = {
            "worker_id": self.worker_id,
            "queue": self.settings.queue,
            "tasks": sorted(self.handlers),
            "max_batch": self.settings.max_batch,
            "concurrency": self.settings.concurrency,
            # Over lease_ttl_s: a runner is stuck (its lease is no longer renewed).
            "since_progress_s": round(
                max(time.monotonic() - r.last_progress_s for r in self.runners), 1
            ),
        }
        classify = self.handlers.get(TASK_NAME)
        bundle = getattr(classify, "bundle", None)
        if bundle is not None:
            m = bundle.manifest
            info |= {"model": m.name, "sha256": m.model_sha256, "provider": bundle.provider}
        return info

    def _keep(self) -> None:
        """Renew the lease while every runner makes progress; restore dead workers' messages
        and this worker's stale lanes. Redis errors of any kind are retried at the next tick."""
        settings = self.settings
        tick_s = min(settings.lease_ttl_s / 3, settings.restore_interval_s)
        next_restore = 0.0
        failing_since: float | None = None
        stall_logged = -math.inf  # a stall is logged when it starts, then once a minute
        while not self._stop.wait(tick_s):
            now = time.monotonic()
            stalled_s = max(now - r.last_progress_s for r in self.runners)
            try:
                if stalled_s < settings.lease_ttl_s:
                    self.intake.renew_lease()
                    stall_logged = -math.inf
                elif now - stall_logged >= _STALL_LOG_EVERY_S:
                    stall_logged = now
                    logger.error(
                        "a batch runner made no progress for %.1f s; not renewing the lease, so "
                        "other workers will take over its messages", stalled_s,
                    )  # fmt: skip
                release_due(self.redis, settings.queue_list, time.time())
                if now >= next_restore:
                    next_restore = now + settings.restore_interval_s
                    moved, stale = self.intake.restore_dead()
                    if moved:
                        logger.warning("redelivered %d messages of dead workers", moved)
                    if stale:
                        logger.warning(
                            "gave back %d messages of batches this worker had acked: Redis came "
                            "back with older data", stale,
                        )  # fmt: skip
                    self._sweep_fleet()
                if failing_since is not None:
                    logger.info("Redis answers again after %.1f s", now - failing_since)
                    failing_since = None
            except redis.RedisError as exc:
                if failing_since is None:
                    failing_since = now
                    logger.warning("lease/restore failed, retrying every %.1f s: %s", tick_s, exc)
            except Exception:  # a bug here must not end lease renewal silently
                logger.exception("lease/restore step failed; retrying")

    def _sweep_fleet(self) -> None:
        """Record workers whose lease lapsed without a release, and export what the fleet is
        (``worker/broker/fleet.py``)."""
        view = self.fleet.sweep()
        self.metrics.fleet_workers.set(view.live)
        self.metrics.fleet_worker_lost.set(view.last_lost_at)
        for worker_id in view.lost:
            logger.warning(
                "worker %s lost: its lease lapsed without a clean shutdown (crashed, killed or "
                "stalled)", worker_id, extra={"event": "worker_lost", "lost_worker": worker_id},
            )  # fmt: skip

    def _guard(self, target: Any) -> None:
        """Run a thread's loop; if it dies (a bug the loop did not catch), shut the worker down
        with a non-zero exit status rather than keep a worker that answers pings but serves
        nothing."""
        try:
            target()
        except BaseException as exc:
            self.fault = f"{threading.current_thread().name}: {type(exc).__name__}: {exc}"
            logger.critical("%s crashed; shutting the worker down", target, exc_info=True)
            os.kill(os.getpid(), signal.SIGTERM)


class BulkTasks(Tasks):
    """Takes the place of Celery's ``Tasks`` step (under the same step name) and serves tasks in
    bulk."""

    name = Tasks.name

    def __init__(self, c: Consumer, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.service = BulkService(c.app, c.hostname)

    def start(self, c: Consumer) -> None:
        # An empty task consumer and a fixed QoS keep Celery's event loop happy; no task
        # message reaches Celery's own task path.
        c.task_consumer = KombuConsumer(c.connection.default_channel, queues=[], accept=["json"])
        c.qos = QoS(lambda prefetch_count: None, 0)
        self.service.start()

    def close(self, c: Consumer) -> None:
        self.service.stop()

    def shutdown(self, c: Consumer) -> None:
        super().shutdown(c)
        self.service.stop()

    def info(self, c: Consumer) -> dict[str, Any]:
        return {"imgq": self.service.info()}


class BulkControl(Control):
    """Celery's remote-control step, ordered after :class:`BulkTasks` as it was after ``Tasks``."""

    name = Control.name
    requires = (BulkTasks,)


class BulkDelayedDelivery(DelayedDelivery):
    """Celery's delayed-delivery step (AMQP only), ordered after :class:`BulkTasks`."""

    name = DelayedDelivery.name
    requires = (BulkTasks,)


_REPLACED_STEPS = {
    "celery.worker.consumer.tasks:Tasks": "imgq.worker.celeryapp.consumer:BulkTasks",
    "celery.worker.consumer.control:Control": "imgq.worker.celeryapp.consumer:BulkControl",
    "celery.worker.consumer.delayed_delivery:DelayedDelivery": (
        "imgq.worker.celeryapp.consumer:BulkDelayedDelivery"
    ),
}


class BulkConsumer(Consumer):
    """Celery's consumer with :class:`BulkTasks` in place of its ``Tasks`` step (and the two
    steps that depend on ``Tasks`` pointed at it)."""

    class Blueprint(Consumer.Blueprint):
        default_steps = [_REPLACED_STEPS.get(s, s) for s in Consumer.Blueprint.default_steps]
