"""The Celery app of a worker process: JSON only, one queue, our bulk consumer in place of
Celery's task consumer.

The app is a real Celery app, so the worker is a real Celery worker: ``celery inspect ping``,
``inspect stats``, heartbeats and events (Flower) work as usual. Only the step that consumes task
messages is replaced (``worker_consumer`` -> :class:`worker.consumer.BulkConsumer`): it takes
``imgq.classify`` messages from Redis in batches instead of one by one. Because no task message
goes through kombu's consumer, kombu's Redis visibility timeout (one hour by default) plays no
part in redelivery; the lease in ``worker/intake.py`` does.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from imgq.worker.messages import TASK_NAME
from imgq.worker.settings import WorkerSettings

__all__ = ["ImgqCelery", "make_app"]


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
        The app, with the task ``imgq.classify`` registered so that ``inspect registered`` and
        Flower show it; its body is never called (the batch runner executes the task).
    """
    app = ImgqCelery("imgq", broker=settings.broker_url, backend=settings.result_backend)
    app.settings = settings
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        result_expires=settings.result_expires_s,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        # No task runs on Celery's own path, so there is nothing to cancel on a lost connection;
        # setting it explicitly also silences Celery's pending-deprecation warning.
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_consumer="imgq.worker.consumer:BulkConsumer",
        worker_pool="solo",
        # Our own JSON logging is configured in worker/main.py; Celery must not replace it.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )

    @app.task(name=TASK_NAME)
    def classify(image: str, top_k: int = 1, request_id: str | None = None) -> dict:
        """Classify one base64-encoded image (executed in batches by worker/batching.py)."""
        raise RuntimeError(
            f"{TASK_NAME} is executed by the imgq batch runner, not by Celery's task path; "
            "start workers with `imgq worker`"
        )

    return app
