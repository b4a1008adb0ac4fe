"""The client envelope: task messages exactly as kombu's Redis transport LPUSHes them.

A Celery producer writes ``{"body": <base64 of the JSON [args, kwargs, embed]>, "headers":
{...}, "properties": {...}, ...}`` onto the queue's list. :class:`MessageTemplate` builds those
messages many at a time (``ImgqClient.classify_many``), identical to what ``send_task`` writes in
everything but ids and timestamps. celery and redis only (pybase64 and orjson when installed).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any
from uuid import uuid4

from celery import Celery
from kombu.utils.json import dumps as json_dumps

from imgq.worker.wire import SENT_AT_HEADER

# Optional accelerators of classify_many (they come with imgq[worker]; the client needs neither):
# base64 and JSON of a ~13 kB image's message cost several times more with the standard library
# (docs/benchmarks.md).
try:
    from pybase64 import b64encode
except ImportError:  # pragma: no cover - exercised where pybase64 is absent
    from base64 import b64encode  # type: ignore[assignment]
try:
    from orjson import dumps as _orjson_dumps

    def _envelope_json(value: dict[str, Any]) -> bytes:
        return _orjson_dumps(value)
except ImportError:  # pragma: no cover

    def _envelope_json(value: dict[str, Any]) -> bytes:
        return json_dumps(value).encode()


__all__ = ["MessageTemplate", "check_image", "check_top_k", "kwargs_repr", "task_kwargs"]


def check_image(image_bytes: bytes) -> None:
    if not isinstance(image_bytes, bytes | bytearray | memoryview):
        raise TypeError(
            f"an image must be the encoded file's bytes, got {type(image_bytes).__name__}; "
            "read the file with open(path, 'rb').read()"
        )


def check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    return top_k


def task_kwargs(image_bytes: bytes, top_k: int, request_id: str | None) -> dict[str, Any]:
    """The task's keyword arguments; wrong Python types are refused here, before enqueueing."""
    check_image(image_bytes)
    kwargs: dict[str, Any] = {"image": base64.b64encode(image_bytes).decode("ascii"),
                              "top_k": check_top_k(top_k)}  # fmt: skip
    if request_id is not None:
        kwargs["request_id"] = str(request_id)
    return kwargs


def kwargs_repr(image_bytes: bytes, kwargs: dict[str, Any]) -> str:
    """What Flower and worker logs show for the arguments: the image's size, not its base64
    (Celery would otherwise ``saferepr`` a kilobyte of base64 per task)."""
    return repr(dict(kwargs, image=f"<{len(image_bytes)} bytes>"))


class MessageTemplate:
    """Task messages exactly as kombu's Redis transport LPUSHes them, made from one template.

    Celery's ``as_task_v2`` builds the headers and body once per :meth:`ImgqClient.classify_many`
    call; per task only the ids, the timestamps, the argument summary and the image change. The
    envelope is kombu's (``Channel.prepare_message`` plus the Redis transport's base64 body and
    delivery tag). Base64 text needs no JSON escaping, so the image and the body are spliced into
    JSON text made by kombu's encoder instead of going through it: an encoder scans every
    character, twice per task (``docs/benchmarks.md``).
    """

    _SPLICE = "<imgq splice>"

    def __init__(
        self,
        app: Celery,
        task_name: str,
        queue: str,
        top_k: int,
        expires_s: float | None,
        extra_headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> None:
        self.app, self.top_k, self.expires_s = app, top_k, expires_s
        kwargs = {"image": self._SPLICE, "top_k": check_top_k(top_k)}
        if request_id is not None:  # the same for every message: one per template
            kwargs["request_id"] = str(request_id)
        self._shown = dict(kwargs, image="")
        headers, properties, body, _ = app.amqp.as_task_v2(
            self._SPLICE,
            task_name,
            args=(),
            kwargs=kwargs,
            reply_to=app.thread_oid,
            ignore_result=None,  # what send_task passes when the caller says nothing
            kwargsrepr=self._SPLICE,
        )
        headers[SENT_AT_HEADER] = 0.0
        headers.update(extra_headers or {})  # e.g. the caller's trace context
        self.headers = headers
        # send_task's order: its extra options (kwargsrepr) become properties, then kombu's.
        self.properties: dict[str, Any] = {**properties, "kwargsrepr": None, "delivery_mode": 2}
        if expires_s is not None:
            self.properties["expiration"] = str(int(max(expires_s, 0) * 1000))
        self.properties |= {
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": None,
        }
        self.body_prefix, self.body_suffix = self._split(json_dumps(body).encode())
        self.envelope = {
            "body": self._SPLICE,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": None,
            "properties": None,
        }

    def _split(self, text: bytes) -> tuple[bytes, bytes]:
        """JSON text around the one spliced string (whose quotes stay in the text)."""
        prefix, suffix = text.split(self._SPLICE.encode(), 1)
        return prefix, suffix

    def fill(self, image_bytes: bytes) -> tuple[str, bytes]:
        """The task id and the message for one image."""
        check_image(image_bytes)
        task_id = str(uuid4())
        kwargsrepr = kwargs_repr(image_bytes, self._shown)
        headers = dict(self.headers, id=task_id, root_id=task_id, kwargsrepr=kwargsrepr)
        if self.expires_s is not None:
            headers["expires"] = (self.app.now() + timedelta(seconds=self.expires_s)).isoformat()
        headers[SENT_AT_HEADER] = time.time()
        properties = dict(self.properties, correlation_id=task_id, kwargsrepr=kwargsrepr,
                          delivery_tag=str(uuid4()))  # fmt: skip
        body = b64encode(self.body_prefix + b64encode(image_bytes) + self.body_suffix)
        envelope = _envelope_json(dict(self.envelope, headers=headers, properties=properties))
        prefix, suffix = self._split(envelope)
        return task_id, prefix + body + suffix
