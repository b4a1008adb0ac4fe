"""Traces of the tasks a worker serves, the OpenTelemetry way: a worker continues each producer's
trace, and shows the batch that answered it.

imgq reads task messages itself and bypasses Celery's task execution, so the CONSUMER spans that
opentelemetry-instrumentation-celery makes in ``task_prerun`` never happen in an imgq worker; this
package makes them (``spans.py``):

- per task, a CONSUMER span ``run/<task name>`` whose parent is the context in the message's
  headers (``worker/wire/message.py`` reads it), with the attributes the instrumentation sets
  (``celery.task_name``, ``messaging.message_id``, ``messaging.destination``) and imgq's (queue
  wait, batch size, model version, outcome and reason), from the moment its batch is served until
  its result is stored;
- per batch, a span ``imgq.batch`` that links to each task span it served (a batch serves many
  traces; each task span links back), with the batch's steps as its children: ``imgq.take``,
  ``imgq.serve`` (with the handler's ``imgq.preprocess`` and ``imgq.inference``) and
  ``imgq.settle``;
- follow-ups (callbacks, chain steps, a chord's body) carry the task's context on, under a
  PRODUCER span ``apply_async/<task name>`` as the instrumentation makes one.

Configured by the standard ``OTEL_*`` variables (``provider.py``; read in ``worker/settings.py``
or by the SDK itself). Off by default: with ``OTEL_TRACES_EXPORTER`` unset or ``none``,
:func:`start_tracing` returns None, the engine calls nothing, and nothing of OpenTelemetry is
imported (this module imports none of it). A handler reports its steps with :func:`phase`
(``phases.py``), which costs one context-variable read while the batch is not traced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from imgq.worker.tracing.phases import Phase, collecting_phases, phase

if TYPE_CHECKING:
    from imgq.worker.settings import WorkerSettings
    from imgq.worker.tracing.spans import BatchTracer

__all__ = ["Phase", "collecting_phases", "phase", "start_tracing"]


def start_tracing(settings: WorkerSettings, hostname: str) -> BatchTracer | None:
    """The worker process's tracer when the settings ask for traces, else None (and nothing of
    OpenTelemetry imported).

    Raises:
        ImgqError: tracing is asked for but OpenTelemetry is not installed or refuses its
            configuration; the message says what to install or fix.
    """
    if not settings.tracing:
        return None
    from imgq.shared.errors import ImgqError

    try:
        from imgq.worker.tracing.provider import root_bound, tracer_provider
        from imgq.worker.tracing.spans import BatchTracer
    except ImportError as exc:
        raise ImgqError(
            f"OTEL_TRACES_EXPORTER={','.join(settings.traces_exporters)} asks for traces, but "
            f"OpenTelemetry is not installed ({exc}); install imgq[otel] "
            "(pip install 'imgq[otel]'), or set OTEL_TRACES_EXPORTER=none"
        ) from None
    bound = root_bound(settings.traces_sampler, settings.traces_sampler_arg)
    return BatchTracer(tracer_provider(settings), hostname, bound)
