"""Celery protocol 2 messages as Celery leaves them in Redis, and results Celery can read back."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from imgq.shared.errors import InvalidImage, InvalidTask
from imgq.worker.handlers.classify import validate_kwargs
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.message import parse_message
from imgq.worker.wire.result import exception_result, result_meta

#: A W3C trace context as an instrumented producer sends it.
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Trap:
    """Unpickling this creates a file: proof, if the file exists, that a body was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


@pytest.fixture
def sender(redis_server) -> Celery:
    """A plain Celery client app, as another service would have."""
    app = Celery("client", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_serializer = "json"
    return app


def _captured(redis_server, queue: str = "imgq") -> bytes:
    """The one message waiting in ``queue``, exactly as it is stored."""
    r = redis.Redis.from_url(redis_server.url)
    (raw,) = r.lrange(queue, 0, -1)
    return bytes(raw)


def test_parses_what_send_task_left_in_redis(sender, redis_server) -> None:
    """Task id, kwargs, expiry, sent time and delivery tag are read from a send_task message."""
    sent_at = time.time()
    result = sender.send_task(
        TASK_NAME,
        kwargs={"image": "aGk=", "top_k": 2, "request_id": "r-1"},
        queue="imgq",
        expires=60,
        headers={"imgq_sent_at": sent_at},
    )
    raw = _captured(redis_server)
    req = parse_message(raw, "imgq")
    assert req.error is None
    assert req.task_id == result.id
    assert req.kwargs == {"image": "aGk=", "top_k": 2, "request_id": "r-1"}
    assert req.expires is not None and 55 < req.expires - time.time() <= 60
    assert req.sent_at == pytest.approx(sent_at)
    assert req.delivery_tag == json.loads(raw)["properties"]["delivery_tag"]
    assert (req.queue, req.raw) == ("imgq", raw)


def test_pickle_body_is_refused_and_never_unpickled(sender, redis_server, tmp_path) -> None:
    """A pickled message keeps its task id (so it can fail visibly) and is never unpickled."""
    trap = tmp_path / "unpickled"
    result = sender.send_task(
        TASK_NAME, kwargs={"image": _Trap(trap)}, queue="imgq", serializer="pickle"
    )
    req = parse_message(_captured(redis_server), "imgq")
    assert req.task_id == result.id
    assert req.error is not None and req.error.reason == "content_refused"
    assert "application/x-python-serialize" in str(req.error)
    assert req.kwargs == {}
    assert not trap.exists()


def test_a_protocol_1_message_is_answered_unsupported(redis_server) -> None:
    """Celery's message protocol 1 (``task_protocol=1``) has no task id in its headers: the
    correlation id kombu copies it to names the task, which fails with the fix, instead of a
    dead letter and a client that waits forever."""
    old = Celery("old", broker=redis_server.url, backend=redis_server.url)
    old.conf.update(task_serializer="json", task_protocol=1)
    result = old.send_task(TASK_NAME, kwargs={"image": "aGk="}, queue="imgq")
    req = parse_message(_captured(redis_server), "imgq")
    assert req.task_id == result.id
    assert req.error is not None and req.error.reason == "unsupported"
    assert "protocol 1" in str(req.error) and "task_protocol=1" in str(req.error)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x80\x04not json",
        b'{"headers": {}}',
        b"[1, 2]",
        b'{"headers": {"id": 7}}',
        # UTF-16: its quote bytes are not where a UTF-8 scan looks (adversary): refused unparsed.
        ('{"body": "\u2241", "x": [' + "{}," * 20_000 + '{}], "headers": {"id": "t-1"}}').encode(
            "utf-16-le"
        ),
        # Never parsed, and its id is more than 4 kB from either end:
        b'{"a": ['
        + b"[]," * 6000
        + b'[]], "headers": {"id": "t-1"}, "b": ['
        + b"[]," * 6000
        + b"[]]}",
    ],
)
def test_no_task_id_raises_malformed(raw: bytes) -> None:
    """Without a readable task id the message cannot be answered: it is malformed (dead letter)."""
    with pytest.raises(InvalidTask) as info:
        parse_message(raw, "imgq")
    assert info.value.reason == "malformed_message"


def _envelope(
    body: object, *, task: str = TASK_NAME, encode: bool = True, **headers: object
) -> bytes:
    text = body if isinstance(body, str) else json.dumps(body)
    return json.dumps({
        "body": base64.b64encode(text.encode()).decode() if encode else text,
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {"task": task, "id": "t-1", **headers},
        "properties": {"body_encoding": "base64"} if encode else {},
    }).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "reason", "text"),
    [
        (_envelope("not json"), "malformed_message", "body is not a JSON"),
        (_envelope([[], "kwargs", {}]), "malformed_message", "kwargs must be an object"),
        (_envelope([["img"], {}, {}]), "bad_argument", "keyword arguments only"),
        (_envelope([[], {}, {}], expires="next tuesday"), "malformed_message", "ISO 8601"),
        (_envelope([[], {}, {}], compression="application/x-gzip"), "content_refused", "gzip"),
        # Millions of tiny containers cost ~100 bytes each parsed: refused unparsed.
        (_envelope([[], {"image": [[]] * 20_000}, {}]), "malformed_message", "body has 40"),
        (_envelope([[], {}, {}], x=[[]] * 20_000), "malformed_message", "message has 40"),
        # An escaped quote must not make the counter take 12,000 containers for a string's bulk:
        (
            _envelope('[[], {"a": "\\"", "x": [' + "[]," * 6000 + '[]], "y": "b"}, {}]'),
            "malformed_message",
            "body has 1",
        ),  # fmt: skip
    ],
)
def test_known_task_with_unusable_body_fails_with_reason(
    raw: bytes, reason: str, text: str
) -> None:
    """A message with a task id but an unusable body is answered with a specific reason."""
    req = parse_message(raw, "imgq")
    assert req.task_id == "t-1"
    assert req.error is not None and req.error.reason == reason
    assert text in str(req.error)


def test_plain_json_body_without_base64_is_read() -> None:
    """A body that is not base64-encoded (no body_encoding) is read as JSON text directly."""
    req = parse_message(_envelope([[], {"image": "x"}, {}], encode=False), "imgq")
    assert req.error is None and req.kwargs == {"image": "x"}


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({}, "missing_argument"),
        ({"image": "aGk=", "colour": "red"}, "unknown_argument"),
        ({"image": 12}, "bad_argument"),
        ({"image": "aGk=", "top_k": True}, "bad_argument"),
        ({"image": "aGk=", "top_k": 0}, "bad_argument"),
        ({"image": "aGk=", "top_k": 4}, "bad_argument"),
        ({"image": "aGk=", "top_k": "2"}, "bad_argument"),
        ({"image": "aGk=", "request_id": {"a": 1}}, "bad_argument"),
    ],
)
def test_bad_kwargs_get_their_reason(kwargs: dict, reason: str) -> None:
    """Each kind of bad argument is refused with its own reason code."""
    with pytest.raises(InvalidTask) as info:
        validate_kwargs(kwargs, n_labels=3)
    assert info.value.reason == reason


def test_good_kwargs_with_defaults() -> None:
    """top_k defaults to 1 and request_id to None."""
    assert validate_kwargs({"image": "aGk="}, n_labels=3) == ("aGk=", 1, None)
    assert validate_kwargs({"image": "aGk=", "top_k": 3, "request_id": 9}, n_labels=3) == (
        "aGk=", 3, 9,
    )  # fmt: skip


def test_stored_meta_is_read_by_celery(sender, redis_server) -> None:
    """Results written in this format come back through AsyncResult: values and exceptions."""
    backend = sender.backend
    r = redis.Redis.from_url(redis_server.url)
    records = {
        "ok": result_meta("ok", "SUCCESS", {"label": "a"}),
        "bad": result_meta("bad", "FAILURE", exception_result(InvalidImage("truncated", "cut"))),
    }
    for task_id, meta in records.items():
        r.set(backend.get_key_for_task(task_id), backend.encode(meta), ex=60)
    assert sender.AsyncResult("ok").get(timeout=5) == {"label": "a"}
    with pytest.raises(InvalidImage) as info:
        sender.AsyncResult("bad").get(timeout=5)
    assert str(info.value).startswith("truncated: ")
    assert info.value.reason == "truncated"


def test_the_task_name_is_read_not_judged() -> None:
    """The parser reports the task name; which names are served is the engine's business (its
    handlers), and a name that is not a string is reported as none."""
    assert (
        parse_message(_envelope([[], {}, {}], task="other.task"), "imgq").task_name == "other.task"
    )
    assert parse_message(_envelope([[], {}, {}], task=5), "imgq").task_name == ""


@pytest.mark.parametrize(
    ("headers", "carrier"),
    [
        ({"traceparent": TRACEPARENT, "tracestate": "a=1"}, {"traceparent": TRACEPARENT,
                                                            "tracestate": "a=1"}),
        ({"headers": {"traceparent": TRACEPARENT}}, {"traceparent": TRACEPARENT}),
        ({"traceparent": TRACEPARENT, "headers": {"traceparent": "other"}},
         {"traceparent": TRACEPARENT}),
        ({"baggage": "user=7"}, {"baggage": "user=7"}),
        ({}, None),
        ({"traceparent": 12345}, None),
        ({"traceparent": ["00-a-b-01"]}, None),
        ({"traceparent": "0" * 257}, None),
        ({"traceparent": TRACEPARENT, "baggage": "x" * 8193}, {"traceparent": TRACEPARENT}),
        ({"headers": "not an object"}, None),
        ({"headers": {"traceparent": {"nested": 1}}}, None),
    ],
)  # fmt: skip
def test_trace_context_is_read_bounded_and_never_fails(headers, carrier) -> None:
    """The context is taken from the top-level headers or a nested ``headers`` object; a value
    that is not a string within its bound is left out, and the task stays runnable."""
    req = parse_message(_envelope([[], {"image": "aGk="}, None], **headers), "imgq")
    assert req.error is None
    assert req.trace_carrier == carrier
