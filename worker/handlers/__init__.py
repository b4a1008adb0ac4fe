"""The handlers a worker can serve, one task kind per module (the seam: ``worker/handler.py``):
``classify`` (``imgq.classify``, the model) and ``null`` (``imgq.null``, for measuring the engine),
and their registry. The registry imports nothing: the settings check handler names against it and
the Celery app registers task names from it without loading a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Final

__all__ = ["HANDLERS", "HandlerSpec"]


@dataclasses.dataclass(frozen=True)
class HandlerSpec:
    """A registered handler: the Celery task it serves, and ``"module:factory"`` (the factory
    takes a ``HandlerContext`` of ``worker/handler.py`` and returns its ``Handler``; imported
    only when a worker serves it)."""

    task_name: str
    factory: str


#: Handler name (``IMGQ_HANDLERS``) -> its spec. Adding a task kind is one line here.
HANDLERS: Final[Mapping[str, HandlerSpec]] = {
    "classify": HandlerSpec("imgq.classify", "imgq.worker.rollout.serving:create"),
    "null": HandlerSpec("imgq.null", "imgq.worker.handlers.null:create"),
}
