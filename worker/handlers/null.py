"""The null handler: ``imgq.null`` tasks answered ``{"ok": true}`` without looking at them.

What the engine costs on its own (take, parse, settle, ack, events) and what one Redis
sustains with imgq's delivery protocol are measured with it (``bench/engine.py``): whatever a
real handler adds comes on top. It also shows the smallest handler there is.

A task may say ``hold_until="<Redis key>"``: its batch is then held (making progress) until that
key exists, at most :data:`HOLD_MAX_S`. That is how tests see a batch in hand from outside
(``inspect active``, ``revoke(terminate=True)``) without depending on how fast a model runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis

from imgq.worker.handler import HandlerContext, Observer, Outcome, Request, Success

__all__ = ["HOLD_MAX_S", "NULL_TASK_NAME", "NullHandler", "create"]

#: The task the null handler serves.
NULL_TASK_NAME = "imgq.null"
#: Longest a batch is held for a ``hold_until`` key.
HOLD_MAX_S = 60.0
_HOLD_POLL_S = 0.01


class NullHandler:
    """Answers every request at once (after its ``hold_until`` key, if any); no observers."""

    task_name = NULL_TASK_NAME
    observers: Sequence[Observer] = ()

    def __init__(self, redis_client: redis.Redis | None = None) -> None:
        self.redis = redis_client

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        wanted = {r.kwargs.get("hold_until") for r in requests}
        keys = {k for k in wanted if isinstance(k, str) and 0 < len(k) <= 200}
        if keys and self.redis is not None:
            deadline = time.monotonic() + HOLD_MAX_S
            while time.monotonic() < deadline and self.redis.exists(*keys) < len(keys):
                tick()
                time.sleep(_HOLD_POLL_S)
        return [Success({"ok": True}) for _ in requests]

    def close(self) -> None:
        pass


def create(context: HandlerContext) -> NullHandler:
    """The null handler (it needs the broker's Redis for ``hold_until`` only)."""
    return NullHandler(context.redis)
