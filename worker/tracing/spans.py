"""The spans of a worker's batches and tasks (see ``worker/tracing/__init__.py`` for what they
show).

A batch crosses two threads (``worker/roundtrips.py``): it is taken on the runner's round-trip
thread (or its own), served on the runner's thread, and settled on the round-trip thread. So
nothing here relies on a thread's current span: each step records its own times, and every span
is made with an explicit parent context and explicit start and end times. The task spans are made
when the settle begins (their follow-ups are sent during it) and end when it has ended, all on
the round-trip thread; the batch's spans are made then, from the times its steps recorded.

Nothing here raises into the engine: tracing is an extra, and a bug in it is logged (rarely) and
costs the batch its spans, never its results.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from celery import signals
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, set_span_in_context

from imgq.worker.outcome import BatchOutcome
from imgq.worker.tracing.phases import Phase, collecting_phases
from imgq.worker.tracing.provider import StagedTraceIds
from imgq.worker.wire.message import TaskRequest

__all__ = ["BatchTrace", "BatchTracer"]

logger = logging.getLogger(__name__)

_LOG_EVERY_S = 60.0
#: Longest task name put in a span name (the name is the producer's, hostile input).
_MAX_NAME_CHARS = 200
#: The context a follow-up sent in this thread continues (set around each task's follow-ups).
#: The task id's attribute: the instrumentation's name now (semantic conventions 1.17+) and its
#: name before (queries written for either find imgq's spans).
_MESSAGE_ID = ("messaging.message.id", "messaging.message_id")
#: The parent context of a span that starts a trace (none: not the thread's current span).
_ROOT = Context()
_FOLLOWING: ContextVar[Context | None] = ContextVar("imgq_following", default=None)

_T = TypeVar("_T")


def _never_raises(method: Callable[..., _T]) -> Callable[..., _T | None]:
    """A tracing step that logs a bug of its own (at most once a minute) instead of raising."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> _T | None:
        try:
            return method(self, *args, **kwargs)
        except Exception:
            tracer = self if isinstance(self, BatchTracer) else self.tracer
            now = time.monotonic()
            if now - tracer.logged_s >= _LOG_EVERY_S:
                tracer.logged_s = now
                logger.error("tracing a batch failed; its spans are incomplete", exc_info=True)
            return None

    return guarded


class BatchTracer:
    """A worker process's tracer of its batches, shared by its runners.

    Args:
        provider: The configured tracer provider (``worker/tracing/provider.py``).
        hostname: The worker's Celery node name (``celery.hostname``, as the instrumentation
            names the worker that ran a task).
        root_bound: The sampler's decision for a root span without links, as
            :func:`~imgq.worker.tracing.provider.root_bound` gives it; None: asks the sampler.
    """

    def __init__(
        self, provider: TracerProvider, hostname: str, root_bound: int | None = None
    ) -> None:
        self.provider = provider
        #: :func:`~imgq.worker.tracing.provider.root_bound` of the configured sampler, when
        #: known: a task without a context is then decided by one random draw.
        self.root_bound = root_bound
        self.tracer = provider.get_tracer("imgq.worker")
        self.hostname = hostname
        ids = provider.id_generator
        #: Decides a task without a context before its span is made (``provider.py``).
        self.staged_ids = ids if isinstance(ids, StagedTraceIds) else None
        self.logged_s = -math.inf
        # Each lane's last take (start, end in epoch ns), from the take until its batch is served.
        self._takes: dict[Hashable, tuple[int, int]] = {}
        # Follow-ups' PRODUCER spans by task id, from Celery's before_task_publish to its after.
        self._producing: dict[str, Span] = {}
        signals.before_task_publish.connect(self._before_publish, weak=False)
        signals.after_task_publish.connect(self._after_publish, weak=False)

    def took(self, lane: Hashable, started_ns: int) -> None:
        """A take into ``lane`` that began at ``started_ns`` has just ended."""
        self._takes[lane] = (started_ns, time.time_ns())

    def batch(self, lane: Hashable, size: int) -> BatchTrace:
        """The trace of the batch of ``size`` messages taken into ``lane``, about to be served."""
        return BatchTrace(self, self._takes.pop(lane, None), size)

    def close(self) -> None:
        """Stop sending follow-ups' context; export what is buffered."""
        signals.before_task_publish.disconnect(self._before_publish)
        signals.after_task_publish.disconnect(self._after_publish)
        self.provider.shutdown()

    @_never_raises
    def _before_publish(
        self, sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any
    ) -> None:
        """Celery is about to publish a message: when it is a follow-up of a traced task, a
        PRODUCER span for it, injected into its headers as Celery's instrumentation does."""
        parent = _FOLLOWING.get()
        if parent is None or not isinstance(headers, dict):
            return
        name = str(sender)[:_MAX_NAME_CHARS]
        span = self.tracer.start_span(f"apply_async/{name}", context=parent,
                                      kind=SpanKind.PRODUCER)  # fmt: skip
        task_id = headers.get("id")
        if span.is_recording():
            span.set_attributes({"celery.action": "apply_async", "celery.task_name": name})
            if isinstance(task_id, str):
                span.set_attributes(dict.fromkeys(_MESSAGE_ID, task_id))
        propagate.inject(headers, context=set_span_in_context(span, parent))
        if isinstance(task_id, str):
            self._producing[task_id] = span
        else:
            span.end()

    @_never_raises
    def _after_publish(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        if isinstance(headers, dict):
            span = self._producing.pop(headers.get("id"), None)  # type: ignore[arg-type]
            if span is not None:
                span.end()


class BatchTrace:
    """The spans of one batch: its steps' times, recorded as they happen, and its task spans.

    Made by :meth:`BatchTracer.batch` on the runner's thread; :meth:`serving` runs there,
    :meth:`settling`, :meth:`following` and :meth:`settled` on the round-trip thread, in that
    order (the engine hands the batch over through the round-trip queue).
    """

    def __init__(self, tracer: BatchTracer, take_ns: tuple[int, int] | None, size: int) -> None:
        self.tracer = tracer
        self.take_ns = take_ns
        self.size = size
        self.serve_ns: tuple[int, int] | None = None
        self.phases_ns: list[tuple[str, int, int]] = []
        self.settle_started_ns: int | None = None
        #: Per task id, its spans and their parent contexts, oldest first.
        self._tasks: dict[str, list[tuple[Span, Context]]] | None = None
        #: The task spans that record (are sampled), by task id: all that :meth:`settled` ends.
        self._recording: list[tuple[str, Span]] = []

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around serving the batch: its time, and the steps its handlers report
        (:func:`imgq.worker.tracing.phase`)."""
        started_ns, started_s = time.time_ns(), time.perf_counter()
        with collecting_phases() as phases:
            try:
                yield
            finally:
                self.serve_ns = (started_ns, time.time_ns())
                self._phases_at(phases, started_ns, started_s)

    @_never_raises
    def _phases_at(self, phases: list[Phase], started_ns: int, started_s: float) -> None:
        """The handlers' steps in epoch nanoseconds (they time them with ``perf_counter``)."""
        self.phases_ns = [
            (name, started_ns + round((a - started_s) * 1e9),
             started_ns + round((b - started_s) * 1e9))
            for name, a, b in phases
        ]  # fmt: skip

    @_never_raises
    def settling(self, out: BatchOutcome) -> None:
        """The settle begins: one span per task that gets a result, from when the batch was
        picked up, its parent the context its producer sent (a new trace without one)."""
        if self.settle_started_ns is not None:  # a second try (the first store failed)
            return
        self.settle_started_ns = time.time_ns()
        picked_ns = round(out.picked_at * 1e9)
        tasks: dict[str, list[tuple[Span, Context]]] = {}
        for req in out.requests:
            started = self._start_task(req, out.picked_at, picked_ns)
            if started is None:
                continue
            tasks.setdefault(req.task_id, []).append(started)
            if started[0].is_recording():
                self._recording.append((req.task_id, started[0]))
        self._tasks = tasks

    def _start_task(
        self, req: TaskRequest, picked_at: float, picked_ns: int
    ) -> tuple[Span, Context] | None:
        """The task's span and its parent context; None for a task without a context, without
        follow-ups and not sampled (no span is needed to carry its trace on)."""
        carrier = req.trace_carrier
        name = f"run/{req.task_name[:_MAX_NAME_CHARS]}"
        ids = self.tracer.staged_ids
        if carrier is None and req.canvas is None and ids is not None:
            if self.tracer.root_bound is not None:
                if ids.sampled_root(self.tracer.root_bound) is None:
                    return None
            else:
                trace_id = ids.generate_trace_id()
                decided = self.tracer.provider.sampler.should_sample(
                    _ROOT, trace_id, name, SpanKind.CONSUMER
                )
                if not decided.decision.is_recording():
                    return None
                ids.stage(trace_id)  # the span gets the trace id the decision was made for
        parent = _ROOT if carrier is None else propagate.extract(carrier, context=Context())
        span = self.tracer.tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER,
                                             start_time=picked_ns)  # fmt: skip
        if span.is_recording():  # the attributes of the sampled only (~1% of tasks, say)
            attributes: dict[str, Any] = {
                "celery.action": "run",
                "celery.task_name": req.task_name,
                "celery.hostname": self.tracer.hostname,
                "messaging.destination": req.queue,
                "imgq.batch.size": self.size,
            }
            attributes.update(dict.fromkeys(_MESSAGE_ID, req.task_id))
            if req.sent_at is not None:
                attributes["imgq.queue_wait_ms"] = max(0.0, picked_at - req.sent_at) * 1000
            span.set_attributes(attributes)
        return span, parent

    @contextlib.contextmanager
    def following(self, task_id: str) -> Iterator[None]:
        """Around sending a task's follow-ups in this thread: they continue its trace."""
        found = self._tasks.get(task_id) if self._tasks is not None else None
        if not found:
            yield
            return
        span, parent = found[0]
        token = _FOLLOWING.set(set_span_in_context(span, parent))
        try:
            yield
        finally:
            _FOLLOWING.reset(token)

    @_never_raises
    def settled(self, out: BatchOutcome) -> None:
        """The settle has ended: each task span gets its outcome and ends; when one of them is
        sampled, the batch's spans are made, linked to the sampled ones."""
        recording, self._recording, self._tasks = self._recording, [], {}
        if not recording or self.settle_started_ns is None:
            return  # nothing sampled: the other spans record nothing and need no end
        ended_ns = time.time_ns()
        outcomes: dict[str, list[tuple[Any, str, str]]] = {}
        for req, record, (outcome, reason) in zip(out.requests, out.records, out.reasons,
                                                  strict=True):  # fmt: skip
            outcomes.setdefault(req.task_id, []).append((record[1], outcome, reason))
        sampled = [s.get_span_context() for _, s in recording]
        sampled = [c for c in sampled if c.trace_flags.sampled]
        batch = self._batch_spans(sampled, ended_ns) if sampled else None
        for task_id, span in recording:
            results = outcomes.get(task_id)
            self._outcome(span, results.pop(0) if results else None)
            if batch is not None:
                span.add_link(batch)
            span.end(end_time=ended_ns)

    def _outcome(self, span: Span, result: tuple[Any, str, str] | None) -> None:
        """A task span's outcome (the metric's outcome and reason), and the model version of a
        classification's result."""
        if result is None:
            return
        record, outcome, reason = result
        span.set_attribute("imgq.outcome", outcome)
        if reason:
            span.set_attribute("imgq.reason", reason)
        answer = record.get("result")
        model = answer.get("model") if isinstance(answer, dict) else None
        if isinstance(model, dict) and isinstance(model.get("version"), str):
            span.set_attribute("imgq.model.version", model["version"])
        if outcome == "failure":
            span.set_status(Status(StatusCode.ERROR, reason))

    def _batch_spans(self, sampled: list[Any], ended_ns: int) -> Any:
        """``imgq.batch`` (linked to the sampled task spans) and its steps; its span context."""
        assert self.settle_started_ns is not None
        tracer = self.tracer.tracer
        starts = [t[0] for t in (self.take_ns, self.serve_ns) if t is not None]
        batch = tracer.start_span(
            "imgq.batch",
            context=Context(),
            links=[Link(context) for context in sampled],
            start_time=min(starts, default=self.settle_started_ns),
            attributes={"imgq.batch.size": self.size, "celery.hostname": self.tracer.hostname},
        )
        in_batch = set_span_in_context(batch, Context())

        def step(name: str, start_ns: int, end_ns: int, parent: Context = in_batch) -> Span:
            span = tracer.start_span(name, context=parent, start_time=start_ns)
            span.end(end_time=end_ns)
            return span

        if self.take_ns is not None:
            step("imgq.take", *self.take_ns)
        if self.serve_ns is not None:
            serve = tracer.start_span("imgq.serve", context=in_batch, start_time=self.serve_ns[0])
            in_serve = set_span_in_context(serve, Context())
            for name, start_ns, end_ns in self.phases_ns:
                step(f"imgq.{name}", start_ns, end_ns, in_serve)
            serve.end(end_time=self.serve_ns[1])
        step("imgq.settle", self.settle_started_ns, ended_ns)
        batch.end(end_time=ended_ns)
        return batch.get_span_context()
