"""The seam between the batch engine and what a task does: handlers, outcomes, observers.

The engine (``worker/engine.py``) owns everything a task queue needs — take, lease, deadlines,
poison pills, storing, acks, retries, task events — and knows nothing of images. A *handler*
owns one kind of task: it turns a batch of requests into exactly one outcome each, with no I/O
(Ray Serve's ``@serve.batch`` and celery-batches' ``run(requests)`` are the models)::

    class Handler(Protocol):
        task_name: str                      # the Celery task name it serves
        observers: Sequence[Observer]       # who sees its outcomes (drift statistics)
        def handle(self, requests, tick) -> list[Outcome]: ...
        def close(self) -> None: ...

An outcome is :class:`Success` (a JSON-able result, and an *observation* for the observers that
is never stored), :class:`Failure` (an exception; its ``reason`` is the metric's), or
:data:`DEFERRED` (not served in this batch: it goes back to the head of the queue, e.g. past a
handler's budget; only the newest requests of a batch can be deferred). ``tick()`` tells the
engine that the handler is making progress (once per item), so a slow but working batch keeps
its lease.

Adding a task kind is a module under ``worker/handlers/`` and one line in its registry
(:data:`imgq.worker.handlers.HANDLERS`); the worker serves the handlers named by
``IMGQ_HANDLERS``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from imgq.worker.handlers import HANDLERS

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from imgq.worker.broker.settle import WindowCounts
    from imgq.worker.metrics import WorkerMetrics
    from imgq.worker.settings import WorkerSettings

__all__ = [
    "DEFERRED",
    "Deferred",
    "Failure",
    "Handler",
    "HandlerContext",
    "Observer",
    "Outcome",
    "Request",
    "Success",
    "check_outcomes",
    "load_handler",
]


@dataclasses.dataclass(frozen=True)
class Request:
    """One task for a handler.

    Attributes:
        task_id: The Celery task id.
        kwargs: Its keyword arguments as sent: hostile input, for the handler to validate.
        queue_ms: How long it waited in the queue, when the producer said when it sent it.
    """

    task_id: str
    kwargs: Mapping[str, Any]
    queue_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class Success:
    """The task's result (stored as Celery's SUCCESS) and what observers may see of it."""

    result: dict[str, Any]
    observation: Any = None


@dataclasses.dataclass(frozen=True)
class Failure:
    """The task fails with ``error`` (stored as Celery's FAILURE; its ``reason`` attribute, or
    its class name, is the metric's reason)."""

    error: BaseException


class Deferred:
    """Not served in this batch: back to the head of the queue, served next."""

    _instance: Deferred | None = None

    def __new__(cls) -> Deferred:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFERRED"


#: The one :class:`Deferred` outcome.
DEFERRED: Final = Deferred()

Outcome = Success | Failure | Deferred


class Observer(Protocol):
    """Sees the outcomes of newly stored tasks (drift statistics). Its counts go into Redis
    with the results, in the batch's settle script, once (``worker/broker/settle.py``)."""

    #: A Lua function ``add_window(key, n, pairs, ttl)`` the settle script includes.
    lua_add_window: str

    def window_counts(self, observations: Sequence[Any]) -> Sequence[WindowCounts]:
        """The counts of these observations (of successes), one per window they go to (none
        for nothing to count)."""
        ...

    def after_settle(self, counted: Mapping[str, int]) -> None:
        """The settle script added the counts: each window's key and the count it returned."""
        ...

    def extras(self, pipe: redis.client.Pipeline, observations: Sequence[Any]) -> None:
        """Commands of its own for the batch's round trip, after the settle script."""
        ...

    def close(self) -> None: ...


class Handler(Protocol):
    """Serves one task name: a batch of requests in, exactly one outcome each out, no I/O."""

    task_name: str
    observers: Sequence[Observer]

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        """One outcome per request, in order; :data:`DEFERRED` only for a suffix."""
        ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class HandlerContext:
    """What a handler factory may use to build its handler (model, clients for observers).

    Attributes:
        settings: The worker's settings.
        app: The worker's Celery app (health reporting).
        redis: Client of the broker's Redis, for observers (a handler itself does no I/O).
        metrics: The process's metrics.
    """

    settings: WorkerSettings
    app: Celery
    redis: redis.Redis
    metrics: WorkerMetrics


def load_handler(name: str, context: HandlerContext) -> Handler:
    """The handler registered as ``name`` in :data:`HANDLERS`, built for ``context``.

    Raises:
        ValueError: no handler of that name.
    """
    spec = HANDLERS.get(name)
    if spec is None:
        raise ValueError(f"no handler {name!r}; the handlers are {', '.join(sorted(HANDLERS))}")
    module, factory = spec.factory.split(":")
    handler: Handler = getattr(importlib.import_module(module), factory)(context)
    if handler.task_name != spec.task_name:
        raise ValueError(
            f"handler {name!r} serves {handler.task_name!r}, but HANDLERS says {spec.task_name!r}"
        )
    return handler


def check_outcomes(requests: Sequence[Request], outcomes: Sequence[Any]) -> None:
    """The batch contract: exactly one outcome per request, each an :data:`Outcome`, and
    :data:`DEFERRED` only for the newest requests (a suffix).

    >>> check_outcomes([Request("a", {}), Request("b", {})], [Success({}), DEFERRED])
    >>> check_outcomes([Request("a", {})], [])
    Traceback (most recent call last):
    ...
    ValueError: the handler got 1 requests but returned 0 outcomes
    """
    if len(outcomes) != len(requests):
        raise ValueError(
            f"the handler got {len(requests)} requests but returned {len(outcomes)} outcomes"
        )
    deferring = False
    for i, outcome in enumerate(outcomes):
        if not isinstance(outcome, Success | Failure | Deferred):
            raise TypeError(f"outcome {i} is a {type(outcome).__name__}, not an Outcome")
        if isinstance(outcome, Deferred):
            deferring = True
        elif deferring:
            raise ValueError(f"outcome {i} follows a DEFERRED one; only a suffix can be deferred")
