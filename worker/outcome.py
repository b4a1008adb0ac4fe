"""What a batch produced, before it is stored: one result record or dead letter per message.

The engine's own outcomes sit beside the handlers' (:class:`~imgq.worker.handler.Success`,
``Failure``, ``Deferred``): a task that expired, was revoked, or was terminated while its batch
ran ends REVOKED without (or instead of) its handler's answer, as Celery's worker ends it; one
whose ``eta`` is ahead is :class:`Scheduled`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from contextlib import AbstractContextManager
from typing import Any, Protocol

from celery.exceptions import TaskRevokedError, TimeLimitExceeded

from imgq.shared.errors import InvalidTask
from imgq.worker.broker.settle import DeadMessage
from imgq.worker.handler import Deferred, Failure, Outcome, Success
from imgq.worker.wire.message import TaskRequest, parse_message
from imgq.worker.wire.result import ResultRecord, exception_result, result_meta

__all__ = ["EXPIRED", "REVOKED", "TERMINATED", "BatchOutcome", "Revoked", "Scheduled", "Trace",
           "fail_all", "overruled", "poison_pill", "too_large", "unknown_task"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Revoked:
    """The engine's outcome of a task it does not answer with a result: REVOKED, with Celery's
    reason (``expired``, ``revoked``, ``terminated``), also the metric's outcome and reason."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """The engine's outcome of a task whose ``eta`` is ahead: it waits in Redis until then."""

    eta: float


EXPIRED = Revoked("expired")
REVOKED = Revoked("revoked")
TERMINATED = Revoked("terminated")


class Trace(Protocol):
    """What storing does with a batch's trace (``worker/tracing/spans.py``'s ``BatchTrace``):
    its task spans start before the settle, the follow-ups continue them, and they end after."""

    def settling(self, out: BatchOutcome) -> None: ...

    def following(self, task_id: str) -> AbstractContextManager[None]: ...

    def settled(self, out: BatchOutcome) -> None: ...


@dataclasses.dataclass
class BatchOutcome:
    """What a batch produced: results to store, dead letters, metric counts, observations."""

    picked_at: float
    records: list[tuple[str, ResultRecord]] = dataclasses.field(default_factory=list)
    #: The request of each record, in the same order (for task events).
    requests: list[TaskRequest] = dataclasses.field(default_factory=list)
    #: The metric's (outcome, reason) of each record, in the same order (for traces).
    reasons: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dead: list[DeadMessage] = dataclasses.field(default_factory=list)
    counts: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    #: (record index, observation) of each success its handler's observers see.
    observations: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    #: How many of the newest messages go back to the queue (deferred by their handler).
    give_back: int = 0
    #: ``(eta, message)`` of each task whose time is ahead (``worker/broker/schedule.py``).
    scheduled: list[tuple[float, bytes]] = dataclasses.field(default_factory=list)
    #: The batch's spans while tracing is on (``worker/tracing/``), else None.
    trace: Trace | None = None

    def add(self, req: TaskRequest, state: str, result: Any, outcome: str, reason: str) -> int:
        """One task's result record (``state`` and ``result`` as Celery stores them); its index."""
        self.records.append((req.task_id, result_meta(req.task_id, state, result)))
        self.requests.append(req)
        self.reasons.append((outcome, reason))
        self.counts[outcome, reason] += 1
        return len(self.records) - 1

    def fail(self, req: TaskRequest, exc: BaseException) -> None:
        """The task fails with ``exc``; its reason code is the metric's ``reason``."""
        reason = getattr(exc, "reason", type(exc).__name__)
        self.add(req, "FAILURE", exception_result(exc), "failure", reason)

    def record(self, req: TaskRequest, outcome: Outcome | Revoked | Scheduled | None) -> None:
        """One message's outcome as its result record (or its place in the schedule)."""
        if isinstance(outcome, Scheduled):
            self.scheduled.append((outcome.eta, req.raw))
        elif isinstance(outcome, Revoked):
            revoked = exception_result(TaskRevokedError(outcome.reason))
            self.add(req, "REVOKED", revoked, outcome.reason, outcome.reason)
        elif isinstance(outcome, Success):
            index = self.add(req, "SUCCESS", outcome.result, "success", "")
            if outcome.observation is not None:
                self.observations.append((index, outcome.observation))
        elif isinstance(outcome, Failure):
            self.fail(req, outcome.error)
        else:
            raise RuntimeError(f"task {req.task_id} has no outcome ({outcome!r})")

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


# -- the engine's own errors ------------------------------------------------------------------


def overruled(held: Any, outcome: Outcome, elapsed_s: float) -> Outcome | Revoked:
    """A handler's outcome for the task ``held`` (``celeryapp.state.HeldTask``), unless
    ``revoke(terminate=True)`` reached it meanwhile, or its batch ran past the task's time limit
    (Celery would have killed it)."""
    req = held.req
    if isinstance(outcome, Deferred):
        return outcome
    if held.terminated:
        return TERMINATED
    if req.time_limit is not None and elapsed_s > req.time_limit:
        return Failure(
            TimeLimitExceeded(f"time limit {req.time_limit:g} s: the batch took {elapsed_s:.3g} s")
        )
    return outcome


def unknown_task(queue: str, served: Any, task_name: str) -> InvalidTask:
    """A task no handler of the queue serves."""
    return InvalidTask(
        "unknown_task",
        f"queue {queue!r} serves {', '.join(sorted(served))}, not {task_name!r}: send it to a "
        "queue whose workers serve it",
    )


def poison_pill(max_deliveries: int) -> InvalidTask:
    """A poison pill's error (its message goes to the dead letters too)."""
    return InvalidTask(
        "redelivered_too_often",
        f"handed out {max_deliveries} times (IMGQ_MAX_DELIVERIES) and never answered: every "
        "worker that took it died or hung. Kept in the dead letters; `imgq dlq requeue ID` "
        "sends it again",
    )


def too_large(length: int, max_message_bytes: int, max_image_bytes: int) -> InvalidTask:
    """A message Redis dead-lettered for its size, unread."""
    return InvalidTask(
        "message_too_large",
        f"the message of {length} bytes is over the {max_message_bytes} a valid task can have "
        f"(images up to {max_image_bytes} bytes, IMGQ_MAX_BYTES); it was not read and is listed "
        "by `imgq dlq list`",
    )


def fail_all(messages: list[bytes], oversized: int, cause: Exception, queue: str) -> BatchOutcome:
    """The outcome of a batch whose serving or storing raised (a bug): every task fails with
    ``internal_error``; each message is kept in the dead letters for a requeue once fixed."""
    out = BatchOutcome(time.time())
    out.counts["dead_letter", "message_too_large"] += oversized
    exc = InvalidTask("internal_error", f"{type(cause).__name__}: {cause}"[:300])
    for raw in messages:
        try:
            req = parse_message(raw, queue)
        except Exception:
            out.dead_letter(raw, InvalidTask("malformed_message", exc.detail))
            continue
        out.fail(req, exc)
        out.dead_letter(raw, exc, req.task_id)
    return out
