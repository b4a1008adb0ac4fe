"""What Celery's worker does after a task, done for a batch: callbacks, errbacks, the next step
of a chain, a chord's part.

imgq executes tasks outside Celery's tracer (``celery/app/trace.py``), so it does that
tracer's last step itself, with Celery's own functions on a
:class:`celery.app.task.Context` built from the message, never with its own idea of Celery's
Redis layout:

- SUCCESS: the ``link`` callbacks get ``(result,)`` (several are sent as one group, as the
  tracer does), then the next chain step gets ``(result,)`` and the rest of the chain, with
  ``parent_id`` this task, ``root_id`` the workflow's, and the priority as the tracer passes
  it; then ``backend.mark_as_done(store_result=False)`` advances the chord's counter, and the
  worker that completes it sends the chord's body (``RedisBackend.on_chord_part_return``).
- FAILURE: ``backend.mark_as_failure(store_result=False)``: the chord part is returned failed
  (its body fails with ``ChordError`` instead of waiting forever) and the errbacks are called
  (``link_error`` tasks are sent as a group with ``(task_id,)``); the rest of the chain gets
  this failure stored as its result, as ``mark_as_failure`` stores it.
- REVOKED (expired, revoked or terminated): ``backend.mark_as_revoked(store_result=False)``:
  the chord part only. Celery's worker calls no errback and fails no chain for a revoked
  task; nor does imgq.

The task's own result is already stored (first wins) by the batch's settle; follow-ups are sent
only for results stored new, by the worker that stored them, after the settle. A worker killed
between the two loses that batch's follow-ups: at most once, like Celery's default early ack
(Celery with ``acks_late`` may send them twice instead).

Follow-ups go through their own Celery app on the worker's broker and result backend: the
worker's app routes unnamed tasks to imgq's queue, where Celery's worker would send a
signature that names no queue to Celery's default queue ``celery``. Nothing here raises into
the engine: a follow-up that cannot be sent (a broker error, a signature Celery cannot build)
is logged (rarely) and counted in ``imgq_followups_total{outcome="failed"}``. While the batch is
traced, each task's follow-ups continue its trace (``worker/tracing/``: a PRODUCER span per
message, its context in the message's headers, as Celery's OpenTelemetry instrumentation sends
it from inside a task).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery, group, signature
from celery import states as celery_states
from celery.app.task import Context

from imgq.worker.metrics import WorkerMetrics
from imgq.worker.wire.canvas import Canvas
from imgq.worker.wire.message import TaskRequest
from imgq.worker.wire.result import ResultRecord

if TYPE_CHECKING:
    from imgq.worker.outcome import Trace

__all__ = ["Followups", "sender_app"]

logger = logging.getLogger(__name__)

#: What the follow-ups' app takes from the worker's: JSON only, results kept as long, routes,
#: the clients' transport options (priority lists).
_SHARED_SETTINGS = (
    "task_serializer",
    "result_serializer",
    "accept_content",
    "result_accept_content",
    "result_expires",
    "task_routes",
    "task_inherit_parent_priority",
    "broker_transport_options",
    "result_backend_transport_options",
    "broker_connection_retry_on_startup",
    "enable_utc",
)
_LOG_EVERY_S = 10.0  # a broker outage fails every follow-up: logged this often, all counted
_CLAIM_TTL_S = 86_400  # how long a revoked task's claimed follow-ups are remembered


def sender_app(app: Celery) -> Celery:
    """A Celery app for the follow-ups of ``app``'s worker: ``app``'s broker, result backend
    and :data:`_SHARED_SETTINGS`, with Celery's default queue (``celery``) for a task that no
    route and no signature names a queue for, as a plain Celery worker would send it."""
    conf = app.conf
    sender = Celery(
        f"{app.main}-followups",
        broker=conf.broker_url,
        backend=conf.result_backend,
        set_as_current=False,
    )
    sender.conf.update({name: conf[name] for name in _SHARED_SETTINGS})
    return sender


class Followups:
    """Sends the follow-ups of a settled batch.

    Args:
        app: The worker's Celery app; follow-ups go through :func:`sender_app` of it.
        metrics: Where ``imgq_followups_total{kind,outcome}`` is counted.

    One per worker process, shared by its batch runners (Celery's producer and connection
    pools are thread-safe).
    """

    def __init__(self, app: Celery, metrics: WorkerMetrics) -> None:
        self.app = sender_app(app)
        self.backend = self.app.backend
        self.metrics = metrics
        self._logged_s = -math.inf
        self._inherit_priority = bool(self.app.conf.task_inherit_parent_priority)

    def after_settle(
        self,
        requests: Sequence[TaskRequest],
        records: Sequence[tuple[str, ResultRecord]],
        stored_new: Sequence[int],
        trace: Trace | None = None,
    ) -> None:
        """Send the follow-ups of every task of the batch that has a canvas and whose result
        was stored new (``stored_new``: the settle script's flag per record); with ``trace``,
        each in its task's trace. Raises nothing."""
        if not len(requests) == len(records) == len(stored_new):  # a bug; the batch is settled
            self._failed("callback", f"(one of {len(requests)})")
            return
        for req, (_, record), new in zip(requests, records, stored_new, strict=True):
            if req.canvas is None:
                continue
            if not new:
                claimed = self._claim_revoked(req.task_id)
                if claimed is None:
                    continue
                record = claimed
            elif record["status"] == celery_states.REVOKED:
                self._claim_revoked(req.task_id)  # so that a redelivery does not claim it again
            try:
                with contextlib.nullcontext() if trace is None else trace.following(req.task_id):
                    self.send(req.task_id, req.task_name, req.canvas, record)
            except Exception:  # a bug here must not reach the engine either
                self._failed("errback" if record["status"] != "SUCCESS" else "callback",
                             req.task_id)  # fmt: skip

    def _claim_revoked(self, task_id: str) -> ResultRecord | None:
        """The stored record of a task whose result was not new, when it is a REVOKED that
        someone else stored and nobody has claimed yet; else None. A plain Celery worker's
        ``revoke`` command (5.7+) stores REVOKED when the broadcast arrives, without the task's
        request, so its chord part was never returned (whether or not an imgq worker then
        computed the task). The first worker that finds it claims the follow-ups (a marker,
        set once) and sends them for that REVOKED."""
        try:
            client = self.backend.client
            meta = self.backend.decode_result(client.get(self.backend.get_key_for_task(task_id)))
            if meta.get("status") != celery_states.REVOKED:
                return None  # answered by a worker of this fleet: its follow-ups went with it
            if not client.set(f"imgq:followed:{task_id}", 1, nx=True, ex=_CLAIM_TTL_S):
                return None
            return {
                "status": meta["status"],
                "result": meta.get("result"),
                "traceback": None,
                "children": [],
                "date_done": meta.get("date_done", ""),
                "task_id": task_id,
            }
        except Exception:
            self._failed("chord", task_id)
            return None

    def send(self, task_id: str, task_name: str, canvas: Canvas, record: ResultRecord) -> None:
        """One task's follow-ups, for its stored ``record``; each kind is tried on its own, so
        that a callback Celery cannot build still lets the chord advance."""
        ctx = self._context(task_id, task_name, canvas)
        state, value = record["status"], record["result"]
        if state == celery_states.SUCCESS:
            if canvas.callbacks:
                self._try("callback", task_id, self._callbacks, ctx, value)
            if canvas.chain:
                self._try("chain", task_id, self._next_in_chain, ctx, value)
            if canvas.chord is not None:
                self._try("chord", task_id, self.backend.mark_as_done, task_id, value,
                          request=ctx, store_result=False)  # fmt: skip
            return
        try:
            exc = self.backend.exception_to_python(value)
        except Exception:  # a record imgq wrote: cannot happen unless a bug
            self._failed("errback", task_id)
            return
        if state == celery_states.REVOKED:
            if canvas.chord is not None:
                self._try("chord", task_id, self.backend.mark_as_revoked, task_id, str(exc),
                          request=ctx, store_result=False)  # fmt: skip
            return
        if canvas.chord is not None or canvas.errbacks:
            # The chain is failed apart, below: with store_result=False, mark_as_failure would
            # not store the failure for the rest of the chain either.
            ctx.chain = None
            self._try("errback", task_id, self.backend.mark_as_failure, task_id, exc,
                      request=ctx, store_result=False, state=state)  # fmt: skip
        if canvas.chain:
            self._try("chain", task_id, self._fail_chain, list(canvas.chain), exc, state)

    def _context(self, task_id: str, task_name: str, canvas: Canvas) -> Any:
        """The task's request as Celery's worker builds it (``Request._context``)."""
        return Context(
            id=task_id,
            task=task_name,
            root_id=canvas.root_id,
            parent_id=canvas.parent_id,
            group=canvas.group,
            group_index=canvas.group_index,
            callbacks=list(canvas.callbacks) or None,
            errbacks=list(canvas.errbacks) or None,
            chain=list(canvas.chain) or None,
            chord=canvas.chord,
            delivery_info={"priority": canvas.priority},
        )

    def _publish_options(self, ctx: Any) -> dict[str, Any]:
        """What the tracer passes to every follow-up it applies (``build_tracer``)."""
        priority = ctx.delivery_info.get("priority") if self._inherit_priority else None
        return {"parent_id": ctx.id, "root_id": ctx.root_id or ctx.id, "priority": priority}

    def _callbacks(self, ctx: Any, retval: Any) -> None:
        """``link`` callbacks with ``(retval,)``: one alone, several as one group (groups among
        them each on their own), as ``_dispatch_callbacks_and_chain`` sends them."""
        options = self._publish_options(ctx)
        sigs = [signature(s, app=self.app) for s in ctx.callbacks]
        if len(sigs) == 1:
            sigs[0].apply_async((retval,), **options)
            return
        for g in (s for s in sigs if isinstance(s, group)):
            g.apply_async((retval,), **options)
        plain = [s for s in sigs if not isinstance(s, group)]
        if plain:
            group(plain, app=self.app).apply_async((retval,), **options)

    def _next_in_chain(self, ctx: Any, retval: Any) -> None:
        """The chain's next step with ``(retval,)`` and the rest of the chain."""
        chain = ctx.chain
        step = signature(chain[-1], app=self.app)
        step.apply_async((retval,), chain=chain[:-1], **self._publish_options(ctx))

    def _fail_chain(self, chain: list[dict[str, Any]], exc: BaseException, state: str) -> None:
        """The rest of the chain fails with ``exc``, as ``mark_as_failure`` fails it: the error
        stored for each step that has a task id, a step that is a chord's part returned."""
        fail_chain = getattr(self.backend, "_fail_chain", None)
        if fail_chain is not None:  # Celery >= 5.6: also descends into chord bodies
            fail_chain(chain, exc, None, store_result=True, state=state)
            return
        for elem in chain:  # Celery 5.5's mark_as_failure, verbatim in effect
            step = Context(elem)
            step.update(step.options)
            step.id = step.options.get("task_id")
            step.group = step.options.get("group_id")
            if step.id is not None:
                self.backend.store_result(step.id, exc, state, request=step)
            if "chord" in step.options:
                self.backend.on_chord_part_return(step, state, exc)

    def _try(self, kind: str, task_id: str, action: Callable[..., Any], *args: Any,
             **kwargs: Any) -> None:  # fmt: skip
        """Run one follow-up; count it, and log and count its failure instead of raising."""
        try:
            action(*args, **kwargs)
        except Exception:
            self._failed(kind, task_id)
        else:
            self.metrics.followups.labels(kind, "sent").inc()

    def _failed(self, kind: str, task_id: str) -> None:
        self.metrics.followups.labels(kind, "failed").inc()
        now = time.monotonic()
        if now - self._logged_s >= _LOG_EVERY_S:
            self._logged_s = now
            logger.error(
                "the %s follow-up of task %s could not be sent (every such failure is counted "
                "in imgq_followups_total)", kind, task_id, exc_info=True,
            )  # fmt: skip
