"""The Python client of imgq: enqueue images, gather results, and the `imgq classify` command.

Other services import this module to send work to imgq workers, so it needs only ``celery`` and
``redis`` — no numpy, OpenCV, onnxruntime or TensorFlow. Everything it sends is a plain Celery
task (protocol 2, JSON), described for any language in ``docs/tasks.md``.

Two ways to enqueue:

- :meth:`ImgqClient.classify` is Celery's ``send_task``: one round trip per task, and the
  returned ``AsyncResult.get()`` works as with any Celery task.
- :meth:`ImgqClient.classify_many` builds the same messages with Celery's own message factory
  (``app.amqp.as_task_v2``), wraps them in the envelope kombu's Redis transport writes, and
  pushes them in chunks with one ``LPUSH`` of many messages per round trip. ``tests/test_client.py``
  checks that its messages equal ``send_task``'s in everything but ids and timestamps.

:meth:`ImgqClient.results` gathers many results with one ``MGET`` per chunk of result keys
instead of one pub/sub subscription per task.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.json import dumps as json_dumps

# Optional accelerators of classify_many (they come with imgq[worker]; the client needs neither):
# base64 and JSON of a ~13 kB image's message cost 60 + 26 us with the standard library here,
# ~5 with these, which lifts one process's bulk enqueue past 3,000 tasks/s.
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


from kombu.utils.url import maybe_sanitize_url

__all__ = ["TASK_NAME", "DEFAULT_QUEUE", "ImgqClient", "classify_main"]

#: Name of the task every imgq worker serves.
TASK_NAME = "imgq.classify"
#: Queue (Redis list) the worker reads when none is configured.
DEFAULT_QUEUE = "imgq"
#: Broker and result backend when neither the arguments nor the environment name one.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Header carrying the enqueue time (epoch seconds); the worker reports queue time from it.
SENT_AT_HEADER = "imgq_sent_at"

#: Seconds to wait for a TCP connection to Redis before giving up on it.
CONNECT_TIMEOUT_S = 3.0
#: Seconds to wait for Redis to answer a command on an open connection.
SOCKET_TIMEOUT_S = 10.0
#: Retries of Celery's publish and of its result backend's pub/sub (which ``send_task``
#: subscribes before publishing) while Redis is unreachable. Celery's backend default retries
#: for ~20 s; this gives up after ~1.5 s plus the connect timeouts, then
#: :meth:`ImgqClient.classify` raises ``OperationalError``.
RETRY_POLICY = {"max_retries": 2, "interval_start": 0.5, "interval_step": 0.5,
                "interval_max": 1.0}  # fmt: skip

#: Most messages (and most bytes) in one ``LPUSH`` of :meth:`ImgqClient.classify_many`.
PUSH_CHUNK_TASKS = 500
PUSH_CHUNK_BYTES = 8 << 20
#: Result keys per ``MGET`` in :meth:`ImgqClient.results`: the oldest pending first, then more.
POLL_HEAD = 64
MGET_CHUNK = 1000
#: Poll interval of :meth:`ImgqClient.results`: it starts short so a quick answer is seen at
#: once, and grows while nothing arrives so a long wait costs little. At most 200 polls a second:
#: at 2 ms the waiting process spent ~0.5 ms of CPU per MobileNetV2 task, beside the workers.
POLL_MIN_S = 0.005
POLL_MAX_S = 0.1

#: File name suffixes `imgq classify` picks up when walking a directory.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

Result = dict[str, Any] | BaseException


class ImgqClient:
    """Enqueue images for imgq workers and collect their results.

    The client is a separate program from the worker, so of imgq's settings it reads only the
    two that say where Redis is: ``IMGQ_BROKER_URL`` and ``IMGQ_RESULT_BACKEND`` (the latter
    defaults to the broker URL). Publishing while Redis is unreachable fails with
    ``kombu.exceptions.OperationalError`` within a few seconds (see :data:`CONNECT_TIMEOUT_S`
    and :data:`RETRY_POLICY`) instead of hanging.

    Args:
        broker_url: Redis URL of the broker (``redis://``, ``rediss://``, with a password if
            any). Defaults to ``$IMGQ_BROKER_URL``, else ``redis://127.0.0.1:6379/0``.
        backend_url: Redis URL of Celery's result backend. Defaults to ``$IMGQ_RESULT_BACKEND``,
            else the broker URL.
        queue: Queue the workers read. Defaults to ``"imgq"``.

    Example:
        >>> client = ImgqClient("redis://127.0.0.1:6379/0")  # doctest: +SKIP
        >>> r = client.classify(open("cat.jpg", "rb").read(), top_k=3)  # doctest: +SKIP
        >>> r.get(timeout=10)["label"]  # doctest: +SKIP
        'cat'
        >>> pending = client.classify_many(list_of_jpeg_bytes)  # doctest: +SKIP
        >>> client.results(pending, timeout_s=60)  # doctest: +SKIP
        [{'label': 'cat', ...}, InvalidImage('undecodable', ...), ...]
    """

    #: Task name put in every message; the benchmark's naive baseline worker changes it.
    task_name = TASK_NAME

    def __init__(
        self,
        broker_url: str | None = None,
        backend_url: str | None = None,
        *,
        queue: str = DEFAULT_QUEUE,
    ) -> None:
        self.broker_url = broker_url or os.environ.get("IMGQ_BROKER_URL") or DEFAULT_REDIS_URL
        self.backend_url = backend_url or os.environ.get("IMGQ_RESULT_BACKEND") or self.broker_url
        for name, url in (("broker", self.broker_url), ("result backend", self.backend_url)):
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(
                    f"imgq needs Redis as {name}, got {maybe_sanitize_url(url)!r}; "
                    "use a redis:// or rediss:// URL"
                )
        if not queue:
            raise ValueError("queue must be a non-empty name, e.g. 'imgq'")
        self.queue = queue
        self.app = Celery("imgq-client", broker=self.broker_url, backend=self.backend_url,
                          set_as_current=False)  # fmt: skip
        self.app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            result_accept_content=["json"],
            broker_connection_timeout=CONNECT_TIMEOUT_S,
            broker_transport_options={
                "socket_connect_timeout": CONNECT_TIMEOUT_S,
                "socket_timeout": SOCKET_TIMEOUT_S,
            },
            redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
            redis_socket_timeout=SOCKET_TIMEOUT_S,
            task_publish_retry_policy=RETRY_POLICY,
            result_backend_transport_options={"retry_policy": RETRY_POLICY},
        )
        self._redis: redis.Redis | None = None

    # -- enqueue ---------------------------------------------------------------------------------

    def classify(
        self,
        image_bytes: bytes,
        *,
        top_k: int = 1,
        request_id: str | None = None,
        expires_s: float | None = None,
    ) -> AsyncResult:
        """Enqueue one image with Celery's ``send_task``.

        Args:
            image_bytes: The encoded image file (JPEG, PNG, WebP, BMP, TIFF), not decoded pixels.
            top_k: How many best labels the result lists. Defaults to 1.
            request_id: Any string; the result echoes it. Defaults to None.
            expires_s: Seconds after which a worker that has not started the task drops it as
                REVOKED instead of computing a late answer. Defaults to None (never).

        Returns:
            The task's ``AsyncResult``; ``.get()`` returns the result dict or raises
            ``InvalidImage`` / ``InvalidTask``.

        Raises:
            kombu.exceptions.OperationalError: Redis cannot be reached (within seconds).
        """
        kwargs = _task_kwargs(image_bytes, top_k, request_id)
        try:
            return self.app.send_task(
                self.task_name,
                kwargs=kwargs,
                kwargsrepr=_kwargs_repr(image_bytes, kwargs),
                queue=self.queue,
                expires=expires_s,
                headers={SENT_AT_HEADER: time.time()},
            )
        except OperationalError as exc:
            raise OperationalError(self._unreachable("publish to", self.broker_url, exc)) from exc
        except RuntimeError as exc:
            # Celery's result consumer gives up its pub/sub reconnects with a RuntimeError whose
            # cause is the connection error; it reconnects on the next call once Redis is back.
            if not isinstance(exc.__cause__, redis.RedisError):
                raise
            raise OperationalError(
                self._unreachable("subscribe to results on", self.backend_url, exc.__cause__)
            ) from exc

    def classify_many(
        self,
        images: Iterable[bytes],
        *,
        top_k: int = 1,
        expires_s: float | None = None,
    ) -> list[AsyncResult]:
        """Enqueue many images, many tasks per round trip to Redis.

        The messages are exactly what :meth:`classify` sends (built by Celery's
        ``as_task_v2`` and kombu's serialisers), pushed with one ``LPUSH`` per chunk of up to
        :data:`PUSH_CHUNK_TASKS` messages in their order, so workers take them first-in
        first-out. ``images`` is consumed lazily: a generator reading files keeps memory flat.
        Celery's ``before/after_task_publish`` signals are not sent for these messages.

        Args:
            images: Encoded image files.
            top_k: How many best labels each result lists. Defaults to 1.
            expires_s: As in :meth:`classify`. Defaults to None.

        Returns:
            One ``AsyncResult`` per image, in order; gather them with :meth:`results`.

        Raises:
            kombu.exceptions.OperationalError: Redis cannot be reached; the message says how
                many tasks were enqueued before the failure (they stay queued).
        """
        results: list[AsyncResult] = []
        client = self._broker_client()
        template = _MessageTemplate(self.app, self.task_name, self.queue, top_k, expires_s)
        chunk: list[bytes] = []
        size = 0
        try:
            for image_bytes in images:
                task_id, message = template.fill(image_bytes)
                results.append(self.app.AsyncResult(task_id))
                chunk.append(message)
                size += len(message)
                if len(chunk) >= PUSH_CHUNK_TASKS or size >= PUSH_CHUNK_BYTES:
                    client.lpush(self.queue, *chunk)
                    chunk, size = [], 0
            if chunk:
                client.lpush(self.queue, *chunk)
        except redis.RedisError as exc:
            sent = len(results) - len(chunk)
            raise OperationalError(
                self._unreachable("publish to", self.broker_url, exc)
                + f"; {sent} of the tasks were enqueued before the failure"
            ) from exc
        return results

    # -- results ---------------------------------------------------------------------------------

    def results(
        self,
        async_results: Sequence[AsyncResult],
        timeout_s: float,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Result]:
        """Wait for many tasks and return each one's outcome, in order.

        Polls the result keys with ``MGET``, oldest first, at an interval that starts at
        :data:`POLL_MIN_S` and grows to :data:`POLL_MAX_S` while nothing new arrives, where
        ``AsyncResult.get()`` on each would cost a pub/sub subscription per task. Each poll
        reads the :data:`POLL_HEAD` oldest pending keys, then the next :data:`MGET_CHUNK`
        while the keys just read held finished tasks: workers serve a queue first in, first
        out, so where nothing has finished the younger tasks have not either. Once nothing has
        arrived for a while (the interval reached its maximum), and at the deadline, a poll
        reads every pending key, so tasks that finish out of order (another queue, a
        redelivery) are found too. Polling every pending key
        each time cost the waiting process 0.24-0.33 ms of CPU per task over a 5,000-task
        drain, as much as Redis spent serving the tasks.

        Args:
            async_results: What :meth:`classify` / :meth:`classify_many` returned.
            timeout_s: Seconds to wait for all of them together.
            progress: Called as ``progress(done, total)`` whenever more results arrived.

        Returns:
            Per task, the result dict (SUCCESS) or the exception ``AsyncResult.get()`` would
            raise: ``InvalidImage`` / ``InvalidTask`` (FAILURE), ``TaskRevokedError``
            (REVOKED, e.g. expired), or ``celery.exceptions.TimeoutError`` when the task had no
            result within ``timeout_s``.

        Raises:
            kombu.exceptions.OperationalError: the result backend cannot be reached.
        """
        backend = self.app.backend
        outcomes: list[Result | None] = [None] * len(async_results)
        pending = {backend.get_key_for_task(r.id): i for i, r in enumerate(async_results)}
        deadline = time.monotonic() + timeout_s
        interval_s = POLL_MIN_S
        try:
            while pending:
                remaining_s = deadline - time.monotonic()
                # Nothing new for a while, or the last look: read every pending key.
                everything = interval_s >= POLL_MAX_S or remaining_s <= 0
                found = self._poll(pending, outcomes, everything=everything)
                if found and progress is not None:
                    progress(len(async_results) - len(pending), len(async_results))
                if not pending or remaining_s <= 0:
                    break
                interval_s = POLL_MIN_S if found else min(interval_s * 1.5, POLL_MAX_S)
                time.sleep(min(interval_s, remaining_s))
        except redis.RedisError as exc:
            raise OperationalError(
                self._unreachable("read results from", self.backend_url, exc)
            ) from exc
        for key, i in pending.items():
            outcomes[i] = ResultTimeout(
                f"task {async_results[i].id} has no result after {timeout_s:g} s ({key})"
            )
        return [o for o in outcomes if o is not None]

    def _poll(
        self, pending: dict[str, int], outcomes: list[Result | None], *, everything: bool
    ) -> int:
        """One poll of :meth:`results`: moves finished tasks from ``pending`` (result key ->
        index, oldest first) into ``outcomes``; returns how many. Stops at the first chunk
        without a finished task unless ``everything``."""
        backend = self.app.backend
        found, skip, size = 0, 0, POLL_HEAD
        while True:
            chunk = list(itertools.islice(pending, skip, skip + size))
            if not chunk:
                return found
            finished = 0
            for key, value in zip(chunk, backend.client.mget(chunk), strict=True):
                if value is None:
                    continue
                meta = backend.decode_result(value)
                if meta["status"] not in states.READY_STATES:
                    continue
                # decode_result turned a failure's result into its exception
                outcomes[pending.pop(key)] = meta["result"]
                finished += 1
            if not finished and not everything:
                return found
            found += finished
            skip += len(chunk) - finished  # the unfinished keys of this chunk stay in front
            size = MGET_CHUNK

    # -- plumbing --------------------------------------------------------------------------------

    def _broker_client(self) -> redis.Redis:
        """A Redis client on the broker for bulk pushes (made once, bounded timeouts)."""
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.broker_url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
            )
        return self._redis

    def _unreachable(self, action: str, url: str, exc: BaseException) -> str:
        return (
            f"cannot {action} Redis at {maybe_sanitize_url(url)}: {exc}; check that Redis runs "
            "and that IMGQ_BROKER_URL / IMGQ_RESULT_BACKEND point at it"
        )

    def close(self) -> None:
        """Release the broker connections."""
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        self.app.close()

    def __enter__(self) -> ImgqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_image(image_bytes: bytes) -> None:
    if not isinstance(image_bytes, bytes | bytearray | memoryview):
        raise TypeError(
            f"an image must be the encoded file's bytes, got {type(image_bytes).__name__}; "
            "read the file with open(path, 'rb').read()"
        )


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    return top_k


def _task_kwargs(image_bytes: bytes, top_k: int, request_id: str | None) -> dict[str, Any]:
    """The task's keyword arguments; wrong Python types are refused here, before enqueueing."""
    _check_image(image_bytes)
    kwargs: dict[str, Any] = {"image": base64.b64encode(image_bytes).decode("ascii"),
                              "top_k": _check_top_k(top_k)}  # fmt: skip
    if request_id is not None:
        kwargs["request_id"] = str(request_id)
    return kwargs


def _kwargs_repr(image_bytes: bytes, kwargs: dict[str, Any]) -> str:
    """What Flower and worker logs show for the arguments: the image's size, not its base64
    (Celery would otherwise ``saferepr`` a kilobyte of base64 per task)."""
    return repr(dict(kwargs, image=f"<{len(image_bytes)} bytes>"))


class _MessageTemplate:
    """Task messages exactly as kombu's Redis transport LPUSHes them, made from one template.

    Celery's ``as_task_v2`` builds the headers and body once per :meth:`ImgqClient.classify_many`
    call; per task only the ids, the timestamps, the argument summary and the image change. The
    envelope is kombu's (``Channel.prepare_message`` plus the Redis transport's base64 body and
    delivery tag). Base64 text needs no JSON escaping, so the image and the body are spliced into
    JSON text made by kombu's encoder instead of going through it: an encoder scans every
    character, ~60 us per 16 kB on this machine, twice per task.
    """

    _SPLICE = "<imgq splice>"

    def __init__(
        self, app: Celery, task_name: str, queue: str, top_k: int, expires_s: float | None
    ) -> None:
        self.app, self.top_k, self.expires_s = app, top_k, expires_s
        kwargs = {"image": self._SPLICE, "top_k": _check_top_k(top_k)}
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
        _check_image(image_bytes)
        task_id = str(uuid4())
        kwargsrepr = _kwargs_repr(image_bytes, {"image": "", "top_k": self.top_k})
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


# -- imgq classify ---------------------------------------------------------------------------------


def _image_files(paths: Sequence[str]) -> list[Path]:
    """Files named on the command line, and the image files under named directories (sorted)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files.extend(p for p in found if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or directory")
    return files


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.width = total, width
        self.stream = sys.stderr
        self.started = time.monotonic()
        self._drawn_at = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        filled = self.width * done // max(total, 1)
        rate = done / max(now - self.started, 1e-9)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {rate:.0f}/s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _error_json(exc: BaseException) -> dict[str, Any]:
    """An outcome's error as JSON: type, reason code (InvalidImage/InvalidTask), message."""
    message = str(exc)
    reason = getattr(exc, "reason", None) or (message.split(":", 1)[0] if ":" in message else None)
    return {"type": type(exc).__name__, "reason": reason, "message": message}


def _read_all(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        yield path.read_bytes()


def classify_main(args: argparse.Namespace) -> int:
    """`imgq classify FILE_OR_DIR... [--top-k K] [--timeout S] [--queue Q]`.

    Enqueues each file (bulk for many), waits up to ``--timeout`` seconds for all results, and
    prints one JSON object per file, in order: ``{"file": ..., "result": {...}}`` or
    ``{"file": ..., "error": {"type", "reason", "message"}}``. A progress bar goes to stderr
    when there is more than one file. Exit status 1 when any task failed or timed out, 2 when a
    path does not exist or Redis cannot be reached.
    """
    try:
        files = _image_files(args.paths)
    except FileNotFoundError as exc:
        print(f"imgq classify: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"imgq classify: no image files in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    with ImgqClient(queue=args.queue or DEFAULT_QUEUE) as client:
        try:
            if len(files) == 1:
                pending = [client.classify(files[0].read_bytes(), top_k=args.top_k)]
            else:
                pending = client.classify_many(_read_all(files), top_k=args.top_k)
            bar = ProgressBar(len(files)) if len(files) > 1 else None
            outcomes = client.results(pending, args.timeout, progress=bar)
        except (OSError, OperationalError) as exc:
            print(f"imgq classify: {exc}", file=sys.stderr)
            return 2
    failed = 0
    for path, outcome in zip(files, outcomes, strict=True):
        line: dict[str, Any] = {"file": str(path)}
        if isinstance(outcome, BaseException):
            failed += 1
            line["error"] = _error_json(outcome)
        else:
            line["result"] = outcome
        print(json.dumps(line), flush=False)
    sys.stdout.flush()
    return 1 if failed else 0
