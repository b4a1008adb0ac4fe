"""The contract between training and serving: decode, preprocess, image statistics, manifest.

numpy, OpenCV and Pillow only: no TensorFlow, Celery or Redis, so the trainer and every worker
import the very same code. Names are re-exported lazily (PEP 562), so ``import shared.errors``
stays cheap for a client that has only celery and redis installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "imgq.shared.decode": (
        "DEFAULT_LIMITS", "DecodeLimits", "ImageInfo", "decode_base64", "decode_image",
        "probe_image",
    ),
    "imgq.shared.errors": (
        "IMAGE_REASONS", "TASK_REASONS", "BundleError", "ImgqError", "InvalidImage",
        "InvalidTask", "ManifestError", "ParityError",
    ),
    "imgq.shared.imagestats": (
        "IMAGE_FEATURES", "OUTPUT_FEATURES", "FeatureReference", "ReferenceStats", "bin_counts",
        "build_reference", "image_features", "out_of_range", "output_features",
    ),
    "imgq.shared.manifest": (
        "MANIFEST_FILE", "MANIFEST_VERSION", "GoldenImage", "Manifest", "load_manifest",
        "save_manifest", "sha256_file",
    ),
    "imgq.shared.preprocess": (
        "PreprocessSpec", "compute_mean_std", "normalise_batch", "preprocess_batch",
        "resize_image",
    ),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """Import the defining module on first use of a re-exported name."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
