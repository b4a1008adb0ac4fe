"""The hot path, message to stored result, in one file.

A :class:`BatchRunner` thread repeats one cycle:

1. take up to ``max_batch`` messages from the queue (one transaction; they are now in this
   runner's in-flight list, its :class:`~worker.intake.Lane`) — when the model is free it takes
   what is queued, and waits up to ``max_wait_ms`` for more only when that is set (it pays on
   a GPU, not on a CPU);
2. per message: parse, check expiry, validate the arguments, decode the image and resize it
   for the model — a problem here ends only that task;
3. one ``normalise_batch`` of the good images (each resized right after its decode: the same
   bytes as ``preprocess_batch``, without holding every full-size frame) and one
   ``bundle.predict`` — if that fails, every task of the batch fails visibly; then the drift
   statistics of the whole batch of model inputs at once;
4. one Redis pipeline: every result (``SET EX`` + ``PUBLISH``, as Celery's Redis backend does,
   in one script call for the batch), then the ack (deleting the in-flight list), one message
   of Celery task events for the whole batch so that Flower shows every task
   (:class:`TaskEvents`), then the drift counts.

Exactly one outcome per message: a stored result, or the dead-letter list for a message that
does not even carry a task id. Nothing on the per-image path logs or talks to Redis.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import pybase64
import redis
from celery import Celery
from celery.events import Event
from celery.exceptions import TaskRevokedError
from celery.utils.time import utcoffset

from shared.decode import decode_base64, decode_image
from shared.errors import ImgqError, InvalidTask
from shared.imagestats import image_features
from shared.preprocess import normalise_batch, resize_image
from worker.intake import Lane, LeaseLost
from worker.messages import (
    TASK_NAME,
    TaskRequest,
    exception_result,
    json_dumps,
    parse_message,
    result_meta,
    validate_kwargs,
)
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

__all__ = ["BatchRunner", "DEAD_LETTER_CAP", "TaskEvents", "dead_letter_key"]

logger = logging.getLogger(__name__)

#: Most raw messages kept in a queue's dead-letter list (oldest dropped).
DEAD_LETTER_CAP = 1000
_IDLE_WAIT_S = 1.0  # how long an idle runner blocks before it looks at its stop flag again
_NO_LEASE_WAIT_S = 0.2
_MAX_BACKOFF_S = 5.0
_REPR_MAX_CHARS = 1024  # Celery's limit on argument and result reprs in events


# KEYS: result keys. ARGV: expiry in seconds, then one value per key. What Celery's Redis
# backend does per result (SET with expiry, then PUBLISH on the key for waiting AsyncResults), for
# a whole batch in one command: 2N pipelined commands cost redis-py ~20 us each to pack and parse.
_STORE_RESULTS = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
  redis.call('PUBLISH', key, ARGV[i + 1])
end
return #KEYS
"""


def dead_letter_key(queue: str) -> str:
    """List of raw messages of ``queue`` that could not be read at all (no task id)."""
    return f"imgq:dead:{queue}"


class Drift(Protocol):
    """What the batch runner needs from ``worker.drift.DriftRecorder``."""

    def out_of_range(self, image_features: np.ndarray) -> list[list[str]]: ...

    def add_to_pipeline(self, pipe: Any, image_features: np.ndarray, probs: np.ndarray) -> int: ...

    def add_out_of_range_thumbnail(
        self, pipe: Any, rgb: np.ndarray, features: list[str]
    ) -> bool: ...

    def after_pipeline(self, reply: Any) -> None: ...


@dataclass
class _Good:
    """A task whose image decoded: it goes into the model call."""

    request: TaskRequest
    top_k: int
    request_id: str | int | None
    queue_ms: float | None


@dataclass
class _Outcome:
    """What a batch produced: results to store, dead letters, and metric counts."""

    picked_at: float
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The request of each record, in the same order (for task events).
    requests: list[TaskRequest] = field(default_factory=list)
    dead: list[bytes] = field(default_factory=list)
    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    #: The first image of the batch outside the training range, and why (for the drift report).
    thumbnail: tuple[np.ndarray, list[str]] | None = None

    def add(self, req: TaskRequest, state: str, result: Any, outcome: str, reason: str) -> None:
        """One task's result record (``state`` and ``result`` as Celery stores them)."""
        self.records.append((req.task_id, result_meta(req.task_id, state, result)))
        self.requests.append(req)
        self.counts[outcome, reason] += 1

    def fail(self, req: TaskRequest, exc: BaseException) -> None:
        """The task fails with ``exc``; its reason code is the metric's ``reason``."""
        reason = getattr(exc, "reason", type(exc).__name__)
        self.add(req, "FAILURE", exception_result(exc), "failure", reason)


class BatchRunner:
    """Serves one queue: take a batch, run the model once, store every result in one round trip.

    Run :meth:`run` in a thread; :meth:`stop` makes it finish the batch in hand and return.

    Args:
        settings: The worker's settings (queue, batch size, wait, limits, result expiry).
        bundle: A loaded ``worker.bundle.ModelBundle`` (``manifest``, ``provider``, ``predict``).
        redis_client: Client of the broker's Redis (queue, in-flight list, drift counts).
        lane: This runner's in-flight list (:class:`~worker.intake.Lane`) on ``settings.queue``.
        backend: The Celery app's result backend: its key names and JSON encoding are used,
            and its Redis client when results live in another Redis than the queue.
        metrics: Where to count.
        drift: A ``worker.drift.DriftRecorder``, or None to skip drift statistics.
        events: The worker's :class:`TaskEvents`, or None to send no task events.

    Attributes:
        last_progress_s: ``time.monotonic()`` of the last loop step; the lease is renewed only
            while it keeps moving, so a stalled runner loses its lease and its messages.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        bundle: Any,
        redis_client: redis.Redis,
        lane: Lane,
        backend: Any,
        metrics: WorkerMetrics,
        drift: Drift | None = None,
        events: TaskEvents | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.redis = redis_client
        self.lane = lane
        self.backend = backend
        self.metrics = metrics
        self.drift = drift
        self._drift_error_logged_s = -math.inf
        self.events = events
        manifest = bundle.manifest
        self._labels = manifest.labels
        self._spec = manifest.preprocess
        self._model = {"name": manifest.name, "sha256": manifest.model_sha256}
        self._wait_s = settings.wait_ms_for(bundle.provider) / 1000.0
        same_redis = settings.result_backend == settings.broker_url
        self._results_redis: redis.Redis = redis_client if same_redis else backend.client
        self._dead_key = dead_letter_key(settings.queue)
        # The image is base64 in a JSON body that kombu base64-encodes again (x 16/9), plus headers.
        self._max_message_bytes = settings.decode_limits.max_bytes * 16 // 9 + 256 * 1024
        # An idle runner must still show progress well within the lease time.
        self._idle_wait_s = min(_IDLE_WAIT_S, settings.lease_ttl_s / 4)
        self._stop = threading.Event()
        self.last_progress_s = time.monotonic()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand is stored."""
        self._stop.set()

    def run(self) -> None:
        """Serve until :meth:`stop`; Redis outages are logged and retried with back-off."""
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                self.run_once()
                backoff_s = 0.1
            except LeaseLost:
                self._stop.wait(_NO_LEASE_WAIT_S)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                logger.warning("redis unavailable, retrying in %.1f s: %s", backoff_s, exc)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)

    def run_once(self) -> int:
        """One cycle: take a batch (or wait briefly for one), serve it. Returns its size."""
        self.last_progress_s = time.monotonic()
        raws = self.lane.take(self.settings.max_batch)
        if not raws:
            self.lane.wait(self._idle_wait_s)
            return 0
        if self._wait_s > 0:
            self._fill(raws)
        outcome = self.serve(raws)
        self._store(outcome)
        return len(raws)

    def _fill(self, raws: list[bytes]) -> None:
        """Wait up to ``max_wait_ms`` for more messages while the batch is not full. A Redis
        problem here ends the wait: the messages in hand are served (and their store retried)."""
        deadline = time.monotonic() + self._wait_s
        try:
            while len(raws) < self.settings.max_batch:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0 or not self.lane.wait(remaining_s):
                    return
                raws += self.lane.take(self.settings.max_batch - len(raws))
        except (LeaseLost, redis.ConnectionError, redis.TimeoutError):
            return

    def serve(self, raws: Sequence[bytes]) -> _Outcome:
        """Everything between taking messages and storing results; no Redis, no logging per image.

        Returns:
            One stored result or one dead letter per message.
        """
        picked_at = time.time()
        t0 = time.perf_counter()
        limits = self.settings.decode_limits
        out = _Outcome(picked_at)
        good: list[_Good] = []
        images: list[np.ndarray] = []
        originals: list[tuple[int, int, int]] = []  # width, height, encoded bytes
        for raw in raws:
            try:
                if len(raw) > self._max_message_bytes:
                    raise InvalidTask(
                        "malformed_message",
                        f"message of {len(raw)} bytes is over the {self._max_message_bytes} a "
                        "valid task can have; not parsed",
                    )
                req = parse_message(raw, self.settings.queue)
            except InvalidTask as exc:
                out.dead.append(raw)
                out.counts["dead_letter", exc.reason] += 1
                continue
            except Exception:  # a parser bug must not become a message that kills every worker
                logger.exception("unreadable message moved to the dead-letter list")
                out.dead.append(raw)
                out.counts["dead_letter", "malformed_message"] += 1
                continue
            queue_ms = None
            if req.sent_at is not None:
                wait_s = max(0.0, picked_at - req.sent_at)
                self.metrics.queue_wait.observe(wait_s)
                queue_ms = round(wait_s * 1000, 3)
            if req.error is not None:
                out.fail(req, req.error)
                continue
            if req.expires is not None and req.expires < picked_at:
                revoked = exception_result(TaskRevokedError("expired"))
                out.add(req, "REVOKED", revoked, "expired", "expired")
                continue
            try:
                image_b64, top_k, request_id = validate_kwargs(req.kwargs, len(self._labels))
                data = decode_base64(image_b64, limits)
                rgb = decode_image(data, limits)
                # Resize while the decoded frame is hot in cache; the big frame is freed at once.
                model_input = resize_image(rgb, self._spec)
            except ImgqError as exc:
                out.fail(req, exc)
                continue
            except Exception as exc:  # a bug on one image must not cost its batch-mates
                logger.exception("unexpected error on task %s", req.task_id)
                out.fail(req, exc)
                continue
            good.append(_Good(req, top_k, request_id, queue_ms))
            images.append(model_input)
            originals.append((rgb.shape[1], rgb.shape[0], len(data)))
        if good:
            self._infer(out, good, images, originals, t0)
        done = len(out.records) + len(out.dead)
        if done != len(raws):
            raise RuntimeError(
                f"batch contract broken: {len(raws)} messages taken but {done} outcomes made"
            )
        return out

    def _infer(
        self,
        out: _Outcome,
        good: list[_Good],
        images: list[np.ndarray],
        originals: list[tuple[int, int, int]],
        t0: float,
    ) -> None:
        """One model call for the good images; on failure every one of them fails."""
        try:
            stacked = np.stack(images)
            batch = normalise_batch(stacked, self._spec)
            t1 = time.perf_counter()
            probs = self.bundle.predict(batch)
            t2 = time.perf_counter()
            if probs.shape != (len(good), len(self._labels)):
                raise RuntimeError(
                    f"the model returned probabilities of shape {probs.shape} for {len(good)} "
                    f"images of {len(self._labels)} classes"
                )
        except Exception as exc:
            logger.exception("model call failed; failing all %d tasks of the batch", len(good))
            for g in good:
                out.fail(g.request, exc)
            return
        n = len(good)
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        self.metrics.preprocess.observe(t1 - t0)
        self.metrics.inference.observe(t2 - t1)
        outside = self._drift_statistics(out, stacked, originals, probs)
        preprocess_ms, infer_ms = round((t1 - t0) * 1000, 3), round((t2 - t1) * 1000, 3)
        order = np.argsort(-probs, axis=1)
        for i, g in enumerate(good):
            p = probs[i]
            top = [{"label": self._labels[j], "score": float(p[j])} for j in order[i, : g.top_k]]
            result: dict[str, Any] = {
                "label": top[0]["label"],
                "score": top[0]["score"],
                "top_k": top,
                "model": self._model,
                "batch_size": n,
                "timings_ms": {"queue": g.queue_ms, "preprocess": preprocess_ms, "infer": infer_ms},
            }
            if g.request_id is not None:
                result["request_id"] = g.request_id
            if outside is not None:
                result["drift"] = {"out_of_range": outside[i]}
                if outside[i] and out.thumbnail is None:
                    out.thumbnail = (images[i], outside[i])
            out.add(g.request, "SUCCESS", result, "success", "")

    def _drift_statistics(
        self,
        out: _Outcome,
        stacked: np.ndarray,
        originals: list[tuple[int, int, int]],
        probs: np.ndarray,
    ) -> list[list[str]] | None:
        """The batch's image features (kept on ``out`` for the drift counts) and each image's
        out-of-range features; None without drift statistics. Statistics are an extra: if they
        fail, the batch's answers are still served, without them."""
        if self.drift is None:
            return None
        try:
            out.features = image_features(stacked, np.asarray(originals, np.float64))
            out.probs = probs
            return self.drift.out_of_range(out.features)
        except Exception:
            logger.exception("drift statistics failed; the batch is served without them")
            out.features = out.probs = None
            return None

    def _store(self, out: _Outcome) -> None:
        """Results, then acks, then drift counts, in one round trip (two when results live in
        another Redis). Retried while Redis is unreachable: until the acks are written the
        messages stay in the in-flight list, so a worker that dies meanwhile loses nothing."""
        backoff_s = 0.1
        while True:
            try:
                self._store_once(out)
                self.lane.settled()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if self._stop.is_set():
                    logger.warning(
                        "stopping with %d results unstored; their messages stay in flight and "
                        "are redelivered after the lease expires",
                        len(out.records),
                    )
                    return
                logger.warning("storing results failed, retrying in %.1f s: %s", backoff_s, exc)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                self.last_progress_s = time.monotonic()
        for (outcome, reason), count in out.counts.items():
            self.metrics.tasks.labels(outcome, reason).inc(count)
        if logger.isEnabledFor(logging.DEBUG):
            outcomes = {f"{o}:{r}": n for (o, r), n in out.counts.items()}
            tasks = sum(out.counts.values())
            logger.debug("batch stored", extra={"tasks": tasks, "outcomes": outcomes})
        if out.dead:
            logger.warning(
                "%d unreadable messages (no task id) moved to %s", len(out.dead), self._dead_key
            )

    def _store_once(self, out: _Outcome) -> None:
        pipe = self._results_redis.pipeline(transaction=False)
        if out.records:
            keys = [self.backend.get_key_for_task(task_id) for task_id, _ in out.records]
            values = [json_dumps(meta) for _, meta in out.records]
            pipe.eval(_STORE_RESULTS, len(keys), *keys, self.settings.result_expires_s, *values)
        if self._results_redis is not self.redis:
            pipe.execute()
            pipe = self.redis.pipeline(transaction=False)
        if out.dead:
            pipe.lpush(self._dead_key, *out.dead)
            pipe.ltrim(self._dead_key, 0, DEAD_LETTER_CAP - 1)
        self.lane.ack(pipe)
        if self.events is not None:
            self.events.add_to_pipeline(pipe, out)
        drift_first = drift_reply = None
        if self.drift is not None and out.features is not None and out.probs is not None:
            drift_first = len(pipe)
            drift_reply = self.drift.add_to_pipeline(pipe, out.features, out.probs)
            if out.thumbnail is not None:
                self.drift.add_out_of_range_thumbnail(pipe, *out.thumbnail)
        replies = pipe.execute(raise_on_error=False)
        errors = [r for r in replies[:drift_first] if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        drift_errors = [
            r for r in replies[drift_first or len(replies) :] if isinstance(r, Exception)
        ]
        if drift_errors:
            # Drift statistics are an extra: the results and acks are stored; say so and go on.
            self._log_drift_error(drift_errors[0])
        elif drift_reply is not None and self.drift is not None:
            self.drift.after_pipeline(replies[drift_reply])

    def _log_drift_error(self, exc: Exception) -> None:
        """Log a failed drift update at most once a minute (it fails every batch until fixed)."""
        now = time.monotonic()
        if now - self._drift_error_logged_s >= 60.0:
            self._drift_error_logged_s = now
            logger.error("drift counts not stored (results are): %s", exc)


class TaskEvents:
    """Celery task events for the tasks a worker serves, published in each batch's pipeline.

    Celery's own worker sends ``task-received``, ``task-succeeded``/``task-failed`` and
    ``task-revoked`` one by one, buffered by its event loop; its ``EventDispatcher`` flushes a
    buffer as one message holding a list of events (routing key ``task.multi``), which Flower and
    ``app.events.Receiver`` unpack. This builds exactly that message for a whole batch and adds
    its ``PUBLISH`` to the pipeline that stores the batch's results, after them: no extra round
    trip, and a monitor never sees a task succeed before its result exists. The envelope is
    kombu's (as in ``worker/messages.py``) on kombu's Redis fanout topic
    ``/<db>.<event exchange>/task.multi``. Publishing through kombu instead builds a new redis-py
    client per message (0.7 ms of CPU here, a fifth of serving one image) and costs a round trip.

    The events carry Celery's fields; ``kwargs`` shows the image's base64 length instead of the
    base64, and ``result`` the label and score (the full result is in the result backend).

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

    def add_to_pipeline(self, pipe: Any, out: _Outcome) -> None:
        """Queue the ``PUBLISH`` of a batch's events (received, then the outcome, per task)."""
        if not out.records:
            return
        body = pybase64.b64encode(json_dumps(self._events(out))).decode("ascii")
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

    def _events(self, out: _Outcome) -> list[dict[str, Any]]:
        now = time.time()
        common = {"hostname": self.hostname, "utcoffset": utcoffset(), "pid": self._pid}
        forward = self._clock.forward
        events: list[dict[str, Any]] = []
        for req, (task_id, meta) in zip(out.requests, out.records, strict=True):
            received = Event(
                "task-received", **common, clock=forward(), timestamp=out.picked_at,
                uuid=task_id, name=TASK_NAME, args="()", kwargs=_kwargs_repr(req.kwargs),
                root_id=task_id, parent_id=None, retries=0, eta=None, expires=_iso(req.expires),
            )  # fmt: skip
            state, result = meta["status"], meta["result"]
            fields: dict[str, Any]
            if state == "SUCCESS":
                kind = "task-succeeded"
                shown = repr({"label": result["label"], "score": result["score"]})
                fields = {"result": shown, "runtime": now - out.picked_at}
            elif state == "FAILURE":
                kind = "task-failed"
                shown = f"{result['exc_type']}({result['exc_message'][0]!r})"[:_REPR_MAX_CHARS]
                fields = {"exception": shown, "traceback": None}
            else:  # REVOKED: it had expired when it was picked up
                kind = "task-revoked"
                fields = {"terminated": False, "signum": None, "expired": True}
            finished = Event(kind, **common, clock=forward(), timestamp=now, uuid=task_id, **fields)
            events += (received, finished)
        return events


def _kwargs_repr(kwargs: dict[str, Any]) -> str:
    """The task's arguments for monitors: the image's base64 length instead of its base64.

    >>> _kwargs_repr({"image": "aGk=", "top_k": 2})
    "{'image': '<4 base64 chars>', 'top_k': 2}"
    """
    image = kwargs.get("image")
    shown = dict(kwargs, image=f"<{len(image)} base64 chars>") if isinstance(image, str) else kwargs
    return repr(shown)[:_REPR_MAX_CHARS]


def _iso(epoch_s: float | None) -> str | None:
    """ISO 8601 (UTC) of epoch seconds, as Celery's events carry ``expires``."""
    return None if epoch_s is None else datetime.fromtimestamp(epoch_s, UTC).isoformat()
