"""The null handler: ``imgq.null`` tasks answered ``{"ok": true}`` without looking at them.

What the engine costs on its own (take, parse, settle, ack, events) and what one Redis
sustains with imgq's delivery protocol are measured with it (``bench/engine.py``): whatever a
real handler adds comes on top. It also shows the smallest handler there is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from imgq.worker.handler import HandlerContext, Observer, Outcome, Request, Success

__all__ = ["NULL_TASK_NAME", "NullHandler", "create"]

#: The task the null handler serves.
NULL_TASK_NAME = "imgq.null"


class NullHandler:
    """Answers every request at once; no model, no observers."""

    task_name = NULL_TASK_NAME
    observers: Sequence[Observer] = ()

    def handle(self, requests: Sequence[Request], tick: Callable[[], None]) -> list[Outcome]:
        return [Success({"ok": True}) for _ in requests]

    def close(self) -> None:
        pass


def create(context: HandlerContext) -> NullHandler:
    """The null handler (it needs nothing from the context)."""
    return NullHandler()
