"""imgq: batched image classification on a Celery/Redis task queue, with train/serve parity and
drift alerts.

The public names are re-exported here; everything else is private by convention, whatever its
module name. They are imported on first use (PEP 562), so ``from imgq import ImgqClient`` needs
only celery and redis installed, never numpy, OpenCV or TensorFlow::

    from imgq import ImgqClient

    with ImgqClient("redis://:password@redis-host:6379/0") as client:
        print(client.classify(open("cat.jpg", "rb").read()).get(timeout=10)["label"])

The packages behind them: ``imgq.shared`` (the preprocessing contract between training and
serving), ``imgq.trainer`` (TensorFlow training and export), ``imgq.worker`` (serving).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imgq.shared.decode import DecodeLimits
    from imgq.shared.errors import (
        BundleError,
        ImgqError,
        InvalidImage,
        InvalidTask,
        ManifestError,
        ParityError,
    )
    from imgq.worker.client import TASK_NAME, ImgqClient
    from imgq.worker.settings import WorkerSettings

_PUBLIC: dict[str, str] = {
    "ImgqClient": "imgq.worker.client",
    "TASK_NAME": "imgq.worker.client",
    "WorkerSettings": "imgq.worker.settings",
    "DecodeLimits": "imgq.shared.decode",
    "ImgqError": "imgq.shared.errors",
    "InvalidImage": "imgq.shared.errors",
    "InvalidTask": "imgq.shared.errors",
    "ManifestError": "imgq.shared.errors",
    "BundleError": "imgq.shared.errors",
    "ParityError": "imgq.shared.errors",
}

__all__ = [
    "BundleError",
    "DecodeLimits",
    "ImgqClient",
    "ImgqError",
    "InvalidImage",
    "InvalidTask",
    "ManifestError",
    "ParityError",
    "TASK_NAME",
    "WorkerSettings",
]


def __getattr__(name: str) -> Any:
    """Import the module that defines a public name on its first use."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'imgq' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
