"""`imgq worker`: settings, logging and metrics, then a Celery worker with the bulk consumer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from celery import signals
from celery.utils.nodenames import default_nodename, host_format

from shared.errors import ImgqError
from worker.app import make_app
from worker.logs import configure_logging
from worker.metrics import start_metrics_server
from worker.settings import WorkerSettings

__all__ = ["main"]

logger = logging.getLogger("worker.main")


def _keep_our_logging(**kwargs: Any) -> None:
    """Connected to Celery's ``setup_logging`` signal: having a receiver tells Celery to leave
    the (JSON) logging configured by :func:`main` alone."""


def main(args: argparse.Namespace) -> int:
    """Run a worker until it is stopped (SIGTERM/SIGINT: warm shutdown).

    Args:
        args: ``imgq worker`` options (see imgq/cli.py); each given option overrides its
            ``IMGQ_*`` variable.

    Returns:
        The exit status: 0 after a clean shutdown, 2 when the settings or the bundle are refused
        (the reason is printed), Celery's status otherwise.
    """
    try:
        settings = WorkerSettings.from_env(
            model_dir=args.model,
            queue=args.queue,
            concurrency=args.concurrency,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            device=args.device,
            threads=args.threads,
            metrics_port=args.metrics_port,
        )
    except ValueError as exc:
        print(f"imgq worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, args.loglevel)
    signals.setup_logging.connect(_keep_our_logging, weak=False)
    logger.info("settings", extra={"settings": settings.describe()})
    try:
        start_metrics_server(settings.metrics_port)
    except OSError as exc:
        print(
            f"imgq worker: cannot serve metrics on port {settings.metrics_port}: {exc}; set "
            "--metrics-port / IMGQ_METRICS_PORT to a free port, or 0 to turn metrics off",
            file=sys.stderr,
        )
        return 2
    app = make_app(settings)
    try:
        worker = app.Worker(
            hostname=host_format(default_nodename(args.hostname or f"imgq{os.getpid()}@%h")),
            loglevel=args.loglevel,
            quiet=True,
            without_mingle=True,
            without_gossip=True,
        )
    except ImgqError as exc:
        print(f"imgq worker: cannot start: {exc}", file=sys.stderr)
        return 2
    worker.start()
    return int(worker.exitcode or 0)
