"""A private OTLP/HTTP trace receiver on a free 127.0.0.1 port, for the tests and the benchmarks:
what a worker started with ``OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint`` exports arrives here.

It answers ``POST /v1/traces`` as an OpenTelemetry Collector does (an empty
``ExportTraceServiceResponse``), keeps the requests (or only counts them) and decodes them on
demand with ``opentelemetry-proto`` (installed with ``imgq[otel]``). Loopback only, in a thread
of the process that starts it, stopped by whoever started it.
"""

from __future__ import annotations

import dataclasses
import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpSink", "ReceivedSpan"]

#: Largest request body accepted (the SDK's batches are far smaller).
_MAX_BODY_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids in lowercase hex, as ``traceparent`` writes them."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    status: str
    resource: dict[str, Any]


class OtlpSink:
    """Receives OTLP/HTTP (protobuf) trace exports.

    Args:
        keep: Keep each request for :meth:`spans`; False only counts them (a benchmark).

    Example:
        >>> sink = OtlpSink().start()  # doctest: +SKIP
        >>> env = {"OTEL_TRACES_EXPORTER": "otlp",  # doctest: +SKIP
        ...        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
        >>> sink.spans()  # doctest: +SKIP
        >>> sink.stop()  # doctest: +SKIP
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.requests = 0
        self.bytes = 0
        self._bodies: list[bytes] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != "/v1/traces" or not 0 <= length <= _MAX_BODY_BYTES:
                    self.send_error(404 if self.path != "/v1/traces" else 413)
                    return
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                sink._received(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: a test's output shows its own failures

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink",
                                        daemon=True)  # fmt: skip

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends
        ``/v1/traces``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OtlpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _received(self, body: bytes) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += len(body)
            if self.keep:
                self._bodies.append(body)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in order of arrival."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

        with self._lock:
            bodies = list(self._bodies)
        found = []
        for body in bodies:
            request = ExportTraceServiceRequest.FromString(body)
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        found.append(
                            ReceivedSpan(
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_span_id=s.parent_span_id.hex(),
                                kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                                start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano,
                                attributes=_attributes(s.attributes),
                                links=tuple((k.trace_id.hex(), k.span_id.hex()) for k in s.links),
                                status=Status.StatusCode.Name(s.status.code).removeprefix(
                                    "STATUS_CODE_"
                                ),
                                resource=resource,
                            )
                        )
        return found


def _attributes(pairs: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` pairs as a dict of plain values."""
    out = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        out[pair.key] = getattr(pair.value, kind) if kind else None
    return out
