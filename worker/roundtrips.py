"""A runner's Redis round trips on a thread of their own, in the order they were asked for, so
that they overlap with serving (``worker/engine.py``): the batch engine's only concurrency."""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["Pace", "RoundTrips"]


class RoundTrips:
    """One runner's Redis round trips (takes, stores), run in the order they were asked for on
    a thread of their own, so that they overlap with serving.

    A daemon thread, started on first use: a worker that exits does not wait for a Redis that
    does not answer (the lease gives its messages to another worker).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._closed = False
        self._starting = threading.Lock()  # stop() submits from another thread than the runner

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` after the jobs asked for before; once closed, run it now."""
        future: Future[Any] = Future()
        job = functools.partial(fn, *args)
        with self._starting:
            if not self._closed:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name,
                                                    daemon=True)  # fmt: skip
                    self._thread.start()
                self._jobs.put((job, future))
                return future
        _run_job(job, future)
        return future

    def close(self) -> None:
        """End the thread once the jobs asked for are done."""
        with self._starting:
            thread, self._thread, self._closed = self._thread, None, True
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            _run_job(*job)


def _run_job(fn: Callable[[], Any], future: Future[Any]) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)


#: Weight of the newest measurement in the running estimates of :class:`Pace`.
_EWMA = 0.2
#: A take goes out this much earlier than a take's running time before the batch in hand ends,
#: for the thread switches around it; or this share of the batch's estimated serving time,
#: if more: a batch's time jitters with the machine's load, and a take that lands late makes
#: the runner wait a round trip, one that lands early only holds a batch a little longer.
_MARGIN_S = 0.002
_MARGIN_SHARE = 0.25
#: Longest a take waits for the runner to start the batch before the one it takes for.
_START_WAIT_S = 0.05
#: Longest a take is held back, whatever the estimates say.
_MAX_HOLD_S = 10.0


class Pace:
    """When a runner's next take goes out: just in time for the end of the batch in hand, two
    takes' running time and a quarter of the batch before it.

    A batch taken the moment the one before it started would wait a whole batch in this worker,
    while another worker may be idle and the tasks of a higher priority arrive behind it
    (Celery's prefetch problem); a take after the end would make the runner wait a round trip.
    The end is estimated from the batch's size and the runner's recent time per message, the
    take's time from recent takes; a runner without estimates yet takes at once, and a batch
    that ends before its estimate releases the take at once.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._ordinal = 0  # batches started (an idle turn counts as one)
        self._until = 0.0  # monotonic time the batch in hand should end; 0: take at once
        self._span_s = 0.0  # its estimated serving time
        self._per_message_s: float | None = None
        self._take_s: float | None = None

    def serving(self, messages: int) -> int:
        """The runner starts a batch of ``messages`` (0: it has none); its ordinal."""
        with self._changed:
            self._ordinal += 1
            per = self._per_message_s
            self._span_s = messages * per if messages and per else 0.0
            self._until = time.monotonic() + self._span_s if self._span_s else 0.0
            self._changed.notify_all()
            return self._ordinal

    def served(self, messages: int, elapsed_s: float) -> None:
        """A batch of ``messages`` took ``elapsed_s`` to serve: a take held for its end goes
        now, however far off the estimate was (one slow batch must not idle the next ones)."""
        with self._changed:
            if messages:
                self._per_message_s = _ewma(self._per_message_s, elapsed_s / messages)
            self._until = 0.0
            self._changed.notify_all()

    def wake(self) -> None:
        """A take held back looks at its ``stop`` event now (call it after setting it)."""
        with self._changed:
            self._changed.notify_all()

    def took(self, elapsed_s: float) -> None:
        """A take took ``elapsed_s``, round trips included."""
        self._take_s = _ewma(self._take_s, elapsed_s)

    def hold(self, after: int, stop: threading.Event) -> bool:
        """On the round-trip thread, before the take of the batch that follows batch ``after``:
        wait until that batch is in hand, then until its estimated end less a take's time, or
        its actual end if that comes first, or ``stop`` (with :meth:`wake`).
        Returns whether it waited (reads made before may be stale)."""
        with self._changed:
            self._changed.wait_for(lambda: self._ordinal > after or stop.is_set(), _START_WAIT_S)
            until = self._until
            lead_s = 2 * (self._take_s or 0.0) + max(_MARGIN_S, _MARGIN_SHARE * self._span_s)
            hold_s = min(until - lead_s - time.monotonic(), _MAX_HOLD_S)
            if not until or hold_s <= 0:
                return False
            self._changed.wait_for(lambda: self._until != until or stop.is_set(), hold_s)
            return True


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else previous + _EWMA * (value - previous)
