"""Traces (issue 27): a stock Celery producer instrumented by opentelemetry-instrumentation-celery
sends to a real `imgq worker` on a real redis-server, and the worker's spans (exported over OTLP
to a receiver of the test's own, ``imgq/otlpsink.py``) continue each producer's trace; a batch's
span links to every task it served; a message without a context, or with a malformed one,
starts a new trace and is served as any; follow-ups carry the context on. With tracing off,
nothing of OpenTelemetry is imported."""

from __future__ import annotations

import base64
import json
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery, current_app
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from imgq.otlpsink import OtlpSink, ReceivedSpan
from imgq.worker.client import ImgqClient
from imgq.worker.outcome import BatchOutcome
from imgq.worker.settings import TRACES_SAMPLERS, WorkerSettings
from imgq.worker.tracing.provider import (
    FollowLinks,
    HashedOnce,
    root_bound,
    sampler,
    tracer_provider,
)
from imgq.worker.tracing.spans import BatchTracer
from imgq.worker.wire import SENT_AT_HEADER, TASK_NAME
from imgq.worker.wire.message import TaskRequest
from tests.blocked_imports import run_without
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import send_many, wait_all, wait_for

IMAGE = base64.b64encode(encode_png(colour_image(COLOURS[2]))).decode()
#: A context of the test's own making, as another service's producer would send it.
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
_TIMEOUT_S = 60


# -- the client ----------------------------------------------------------------------------------


def test_client_sends_the_callers_context(redis_server) -> None:
    """``ImgqClient`` puts the caller's active span into the messages it sends, one by one and
    in bulk; without an active span the messages carry no context."""
    tracer = TracerProvider().get_tracer("caller")
    r = redis.Redis.from_url(redis_server.url)
    with ImgqClient(redis_server.url) as client:
        client.classify_many([b"x"])
        client.classify(b"x")
        with tracer.start_as_current_span("request") as span:
            client.classify_many([b"x"])
            client.classify(b"x")
        ctx = span.get_span_context()
    queued = [json.loads(m)["headers"] for m in reversed(r.lrange("imgq", 0, -1))]
    assert [h.get("traceparent") for h in queued] == [None, None] + [
        f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    ] * 2


# -- sampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("by_bound", [True, False], ids=["one-draw", "sampler"])
def test_a_task_without_context_is_sampled_once_at_the_ratio(by_bound: bool) -> None:
    """A task without a context is decided before its span is made (by one random draw against
    the sampler's bound, or by asking the sampler), and its span gets the trace id it was
    decided for: at a ratio of 0.5 half the tasks are traced (deciding twice would trace a
    quarter); the batch's span links to the traced ones, as many as the SDK keeps, and each of
    them links back."""
    settings = WorkerSettings(traces_sampler="parentbased_traceidratio", traces_sampler_arg=0.5)
    provider = tracer_provider(settings)
    exported = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    bound = root_bound(settings.traces_sampler, 0.5) if by_bound else None
    tracer = BatchTracer(provider, "t@host", bound)
    try:
        out = BatchOutcome(time.time())
        for i in range(2000):
            req = TaskRequest(f"t{i}", TASK_NAME, {}, None, None, None, "imgq", b"")
            out.add(req, "SUCCESS", {}, "success", "")
        trace_ = tracer.batch("lane", 2000)
        trace_.settling(out)
        trace_.settled(out)
    finally:
        tracer.close()
    spans = exported.get_finished_spans()
    runs = [s for s in spans if s.name == f"run/{TASK_NAME}"]
    assert 850 < len(runs) < 1150  # 1000 expected; 6 standard deviations either side
    assert len({s.context.trace_id for s in runs}) == len(runs)
    (batch,) = [s for s in spans if s.name == "imgq.batch"]
    linked = {link.context.span_id for link in batch.links}
    assert len(linked) == 128  # the SDK's limit (OTEL_SPAN_LINK_COUNT_LIMIT); the first kept
    assert linked <= {s.context.span_id for s in runs}
    assert all(s.links[0].context.span_id == batch.context.span_id for s in runs)


@pytest.mark.parametrize("name", TRACES_SAMPLERS)
@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.5, 1.0])
def test_the_one_draw_bound_decides_as_the_sampler_does(name: str, ratio: float) -> None:
    """For a root span without links, low 64 bits of the trace id below :func:`root_bound` is
    exactly the configured sampler's decision (wrapped as the worker wraps it), at and on either
    side of the bound."""
    configured = FollowLinks(sampler(name, ratio))
    bound = root_bound(name, ratio)
    rng = random.Random(7)
    lows = [rng.getrandbits(64) for _ in range(300)]
    lows += [b for b in (bound - 1, bound) if 0 <= b < 2**64]
    for low in lows:
        trace_id = rng.getrandbits(64) << 64 | low
        decided = configured.should_sample(None, trace_id, "run/x", SpanKind.CONSUMER)
        assert decided.decision.is_sampled() == (low < bound), (name, ratio, low)


def test_the_resource_hashed_once_is_the_sdks_resource() -> None:
    """The provider's resource equals and hashes as the SDK's own (the OTLP encoder groups spans
    by it), and spans of it encode under one resource with its attributes."""
    provider = tracer_provider(WorkerSettings(traces_exporters=("console",)))
    resource = provider.resource
    assert isinstance(resource, HashedOnce)
    plain = Resource(resource.attributes, resource.schema_url)
    assert resource == plain and hash(resource) == hash(plain)
    assert resource.attributes["service.name"] == "imgq-worker"
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for name in ("a", "b"):
        provider.get_tracer("t").start_span(name).end()
    (group,) = encode_spans(memory.get_finished_spans()).resource_spans
    assert {kv.key: kv.value.string_value for kv in group.resource.attributes}["service.name"] == (
        "imgq-worker"
    )
    assert [s.name for s in group.scope_spans[0].spans] == ["a", "b"]
    provider.shutdown()


# -- tracing off ---------------------------------------------------------------------------------


def test_tracing_off_imports_nothing_of_opentelemetry(redis_server, bundle_dir: Path) -> None:
    """With OTEL_TRACES_EXPORTER unset the worker's whole serving path (its service, an engine
    serving a batch with a context in its messages, follow-ups) runs with OpenTelemetry
    unimportable, and nothing of it is loaded."""
    (line,) = run_without(
        ["opentelemetry"],
        f"""
import redis
from celery import Celery, current_app
from imgq.worker.celeryapp.app import make_app
from imgq.worker.celeryapp.consumer import BulkService
from imgq.worker.settings import WorkerSettings
settings = WorkerSettings.from_env({{}}, broker_url={redis_server.url!r},
                                   model_dir={str(bundle_dir)!r}, metrics_port=0,
                                   drift_enabled=False, device="cpu")
app = make_app(settings)
service = BulkService(app, "off@test")
assert service.tracing is None
producer = Celery("p", broker={redis_server.url!r}, backend={redis_server.url!r})
producer.conf.task_serializer = "json"
sig = producer.signature("user.store", queue="user")
task = producer.send_task("imgq.classify", kwargs={{"image": {IMAGE!r}}}, queue="imgq",
                          headers={{"traceparent": {TRACEPARENT!r}}}, link=sig)
service.intake.renew_lease()
assert service.runners[0].run_once() == 1
print(task.get(timeout=10)["label"], redis.Redis.from_url({redis_server.url!r}).llen("user"))
""",
    )
    assert line == "c 1"  # blue is the tiny model's third class; the callback was sent


# -- a real worker ---------------------------------------------------------------------------------


@pytest.fixture
def otlp() -> Iterator[OtlpSink]:
    sink = OtlpSink().start()
    yield sink
    sink.stop()


def _tracing_env(sink: OtlpSink) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_SERVICE_NAME": "imgq-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


def _runs(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    """The worker's task spans by task id."""
    return {
        s.attributes["messaging.message_id"]: s
        for s in spans
        if s.name == f"run/{TASK_NAME}" and s.kind == "CONSUMER"
    }


@pytest.mark.integration
def test_worker_continues_the_producers_traces(workers, redis_server, otlp) -> None:
    """32 tasks from a stock Celery producer instrumented by CeleryInstrumentor, served in one
    batch: each task's span is in its producer's trace with the producer's span as parent,
    carries the instrumentation's attributes and imgq's, and links to the batch's span, which
    links back to all 32 and holds the batch's take, serve, preprocess, inference and settle."""
    producer_spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(producer_spans))
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    with warnings.catch_warnings():
        # The instrumentation looks tasks up in the current app, which finalizes it: with
        # other tests' worker apps made in this process, imgq.classify registers once more, and
        # the warning (an error in this run) would abort its handler of the first publish.
        warnings.simplefilter("ignore")
        app.tasks  # noqa: B018
        current_app.tasks  # noqa: B018
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        sent = send_many(app, [IMAGE] * 32)  # queued before the worker starts: one batch
    finally:
        instrumentor.uninstrument()
    # The producer's span of each task, as the instrumentation injected it into the message.
    queued = [json.loads(m)["headers"] for m in redis.Redis.from_url(redis_server.url).lrange(
        "imgq", 0, -1)]  # fmt: skip
    produced = {h["id"]: h["traceparent"].split("-")[1:3] for h in queued}
    assert set(produced) == {t.id for t in sent}
    # Those are the instrumentation's apply_async spans.
    finished = producer_spans.get_finished_spans()
    assert len(finished) == 32 and all(
        produced[s.attributes["messaging.message.id"]]
        == [f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}"]
        for s in finished
    )

    worker = workers.start("w1", **_tracing_env(otlp))
    records = wait_all(app, [t.id for t in sent], _TIMEOUT_S, watch=[worker])
    assert {r["status"] for r in records.values()} == {"SUCCESS"}
    runs = wait_for(lambda: len(_runs(otlp.spans())) == 32 and _runs(otlp.spans()), _TIMEOUT_S)
    batch = wait_for(lambda: [s for s in otlp.spans() if s.name == "imgq.batch"], _TIMEOUT_S)[0]

    for task_id, run in runs.items():
        assert [run.trace_id, run.parent_span_id] == produced[task_id]
        assert run.resource["service.name"] == "imgq-test" and run.status == "UNSET"
        attributes = run.attributes
        assert attributes["celery.hostname"] == worker.name
        assert attributes["celery.task_name"] == TASK_NAME
        assert attributes["messaging.message.id"] == attributes["messaging.message_id"] == task_id
        assert attributes["messaging.destination"] == "imgq"
        assert attributes["imgq.batch.size"] == 32 and attributes["imgq.outcome"] == "success"
        assert attributes["imgq.model.version"] == records[task_id]["result"]["model"]["version"]
        assert "imgq.queue_wait_ms" not in attributes  # a stock producer sends no enqueue time
        assert run.links == ((batch.trace_id, batch.span_id),)
        assert run.start_ns <= run.end_ns
    assert len(batch.links) == 32
    assert set(batch.links) == {(r.trace_id, r.span_id) for r in runs.values()}
    assert batch.trace_id not in {r.trace_id for r in runs.values()}

    steps = {s.name: s for s in otlp.spans() if s.trace_id == batch.trace_id}
    assert set(steps) == {"imgq.batch", "imgq.take", "imgq.serve", "imgq.preprocess",
                          "imgq.inference", "imgq.settle"}  # fmt: skip
    for name in ("imgq.take", "imgq.serve", "imgq.settle"):
        assert steps[name].parent_span_id == batch.span_id, name
    for name in ("imgq.preprocess", "imgq.inference"):
        assert steps[name].parent_span_id == steps["imgq.serve"].span_id, name
    order = [steps[n] for n in ("imgq.take", "imgq.serve", "imgq.settle")]
    assert all(a.end_ns <= b.start_ns for a, b in zip(order, order[1:], strict=False))
    assert steps["imgq.preprocess"].end_ns <= steps["imgq.inference"].start_ns


@pytest.mark.integration
def test_new_traces_malformed_contexts_and_followups(workers, redis_server, otlp) -> None:
    """A message without a context, or with a malformed or hostile ``traceparent`` or
    ``baggage``, starts a new trace and is served as any (its batch-mates keep their spans); a
    context nested under ``headers`` is continued; a task's callback is sent in its trace, under
    a PRODUCER span that is the callback's parent."""
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    worker = workers.start("w1", **_tracing_env(otlp))
    plain = {
        "none": {},
        "malformed": {"traceparent": "00-not-a-trace-at-all"},
        "zero": {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},
        "number": {"traceparent": 12345},
        "huge": {"traceparent": "00-" + "a" * 5000},
        # JSON's "\udcff": OpenTelemetry's baggage propagator raises on it.
        "surrogate": {"baggage": chr(0xDCFF) + "=x"},
    }
    sent = {
        name: app.send_task(TASK_NAME, kwargs={"image": IMAGE}, queue="imgq", headers=headers)
        for name, headers in plain.items()
    }
    nested = {"headers": {"traceparent": TRACEPARENT}, SENT_AT_HEADER: time.time()}
    sent["nested"] = app.send_task(TASK_NAME, kwargs={"image": IMAGE}, queue="imgq",
                                   headers=nested)  # fmt: skip
    callback = app.signature("user.store", queue="user")
    sent["linked"] = app.send_task(TASK_NAME, kwargs={"image": IMAGE}, queue="imgq",
                                   headers={"traceparent": TRACEPARENT}, link=callback)  # fmt: skip
    ids = {name: t.id for name, t in sent.items()}
    records = wait_all(app, list(ids.values()), _TIMEOUT_S, watch=[worker])
    assert {r["status"] for r in records.values()} == {"SUCCESS"}

    runs = wait_for(lambda: len(_runs(otlp.spans())) == len(ids) and _runs(otlp.spans()),
                    _TIMEOUT_S)  # fmt: skip
    new_traces = {runs[ids[name]].trace_id for name in plain}
    assert len(new_traces) == len(plain) and TRACE_ID not in new_traces
    assert all(runs[ids[name]].parent_span_id == "" for name in plain)
    for name in ("nested", "linked"):
        assert (runs[ids[name]].trace_id, runs[ids[name]].parent_span_id) == (TRACE_ID, PARENT_ID)
    waited_ms = records[ids["nested"]]["result"]["timings_ms"]["queue"]
    assert runs[ids["nested"]].attributes["imgq.queue_wait_ms"] == pytest.approx(
        waited_ms, abs=0.01
    )

    (message,) = redis.Redis.from_url(redis_server.url).lrange("user", 0, -1)
    headers = json.loads(message)["headers"]
    _, trace_id, parent_id, _ = headers["traceparent"].split("-")
    producer = wait_for(
        lambda: [s for s in otlp.spans() if s.name == "apply_async/user.store"], _TIMEOUT_S
    )[0]
    assert (
        producer.kind == "PRODUCER" and producer.attributes["messaging.message_id"] == headers["id"]
    )
    assert (trace_id, parent_id) == (TRACE_ID, producer.span_id)
    assert producer.parent_span_id == runs[ids["linked"]].span_id
    assert not trace.get_current_span().get_span_context().is_valid  # nothing leaked into ours
