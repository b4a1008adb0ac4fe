"""The worker's OpenTelemetry tracer provider, configured the OpenTelemetry way.

imgq reads the variables that decide whether and how it traces in ``worker/settings.py``
(``OTEL_TRACES_EXPORTER``, ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL``, ``OTEL_TRACES_SAMPLER`` and
``_ARG``, ``OTEL_SDK_DISABLED``), so that a wrong value stops the worker at start with what is
allowed instead of a warning; the SDK reads the rest itself, as in any instrumented program:
``OTEL_EXPORTER_OTLP_ENDPOINT`` and ``_HEADERS`` (the exporters), ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (the resource), ``OTEL_BSP_*`` (the batch span processor),
``OTEL_PROPAGATORS``.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from imgq.shared.errors import ImgqError
from imgq.worker.settings import WorkerSettings

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "FollowLinks",
    "HashedOnce",
    "StagedTraceIds",
    "root_bound",
    "sampler",
    "tracer_provider",
]

#: ``service.name`` when neither ``OTEL_SERVICE_NAME`` nor ``OTEL_RESOURCE_ATTRIBUTES`` names one.
DEFAULT_SERVICE_NAME = "imgq-worker"
#: OpenTelemetry's loggers that warn about a malformed ``tracestate`` or ``baggage`` header: every
#: message is hostile input, and such a context is left out without a log line per message.
_HOSTILE_INPUT_LOGGERS = (
    "opentelemetry.trace.span",
    "opentelemetry.trace.propagation.tracecontext",
    "opentelemetry.baggage.propagation",
)
#: The span processor's loggers: a full queue is logged per span dropped, an unreachable
#: collector per batch; a worker logs each at most once a minute.
_EXPORT_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
)
_LOG_EVERY_S = 60.0


class OncePerMinute(logging.Filter):
    """Lets each message (its format string) through at most once a minute: a collector that is
    down, or a queue that overflows, would otherwise log a line per batch or per span."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_s: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        if now - self._logged_s.get(key, -math.inf) < _LOG_EVERY_S:
            return False
        self._logged_s[key] = now
        return True


class FollowLinks(Sampler):
    """The configured sampler, except that a root span with a sampled link is sampled: a batch's
    spans are kept whenever the span of one of its tasks is, whatever the ratio."""

    def __init__(self, configured: Sampler) -> None:
        self.configured = configured

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if links and any(link.context.trace_flags.sampled for link in links):
            if not get_current_span(parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.configured.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"FollowLinks{{{self.configured.get_description()}}}"


class StagedTraceIds(RandomIdGenerator):
    """Random ids, except a trace id staged in this thread for its next root span: the worker
    decides whether a task without a context is sampled before it makes the task's span (at a
    low ratio nearly none is, and then none is made), with the trace id the span then gets."""

    def __init__(self) -> None:
        self._staged = threading.local()

    def stage(self, trace_id: int) -> None:
        """The trace id of the next root span this thread starts."""
        self._staged.trace_id = trace_id

    def sampled_root(self, bound: int) -> int | None:
        """A trace id for a root span, staged, when the sampler samples it (the low 64 bits
        below ``bound``, as :func:`root_bound` says), else None: one random draw decides, with
        no call of the sampler chain (which costs several times the draw)."""
        low = random.getrandbits(64)
        if low >= bound:
            return None
        trace_id = random.getrandbits(64) << 64 | low
        if trace_id == 0:  # the invalid id (one chance in 2**128): not sampled
            return None
        self.stage(trace_id)
        return trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._staged, "trace_id", None)
        if trace_id is None:
            return super().generate_trace_id()
        self._staged.trace_id = None
        return trace_id


class HashedOnce(Resource):
    """The resource, hashed once: the OTLP encoder hashes the resource of every span it exports
    (to group spans by resource), and the SDK's hash writes all its attributes as JSON each time
    (a sixth of the encoding's cost). A resource is immutable."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def sampler(name: str, ratio: float) -> Sampler:
    """The SDK's sampler of an ``OTEL_TRACES_SAMPLER`` name (``worker/settings.py`` checked it).

    >>> sampler("parentbased_traceidratio", 0.01).get_description()
    'ParentBased{root:TraceIdRatioBased{0.01},remoteParentSampled:AlwaysOnSampler,...'
    """
    roots = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    plain = name.removeprefix("parentbased_")
    root = roots[plain] if plain in roots else TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def root_bound(name: str, ratio: float) -> int:
    """The bound the low 64 bits of a trace id stay below when the sampler of ``name`` and
    ``ratio`` samples a root span without links (the decision for a task without a context):
    the SDK's ``TraceIdRatioBased`` rule, ``ParentBased`` deferring to its root for a span
    without a parent, and :class:`FollowLinks` to the configured sampler without links.

    >>> root_bound("parentbased_traceidratio", 0.5) == 2**63, root_bound("always_off", 1.0)
    (True, 0)
    """
    plain = name.removeprefix("parentbased_")
    if plain == "always_on":
        return TraceIdRatioBased.TRACE_ID_LIMIT + 1
    if plain == "always_off":
        return 0
    return TraceIdRatioBased.get_bound_for_rate(ratio)


def tracer_provider(settings: WorkerSettings) -> TracerProvider:
    """A tracer provider with the settings' sampler (:class:`FollowLinks` around it), one batch
    span processor per exporter, and ``service.name`` :data:`DEFAULT_SERVICE_NAME` unless the
    environment names the service (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``).

    Raises:
        ImgqError: an exporter's package is missing, or the SDK refuses its configuration.
    """
    for name in _HOSTILE_INPUT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in _EXPORT_LOGGERS:
        exporting = logging.getLogger(name)
        if not any(isinstance(f, OncePerMinute) for f in exporting.filters):
            exporting.addFilter(OncePerMinute())
    try:
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        configured = sampler(settings.traces_sampler, settings.traces_sampler_arg)
        provider = TracerProvider(sampler=FollowLinks(configured), resource=HashedOnce(resource),
                                  id_generator=StagedTraceIds())  # fmt: skip
        for name in settings.traces_exporters:
            exporter = _exporter(name, settings.traces_protocol)
            provider.add_span_processor(BatchSpanProcessor(exporter))
    except ImgqError:
        raise
    except Exception as exc:
        raise ImgqError(f"OpenTelemetry refused the tracing configuration: {exc}") from exc
    return provider


def _exporter(name: str, protocol: str) -> SpanExporter:
    """``console`` (one JSON object per span and line on stdout, beside the log) or ``otlp``."""
    if name == "console":
        return ConsoleSpanExporter(out=sys.stdout, formatter=_one_line)
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        raise ImgqError(
            f"OTEL_TRACES_EXPORTER=otlp over {protocol} needs its exporter package ({exc}); "
            "install imgq[otel] (pip install 'imgq[otel]')"
        ) from None
    return OTLPSpanExporter()


def _one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"
