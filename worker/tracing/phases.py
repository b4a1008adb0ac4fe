"""The steps a handler reports of the batch in hand (preprocess, inference), for the batch's
spans while it is traced (``worker/tracing/spans.py``). Imports nothing of OpenTelemetry: a
handler calls :func:`phase` whether or not tracing is on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Phase", "collecting_phases", "phase"]

#: A step of a handler's batch: name, start and end in ``time.perf_counter()`` seconds.
Phase = tuple[str, float, float]

_PHASES: ContextVar[list[Phase] | None] = ContextVar("imgq_batch_phases", default=None)


def phase(name: str, start_s: float, end_s: float) -> None:
    """A handler's step of the batch in hand (``preprocess``, ``inference``), timed with
    ``time.perf_counter()``: a span ``imgq.<name>`` of the batch when it is traced, else nothing.
    """
    phases = _PHASES.get()
    if phases is not None:
        phases.append((name, start_s, end_s))


@contextlib.contextmanager
def collecting_phases() -> Iterator[list[Phase]]:
    """The steps :func:`phase` reports in this thread meanwhile (the batch engine serves a
    batch in one thread)."""
    phases: list[Phase] = []
    token = _PHASES.set(phases)
    try:
        yield phases
    finally:
        _PHASES.reset(token)
