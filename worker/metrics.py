"""The worker's Prometheus metrics, served on ``IMGQ_METRICS_PORT``.

One :class:`WorkerMetrics` per registry. A worker process uses :func:`process_metrics` (the
default registry, which also carries the process's CPU and memory); tests build their own on a
fresh ``CollectorRegistry`` so counts start at zero.

Names (all prefixed ``imgq_``):

- ``tasks_total{outcome,reason}``: outcome ``success``, ``failure``, ``expired`` or
  ``dead_letter``; reason is the failure's reason code (``""`` for success).
- ``images_total``: images run through the model (``rate()`` gives images per second).
- ``batch_size``: tasks per model call (histogram).
- ``queue_wait_seconds``, ``preprocess_seconds``, ``inference_seconds`` (histograms): enqueue to
  pick-up per task taken, whatever its outcome (for tasks that carry ``imgq_sent_at``, as
  ``ImgqClient`` sends them; Celery's own messages carry no send time), decode + preprocess per
  model call, the model call itself.
- ``followups_total{kind,outcome}``: what was sent after a task for its canvas
  (``worker/celeryapp/followups.py``): kind ``callback``, ``chain``, ``chord``, ``errback``; outcome
  ``sent`` or ``failed`` (logged; the task's own result is stored either way).
- ``wait_shortfalls_total``: settles whose ``WAIT`` (``IMGQ_WAIT_REPLICAS``) fell short: their
  results and ack were on the master only when the runner went on (``worker/broker/settle.py``).
- ``model_info{name,sha256,version,provider}`` = 1.
- ``drift_psi{model,drift_id,feature}``, ``drift_alerts_open{model,drift_id,tier}``,
  ``drift_alerts_total{model,drift_id,tier}`` (one per alert raised; at 0 for both tiers from
  the moment the worker loads a version, so that a rule's ``increase()`` sees the first page),
  ``drift_alert_features_total{model,drift_id,feature,tier}`` (the features of each alert),
  ``drift_windows_total{model,drift_id,tier}``, ``drift_estimated_accuracy{model,drift_id}``:
  set by ``worker/drift/detector.py``.
- ``alert_webhook_total{outcome}``: drift entries the alert webhook handled
  (``worker/drift/notify.py``): ``delivered``, ``retried`` (per failed attempt retried),
  ``dead_letter``, ``skipped`` (notices, clears of notices).
- ``fleet_workers``, ``fleet_worker_lost_timestamp_seconds``: the fleet as the keeper's last
  sweep of Redis saw it (``worker/broker/fleet.py``), the same on every worker of one Redis.
- ``queue_backlog{queue,state}`` (state ``ready``, ``in_flight``, ``due``, ``scheduled``) and
  ``queue_oldest_age_seconds{queue}``: the queue's backlog read from Redis at each scrape
  (:class:`BacklogCollector`, ``worker/broker/backlog.py``); every worker and ``imgq exporter``
  export the same figures, so read them with ``max by (queue, state)``, never ``sum``.
- ``backlog_read_errors_total``: scrapes whose backlog read failed (the backlog's series are
  then left out, not reported as an empty queue).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imgq.worker.broker.backlog import STATES, Backlog, BacklogReader
from imgq.worker.broker.fleet import FleetView, observe

__all__ = ["BacklogCollector", "WorkerMetrics", "process_metrics", "start_metrics_server"]

logger = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip


class WorkerMetrics:
    """The worker's collectors, registered on ``registry``.

    Args:
        registry: Where to register. Defaults to prometheus_client's default registry.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.tasks = Counter(
            "imgq_tasks", "Tasks finished, by outcome and reason code.",
            ["outcome", "reason"], registry=registry,
        )  # fmt: skip
        self.followups = Counter(
            "imgq_followups", "Callbacks, chain steps, chord parts and errbacks of tasks.",
            ["kind", "outcome"], registry=registry,
        )  # fmt: skip
        self.wait_shortfalls = Counter(
            "imgq_wait_shortfalls", "Settles whose WAIT for replicas fell short.",
            registry=registry,
        )  # fmt: skip
        self.images = Counter("imgq_images", "Images run through the model.", registry=registry)
        self.batch_size = Histogram(
            "imgq_batch_size", "Tasks per model call.", buckets=_BATCH_BUCKETS, registry=registry
        )
        self.queue_wait = Histogram(
            "imgq_queue_wait_seconds", "Enqueue to pick-up, per task that carries imgq_sent_at.",
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.preprocess = Histogram(
            "imgq_preprocess_seconds", "Decode, statistics and preprocessing, per batch.",
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.inference = Histogram(
            "imgq_inference_seconds", "The model call, per batch.",
            buckets=_LATENCY_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.model_info = Gauge(
            "imgq_model_info", "The served model (value 1).",
            ["name", "sha256", "version", "provider"],
            registry=registry,
        )  # fmt: skip
        self.model_tasks = Counter(
            "imgq_model_tasks", "Tasks per model version: success, failure (the model's), "
            "invalid (the input's), shadow (run beside the stable version, not answered).",
            ["version", "outcome"], registry=registry,
        )  # fmt: skip
        self.drift_psi = Gauge(
            "imgq_drift_psi", "PSI of the last closed window against the reference.",
            ["model", "drift_id", "feature"], registry=registry,
        )  # fmt: skip
        self.drift_alerts_open = Gauge(
            "imgq_drift_alerts_open", "Drift alerts open now, by tier (page, notice).",
            ["model", "drift_id", "tier"], registry=registry,
        )  # fmt: skip
        self.drift_alerts = Counter(
            "imgq_drift_alerts", "Drift alerts raised, by tier (page, notice).",
            ["model", "drift_id", "tier"], registry=registry,
        )  # fmt: skip
        self.drift_alert_features = Counter(
            "imgq_drift_alert_features", "Features of the drift alerts raised, by alert tier.",
            ["model", "drift_id", "feature", "tier"], registry=registry,
        )  # fmt: skip
        self.drift_windows = Counter(
            "imgq_drift_windows", "Drift windows judged, by verdict tier (page, notice, ok).",
            ["model", "drift_id", "tier"], registry=registry,
        )  # fmt: skip
        self.drift_estimated_accuracy = Gauge(
            "imgq_drift_estimated_accuracy",
            "Estimated accuracy (mean calibrated top-1 probability) of the last judged window.",
            ["model", "drift_id"], registry=registry,
        )  # fmt: skip
        self.alert_webhook = Counter(
            "imgq_alert_webhook", "Drift alert stream entries the alert webhook handled.",
            ["outcome"], registry=registry,
        )  # fmt: skip
        self.fleet_workers = Gauge(
            "imgq_fleet_workers", "Workers of this Redis holding a lease, at the last sweep.",
            registry=registry,
        )  # fmt: skip
        self.fleet_worker_lost = Gauge(
            "imgq_fleet_worker_lost_timestamp_seconds",
            "When this Redis last recorded a worker lost (its lease lapsed without a clean "
            "shutdown); 0: none recorded.", registry=registry,
        )  # fmt: skip


_process_metrics: WorkerMetrics | None = None
_process_lock = threading.Lock()


def process_metrics() -> WorkerMetrics:
    """This process's metrics on the default registry, created on first use."""
    global _process_metrics
    with _process_lock:
        if _process_metrics is None:
            _process_metrics = WorkerMetrics()
        return _process_metrics


def start_metrics_server(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread; 0 does nothing."""
    if port:
        _start_http_server(port, registry=registry)


class BacklogCollector(Collector):
    """The backlog of queues (and, for a process outside the fleet, the fleet's gauges), read
    from Redis when scraped: always as fresh as the scrape, and no Redis traffic between
    scrapes. Reads within ``min_interval_s`` of the last share it (several scrapers).

    A read that fails leaves that scrape without the backlog's series and counts
    ``imgq_backlog_read_errors_total``: a missing series makes a scaler hold (KEDA: its
    fallback), where a 0 would scale the fleet down while Redis is out of reach.

    Args:
        readers: One per queue exported.
        fleet_client: When given, the fleet's gauges too, from :func:`~imgq.worker.broker.fleet.
            observe` (a worker exports its own sweep's instead).
        min_interval_s: Reads closer together than this share the first.
    """

    def __init__(
        self,
        readers: Sequence[BacklogReader],
        fleet_client: redis.Redis | None = None,
        min_interval_s: float = 1.0,
    ) -> None:
        self.readers = list(readers)
        self.fleet_client = fleet_client
        self.min_interval_s = min_interval_s
        self.errors = 0
        self._lock = threading.Lock()
        self._last: tuple[float, list[Backlog], FleetView | None] | None = None

    def describe(self) -> list[Metric]:
        """Nothing: registering the collector must not read Redis."""
        return []

    def read(self) -> tuple[list[Backlog], FleetView | None]:
        """The backlog of every queue, and the fleet (None without ``fleet_client``), read now
        or within ``min_interval_s``.

        Raises:
            redis.RedisError: a read failed (counted).
        """
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.min_interval_s:
                return self._last[1], self._last[2]
            try:
                backlogs = [reader.read() for reader in self.readers]
                fleet = observe(self.fleet_client) if self.fleet_client is not None else None
            except redis.RedisError:
                self.errors += 1
                raise
            self._last = (now, backlogs, fleet)
            return backlogs, fleet

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "imgq_backlog_read_errors", "Scrapes whose backlog read from Redis failed."
        )
        try:
            backlogs, fleet = self.read()
        except redis.RedisError as exc:
            logger.warning("could not read the backlog from Redis: %s", exc)
            backlogs, fleet = [], None
        errors.add_metric([], self.errors)
        yield errors
        if backlogs:
            yield from _backlog_families(backlogs)
        if fleet is not None:
            yield GaugeMetricFamily(
                "imgq_fleet_workers", "Workers of this Redis holding a lease.", value=fleet.live
            )
            yield GaugeMetricFamily(
                "imgq_fleet_worker_lost_timestamp_seconds",
                "When this Redis last recorded a worker lost; 0: none recorded.",
                value=fleet.last_lost_at,
            )


def _backlog_families(backlogs: Sequence[Backlog]) -> Iterator[Metric]:
    counts = GaugeMetricFamily(
        "imgq_queue_backlog",
        "Messages not answered, by state: ready (queued), in_flight (taken, in a batch), due "
        "(eta come, not yet queued again), scheduled (eta ahead).",
        labels=["queue", "state"],
    )
    ages = GaugeMetricFamily(
        "imgq_queue_oldest_age_seconds",
        "How long the oldest ready message has waited (0: none ready).",
        labels=["queue"],
    )
    for backlog in backlogs:
        for state in STATES:
            counts.add_metric([backlog.queue, state], getattr(backlog, state))
        ages.add_metric([backlog.queue], backlog.oldest_age_s)
    yield counts
    yield ages
