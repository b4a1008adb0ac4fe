"""`imgq drift notify`: a process that sends every model's drift pages to the webhook (the
same sender a worker runs for its own model, :class:`~imgq.worker.drift.notify.AlertNotifier`),
for fleets where only some machines may reach the receiver, or workers should not.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable

import redis

from imgq.worker.drift.layout import _text
from imgq.worker.drift.notify import AlertNotifier, WebhookConfig, log
from imgq.worker.logs import configure_logging, mask_url
from imgq.worker.metrics import start_metrics_server
from imgq.worker.settings import WorkerSettings

__all__ = ["model_streams", "notify_main"]

_ALERTS_PATTERN = "imgq:drift:*:alerts"


#: Seconds between two SCANs for alert streams: a new model's first page waits at most this.
RESCAN_S = 5.0


def model_streams(client: redis.Redis, rescan_s: float = RESCAN_S) -> Callable[[], list[str]]:
    """Every model's alert stream, found by ``SCAN`` every ``rescan_s`` (for
    ``imgq drift notify``, which serves all models; the alert keys are few, SCAN is cheap)."""
    found: list[str] = []
    next_scan = 0.0

    def streams() -> list[str]:
        nonlocal found, next_scan
        if time.monotonic() >= next_scan:
            keys = client.scan_iter(match=_ALERTS_PATTERN, count=1000, _type="stream")
            found = sorted({_text(k) for k in keys})
            next_scan = time.monotonic() + rescan_s
        return found

    return streams


def notify_main(args: argparse.Namespace) -> int:
    """`imgq drift notify`: send every model's drift pages to the webhook until stopped."""
    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        print(f"imgq drift notify: {exc}", file=sys.stderr)
        return 2
    config = WebhookConfig.from_settings(settings)
    if config is None:
        print("imgq drift notify: set IMGQ_ALERT_WEBHOOK_URL (and its secret)", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    start_metrics_server(settings.metrics_port)
    client = settings.broker_client(socket_timeout=30, health_check_interval=30)
    log.info("imgq drift notify: Redis at %s", mask_url(settings.broker_url))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    notifier = AlertNotifier(client, config, model_streams(client)).start()
    try:
        stop.wait()
    finally:
        notifier.close()
        client.close()
    return 0
