"""The ``IMGQ_*`` environment variables: name, settings field, parser, default and meaning.

The table the README's and docs/operations.md's configuration references are written from
(``scripts/env_table.py``); :meth:`imgq.worker.settings.WorkerSettings.from_env` reads the
environment through it. Beside it, :data:`_OTEL_VARS`: the standard OpenTelemetry variables that
decide whether and how a worker traces (``worker/tracing/``); the OpenTelemetry SDK reads the
others itself (endpoint, headers, service name, batch processor). Nothing here reads
``os.environ``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV_VARS", "parse_infer_batch"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"is not a boolean; use one of {_TRUE + _FALSE}")


def _parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("is not an integer") from None


def parse_infer_batch(raw: str) -> int:
    """``auto`` (0: measured at start) or a positive number of images per model call."""
    if raw.strip().lower() == "auto":
        return 0
    return _parse_int(raw)


def _parse_names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of names, e.g. ``"classify,null"``."""
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def _parse_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("is not a JSON object")
    return value


def _parse_exporters(raw: str) -> tuple[str, ...]:
    """``OTEL_TRACES_EXPORTER``: comma-separated exporter names; ``none`` is no exporter."""
    names = tuple(name.lower() for name in _parse_names(raw))
    return () if names == ("none",) else names


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError("is not a number") from None


@dataclasses.dataclass(frozen=True)
class _Var:
    """One environment variable: the field it sets, how to parse it, its default and meaning."""

    env: str
    field: str
    parse: Callable[[str], Any]
    default: str
    meaning: str


#: The worker's environment variables, in the order of the README's reference.
_VARS: tuple[_Var, ...] = (
    _Var("IMGQ_BROKER_URL", "broker_url", str, "redis://127.0.0.1:6379/0",
         "Redis URL of the task queue (redis://, rediss:// for TLS, unix://, or Sentinel as "
         "kombu spells it: sentinel://h1:26379;sentinel://h2:26379 with master_name in "
         "IMGQ_BROKER_TRANSPORT_OPTIONS); a password goes in the URL and is masked in logs"),
    _Var("IMGQ_RESULT_BACKEND", "result_backend", str, "= IMGQ_BROKER_URL",
         "Redis URL where results are stored"),
    _Var("IMGQ_MODEL", "model_dir", Path, "(the queue's published version)",
         "model bundle folder written by `imgq train`; without it the worker fetches a "
         "version published with `imgq models publish`"),
    _Var("IMGQ_MODEL_VERSION", "model_version", str, "(the queue's stable version)",
         "published model version to serve when no folder is given (a sha256 prefix)"),
    _Var("IMGQ_MODEL_CACHE", "model_cache", Path, "~/.cache/imgq/bundles",
         "where fetched model versions are kept, checked, and reused"),
    _Var("IMGQ_BUNDLE_MAX_BYTES", "bundle_max_bytes", _parse_int, "268435456",
         "largest bundle `imgq models publish` stores in Redis"),
    _Var("IMGQ_QUEUE", "queue", str, "imgq", "queue the worker serves"),
    _Var("IMGQ_BROKER_TRANSPORT_OPTIONS", "broker_transport_options", _parse_json_object, "{}",
         "the clients' Celery broker_transport_options as JSON; priority_steps, sep and "
         "global_keyprefix name the queue's Redis lists, as kombu does; master_name, "
         "sentinel_kwargs and min_other_sentinels reach a Sentinel-managed master"),
    _Var("IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS", "result_backend_transport_options",
         _parse_json_object, "{}",
         "the clients' Celery result_backend_transport_options as JSON (global_keyprefix "
         "prefixes the result keys; Sentinel's options default to the broker's when the URLs "
         "are the same)"),
    _Var("IMGQ_WAIT_REPLICAS", "wait_replicas", _parse_int, "0",
         "replicas that must acknowledge each batch's results and ack (Redis WAIT after the "
         "settle) before the runner goes on; 0: asynchronous replication only "
         "(docs/operations.md, durability)"),
    _Var("IMGQ_WAIT_TIMEOUT_MS", "wait_timeout_ms", _parse_int, "1000",
         "longest such WAIT; one that falls short is counted (imgq_wait_shortfalls_total) and "
         "logged, and the runner goes on"),
    _Var("IMGQ_HANDLERS", "handlers", _parse_names, "classify",
         "comma-separated handlers the worker serves: classify (imgq.classify, needs a model), "
         "null (imgq.null, answers at once: for measuring the engine)"),
    _Var("IMGQ_CONCURRENCY", "concurrency", _parse_int, "1",
         "batch runner threads per worker process"),
    _Var("IMGQ_MAX_BATCH", "max_batch", _parse_int, "32",
         "most tasks taken from the queue, served and stored together"),
    _Var("IMGQ_PREFETCH", "prefetch", _parse_bool, "true",
         "take the next batch while this one is served, and store this one meanwhile, so no "
         "batch waits on Redis round trips; false: one batch at a time (for comparison)"),
    _Var("IMGQ_INFER_BATCH", "infer_batch", parse_infer_batch, "auto",
         "most images per onnxruntime call (a batch is split into calls of this size); auto "
         "measures the size that costs least per image at start on CPU, the whole batch on CUDA"),
    _Var("IMGQ_MAX_WAIT_MS", "max_wait_ms", _parse_float, "0 on CPU, 2 on CUDA",
         "how long a partial batch waits for more tasks; waiting pays only on a GPU"),
    _Var("IMGQ_DEVICE", "device", str, "auto",
         "auto (CUDA when onnxruntime-gpu and a GPU are present), cpu or cuda"),
    _Var("IMGQ_THREADS", "threads", _parse_int, "1",
         "onnxruntime intra-op threads per process; keep processes x threads <= cores"),
    _Var("IMGQ_RESULT_EXPIRES_S", "result_expires_s", _parse_int, "86400",
         "seconds a stored result is kept"),
    _Var("IMGQ_LEASE_TTL_S", "lease_ttl_s", _parse_float, "10",
         "a worker that has not renewed its lease for this long is dead; its tasks are "
         "redelivered within IMGQ_LEASE_TTL_S + IMGQ_RESTORE_INTERVAL_S"),
    _Var("IMGQ_RESTORE_INTERVAL_S", "restore_interval_s", _parse_float, "2",
         "how often each worker looks for dead workers' tasks"),
    _Var("IMGQ_MAX_DELIVERIES", "max_deliveries", _parse_int, "3",
         "a message handed out this many times without a stored result (its workers died or "
         "hung) ends in FAILURE redelivered_too_often and goes to the dead letters"),
    _Var("IMGQ_IDLE_POLL_MS", "idle_poll_ms", _parse_float, "20",
         "longest pause between two looks at an empty queue (the wait reads, never writes)"),
    _Var("IMGQ_MAX_BYTES", "max_bytes", _parse_int, "20971520",
         "largest encoded image accepted, in bytes"),
    _Var("IMGQ_MAX_PIXELS", "max_pixels", _parse_int, "40000000",
         "largest width x height accepted (decompression bomb guard)"),
    _Var("IMGQ_MAX_ASPECT", "max_aspect", _parse_float, "20",
         "largest long side / short side accepted"),
    _Var("IMGQ_MIN_SIDE_PX", "min_side_px", _parse_int, "8", "shortest side accepted, pixels"),
    _Var("IMGQ_BATCH_PIXELS", "batch_pixels", _parse_int, "100000000",
         "most decoded pixels per batch; the rest of a batch of huge images goes back to the "
         "head of the queue and is served next"),
    _Var("IMGQ_DEAD_LETTER_MAX_BYTES", "dead_letter_max_bytes", _parse_int, "67108864",
         "most bytes of raw messages the dead letters keep per queue (oldest bodies dropped "
         "first; their entries stay)"),
    _Var("IMGQ_DEAD_LETTER_MAX_ENTRIES", "dead_letter_max_entries", _parse_int, "10000",
         "most dead-letter entries kept per queue (oldest dropped)"),
    _Var("IMGQ_DEAD_LETTER_TTL_S", "dead_letter_ttl_s", _parse_int, "604800",
         "seconds a dead-letter entry and its message are kept"),
    _Var("IMGQ_METRICS_PORT", "metrics_port", _parse_int, "9808",
         "Prometheus metrics port; 0 turns the endpoint off"),
    _Var("IMGQ_EXPORTER_PORT", "exporter_port", _parse_int, "9809",
         "port of `imgq exporter`, which exports the queue's backlog and the fleet without "
         "serving (for a scaler, and a fleet scaled to zero)"),
    _Var("IMGQ_DRIFT_WINDOW", "drift_window", _parse_int, "200", "images per drift window"),
    _Var("IMGQ_DRIFT_WINDOW_S", "drift_window_s", _parse_float, "300",
         "seconds after which a drift window closes even if not full"),
    _Var("IMGQ_DRIFT", "drift_enabled", _parse_bool, "true",
         "collect input statistics for drift detection"),
    _Var("IMGQ_ALERT_WEBHOOK_URL", "alert_webhook_url", str, "(none: no webhook)",
         "http(s) URL that receives every drift page as a signed JSON POST (docs/operations.md); "
         "logged as its scheme and host only"),
    _Var("IMGQ_ALERT_WEBHOOK_SECRET", "alert_webhook_secret", str, "(none; required with the URL)",
         "key of the webhook's HMAC-SHA256 signature header, at least 16 characters; never logged"),
    _Var("IMGQ_ALERT_WEBHOOK_TIMEOUT_S", "alert_webhook_timeout_s", _parse_float, "10",
         "most seconds one webhook attempt takes, connect to last byte read"),
    _Var("IMGQ_ALERT_WEBHOOK_ATTEMPTS", "alert_webhook_attempts", _parse_int, "8",
         "attempts per alert before it goes to the webhook's dead letters"),
    _Var("IMGQ_ALERT_WEBHOOK_BACKOFF_S", "alert_webhook_backoff_s", _parse_float, "1",
         "wait before the first retry; it doubles per attempt, with jitter, up to "
         "IMGQ_ALERT_WEBHOOK_BACKOFF_MAX_S"),
    _Var("IMGQ_ALERT_WEBHOOK_BACKOFF_MAX_S", "alert_webhook_backoff_max_s", _parse_float, "60",
         "longest wait between two webhook attempts"),
    _Var("IMGQ_ALERT_WEBHOOK_CLEARS", "alert_webhook_clears", _parse_bool, "true",
         "also send the clear of a paged alert"),
    _Var("IMGQ_TASK_EVENTS", "task_events", _parse_bool, "true",
         "send Celery task events (received, succeeded, failed, revoked) so Flower shows tasks; "
         "one publish per batch"),
    _Var("IMGQ_LOG_FORMAT", "log_format", str, "json", "json (one object per line) or text"),
)  # fmt: skip

#: The OpenTelemetry variables read here (their names and meanings are the specification's,
#: docs/operations.md "Traces"); the later of two for one field wins.
_OTEL_VARS: tuple[_Var, ...] = (
    _Var("OTEL_TRACES_EXPORTER", "traces_exporters", _parse_exporters, "none",
         "otlp, console or none (comma-separated for several); none: tracing is off and "
         "nothing of OpenTelemetry is imported"),
    _Var("OTEL_SDK_DISABLED", "otel_sdk_disabled", _parse_bool, "false",
         "true turns tracing off whatever the exporter"),
    _Var("OTEL_EXPORTER_OTLP_PROTOCOL", "traces_protocol", str.lower, "http/protobuf",
         "http/protobuf or grpc"),
    _Var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "traces_protocol", str.lower, "http/protobuf",
         "the same, for traces only"),
    _Var("OTEL_TRACES_SAMPLER", "traces_sampler", str.lower, "parentbased_always_on",
         "always_on, always_off, traceidratio or parentbased_ of one of them"),
    _Var("OTEL_TRACES_SAMPLER_ARG", "traces_sampler_arg", _parse_float, "1.0",
         "the ratio of traceidratio samplers, 0..1"),
)  # fmt: skip

#: Environment variable -> (default, meaning), for the README's configuration reference.
ENV_VARS: dict[str, tuple[str, str]] = {v.env: (v.default, v.meaning) for v in _VARS}

#: The fields of ``shared.decode.DecodeLimits`` that environment variables set.
_LIMIT_FIELDS = ("max_bytes", "max_pixels", "max_aspect", "min_side_px")
_ENV_OF = {v.field: v.env for v in _VARS + _OTEL_VARS}
