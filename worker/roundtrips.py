"""A runner's Redis round trips on a thread of their own, in the order they were asked for, so
that they overlap with serving (``worker/engine.py``): the batch engine's only concurrency."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["RoundTrips"]


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
