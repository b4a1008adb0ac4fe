"""Celery's wire formats as imgq writes and reads them, one module each.

imgq's workers read the Redis list themselves and write results and events themselves, so each
format is written out here, exactly as Celery and kombu do it, and tested against them:

- :mod:`~imgq.worker.wire.envelope` — a task message as a producer LPUSHes it (the client);
- :mod:`~imgq.worker.wire.message` — reading one back, every field validated (the worker);
- :mod:`~imgq.worker.wire.canvas` — its callbacks, errbacks, chain and chord, checked;
- :mod:`~imgq.worker.wire.result` — a finished task's record in the result backend;
- :mod:`~imgq.worker.wire.events` — Celery task events (Flower) for a whole batch;
- :mod:`~imgq.worker.wire.codec` — the JSON those are made of.

This package and ``envelope`` and ``result`` import only celery, kombu and the standard library,
so a client with only celery and redis installed uses them.
"""

from __future__ import annotations

__all__ = ["DEFAULT_QUEUE", "SENT_AT_HEADER", "TASK_NAME"]

#: The task imgq's classification handler serves.
TASK_NAME = "imgq.classify"
#: Queue (Redis list) the workers read when none is configured.
DEFAULT_QUEUE = "imgq"
#: Header carrying the enqueue time (epoch seconds); the worker reports queue time from it.
SENT_AT_HEADER = "imgq_sent_at"
