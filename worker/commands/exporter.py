"""`imgq exporter [--port P] [--queue Q ...]`: the queues' backlog and the fleet's gauges for
Prometheus, from a process that serves nothing.

Workers export the backlog too, but a fleet scaled to zero has no worker to ask, and a scaler
that reads only workers never scales up from zero. The exporter loads no model and imports
neither Celery nor onnxruntime, numpy or OpenCV (only redis and prometheus_client), so it
starts in a fraction of a second and stays small; it reads Redis when scraped
(:class:`~imgq.worker.metrics.BacklogCollector`), read-only, and records nothing: losing it
loses no state. It runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from prometheus_client import REGISTRY, start_http_server

from imgq.worker.commands.backlog import readers, redis_client
from imgq.worker.logs import configure_logging, mask_url
from imgq.worker.metrics import BacklogCollector
from imgq.worker.settings import WorkerSettings

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(args: argparse.Namespace) -> int:
    """Serve ``/metrics`` on ``--port`` (``IMGQ_EXPORTER_PORT``) until stopped.

    Returns:
        0 when stopped, 2 when the settings or the port are refused (the reason printed).
    """
    try:
        settings = WorkerSettings.from_env(exporter_port=args.port)
        client = redis_client(settings)
        collector = BacklogCollector(readers(settings, args.queue, client), fleet_client=client)
    except ValueError as exc:
        print(f"imgq exporter: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, "INFO")
    REGISTRY.register(collector)
    try:
        server, _ = start_http_server(settings.exporter_port, registry=REGISTRY)
    except OSError as exc:
        print(
            f"imgq exporter: cannot serve on port {settings.exporter_port}: {exc}; set --port / "
            "IMGQ_EXPORTER_PORT to a free port",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info(
        "exporting",
        extra={"port": settings.exporter_port, "queues": [r.queue for r in collector.readers],
               "broker": mask_url(settings.broker_url)},
    )  # fmt: skip
    stop.wait()
    server.shutdown()
    client.close()
    logger.info("stopped")
    return 0
