"""The Celery app of a worker process: JSON only, one queue, our bulk consumer in place of
Celery's task consumer.

The app is a real Celery app, so the worker is a real Celery worker: ``celery inspect ping``,
``inspect stats``, heartbeats and events (Flower) work as usual. Only the step that consumes task
messages is replaced (``worker_consumer`` -> :class:`worker.consumer.BulkConsumer`): it takes
``imgq.classify`` messages from Redis in batches instead of one by one. Because no task message
goes through kombu's consumer, kombu's Redis visibility timeout (one hour by default) plays no
part in redelivery; the lease in ``worker/broker/intake.py`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery

from imgq.worker.settings import WorkerSettings

__all__ = ["ImgqCelery", "make_app"]

#: Seconds Celery's connections to a sentinel wait for it to connect or answer, unless
#: ``sentinel_kwargs`` says otherwise: kombu and Celery's result backend give them no timeout,
#: so one sentinel that accepts and never answers (a stopped process, a half-open link) hung
#: every Celery connection, and ``imgq health`` past its ``--timeout``; with one, the next
#: sentinel is asked.
SENTINEL_TIMEOUT_S = 2.0


class ImgqCelery(Celery):
    """A Celery app that carries the worker's settings (read by the bulk consumer step)."""

    settings: WorkerSettings
    #: The worker's ``worker.consumer.BulkService`` once built.
    imgq_service: Any = None


def make_app(settings: WorkerSettings) -> ImgqCelery:
    """The Celery app for ``settings``.

    Args:
        settings: Broker and backend URLs, queue, result expiry.

    Returns:
        The app, with the tasks of the handlers served registered so that ``inspect
        registered`` and Flower show them; their bodies are never called (the batch engine
        executes the tasks).
    """
    app = ImgqCelery("imgq", broker=settings.broker_url, backend=settings.result_backend)
    app.settings = settings
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        # The clients' options: the same priority lists, key prefix and pub/sub names.
        broker_transport_options=_with_sentinel_timeouts(settings.broker_transport_options),
        result_backend_transport_options=_with_sentinel_timeouts(
            settings.result_backend_transport_options
        ),
        task_routes={name: {"queue": settings.queue} for name in _task_names(settings)},
        result_expires=settings.result_expires_s,
        broker_connection_retry_on_startup=True,
        # A Redis that refuses writes (OOM, READONLY, NOPERM) when the consumer reconnects is an
        # outage to wait out, not a reason to exit; nor is a long one (kombu's default gives up
        # after ~100 tries).
        broker_channel_error_retry=True,
        broker_connection_max_retries=None,
        worker_send_task_events=True,
        # No task runs on Celery's own path, so there is nothing to cancel on a lost connection;
        # setting it explicitly also silences Celery's pending-deprecation warning.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_consumer="imgq.worker.celeryapp.consumer:BulkConsumer",
        worker_pool="solo",
        # Our own JSON logging is configured in worker/commands/worker.py; Celery must not
        # replace it.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )

    for name in _task_names(settings):
        app.task(name=name)(_not_here(name))
    return app


def _task_names(settings: WorkerSettings) -> list[str]:
    """The Celery task names of the handlers served, from the registry (without importing the
    handlers: the classification handler imports numpy, OpenCV and onnxruntime)."""
    from imgq.worker.handlers import HANDLERS

    return [HANDLERS[name].task_name for name in settings.handlers]


def _not_here(name: str) -> Callable[..., Any]:
    """The body of a registered task, which Celery never calls: the batch engine executes it."""

    def task(**kwargs: Any) -> Any:
        raise RuntimeError(
            f"{name} is executed by imgq's batch engine, not by Celery's task path; start "
            "workers with `imgq worker`"
        )

    task.__name__ = task.__qualname__ = name.rsplit(".", 1)[-1]
    return task


def _with_sentinel_timeouts(options: dict[str, Any]) -> dict[str, Any]:
    """Transport options whose ``sentinel_kwargs`` bound each sentinel's connect and reply by
    :data:`SENTINEL_TIMEOUT_S` unless they set their own; the same options without Sentinel.

    >>> _with_sentinel_timeouts({"master_name": "m", "sentinel_kwargs": {"socket_timeout": 1}})
    {'master_name': 'm', 'sentinel_kwargs': {'socket_connect_timeout': 2.0, 'socket_timeout': 1}}
    """
    if "master_name" not in options:
        return dict(options)
    timeouts = dict.fromkeys(("socket_connect_timeout", "socket_timeout"), SENTINEL_TIMEOUT_S)
    return {**options, "sentinel_kwargs": timeouts | (options.get("sentinel_kwargs") or {})}
