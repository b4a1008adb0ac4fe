"""The worker's settings: one frozen object per process, built from ``IMGQ_*`` in one place.

Every ``IMGQ_*`` environment variable is read here and nowhere else, and so are the OpenTelemetry
variables that decide whether and how the worker traces (``OTEL_TRACES_EXPORTER``, the sampler);
command-line options override them. Values are checked when the process starts, and a bad one
stops it with a message that says what was given and what is allowed, instead of failing on the
first task.

This module imports neither numpy nor OpenCV, so a client with only ``celery`` and ``redis``
installed can use :meth:`WorkerSettings.from_env` for the broker URL and queue.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from imgq.worker.broker.connection import results_options, url_problem
from imgq.worker.broker.options import masked_options, transport_problem
from imgq.worker.broker.priority import QueueLists
from imgq.worker.envvars import (
    _ENV_OF,
    _LIMIT_FIELDS,
    _OTEL_VARS,
    _VARS,
    ENV_VARS,
    parse_infer_batch,
)
from imgq.worker.logs import LOG_FORMATS, mask_url

if TYPE_CHECKING:
    import redis

    from imgq.shared.probe import DecodeLimits

__all__ = [
    "DEVICES",
    "ENV_VARS",
    "TRACES_EXPORTERS",
    "SettingsError",
    "WorkerSettings",
    "parse_infer_batch",
    "webhook_origin",
]

DEVICES = ("auto", "cpu", "cuda")
#: What ``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP_PROTOCOL`` and ``OTEL_TRACES_SAMPLER`` may
#: name (the specification's values that imgq supports).
TRACES_EXPORTERS = ("otlp", "console")
TRACES_PROTOCOLS = ("http/protobuf", "grpc")
TRACES_SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
                   "parentbased_always_off", "parentbased_traceidratio")  # fmt: skip


class SettingsError(ValueError):
    """Settings refused at start; the message names each variable, the value given and what is
    allowed (``imgq`` prints it as one line)."""


def _default_limits() -> DecodeLimits:
    from imgq.shared.probe import DecodeLimits

    return DecodeLimits()


def webhook_origin(url: str) -> str:
    """Scheme, host and port of a webhook URL, for logs: its path, query and user part may
    hold a token (Slack, PagerDuty and most receivers put one there). ``""`` when not a URL.

    >>> webhook_origin("https://user:pw@hooks.example.com:8443/T0/B1/s3cret?token=x")
    'https://hooks.example.com:8443'
    """
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return ""
    if not parts.scheme or not parts.hostname:
        return ""
    return f"{parts.scheme}://{parts.hostname}{port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Everything a worker process is configured with; build it with :meth:`from_env`.

    Attributes:
        broker_url: Redis URL of the task queue.
        result_backend: Redis URL of the results; defaults to ``broker_url``.
        model_dir: The model bundle folder; ``None``: fetch a published version
            (``worker/bundles.py``), or a process that does not serve.
        model_version: The published version to fetch (a sha256 prefix); ``None``: the queue's
            stable version.
        model_cache: Where fetched versions are kept.
        bundle_max_bytes: Largest bundle ``imgq models publish`` stores.
        queue: The queue name (a Redis list of that name, and one per priority level).
        broker_transport_options: Celery's ``broker_transport_options`` of the clients: the
            worker's Celery app uses them, and :attr:`queue_lists` reads the list names.
        result_backend_transport_options: The clients' ``result_backend_transport_options``.
        wait_replicas: Replicas that must acknowledge each settle (``WAIT``); 0: none.
        wait_timeout_ms: Longest ``WAIT`` of a settle.
        handlers: The handlers served (``worker/handlers/__init__.py``'s ``HANDLERS``).
        concurrency: Batch runner threads per process.
        max_batch: Most tasks taken, served and stored together.
        prefetch: Take the next batch while this one is served, and store this one meanwhile
            (``worker/engine.py``); False: one batch at a time.
        infer_batch: Most images per onnxruntime call; 0 measures the cheapest size at start
            on CPU (``ModelBundle.calibrate_infer_batch``) and uses the whole batch on CUDA.
        max_wait_ms: How long a partial batch waits for more; ``None`` picks by device
            (:meth:`wait_ms_for`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: onnxruntime intra-op threads.
        result_expires_s: Seconds a stored result is kept.
        lease_ttl_s: Lease lifetime; a worker silent this long is presumed dead.
        restore_interval_s: Seconds between looks for dead workers' messages.
        max_deliveries: Deliveries without a stored result after which a message is a poison
            pill (FAILURE ``redelivered_too_often``, dead letters).
        idle_poll_ms: Longest pause between two looks at an empty queue.
        decode_limits: Byte, pixel, aspect and size limits of images.
        batch_pixels: Most decoded pixels per batch.
        dead_letter_max_bytes: Most bytes of raw messages kept in a queue's dead letters.
        dead_letter_max_entries: Most dead-letter entries kept per queue.
        dead_letter_ttl_s: Seconds a dead-letter entry is kept.
        metrics_port: Prometheus port, 0 = off.
        exporter_port: The port ``imgq exporter`` serves the backlog and the fleet on.
        drift_window: Images per drift window.
        drift_window_s: Seconds before a drift window closes anyway.
        drift_enabled: Collect input statistics for drift detection.
        alert_webhook_url: Where drift pages are POSTed (``worker/drift/notify.py``); ``""``:
            no webhook. Never logged whole (:func:`webhook_origin`).
        alert_webhook_secret: The HMAC-SHA256 key of the signature header; never logged.
        alert_webhook_timeout_s: Most seconds one delivery attempt takes.
        alert_webhook_attempts: Attempts per alert before its dead letter.
        alert_webhook_backoff_s: Wait before the first retry (doubled per attempt, jittered).
        alert_webhook_backoff_max_s: Longest wait between two attempts.
        alert_webhook_clears: Also send the clear of a paged alert.
        task_events: Send Celery task events (Flower) for the tasks served.
        log_format: ``"json"`` or ``"text"``.
        traces_exporters: Where spans go (``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``);
            empty: tracing is off (``worker/tracing/``).
        otel_sdk_disabled: ``OTEL_SDK_DISABLED``: tracing off whatever the exporters.
        traces_protocol: The OTLP exporter's protocol, ``http/protobuf`` or ``grpc``.
        traces_sampler: ``OTEL_TRACES_SAMPLER``'s sampler name.
        traces_sampler_arg: Its ratio (``OTEL_TRACES_SAMPLER_ARG``).
    """

    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str = ""
    model_dir: Path | None = None
    model_version: str | None = None
    model_cache: Path = dataclasses.field(
        default_factory=lambda: Path.home() / ".cache" / "imgq" / "bundles"
    )
    bundle_max_bytes: int = 256 << 20
    queue: str = "imgq"
    broker_transport_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    result_backend_transport_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000
    handlers: tuple[str, ...] = ("classify",)
    concurrency: int = 1
    max_batch: int = 32
    prefetch: bool = True
    infer_batch: int = 0
    max_wait_ms: float | None = None
    device: str = "auto"
    threads: int = 1
    result_expires_s: int = 86400
    lease_ttl_s: float = 10.0
    restore_interval_s: float = 2.0
    max_deliveries: int = 3
    idle_poll_ms: float = 20.0
    decode_limits: DecodeLimits = dataclasses.field(default_factory=_default_limits)
    batch_pixels: int = 100_000_000
    dead_letter_max_bytes: int = 64 * 2**20
    dead_letter_max_entries: int = 10_000
    dead_letter_ttl_s: int = 7 * 86400
    metrics_port: int = 9808
    exporter_port: int = 9809
    drift_window: int = 200
    drift_window_s: float = 300.0
    drift_enabled: bool = True
    alert_webhook_url: str = dataclasses.field(default="", repr=False)
    alert_webhook_secret: str = dataclasses.field(default="", repr=False)
    alert_webhook_timeout_s: float = 10.0
    alert_webhook_attempts: int = 8
    alert_webhook_backoff_s: float = 1.0
    alert_webhook_backoff_max_s: float = 60.0
    alert_webhook_clears: bool = True
    task_events: bool = True
    log_format: str = "json"
    traces_exporters: tuple[str, ...] = ()
    otel_sdk_disabled: bool = False
    traces_protocol: str = "http/protobuf"
    traces_sampler: str = "parentbased_always_on"
    traces_sampler_arg: float = 1.0

    def __post_init__(self) -> None:
        if not self.result_backend:
            object.__setattr__(self, "result_backend", self.broker_url)
        if isinstance(self.result_backend_transport_options, dict) and isinstance(
            self.broker_transport_options, dict
        ):
            results = results_options(
                self.broker_url,
                self.broker_transport_options,
                self.result_backend,
                self.result_backend_transport_options,
            )
            object.__setattr__(self, "result_backend_transport_options", results)  # fmt: skip
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "model_cache", Path(self.model_cache).expanduser())
        problems = [p for p in self._problems() if p]
        if problems:
            raise SettingsError("invalid worker settings: " + "; ".join(problems))

    def _problems(self) -> list[str | None]:
        def name(field: str) -> str:
            return f"{field} ({_ENV_OF[field]})"

        def number(field: str, low: float, high: float, integer: bool = True) -> str | None:
            value = getattr(self, field)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                kind = "an integer" if integer else "a number"
                return f"{name(field)} must be {kind} in {low:g}..{high:g}, got {value!r}"
            return None

        def choice(field: str, allowed: tuple[str, ...]) -> str | None:
            value = getattr(self, field)
            if value not in allowed:
                return f"{name(field)} must be one of {', '.join(allowed)}, got {value!r}"
            return None

        def url(field: str, options_field: str) -> str | None:
            value, options = getattr(self, field), getattr(self, options_field)
            problem = (
                url_problem(value, options if isinstance(options, dict) else {},
                            _ENV_OF[options_field])
                if isinstance(value, str) else "must be a Redis URL"
            )  # fmt: skip
            if problem:
                shown = mask_url(value) if isinstance(value, str) else value
                return f"{name(field)}={shown!r}: {problem}"
            return None

        from imgq.worker.handlers import HANDLERS  # light: the registry imports nothing heavy

        handlers_ok = (
            isinstance(self.handlers, tuple)
            and bool(self.handlers)
            and all(h in HANDLERS for h in self.handlers)
            and len(set(self.handlers)) == len(self.handlers)
        )
        queue_ok = (
            isinstance(self.queue, str) and self.queue and not any(c.isspace() for c in self.queue)
        )
        model_ok = self.model_dir is None or self.model_dir.is_dir()
        try:
            lists_problem = transport_problem(self.broker_transport_options)
            self.queue_lists  # noqa: B018 (validates the options)
        except (ValueError, AttributeError) as exc:
            lists_problem = str(exc)
        if lists_problem:
            lists_problem = f"{name('broker_transport_options')}: {lists_problem}"
        results_problem = transport_problem(self.result_backend_transport_options)
        if results_problem:
            results_problem = f"{name('result_backend_transport_options')}: {results_problem}"
        return [
            url("broker_url", "broker_transport_options"),
            None
            if self.results_in_broker
            else url("result_backend", "result_backend_transport_options"),
            lists_problem,
            results_problem,
            None if model_ok else f"{name('model_dir')} {self.model_dir} is not a folder",
            None
            if queue_ok
            else f"{name('queue')} must be a non-empty name without spaces, got {self.queue!r}",
            None
            if handlers_ok
            else f"{name('handlers')} must name handlers among {', '.join(sorted(HANDLERS))}, "
            f"each once, got {self.handlers!r}",
            number("wait_replicas", 0, 100),
            number("wait_timeout_ms", 1, 600_000),
            number("concurrency", 1, 64),
            number("max_batch", 1, 4096),
            number("infer_batch", 0, 4096),
            None if self.max_wait_ms is None else number("max_wait_ms", 0, 5000, integer=False),
            choice("device", DEVICES),
            number("threads", 1, 256),
            number("result_expires_s", 1, 10 * 365 * 86400),
            number("lease_ttl_s", 1, 3600, integer=False),
            number("restore_interval_s", 0.1, 3600, integer=False),
            number("max_deliveries", 1, 1000),
            number("idle_poll_ms", 1, 1000, integer=False),
            number("batch_pixels", self.decode_limits.max_pixels, 10**11),
            number("dead_letter_max_bytes", 0, 2**40),
            number("bundle_max_bytes", 1, 2**29),
            number("dead_letter_max_entries", 1, 10**7),
            number("dead_letter_ttl_s", 60, 365 * 86400),
            number("metrics_port", 0, 65535),
            number("exporter_port", 1, 65535),
            number("drift_window", 10, 10_000_000),
            number("drift_window_s", 1, 30 * 86400, integer=False),
            None
            if isinstance(self.drift_enabled, bool)
            else f"{name('drift_enabled')} must be true or false, got {self.drift_enabled!r}",
            *self._webhook_problems(name, number),
            None
            if isinstance(self.task_events, bool)
            else f"{name('task_events')} must be true or false, got {self.task_events!r}",
            None
            if isinstance(self.prefetch, bool)
            else f"{name('prefetch')} must be true or false, got {self.prefetch!r}",
            choice("log_format", LOG_FORMATS),
            *self._tracing_problems(name, choice, number),
        ]

    def _tracing_problems(
        self, name: Callable[[str], str], choice: Callable[..., str | None],
        number: Callable[..., str | None],
    ) -> list[str | None]:  # fmt: skip
        """The OpenTelemetry variables imgq reads: refused at start with what is allowed (the
        SDK would log a warning and carry on with its default)."""
        exporters = self.traces_exporters
        exporters_ok = isinstance(exporters, tuple) and set(exporters) <= set(TRACES_EXPORTERS)
        return [
            None
            if exporters_ok
            else f"{name('traces_exporters')} must be none or name exporters among "
            f"{', '.join(TRACES_EXPORTERS)}, got {','.join(map(str, exporters))!r}",
            choice("traces_protocol", TRACES_PROTOCOLS),
            choice("traces_sampler", TRACES_SAMPLERS),
            number("traces_sampler_arg", 0, 1, integer=False),
        ]

    @property
    def tracing(self) -> bool:
        """Whether the worker traces: an exporter is named and the SDK is not disabled."""
        return bool(self.traces_exporters) and not self.otel_sdk_disabled

    def _webhook_problems(
        self, name: Callable[[str], str], number: Callable[..., str | None]
    ) -> list[str | None]:
        """The webhook's URL must be http(s) and come with a secret long enough to sign."""
        url, secret = self.alert_webhook_url, self.alert_webhook_secret
        if not isinstance(url, str) or not isinstance(secret, str):
            return [f"{name('alert_webhook_url')} and its secret must be strings"]
        url_ok = url == "" or (url.startswith(("http://", "https://")) and webhook_origin(url))
        return [
            None
            if url_ok
            else f"{name('alert_webhook_url')} must be an http:// or https:// URL with a host, "
            f"got {webhook_origin(url) or 'something else'!r}",
            None
            if url == "" or len(secret) >= 16
            else f"{name('alert_webhook_secret')} must be at least 16 characters when "
            f"{_ENV_OF['alert_webhook_url']} is set (got {len(secret)}); make one with "
            "`openssl rand -hex 32`",
            number("alert_webhook_timeout_s", 0.1, 600, integer=False),
            number("alert_webhook_attempts", 1, 100),
            number("alert_webhook_backoff_s", 0.01, 3600, integer=False),
            number("alert_webhook_backoff_max_s", self.alert_webhook_backoff_s, 86400, False),
            None
            if isinstance(self.alert_webhook_clears, bool)
            else f"{name('alert_webhook_clears')} must be true or false",
        ]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Settings from ``IMGQ_*`` variables (and the ``OTEL_*`` ones of tracing), with explicit
        overrides (e.g. command-line options).

        Args:
            environ: The environment to read. Defaults to ``os.environ``.
            **overrides: Field values that win over the environment; ``None`` values are ignored,
                so parsed command-line options can be passed as they are.

        Raises:
            SettingsError: a variable cannot be parsed or a value is outside what is allowed; the
                message names the variable, the value given and what is allowed.
            TypeError: an override names no field.

        >>> WorkerSettings.from_env({"IMGQ_MAX_BATCH": "8"}, queue="gpu").max_batch
        8
        >>> try:
        ...     WorkerSettings.from_env({"IMGQ_MAX_BATCH": "lots"})
        ... except SettingsError as exc:
        ...     print(exc)
        invalid worker settings: IMGQ_MAX_BATCH='lots' is not an integer
        """
        env = os.environ if environ is None else environ
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown settings {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        problems = []
        for var in _VARS + _OTEL_VARS:
            raw = env.get(var.env, "")
            if raw == "":
                continue
            try:
                values[var.field] = var.parse(raw)
            except ValueError as exc:
                problems.append(f"{var.env}={raw!r} {exc}")
        if problems:
            raise SettingsError("invalid worker settings: " + "; ".join(problems))
        limits = {k: values.pop(k) for k in _LIMIT_FIELDS if k in values}
        if limits:
            from imgq.shared.probe import DecodeLimits

            values["decode_limits"] = DecodeLimits(**limits)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def broker_client(self, **kwargs: Any) -> redis.Redis:
        """A client of the broker's Redis (its master, through Sentinel); ``kwargs`` are
        redis-py's connection options (``worker/broker/connection.py``)."""
        from imgq.worker.broker.connection import connect

        return connect(self.broker_url, self.broker_transport_options,
                       options_name=_ENV_OF["broker_transport_options"], **kwargs)  # fmt: skip

    def results_client(self, **kwargs: Any) -> redis.Redis:
        """A client of the results' Redis, as :meth:`broker_client`."""
        from imgq.worker.broker.connection import connect

        options_name = _ENV_OF["result_backend_transport_options"]
        return connect(self.result_backend, self.result_backend_transport_options,
                       options_name=options_name, **kwargs)  # fmt: skip

    @property
    def results_in_broker(self) -> bool:
        """Whether the results live in the broker's Redis (the same URL and, for Sentinel, the
        same master)."""
        return self.result_backend == self.broker_url and self.result_backend_transport_options.get(
            "master_name"
        ) == self.broker_transport_options.get("master_name")

    @property
    def queue_lists(self) -> QueueLists:
        """How the queue's Redis lists are named (priority levels, key prefix)."""
        return QueueLists.from_transport_options(self.broker_transport_options)

    @property
    def queue_list(self) -> str:
        """The queue's own Redis list: :attr:`queue` under the clients' ``global_keyprefix``."""
        return self.queue_lists.home(self.queue)

    @property
    def max_message_bytes(self) -> int:
        """The largest message that can carry a valid task: the image's base64 inside a JSON
        body that kombu base64-encodes again (x 16/9), plus 256 KiB of headers. A worker never
        reads a longer message (``worker/broker/intake.py``)."""
        return self.decode_limits.max_bytes * 16 // 9 + 256 * 1024

    def wait_ms_for(self, provider: str) -> float:
        """``max_wait_ms``, or its default for the execution provider that runs the model: 2 ms
        on CUDA, where a fuller batch costs almost nothing more; 0 on the CPU, where it does not
        run faster per image and waiting only adds latency."""
        if self.max_wait_ms is not None:
            return self.max_wait_ms
        return 2.0 if provider == "CUDAExecutionProvider" else 0.0

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict with passwords in URLs masked, for the start-up log."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("broker_url", "result_backend"):
                value = mask_url(value)
            elif field.name == "alert_webhook_url":
                value = webhook_origin(value)
            elif field.name == "alert_webhook_secret":
                value = "***" if value else ""
            elif field.name.endswith("transport_options"):
                value = masked_options(value)
            elif field.name == "decode_limits":
                value = dataclasses.asdict(value)
            elif isinstance(value, Path):
                value = str(value)
            out[field.name] = value
        return out
