"""The Python client of imgq: enqueue images and gather results (`imgq classify` is
:mod:`imgq.worker.commands.classify`).

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

A caller that traces with OpenTelemetry gets its context into the messages (W3C ``traceparent``,
``tracestate``, ``baggage`` headers, where Celery's instrumentation puts them), so the worker's
spans continue its trace; a caller that has not imported OpenTelemetry pays nothing for it.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from kombu.exceptions import OperationalError

from imgq.worker.broker.connection import SENTINEL_OPTIONS, connect, follow, results_options
from imgq.worker.broker.connection import url_problem as _url_problem
from imgq.worker.logs import mask_url
from imgq.worker.wire import DEFAULT_QUEUE, SENT_AT_HEADER, TASK_NAME
from imgq.worker.wire.envelope import MessageTemplate, kwargs_repr, task_kwargs

__all__ = ["DEFAULT_QUEUE", "TASK_NAME", "EnqueueNotConfirmed", "ImgqClient"]

#: Broker and result backend when neither the arguments nor the environment name one.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

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
#: once, and grows while nothing arrives so a long wait costs little: at most 200 polls a second
#: (a faster poll cost the waiting process CPU the workers needed; docs/benchmarks.md).
POLL_MIN_S = 0.005
POLL_MAX_S = 0.1


Result = dict[str, Any] | BaseException

_BROKER_OPTIONS = "IMGQ_BROKER_TRANSPORT_OPTIONS"
_RESULT_OPTIONS = "IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS"


class EnqueueNotConfirmed(OperationalError):
    """Not every task of a call was confirmed enqueued: Redis failed part-way, or (with
    ``wait_replicas``) fewer replicas than asked acknowledged a push in time.

    A task in :attr:`unconfirmed` is on the master (a short ``WAIT``) or may be (a lost reply),
    and is lost if the master fails before a replica has it; it may be answered anyway. Sending
    its image again makes a second task. The images after them were not sent.

    Attributes:
        confirmed: The ``AsyncResult`` of each task confirmed (by the replicas asked for, if
            any), in order.
        unconfirmed: Those of the tasks whose push was not confirmed, in order.
    """

    def __init__(
        self, message: str, confirmed: list[AsyncResult], unconfirmed: list[AsyncResult]
    ) -> None:
        super().__init__(message)
        self.confirmed = confirmed
        self.unconfirmed = unconfirmed


class ImgqClient:
    """Enqueue images for imgq workers and collect their results.

    The client is a separate program from the worker, so of imgq's settings it reads only
    those that say where Redis is: ``IMGQ_BROKER_URL`` and ``IMGQ_RESULT_BACKEND`` (the latter
    defaults to the broker URL), and for Sentinel the ``master_name``, ``sentinel_kwargs`` and
    ``min_other_sentinels`` of ``IMGQ_BROKER_TRANSPORT_OPTIONS`` and
    ``IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS`` (their other options are not read). Publishing
    while Redis is unreachable fails with ``kombu.exceptions.OperationalError`` within a few
    seconds (see :data:`CONNECT_TIMEOUT_S` and :data:`RETRY_POLICY`) instead of hanging.

    Args:
        broker_url: Redis URL of the broker (``redis://``, ``rediss://``, with a password if
            any, or ``sentinel://h1:26379;sentinel://h2:26379``). Defaults to
            ``$IMGQ_BROKER_URL``, else ``redis://127.0.0.1:6379/0``.
        backend_url: Redis URL of Celery's result backend. Defaults to ``$IMGQ_RESULT_BACKEND``,
            else the broker URL.
        queue: Queue the workers read. Defaults to ``"imgq"``.
        broker_transport_options: Celery's transport options of the broker, of which the
            Sentinel ones are used (``{"master_name": "mymaster"}``). Defaults to
            ``$IMGQ_BROKER_TRANSPORT_OPTIONS``.
        result_backend_transport_options: The same for the result backend. Defaults to
            ``$IMGQ_RESULT_BACKEND_TRANSPORT_OPTIONS``; with the same URL as the broker, the
            broker's Sentinel options unless these name a master.
        wait_replicas: After each push, wait until this many replicas have it (Redis
            ``WAIT``): a task the caller sees enqueued survives a failover to one of them.
            A push that falls short raises :class:`EnqueueNotConfirmed`. Defaults to 0 (the
            master's acknowledgement, which a failover can lose: docs/operations.md).
        wait_timeout_ms: Longest wait for the replicas, per push. Defaults to 1000.

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
        broker_transport_options: Mapping[str, Any] | None = None,
        result_backend_transport_options: Mapping[str, Any] | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.broker_url = broker_url or os.environ.get("IMGQ_BROKER_URL") or DEFAULT_REDIS_URL
        self.backend_url = backend_url or os.environ.get("IMGQ_RESULT_BACKEND") or self.broker_url
        self._broker_options = _sentinel_options(broker_transport_options, _BROKER_OPTIONS)
        self._result_options = results_options(
            self.broker_url, self._broker_options, self.backend_url,
            _sentinel_options(result_backend_transport_options, _RESULT_OPTIONS),
        )  # fmt: skip
        for name, url, options, source in (
            ("broker", self.broker_url, self._broker_options, _BROKER_OPTIONS),
            ("result backend", self.backend_url, self._result_options, _RESULT_OPTIONS),
        ):
            problem = _url_problem(url, options, source)
            if problem:
                raise ValueError(f"imgq needs Redis as {name}, got {mask_url(url)!r}: {problem}")
        if not queue:
            raise ValueError("queue must be a non-empty name, e.g. 'imgq'")
        for name, value, low in (("wait_replicas", wait_replicas, 0),
                                 ("wait_timeout_ms", wait_timeout_ms, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.queue = queue
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
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
                **self._broker_options,
            },
            redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
            redis_socket_timeout=SOCKET_TIMEOUT_S,
            task_publish_retry_policy=RETRY_POLICY,
            result_backend_transport_options={"retry_policy": RETRY_POLICY, **self._result_options},
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
            EnqueueNotConfirmed: with ``wait_replicas``, the replicas did not acknowledge the
                task in time (or Redis failed after the push); :attr:`~EnqueueNotConfirmed.
                unconfirmed` holds its ``AsyncResult``.
        """
        if self.wait_replicas:
            # The WAIT must follow the push on the same connection (it waits for that
            # connection's writes), so the message is pushed here, as classify_many pushes it.
            template = MessageTemplate(self.app, self.task_name, self.queue, top_k, expires_s,
                                       caller_trace_context(), request_id)  # fmt: skip
            task_id, message = template.fill(image_bytes)
            result = self.app.AsyncResult(task_id)
            self._push_confirmed([message], [result], 0)
            return result
        kwargs = task_kwargs(image_bytes, top_k, request_id)
        try:
            return self.app.send_task(
                self.task_name,
                kwargs=kwargs,
                kwargsrepr=kwargs_repr(image_bytes, kwargs),
                queue=self.queue,
                expires=expires_s,
                headers={SENT_AT_HEADER: time.time(), **caller_trace_context()},
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
            EnqueueNotConfirmed: Redis cannot be reached (a ``kombu.exceptions.
                OperationalError``), or with ``wait_replicas`` a push was not acknowledged by
                enough replicas in time; it says which tasks were confirmed (they stay
                queued) and which were not, and the images after those were not sent.
        """
        results: list[AsyncResult] = []
        template = MessageTemplate(self.app, self.task_name, self.queue, top_k, expires_s,
                                   caller_trace_context())  # fmt: skip
        chunk: list[bytes] = []
        size = 0
        for image_bytes in images:
            task_id, message = template.fill(image_bytes)
            results.append(self.app.AsyncResult(task_id))
            chunk.append(message)
            size += len(message)
            if len(chunk) >= PUSH_CHUNK_TASKS or size >= PUSH_CHUNK_BYTES:
                self._push_confirmed(chunk, results, len(results) - len(chunk))
                chunk, size = [], 0
        if chunk:
            self._push_confirmed(chunk, results, len(results) - len(chunk))
        return results

    def _push_confirmed(self, messages: list[bytes], results: list[AsyncResult], done: int) -> None:
        """``LPUSH`` the ``messages`` (the last of ``results``; the ``done`` before them are
        confirmed), followed with ``wait_replicas`` by ``WAIT`` on the same connection.

        Raises:
            EnqueueNotConfirmed: Redis failed, or the replicas fell short.
        """
        try:
            pipe = self._broker_client().pipeline(transaction=False)
            pipe.lpush(self.queue, *messages)
            if self.wait_replicas:
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise EnqueueNotConfirmed(
                self._unreachable("publish to", self.broker_url, exc)
                + f"; {done} of the tasks were enqueued before the failure",
                results[:done], results[done:],
            ) from exc  # fmt: skip
        if self.wait_replicas and int(replies[1]) < self.wait_replicas:
            raise EnqueueNotConfirmed(
                f"{len(messages)} tasks are enqueued on the master, but {replies[1]} of the "
                f"{self.wait_replicas} replicas asked for acknowledged them within "
                f"{self.wait_timeout_ms} ms: a failover now may lose them; {done} tasks "
                "before them were confirmed",
                results[:done], results[done:],
            )  # fmt: skip

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
        redelivery) are found too. (Polling every pending key each time cost the waiting
        process as much CPU as Redis spent serving the tasks: ``docs/benchmarks.md``.)

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
        follow(backend.client)  # through Sentinel: read the master the sentinels name now
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
            self._redis = connect(
                self.broker_url,
                self._broker_options,
                options_name=_BROKER_OPTIONS,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
            )
        return self._redis

    def _unreachable(self, action: str, url: str, exc: BaseException) -> str:
        return (
            f"cannot {action} Redis at {mask_url(url)}: {exc}; check that Redis runs "
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


def caller_trace_context() -> dict[str, str]:
    """The caller's OpenTelemetry context as message headers (none when it has no span or
    baggage). Only a program that has imported OpenTelemetry can have a span, so nothing is
    imported here unless it has."""
    if "opentelemetry.context" not in sys.modules:
        return {}
    try:
        from opentelemetry import propagate
    except ImportError:  # a part of it only
        return {}
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _sentinel_options(given: Mapping[str, Any] | None, variable: str) -> dict[str, Any]:
    """The Sentinel options (:data:`SENTINEL_OPTIONS`) of ``given``, or of the JSON object in
    the environment variable ``variable`` when ``given`` is None.

    Raises:
        ValueError: the variable is not a JSON object.
    """
    if given is None:
        raw = os.environ.get(variable, "").strip()
        try:
            given = json.loads(raw) if raw else {}
        except ValueError:
            raise ValueError(f"{variable} is not JSON") from None
        if not isinstance(given, dict):
            raise ValueError(f"{variable} is not a JSON object")
    return {k: given[k] for k in SENTINEL_OPTIONS if k in given}
