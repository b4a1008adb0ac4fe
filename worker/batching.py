"""The hot path, message to stored result, in one file.

A :class:`BatchRunner` thread repeats one cycle:

1. take up to ``max_batch`` messages from the queue into this batch's in-flight list (its
   :class:`~worker.intake.Lane`; one transaction, bounded in bytes) — when the model is free it
   takes what is queued, and waits up to ``max_wait_ms`` for more only when that is set (it pays
   on a GPU, not on a CPU); an idle runner looks again after a short pause that grows with the
   idle time (reads only: a wait that wrote would be refused by a full Redis);
2. per message: parse, poison-pill check, expiry, arguments, the image's header against the
   batch's decoded-pixel budget, decode and resize for the model — a problem here ends only that
   task; past the pixel budget the rest of the batch goes back to the head of the queue;
3. one ``normalise_batch`` of the good images and one ``bundle.predict`` — if that fails, every
   task of the batch fails visibly; then the drift statistics of the batch;
4. one Redis round trip: the settle script (dead letters, results stored first-wins, the ack,
   drift counts once; ``worker/settle.py``), then one message of Celery task events.

Exactly one outcome per message: a stored result, or a dead letter for a message that does not
even carry a task id. An unexpected exception anywhere in a batch fails that batch's tasks
(``internal_error``, kept in the dead letters for ``imgq dlq requeue``); it never puts them back
at the head of the queue and never stops the runner. Redis errors of any kind (a lost
connection, ``OOM``, ``READONLY``, ``LOADING``, ``NOPERM``) are outages: logged, backed off,
retried. Nothing on the per-image path logs or talks to Redis.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from celery.exceptions import TaskRevokedError

from imgq.shared.decode import decode_base64, decode_image, probe_image
from imgq.shared.errors import ImgqError, InvalidTask
from imgq.shared.imagestats import image_features
from imgq.shared.preprocess import normalise_batch, resize_image
from imgq.worker.events import TaskEvents
from imgq.worker.intake import Lane, LeaseLost, Oversized, Taken
from imgq.worker.messages import (
    TaskRequest,
    _task_id,
    exception_result,
    parse_message,
    result_meta,
    validate_kwargs,
)
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.settle import DeadMessage, Drift, Settler, WindowCounts, once_token

__all__ = ["BatchRunner"]

logger = logging.getLogger(__name__)

_IDLE_WAIT_MIN_S = 0.0005  # first pause of an idle runner; it grows with the idle time
_NO_LEASE_WAIT_S = 0.2
_MAX_BACKOFF_S = 5.0
_LOG_EVERY_S = 10.0  # an outage or a bug that repeats every batch is logged this often
#: A task id as kombu writes it in the headers, for a message too large to read.
_ID_IN_HEADERS = re.compile(rb'[{,]\s*"id"\s*:\s*"([^"\\]{1,512})"')


@dataclass
class _Good:
    """A task whose image decoded: it goes into the model call."""

    request: TaskRequest
    top_k: int
    request_id: str | int | None
    queue_ms: float | None


@dataclass
class Outcome:
    """What a batch produced: results to store, dead letters, metric counts, drift inputs."""

    picked_at: float
    records: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The request of each record, in the same order (for task events).
    requests: list[TaskRequest] = field(default_factory=list)
    dead: list[DeadMessage] = field(default_factory=list)
    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    features: np.ndarray | None = None
    probs: np.ndarray | None = None
    #: The record index of each row of ``features``/``probs``.
    rows: list[int] = field(default_factory=list)
    #: The first image of the batch outside the training range, and why (for the drift report).
    thumbnail: tuple[np.ndarray, list[str]] | None = None
    #: How many of the newest messages go back to the queue (the decoded-pixel budget).
    give_back: int = 0

    def add(self, req: TaskRequest, state: str, result: Any, outcome: str, reason: str) -> int:
        """One task's result record (``state`` and ``result`` as Celery stores them); its index."""
        self.records.append((req.task_id, result_meta(req.task_id, state, result)))
        self.requests.append(req)
        self.counts[outcome, reason] += 1
        return len(self.records) - 1

    def fail(self, req: TaskRequest, exc: BaseException) -> None:
        """The task fails with ``exc``; its reason code is the metric's ``reason``."""
        reason = getattr(exc, "reason", type(exc).__name__)
        self.add(req, "FAILURE", exception_result(exc), "failure", reason)

    def dead_letter(
        self, raw: bytes, exc: InvalidTask, task_id: str = "", keep_body: bool = True
    ) -> None:
        """The raw message goes to the dead letters with ``exc``'s reason."""
        self.dead.append(
            DeadMessage(
                raw if keep_body else b"",
                len(raw),
                hashlib.sha1(raw).hexdigest(),
                raw[:200],
                exc.reason,
                exc.detail,
                task_id,
            )  # fmt: skip
        )
        if not task_id:
            self.counts["dead_letter", exc.reason] += 1


class BatchRunner:
    """Serves one queue: take a batch, run the model once, settle it in one round trip.

    Run :meth:`run` in a thread; :meth:`stop` makes it finish the batch in hand and return.

    Args:
        settings: The worker's settings (queue, batch size, wait, limits, result expiry).
        bundle: A loaded ``worker.bundle.ModelBundle`` (``manifest``, ``provider``, ``predict``).
        redis_client: Client of the broker's Redis (queue, in-flight list, drift counts).
        lane: This runner's in-flight list (:class:`~worker.intake.Lane`) on ``settings.queue``.
        backend: The Celery app's result backend: its key names are used, and its Redis client
            when results live in another Redis than the queue.
        metrics: Where to count.
        drift: A ``worker.drift.DriftRecorder``, or None to skip drift statistics.
        events: The worker's :class:`~worker.events.TaskEvents`, or None to send none.

    Attributes:
        last_progress_s: ``time.monotonic()`` of the last step (each image, each loop, each
            retry); the lease is renewed only while it keeps moving, so a stalled runner loses
            its lease and its messages, and a slow but working batch keeps them.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        bundle: Any,
        redis_client: redis.Redis,
        lane: Lane,
        backend: Any,
        metrics: WorkerMetrics,
        drift: Any | None = None,
        events: TaskEvents | None = None,
    ) -> None:
        self.settings = settings
        self.bundle = bundle
        self.redis = redis_client
        self.lane = lane
        self.backend = backend
        self.metrics = metrics
        self.drift: Drift | None = drift
        self.events = events
        manifest = bundle.manifest
        self._labels = manifest.labels
        self._spec = manifest.preprocess
        self._model = {"name": manifest.name, "sha256": manifest.model_sha256}
        self._wait_s = settings.wait_ms_for(bundle.provider) / 1000.0
        self._idle_poll_s = settings.idle_poll_ms / 1000.0
        same_redis = settings.result_backend == settings.broker_url
        self._results_redis: redis.Redis = redis_client if same_redis else backend.client
        dead_letters = (settings.dead_letter_ttl_s, settings.dead_letter_max_entries,
                        settings.dead_letter_max_bytes)  # fmt: skip
        self.settler = Settler(redis_client, self._results_redis, settings.queue,
                               lane.intake.worker_id, settings.result_expires_s, dead_letters,
                               drift)  # fmt: skip
        self._stop = threading.Event()
        self._logged_s: dict[str, float] = {}
        self._last_busy_s = time.monotonic()
        self.last_progress_s = time.monotonic()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand is stored."""
        self._stop.set()

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
                self._log_rarely("bug", "batch runner step failed", exc_info=True)
            self._stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
            self.last_progress_s = time.monotonic()

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
        outcome = self.serve_safely(taken)
        self._store(outcome)
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

    def serve_safely(self, taken: Taken) -> Outcome:
        """:meth:`serve`, or, if it raises (a bug), every task of the batch failed with
        ``internal_error`` and kept in the dead letters for a requeue once fixed."""
        try:
            return self.serve(taken)
        except Exception as exc:
            self._log_rarely("bug", "serving a batch of %d failed; failing its tasks",
                             len(taken.messages), exc_info=True)  # fmt: skip
            return self._fail_all(taken, exc)

    def serve(self, taken: Taken) -> Outcome:
        """Everything between taking messages and storing results; no Redis, no logging per image.

        Returns:
            One result or one dead letter per message, and what goes back to the queue.
        """
        picked_at = time.time()
        t0 = time.perf_counter()
        limits = self.settings.decode_limits
        out = Outcome(picked_at)
        good: list[_Good] = []
        images: list[np.ndarray] = []
        originals: list[tuple[int, int, int]] = []  # width, height, encoded bytes
        pixels = 0
        raws = taken.messages
        for i, raw in enumerate(raws):
            self.last_progress_s = time.monotonic()
            try:
                req = parse_message(raw, self.settings.queue)
            except InvalidTask as exc:
                out.dead_letter(raw, exc)
                continue
            queue_ms = None
            if req.sent_at is not None:
                wait_s = max(0.0, picked_at - req.sent_at)
                self.metrics.queue_wait.observe(wait_s)
                queue_ms = round(wait_s * 1000, 3)
            if taken.poisoned[i]:
                self._poisoned(out, req)
                continue
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
                info = probe_image(data, limits)
                if images and pixels + info.width * info.height > self.settings.batch_pixels:
                    # Served in parts: this and the newer messages go back to the queue head.
                    out.give_back = len(raws) - i
                    break
                pixels += info.width * info.height
                rgb = decode_image(data, limits)
                # Resize while the decoded frame is hot in cache; the big frame is freed at once.
                model_input = resize_image(rgb, self._spec)
            except ImgqError as exc:
                out.fail(req, exc)
                continue
            except Exception as exc:  # a bug on one image must not cost its batch-mates
                self._log_rarely("image", "unexpected error on task %s", req.task_id,
                                 exc_info=True)  # fmt: skip
                out.fail(req, exc)
                continue
            good.append(_Good(req, top_k, request_id, queue_ms))
            images.append(model_input)
            originals.append((rgb.shape[1], rgb.shape[0], len(data)))
            del rgb, data, image_b64
        if good:
            self._infer(out, good, images, originals, t0)
        done = len(out.records) + out.give_back + sum(1 for d in out.dead if not d.task_id)
        if done != len(raws):
            raise RuntimeError(
                f"batch contract broken: {len(raws)} messages taken but {done} outcomes made"
            )
        for big in taken.oversized:
            self._too_large(out, big)
        return out

    def _too_large(self, out: Outcome, big: Oversized) -> None:
        """A message Redis dead-lettered for its size: answer its task if its id can be read
        from the fragments Redis returned (kombu writes the headers after the body)."""
        task_id = None
        for fragment in (big.tail, big.head):
            for match in _ID_IN_HEADERS.finditer(fragment):
                try:
                    task_id = _task_id(match.group(1).decode("utf-8"))
                except (UnicodeDecodeError, ValueError, TypeError):
                    continue
            if task_id:
                break
        exc = InvalidTask(
            "message_too_large",
            f"the message of {big.length} bytes is over the {self.settings.max_message_bytes} "
            f"a valid task can have (images up to {self.settings.decode_limits.max_bytes} "
            "bytes, IMGQ_MAX_BYTES); it was not read and is listed by `imgq dlq list`",
        )
        if task_id is None:
            out.counts["dead_letter", exc.reason] += 1
            return
        req = TaskRequest(task_id, {}, None, None, None, self.settings.queue, b"")
        out.fail(req, exc)

    def _poisoned(self, out: Outcome, req: TaskRequest) -> None:
        exc = InvalidTask(
            "redelivered_too_often",
            f"handed out {self.settings.max_deliveries} times (IMGQ_MAX_DELIVERIES) and never "
            "answered: every worker that took it died or hung. Kept in the dead letters; "
            "`imgq dlq requeue ID` sends it again",
        )
        out.fail(req, exc)
        out.dead_letter(req.raw, exc, req.task_id)

    def _fail_all(self, taken: Taken, cause: Exception) -> Outcome:
        """The outcome of a batch whose serving raised: every task fails with
        ``internal_error``; each message is kept in the dead letters."""
        out = Outcome(time.time())
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

    def _infer(
        self,
        out: Outcome,
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
            self._log_rarely("model", "model call failed; failing all %d tasks of the batch",
                             len(good), exc_info=True)  # fmt: skip
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
            out.rows.append(out.add(g.request, "SUCCESS", result, "success", ""))

    def _drift_statistics(
        self,
        out: Outcome,
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
            return self.drift.out_of_range(out.features)  # type: ignore[attr-defined]
        except Exception:
            self._log_rarely("drift", "drift statistics failed; the batch is served without them",
                             exc_info=True)  # fmt: skip
            out.features = out.probs = None
            return None

    def _store(self, out: Outcome) -> None:
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
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                self.last_progress_s = time.monotonic()
        for (outcome, reason), count in out.counts.items():
            self.metrics.tasks.labels(outcome, reason).inc(count)
        if logger.isEnabledFor(logging.DEBUG):
            outcomes = {f"{o}:{r}": n for (o, r), n in out.counts.items()}
            logger.debug("batch stored", extra={"outcomes": outcomes})
        if out.dead:
            reasons = collections.Counter(d.reason for d in out.dead)
            self._log_rarely("dead", "dead letters of queue %s: %s (see `imgq dlq list`)",
                             self.settings.queue, dict(reasons))  # fmt: skip

    def _store_once(self, out: Outcome) -> None:
        lane = self.lane
        if out.give_back:
            lane.give_back_newest(out.give_back)
            out.give_back = 0  # a retry must not give back more
        lane.prepare_ack()
        keys = [self.backend.get_key_for_task(task_id) for task_id, _ in out.records]
        results = list(zip(keys, (meta for _, meta in out.records), strict=True))
        window = self._window(out, None)
        if self._results_redis is self.redis:
            pipe = self.redis.pipeline(transaction=False)
            index = self.settler.settle(pipe, lane, results, out.dead, window)
            self._extras(pipe, out)
            replies = pipe.execute(raise_on_error=False)
            reply = replies[index]
            if isinstance(reply, Exception):
                raise reply
            count, flags = int(reply[0]), reply[1:]
            if window is not None and count == -1 and any(flags):
                count = self._count_new(out, flags, once_token(lane))
        else:
            rpipe = self._results_redis.pipeline(transaction=False)
            index = self.settler.settle(rpipe, None, results, [], None)
            reply = rpipe.execute()[index]
            flags = reply[1:]
            pipe = self.redis.pipeline(transaction=False)
            subset = self._window(out, flags) if any(flags) else None
            index = self.settler.settle(pipe, lane, [], out.dead, subset, once_token(lane))
            self._extras(pipe, out)
            replies = pipe.execute(raise_on_error=False)
            if isinstance(replies[index], Exception):
                raise replies[index]
            count = int(replies[index][0])
        lane.settled()
        if count == -2:
            self._log_rarely("drift", "drift counts not stored (results are)")
        elif count >= 0 and self.drift is not None:
            self.drift.after_pipeline(count)

    def _window(self, out: Outcome, flags: list[int] | None) -> WindowCounts | None:
        """The batch's drift counts (of the rows whose result ``flags`` says was new)."""
        if self.drift is None or out.features is None or out.probs is None:
            return None
        rows = np.arange(len(out.rows))
        if flags is not None:
            rows = np.asarray([k for k, r in enumerate(out.rows) if flags[r]], np.intp)
            if not len(rows):
                return None
        try:
            return self.drift.window_counts(out.features[rows], out.probs[rows])
        except Exception:
            self._log_rarely("drift", "drift counts failed; the batch is stored without them",
                             exc_info=True)  # fmt: skip
            return None

    def _count_new(self, out: Outcome, flags: list[int], once: tuple[str, int]) -> int:
        """Some results of the batch were there already (a redelivery): count only the new."""
        subset = self._window(out, flags)
        if subset is None:
            return -1
        pipe = self.redis.pipeline(transaction=False)
        index = self.settler.settle(pipe, None, [], [], subset, once)
        reply = pipe.execute(raise_on_error=False)[index]
        return -2 if isinstance(reply, Exception) else int(reply[0])

    def _extras(self, pipe: Any, out: Outcome) -> None:
        """After the settle script on the same round trip: the task events and the thumbnail."""
        if self.events is not None:
            metas = (meta for _, meta in out.records)
            self.events.add_to_pipeline(pipe, out.picked_at, zip(out.requests, metas, strict=True))
        if self.drift is not None and out.thumbnail is not None:
            try:
                self.drift.add_out_of_range_thumbnail(pipe, *out.thumbnail)  # type: ignore[attr-defined]
            except Exception:
                self._log_rarely("drift", "out-of-range thumbnail failed", exc_info=True)

    def _log_rarely(self, topic: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        """Log ``msg`` at most every few seconds per topic (an outage fails every batch)."""
        now = time.monotonic()
        if now - self._logged_s.get(topic, -math.inf) >= _LOG_EVERY_S:
            self._logged_s[topic] = now
            logger.error(msg, *args, exc_info=exc_info)
