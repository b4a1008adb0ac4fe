"""Reading a task message as a Celery producer left it in the Redis list, every field checked.

The worker reads the Redis list itself (``worker/broker/intake.py``) instead of going through
Celery's task consumer, so it reads exactly what any Celery client writes there: kombu's JSON
envelope::

    {"body": "<base64 of the JSON [args, kwargs, embed]>", "content-type": "application/json",
     "content-encoding": "utf-8",
     "headers": {"task": "imgq.classify", "id": "<task id>", "expires": "<ISO 8601 or null>", ...},
     "properties": {"body_encoding": "base64", "delivery_tag": "<uuid>", ...}}

Every byte is hostile input: each field read is validated here, with a reason, so that nothing
downstream (task events, result keys, logs) meets a value it cannot handle. The trace context a
producer put in the headers (W3C ``traceparent``, ``tracestate``, ``baggage``: where
opentelemetry-instrumentation-celery's ``inject`` writes them, or nested under a ``headers``
object as some producers nest custom headers) is kept as strings of bounded length and never
fails a task: a context that cannot be used is left out, and the task starts a new trace. Only
``application/json`` bodies are ever decoded: a pickled body is never unpickled, and its task
ends in FAILURE (``content_refused``) so the sender sees why.
"""

from __future__ import annotations

import binascii
import dataclasses
import math
import re
from datetime import UTC, datetime
from typing import Any

from imgq.shared.b64 import b64decode_strict
from imgq.shared.errors import InvalidTask
from imgq.worker.wire import SENT_AT_HEADER
from imgq.worker.wire.canvas import Canvas, parse_canvas
from imgq.worker.wire.codec import json_loads

__all__ = [
    "MAX_JSON_CONTAINERS",
    "MAX_STAMPS",
    "MAX_TASK_ID_CHARS",
    "TRACE_HEADERS",
    "TaskRequest",
    "epoch_s",
    "find_task_id",
    "parse_message",
    "parse_task_id",
]

#: Longest task id accepted (Celery's are 36-character UUIDs; the id is part of a Redis key).
MAX_TASK_ID_CHARS = 512
#: Most ``{``, ``[`` and ``,`` a message, or its decoded body, may hold. A real task has a few
#: dozen (the image is one base64 string); a body of millions of empty lists costs about a
#: hundred bytes of memory per character once parsed, so it is refused before parsing.
MAX_JSON_CONTAINERS = 10_000
#: Most stamps a task may carry (Celery's stamping; each is compared with revoked stamps).
MAX_STAMPS = 100
#: The trace context headers read, and the longest value of each kept (W3C Trace Context:
#: ``traceparent`` is 55 characters in version 00, ``tracestate`` at most 32 members; W3C Baggage:
#: at most 8192 bytes); a longer or non-string value is left out.
TRACE_HEADERS = (("traceparent", 256), ("tracestate", 1024), ("baggage", 8192))
_PROTOCOL_1 = InvalidTask(
    "unsupported",
    "Celery message protocol 1 (the task id in the body, none in the headers); imgq reads "
    "protocol 2, Celery's default since 4.0: remove task_protocol=1 from the client's settings",
)
#: Strings looked at for the one that holds most of a message (kombu: the 2nd; a body: the 2nd).
_STRINGS_LOOKED_AT = 4
_ID_IN_HEADERS = re.compile(rb'[{,]\s*"id"\s*:\s*"([^"\\]{1,512})"')
#: The epoch seconds a time header may hold: what Python's datetime can represent (years
#: 1..9999), so that every time formats; beyond it is refused, not crashed on.
_MIN_EPOCH_S, _MAX_EPOCH_S = -62_135_596_800.0, 253_402_300_799.0
#: A number of "seconds" above this is epoch milliseconds (JavaScript's Date.now(): year 5138+).
_LOOKS_LIKE_MS = 1e11


@dataclasses.dataclass(frozen=True)
class TaskRequest:
    """One task taken from the queue.

    Attributes:
        task_id: Celery task id (the result key is derived from it).
        task_name: The ``task`` header ("" when it is not a string): which handler serves it.
        kwargs: Keyword arguments as sent (not yet validated).
        expires: Expiry as epoch seconds, or None.
        sent_at: Enqueue time as epoch seconds from the optional ``imgq_sent_at`` header, or None.
        delivery_tag: kombu's delivery tag.
        queue: The queue it was taken from.
        raw: The message exactly as it was in Redis (for redelivery and dead letters).
        error: Why the task must not run (refused content type, unusable body, a header no time
            can be made of), or None; such a task ends in FAILURE without being executed.
        eta: Celery's ``eta`` (``countdown``/``eta``) as epoch seconds, or None; a task taken
            before it waits in Redis until then.
        ignore_result: The producer's ``ignore_result``: no result is stored.
        time_limit: The smaller of the ``time_limit``/``soft_time_limit`` it was sent with, in
            seconds, or None.
        stamps: Its Celery stamps (``revoke_by_stamped_headers`` matches them), or None.
        canvas: What to do after the task (callbacks, errbacks, the rest of a chain, a chord's
            part; ``worker/wire/canvas.py``), or None when nothing (nearly every task).
        trace_carrier: The producer's trace context headers (:data:`TRACE_HEADERS`, strings
            within their bounds), or None when it sent none (``worker/tracing/``).
    """

    task_id: str
    task_name: str
    kwargs: dict[str, Any]
    expires: float | None
    sent_at: float | None
    delivery_tag: str | None
    queue: str
    raw: bytes
    error: InvalidTask | None = None
    eta: float | None = None
    ignore_result: bool = False
    time_limit: float | None = None
    stamps: dict[str, Any] | None = None
    canvas: Canvas | None = None
    trace_carrier: dict[str, str] | None = None


def parse_message(raw: bytes | str, queue: str) -> TaskRequest:
    """Read one message as a Celery client left it in the Redis list.

    Args:
        raw: The list element: kombu's JSON envelope around a protocol 2 task.
        queue: The queue it came from.

    Returns:
        A :class:`TaskRequest`; when the task id is known but the task must not run (content type
        other than JSON, unusable body, an unusable header), its ``error`` says why.

    Raises:
        InvalidTask: ``malformed_message`` when not even a task id can be read; such a message
            cannot be answered and goes to the dead-letter list.
    """
    raw_bytes = raw.encode() if isinstance(raw, str) else raw
    containers = _json_containers(raw_bytes)
    if containers > MAX_JSON_CONTAINERS:
        exc = InvalidTask(
            "malformed_message",
            f"the message has {containers} JSON separators and brackets, over the "
            f"{MAX_JSON_CONTAINERS} a valid task can have; it was not parsed",
        )
        task_id = find_task_id(raw_bytes[-4096:]) or find_task_id(raw_bytes[:4096])
        if task_id is None:
            raise exc
        return TaskRequest(task_id, "", {}, None, None, None, queue, raw_bytes, exc)
    try:
        envelope = json_loads(raw_bytes)
        if not isinstance(envelope, dict) or not isinstance(envelope.get("headers"), dict):
            raise TypeError("the message is not a JSON object with a `headers` object")
        headers = envelope["headers"]
        properties = envelope.get("properties")
        if not isinstance(properties, dict):
            properties = {}
        if "id" not in headers and "task" not in headers and "correlation_id" in properties:
            # Celery's message protocol 1 keeps the task id in the body; kombu copies it to
            # the correlation id, which is enough to answer the client.
            return TaskRequest(
                parse_task_id(properties["correlation_id"]), "", {}, None, None, None, queue,
                raw_bytes, _PROTOCOL_1,
            )  # fmt: skip
        task_id = parse_task_id(headers.get("id"))
    except (ValueError, TypeError, KeyError, RecursionError) as exc:  # issue 7: deep nesting
        raise InvalidTask(
            "malformed_message", f"no readable Celery envelope: {exc!r:.300}"
        ) from None
    delivery_tag = properties.get("delivery_tag")
    if not isinstance(delivery_tag, str):
        delivery_tag = None
    task_name = headers.get("task")
    if not isinstance(task_name, str):
        task_name = ""
    try:
        expires = epoch_s(headers.get("expires"))
        sent_at = epoch_s(headers.get(SENT_AT_HEADER))
        eta = epoch_s(headers.get("eta"))
        if headers.get("compression") is not None:
            raise InvalidTask(
                "content_refused",
                f"a body compressed with {headers['compression']!r:.60} is refused; imgq reads "
                "uncompressed JSON (send without compression=)",
            )
        time_limit = _time_limit(headers.get("timelimit"))
        stamps = _stamps(headers.get("stamps"))
        kwargs, embed = _body_kwargs(envelope, properties)
        canvas = parse_canvas(embed, headers, properties)
        error = None
    except InvalidTask as exc:
        kwargs, expires, sent_at, eta, canvas, error = {}, None, None, None, None, exc
        time_limit, stamps = None, None
    return TaskRequest(
        task_id=task_id,
        task_name=task_name,
        kwargs=kwargs,
        expires=expires,
        sent_at=sent_at,
        delivery_tag=delivery_tag,
        queue=queue,
        raw=raw_bytes,
        error=error,
        eta=eta,
        ignore_result=bool(headers.get("ignore_result")),  # truthy, as Celery's worker reads it
        time_limit=time_limit,
        stamps=stamps,
        canvas=canvas,
        trace_carrier=trace_carrier(headers),
    )


def trace_carrier(headers: dict[str, Any]) -> dict[str, str] | None:
    """The trace context of a message's headers: at the top level, where Celery's instrumentation
    injects it, else in a nested ``headers`` object; each of :data:`TRACE_HEADERS` that is an
    ASCII string within its bound. None when there is none (nearly every message: two lookups).

    >>> trace_carrier({"traceparent": "00-ab-cd-01", "baggage": 7})
    {'traceparent': '00-ab-cd-01'}
    >>> trace_carrier({"headers": {"traceparent": "00-ab-cd-01"}})
    {'traceparent': '00-ab-cd-01'}
    >>> trace_carrier({"traceparent": "x" * 300}) is None
    True
    >>> trace_carrier({"baggage": chr(0xDCFF) + "=x"}) is None
    True
    """
    source: Any = headers
    if "traceparent" not in headers and "baggage" not in headers:
        source = headers.get("headers")
        if not isinstance(source, dict):
            return None
    carrier = {}
    for name, limit in TRACE_HEADERS:
        value = source.get(name)
        # ASCII only, as W3C defines them: OpenTelemetry's baggage propagator raises on a lone
        # surrogate (JSON's "\udcff"), and one task's raise would cost its batch its spans.
        if isinstance(value, str) and len(value) <= limit and value.isascii():
            carrier[name] = value
    return carrier or None


def parse_task_id(value: Any) -> str:
    """The task id, if it can name a result: a non-empty string of at most
    :data:`MAX_TASK_ID_CHARS` that encodes to UTF-8 (a lone surrogate from a JSON escape
    does not).

    >>> parse_task_id("5f1c-aa")
    '5f1c-aa'
    >>> parse_task_id(chr(0xD800))
    Traceback (most recent call last):
    ...
    ValueError: the task id is not valid Unicode (a lone surrogate?)
    """
    if not isinstance(value, str) or not value:
        raise TypeError(f"the task id must be a non-empty string, got {value!r:.80}")
    if len(value) > MAX_TASK_ID_CHARS:
        raise ValueError(f"the task id has {len(value)} characters, over {MAX_TASK_ID_CHARS}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the task id is not valid Unicode (a lone surrogate?)") from None
    return value


def not_due(req: TaskRequest, now: float) -> bool:
    """Whether the task's ``countdown``/``eta`` is still ahead of ``now``: it waits in Redis
    (``worker/broker/schedule.py``) instead of running early.

    >>> not_due(TaskRequest("t", "", {}, None, None, None, "q", b"", eta=100.0), now=100.0)
    False
    >>> not_due(TaskRequest("t", "", {}, None, None, None, "q", b"", eta=160.0), now=100.0)
    True
    """
    return req.eta is not None and req.eta > now


def find_task_id(fragment: bytes) -> str | None:
    """The task id of the first usable ``"id": "..."`` member in a fragment of a message, read
    without parsing it (kombu writes the headers after the body); None when there is none.

    >>> find_task_id(b'...AAAA", "headers": {"lang": "py", "id": "5f1c-aa", "task": "x"}}')
    '5f1c-aa'
    """
    for match in _ID_IN_HEADERS.finditer(fragment):
        try:
            return parse_task_id(match.group(1).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, TypeError):
            continue
    return None


def _json_containers(text: bytes | str) -> int:
    """How many ``{``, ``[`` and ``,`` the JSON text holds outside its bulk, a bound on what
    parsing it allocates.

    The bulk of a task is one string (kombu's base64 body, then the image's base64), and
    counting every byte cost 6% of a small task's CPU. So the first strings are found with
    ``find`` (memchr): if one holds most of the text and no backslash comes before its end
    (then every quote so far opens or closes a string, for any JSON lexer too), the count skips
    it. Otherwise every byte is counted.

    >>> bulk = b'{"b": "' + b"[," * 50 + b'", "c": [1]}'
    >>> _json_containers(b'{"a": [1, 2]}'), _json_containers(bulk)
    (3, 3)
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    pos = 0
    for _ in range(_STRINGS_LOOKED_AT):
        start = data.find(b'"', pos)
        end = data.find(b'"', start + 1) if start >= 0 else -1
        if end < 0:
            break
        if end - start > len(data) // 2:
            if data.find(b"\\", 0, end) >= 0:
                break
            return _containers_in(data, 0, start) + _containers_in(data, end, len(data))
        pos = end + 1
    return _containers_in(data, 0, len(data))


def _containers_in(data: bytes, a: int, b: int) -> int:
    """``{``, ``[`` and ``,`` in ``data[a:b]``, counted in place."""
    return data.count(b"{", a, b) + data.count(b"[", a, b) + data.count(b",", a, b)


def _body_kwargs(envelope: dict[str, Any], properties: Any) -> tuple[dict[str, Any], Any]:
    """The keyword arguments and the embed of a JSON protocol 2 body; InvalidTask for anything
    else."""
    content_type = envelope.get("content-type")
    if content_type != "application/json":
        raise InvalidTask(
            "content_refused",
            f"content type {content_type!r} is refused; imgq executes application/json only "
            "(send with serializer='json')",
        )
    body: Any = envelope.get("body")
    try:
        if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
            body = b64decode_strict(body)
        containers = _json_containers(body) if isinstance(body, bytes | str) else 0
        if containers > MAX_JSON_CONTAINERS:
            raise InvalidTask(
                "malformed_message",
                f"the body has {containers} JSON separators and brackets, over the "
                f"{MAX_JSON_CONTAINERS} a valid task can have; it was not parsed",
            )
        args, kwargs, embed = json_loads(body)
    except (ValueError, TypeError, binascii.Error, RecursionError) as exc:
        raise InvalidTask(
            "malformed_message", f"body is not a JSON [args, kwargs, embed] list: {exc}"
        ) from None
    if not isinstance(kwargs, dict):
        raise InvalidTask("malformed_message", f"kwargs must be an object, got {kwargs!r:.80}")
    if not isinstance(args, list):  # issue 7: len() of a number escaped as TypeError
        raise InvalidTask("malformed_message", f"args must be a list, got {args!r:.80}")
    if args:
        raise InvalidTask(
            "bad_argument",
            f"imgq tasks take keyword arguments only, got {len(args)} positional",
        )
    return kwargs, embed


def _time_limit(value: Any) -> float | None:
    """The smaller of Celery's ``timelimit`` header ``[hard, soft]`` (seconds, either None).

    >>> _time_limit([30, 5.5]), _time_limit([None, None]), _time_limit(None)
    (5.5, None, None)
    """
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise InvalidTask("malformed_message", f"timelimit must be [hard, soft], got {value!r:.80}")
    limits = []
    for limit in value:
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
            raise InvalidTask(
                "malformed_message", f"a time limit must be a positive number, got {limit!r:.40}"
            )
        limits.append(float(limit) if limit < 1e300 else math.inf)
    return min(limits) if limits else None


def _stamps(value: Any) -> dict[str, Any] | None:
    """Celery's ``stamps`` header (name -> value or list of values), or None when empty."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict) or len(value) > MAX_STAMPS:
        raise InvalidTask(
            "malformed_message", f"stamps must be an object of at most {MAX_STAMPS} names"
        )
    return value


def epoch_s(value: Any) -> float | None:
    """Epoch seconds from an ISO 8601 string (Celery's ``expires``) or a number of epoch
    seconds; None stays None. Anything that is not a time a datetime can hold is refused here,
    so that no later step (task events, logs) meets a time it cannot format (issue 14: epoch
    milliseconds from a JavaScript client stopped every worker in turn).

    >>> epoch_s("1970-01-01T00:01:00+00:00"), epoch_s("1970-01-01T00:01:00"), epoch_s(5)
    (60.0, 60.0, 5.0)
    >>> epoch_s(1_764_000_000_000)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    imgq.shared.errors.InvalidTask: malformed_message: ... looks like epoch milliseconds; ...
    """
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # issue 7: an int too large for a float escaped
            seconds = math.inf
        if math.isfinite(seconds) and _LOOKS_LIKE_MS < seconds < _LOOKS_LIKE_MS * 1e4:
            raise InvalidTask(
                "malformed_message",
                f"a time header of {value!r:.40} looks like epoch milliseconds; send ISO 8601 "
                "or epoch seconds",
            )
    elif isinstance(value, str) and len(value) <= 64:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:  # Celery sends aware times; naive ones are taken as UTC
                moment = moment.replace(tzinfo=UTC)
            try:
                seconds = moment.timestamp()
            except (OverflowError, ValueError, OSError):
                seconds = math.inf
    if seconds is None:
        raise InvalidTask("malformed_message", f"a time header must be ISO 8601, got {value!r:.80}")
    if not (math.isfinite(seconds) and _MIN_EPOCH_S <= seconds <= _MAX_EPOCH_S):
        raise InvalidTask("malformed_message", f"a time header is out of range, got {value!r:.80}")
    return seconds
