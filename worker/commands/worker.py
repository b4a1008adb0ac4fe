"""`imgq worker`: settings, logging and metrics, then a Celery worker with the bulk consumer."""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any

import redis
from celery import signals
from celery.utils.nodenames import default_nodename, host_format
from prometheus_client import REGISTRY

from imgq.shared.errors import ImgqError
from imgq.worker.broker.connection import RedisRefused
from imgq.worker.celeryapp.app import make_app
from imgq.worker.commands.backlog import readers, redis_client
from imgq.worker.logs import configure_logging, mask_url
from imgq.worker.metrics import BacklogCollector, start_metrics_server
from imgq.worker.settings import WorkerSettings

__all__ = ["main"]

logger = logging.getLogger("imgq.worker.commands.worker")


def _keep_batch_buffers() -> None:
    """Tell glibc to keep freed batch buffers instead of returning them to the kernel.

    Each batch frees tens of MB (decoded frames, the input tensor); by default glibc unmaps them
    and the next batch pays thousands of page faults (``docs/benchmarks.md``, design figures).
    Thresholds: mmap above 64 MiB, trim above 256 MiB. A no-op where the C library is not
    glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _opencv_in_calling_thread() -> None:
    """Run OpenCV's calls in the thread that makes them, as everything else in a worker does
    (its parallelism is processes x batch threads). OpenCV's own thread pool split the drift
    statistics' calls on a batch's tall image across a second core and spun it, doubling their
    CPU for no gain in time (``docs/benchmarks.md``, design figures)."""
    import cv2

    cv2.setNumThreads(1)


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
            model_version=getattr(args, "model_version", None),
            queue=args.queue,
            handlers=_names(getattr(args, "handlers", None)),
            concurrency=args.concurrency,
            max_batch=args.max_batch,
            infer_batch=getattr(args, "infer_batch", None),
            max_wait_ms=args.max_wait_ms,
            device=args.device,
            threads=args.threads,
            metrics_port=args.metrics_port,
        )
    except ValueError as exc:
        print(f"imgq worker: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, args.loglevel)
    _keep_batch_buffers()
    _opencv_in_calling_thread()
    signals.setup_logging.connect(_keep_our_logging, weak=False)
    logger.info("settings", extra={"settings": settings.describe()})
    if settings.metrics_port:  # the queue's backlog too, read from Redis at each scrape
        REGISTRY.register(BacklogCollector(readers(settings, None, redis_client(settings))))
    try:
        start_metrics_server(settings.metrics_port)
    except OSError as exc:
        print(
            f"imgq worker: cannot serve metrics on port {settings.metrics_port}: {exc}; set "
            "--metrics-port / IMGQ_METRICS_PORT to a free port, or 0 to turn metrics off",
            file=sys.stderr,
        )
        return 2
    try:
        if not _wait_for_redis(settings):
            return 1
    except RedisRefused as exc:
        print(f"imgq worker: {exc}", file=sys.stderr)
        return 2
    if settings.model_dir is None and "classify" in settings.handlers:
        try:
            settings = _published_bundle(settings)
        except (ImgqError, redis.RedisError, OSError, ValueError) as exc:
            print(f"imgq worker: cannot fetch a published model: {exc}", file=sys.stderr)
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
    service = app.imgq_service
    if service is not None and service.fault:
        print(f"imgq worker: stopped by a fault: {service.fault}", file=sys.stderr)
        return 1
    return int(worker.exitcode or 0)


def _published_bundle(settings: WorkerSettings) -> WorkerSettings:
    """``settings`` with the folder of the published version it pins (``--model-version``),
    fetched and checked (``worker/bundles.py``); without a pin, unchanged once the queue's
    stable version is fetched: the worker follows the queue's rollout (``worker/rollout/``)."""
    from imgq.worker.bundles import fetch, resolve

    client = settings.broker_client(socket_timeout=60)
    version = resolve(client, settings.model_version, settings.queue_list)
    folder = fetch(client, version, settings.model_cache, settings.bundle_max_bytes)
    logger.info("model version fetched", extra={"version": version.version, "model": version.name,
                                                "folder": str(folder)})  # fmt: skip
    if settings.model_version is None:
        return settings
    return dataclasses.replace(settings, model_dir=folder)


def _names(raw: str | None) -> tuple[str, ...] | None:
    """``--handlers classify,null`` as a tuple (None when not given)."""
    if raw is None:
        return None
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def _wait_for_redis(settings: WorkerSettings) -> bool:
    """Until the broker (and the results' Redis, when another) accepts a write, log why not
    every few seconds: a Redis that is down, loading its data, full (``maxmemory`` with
    ``noeviction``), a read-only replica, a user without permission or a Sentinel group amid a
    failover is an outage to wait out, not a reason to crash-loop.

    Returns:
        True once Redis accepts writes; False when interrupted.

    Raises:
        RedisRefused: a Redis Cluster node, or sentinels that monitor no master of that name:
            a mistake no wait mends.
    """
    timeouts = {"socket_timeout": 5, "socket_connect_timeout": 5}
    targets = [(settings.broker_url, settings.broker_client(**timeouts))]
    if not settings.results_in_broker:
        targets.append((settings.result_backend, settings.results_client(**timeouts)))
    try:
        return all(_wait_for_writes(url, client) for url, client in targets)
    finally:
        for _, client in targets:
            client.close()


def _wait_for_writes(url: str, client: redis.Redis) -> bool:
    probe = f"imgq:probe:{os.getpid()}"
    backoff_s, logged_s = 0.2, -math.inf
    try:
        while True:
            try:
                client.set(probe, "1", px=1000)
                if logged_s > -math.inf:
                    logger.info("Redis at %s accepts writes; starting", mask_url(url))
                return True
            except RedisRefused:
                raise
            except redis.RedisError as exc:
                now = time.monotonic()
                if now - logged_s >= 10:
                    logged_s = now
                    logger.warning(
                        "waiting for Redis at %s to accept writes: %s", mask_url(url), _why(exc)
                    )
                time.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
    except KeyboardInterrupt:
        return False


def _why(exc: redis.RedisError) -> str:
    """What a Redis error means for an operator, with the fix."""
    text = str(exc)
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
        return f"{text} (Redis is full: free memory or raise maxmemory)"
    if isinstance(exc, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return f"{text} (this is a replica: point IMGQ_BROKER_URL at the primary)"
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in text:
        return f"{text} (grant the Redis user the commands imgq needs: docs/security.md)"
    if isinstance(exc, redis.exceptions.BusyLoadingError) or "loading" in text.lower():
        return f"{text} (Redis is loading its data set)"
    return text
