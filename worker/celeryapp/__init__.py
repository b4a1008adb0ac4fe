"""The Celery side of a worker: the Celery app, the consumer step that runs the batch engine
inside a real Celery worker, the batch in hand in Celery's worker state (inspect, revoke), the
follow-ups Celery's worker would send (callbacks, chains, chords), misrouted tasks, and the
``imgq_status`` remote-control command."""
