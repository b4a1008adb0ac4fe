"""The ``imgq_status`` remote-control command: which model this worker serves, if any.

Registered when this module is imported (the worker's consumer imports it); a worker calls
:func:`publish_model` once its bundle has passed the start-up checks, so a healthy answer means
the worker can serve, not merely that its process runs. ``imgq health`` and
``celery inspect imgq_status`` ask it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.worker.control import inspect_command

if TYPE_CHECKING:
    from imgq.shared.bundle import ModelBundle

__all__ = ["STATUS_COMMAND", "imgq_status", "publish_model"]

#: Name of the remote-control command that reports a worker's model.
STATUS_COMMAND = "imgq_status"

# The model each app (one per worker process) serves; weak so a test's apps can be collected.
_models: weakref.WeakKeyDictionary[Celery, dict[str, Any]] = weakref.WeakKeyDictionary()


def publish_model(
    app: Celery, bundle: ModelBundle, candidate: ModelBundle | None = None, follows: bool = False
) -> None:
    """Make the worker's ``imgq_status`` answer report ``bundle`` as loaded (and the rollout
    candidate it also serves, if any).

    Call it once the bundle has passed its start-up checks (hash, signature, golden set), so a
    healthy answer means the worker can serve, not merely that its process runs.

    Args:
        app: The worker's Celery app.
        bundle: The loaded (stable) bundle.
        candidate: The candidate version loaded beside it during a rollout.
        follows: Whether the worker follows its queue's rollout (False: pinned to a folder or
            a version).
    """
    _models[app] = {
        "loaded": True,
        "model": bundle.manifest.name,
        "version": bundle.version,
        "sha256": bundle.manifest.model_sha256,
        "provider": bundle.provider,
        "candidate": candidate.version if candidate is not None else None,
        "follows": follows,
        "queue": getattr(getattr(app, "settings", None), "queue", None),
    }


@inspect_command(name=STATUS_COMMAND)
def imgq_status(state: Any) -> dict[str, Any]:
    """The model this worker serves: {loaded, model, sha256, provider}; {loaded: false} before."""
    return _models.get(state.app, {"loaded": False})
