"""The hot path, message to stored result, in one file.

A :class:`BatchRunner` thread repeats one cycle:

1. take up to ``max_batch`` messages from the queue (one atomic Lua call; they are now in this
   worker's in-flight hash) — when the model is free it takes what is queued, and waits up to
   ``max_wait_ms`` for more only when that is set (it pays on a GPU, not on a CPU);
2. per message: parse, check expiry, validate the arguments, decode the image and compute its
   drift statistics — a problem here ends only that task;
3. one ``preprocess_batch`` of the good images and one ``bundle.predict`` — if that fails,
   every task of the batch fails visibly;
4. one Redis pipeline: every result (``SET EX`` + ``PUBLISH``, as Celery's Redis backend does),
   then the acks (the in-flight entries), then the drift counts.

Exactly one outcome per message: a stored result, or the dead-letter list for a message that
does not even carry a task id. Nothing on the per-image path logs or talks to Redis.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import redis
from celery.exceptions import TaskRevokedError

from shared.decode import decode_base64, decode_image
from shared.errors import ImgqError, InvalidTask
from shared.imagestats import image_features
from shared.preprocess import preprocess_batch
from worker.intake import Intake, LeaseLost
from worker.messages import (
    TaskRequest,
    exception_result,
    parse_message,
    result_meta,
    validate_kwargs,
)
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

__all__ = ["BatchRunner", "DEAD_LETTER_CAP", "dead_letter_key"]

logger = logging.getLogger(__name__)

#: Most raw messages kept in a queue's dead-letter list (oldest dropped).
DEAD_LETTER_CAP = 1000
_IDLE_WAIT_S = 1.0  # how long an idle runner blocks before it looks at its stop flag again
_NO_LEASE_WAIT_S = 0.2
_MAX_BACKOFF_S = 5.0


def dead_letter_key(queue: str) -> str:
    """List of raw messages of ``queue`` that could not be read at all (no task id)."""
    return f"imgq:dead:{queue}"


class Drift(Protocol):
    """What the batch runner needs from ``worker.drift.DriftRecorder``."""

    def out_of_range(self, features_row: np.ndarray) -> list[str]: ...

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


@dataclass
class _Outcome:
    """What a batch produced: results to store, dead letters, and metric counts."""

    records: list[tuple[str, dict[str, Any]]]
    dead: list[bytes]
    counts: collections.Counter[tuple[str, str]]
    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    #: The first image of the batch outside the training range, and why (for the drift report).
    thumbnail: tuple[np.ndarray, list[str]] | None = None


class BatchRunner:
    """Serves one queue: take a batch, run the model once, store every result in one round trip.

    Run :meth:`run` in a thread; :meth:`stop` makes it finish the batch in hand and return.

    Args:
        settings: The worker's settings (queue, batch size, wait, limits, result expiry).
        bundle: A loaded ``worker.bundle.ModelBundle`` (``manifest``, ``provider``, ``predict``).
        redis_client: Client of the broker's Redis (queue, in-flight hash, drift counts).
        intake: This process's :class:`~worker.intake.Intake` on ``settings.queue``.
        backend: The Celery app's result backend: its key names and JSON encoding are used,
            and its Redis client when results live in another Redis than the queue.
        metrics: Where to count.
        drift: A ``worker.drift.DriftRecorder``, or None to skip drift statistics.

    Attributes:
        last_progress_s: ``time.monotonic()`` of the last loop step; the lease is renewed only
            while it keeps moving, so a stalled runner loses its lease and its messages.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        bundle: Any,
        redis_client: redis.Redis,
        intake: Intake,
        backend: Any,
        metrics: WorkerMetrics,
        drift: Drift | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.redis = redis_client
        self.intake = intake
        self.backend = backend
        self.metrics = metrics
        self.drift = drift
        manifest = bundle.manifest
        self._labels = manifest.labels
        self._model = {"name": manifest.name, "sha256": manifest.model_sha256}
        self._wait_s = settings.wait_ms_for(bundle.provider) / 1000.0
        same_redis = settings.result_backend == settings.broker_url
        self._results_redis: redis.Redis = redis_client if same_redis else backend.client
        self._dead_key = dead_letter_key(settings.queue)
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
        fields, raws = self.intake.take(self.settings.max_batch)
        if not raws:
            self.intake.wait(self._idle_wait_s)
            return 0
        if self._wait_s > 0:
            self._fill(fields, raws)
        outcome = self.serve(raws)
        self._store(outcome, fields)
        return len(raws)

    def _fill(self, fields: list[str], raws: list[bytes]) -> None:
        """Wait up to ``max_wait_ms`` for more messages while the batch is not full. A Redis
        problem here ends the wait: the messages in hand are served (and their store retried)."""
        deadline = time.monotonic() + self._wait_s
        try:
            while len(raws) < self.settings.max_batch:
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0 or not self.intake.wait(remaining_s):
                    return
                more_fields, more = self.intake.take(self.settings.max_batch - len(raws))
                fields += more_fields
                raws += more
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
        out = _Outcome(records=[], dead=[], counts=collections.Counter())
        good: list[_Good] = []
        images: list[np.ndarray] = []
        features: list[np.ndarray] = []
        for raw in raws:
            try:
                req = parse_message(raw, self.settings.queue)
            except InvalidTask as exc:
                out.dead.append(raw)
                out.counts["dead_letter", exc.reason] += 1
                continue
            if req.error is not None:
                self._fail(out, req, req.error)
                continue
            if req.expires is not None and req.expires < picked_at:
                revoked = exception_result(TaskRevokedError("expired"))
                out.records.append((req.task_id, result_meta(req.task_id, "REVOKED", revoked)))
                out.counts["expired", "expired"] += 1
                continue
            try:
                image_b64, top_k, request_id = validate_kwargs(req.kwargs, len(self._labels))
                data = decode_base64(image_b64, limits)
                rgb = decode_image(data, limits)
                if self.drift is not None:
                    features.append(image_features(rgb, len(data)))
            except ImgqError as exc:
                self._fail(out, req, exc)
                continue
            except Exception as exc:  # a bug on one image must not cost its batch-mates
                logger.exception("unexpected error on task %s", req.task_id)
                self._fail(out, req, exc)
                continue
            good.append(_Good(req, top_k, request_id))
            images.append(rgb)
            if req.sent_at is not None:
                self.metrics.queue_wait.observe(max(0.0, picked_at - req.sent_at))
        if good:
            self._infer(out, good, images, features, picked_at, t0)
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
        features: list[np.ndarray],
        picked_at: float,
        t0: float,
    ) -> None:
        """One model call for the good images; on failure every one of them fails."""
        try:
            batch = preprocess_batch(images, self.bundle.manifest.preprocess)
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
                self._fail(out, g.request, exc)
            return
        n = len(good)
        self.metrics.batch_size.observe(n)
        self.metrics.images.inc(n)
        self.metrics.preprocess.observe(t1 - t0)
        self.metrics.inference.observe(t2 - t1)
        out.counts["success", ""] += n
        feats = np.asarray(features) if self.drift is not None else None
        out.features, out.probs = feats, probs
        preprocess_ms, infer_ms = round((t1 - t0) * 1000, 3), round((t2 - t1) * 1000, 3)
        order = np.argsort(-probs, axis=1)
        for i, g in enumerate(good):
            p = probs[i]
            top = [{"label": self._labels[j], "score": float(p[j])} for j in order[i, : g.top_k]]
            sent_at = g.request.sent_at
            result: dict[str, Any] = {
                "label": top[0]["label"],
                "score": top[0]["score"],
                "top_k": top,
                "model": self._model,
                "batch_size": n,
                "timings_ms": {
                    "queue": None
                    if sent_at is None
                    else round(max(0.0, picked_at - sent_at) * 1000, 3),
                    "preprocess": preprocess_ms,
                    "infer": infer_ms,
                },
            }
            if g.request_id is not None:
                result["request_id"] = g.request_id
            if feats is not None and self.drift is not None:
                out_of_range = self.drift.out_of_range(feats[i])
                result["drift"] = {"out_of_range": out_of_range}
                if out_of_range and out.thumbnail is None:
                    out.thumbnail = (images[i], out_of_range)
            out.records.append(
                (g.request.task_id, result_meta(g.request.task_id, "SUCCESS", result))
            )

    @staticmethod
    def _fail(out: _Outcome, req: TaskRequest, exc: BaseException) -> None:
        reason = getattr(exc, "reason", type(exc).__name__)
        out.records.append(
            (req.task_id, result_meta(req.task_id, "FAILURE", exception_result(exc)))
        )
        out.counts["failure", reason] += 1

    def _store(self, out: _Outcome, fields: list[str]) -> None:
        """Results, then acks, then drift counts, in one round trip (two when results live in
        another Redis). Retried while Redis is unreachable: until the acks are written the
        messages stay in the in-flight hash, so a worker that dies meanwhile loses nothing."""
        backoff_s = 0.1
        while True:
            try:
                self._store_once(out, fields)
                self.intake.settled(fields)
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
        logger.debug(
            "batch stored",
            extra={
                "tasks": len(fields),
                "outcomes": {f"{o}:{r}": n for (o, r), n in out.counts.items()},
            },
        )
        if out.dead:
            logger.warning(
                "%d unreadable messages (no task id) moved to %s", len(out.dead), self._dead_key
            )

    def _store_once(self, out: _Outcome, fields: list[str]) -> None:
        expires_s = self.settings.result_expires_s
        pipe = self._results_redis.pipeline(transaction=False)
        for task_id, meta in out.records:
            key = self.backend.get_key_for_task(task_id)
            value = self.backend.encode(meta)
            pipe.set(key, value, ex=expires_s)
            pipe.publish(key, value)
        if self._results_redis is not self.redis:
            pipe.execute()
            pipe = self.redis.pipeline(transaction=False)
        if out.dead:
            pipe.lpush(self._dead_key, *out.dead)
            pipe.ltrim(self._dead_key, 0, DEAD_LETTER_CAP - 1)
        self.intake.ack(pipe, fields)
        drift_reply = None
        if self.drift is not None and out.features is not None and out.probs is not None:
            drift_reply = self.drift.add_to_pipeline(pipe, out.features, out.probs)
            if out.thumbnail is not None:
                self.drift.add_out_of_range_thumbnail(pipe, *out.thumbnail)
        replies = pipe.execute()
        if drift_reply is not None and self.drift is not None:
            self.drift.after_pipeline(replies[drift_reply])
