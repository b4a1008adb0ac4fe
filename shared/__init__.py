"""The contract between training and serving: decode, preprocess, image statistics, manifest.

numpy, OpenCV and Pillow only: no TensorFlow, Celery or Redis, so the trainer and every worker
import the very same code.
"""

from shared.decode import (
    DEFAULT_LIMITS,
    DecodeLimits,
    ImageInfo,
    decode_base64,
    decode_image,
    probe_image,
)
from shared.errors import (
    IMAGE_REASONS,
    TASK_REASONS,
    BundleError,
    ImgqError,
    InvalidImage,
    InvalidTask,
    ManifestError,
    ParityError,
)
from shared.imagestats import (
    IMAGE_FEATURES,
    OUTPUT_FEATURES,
    FeatureReference,
    ReferenceStats,
    bin_counts,
    build_reference,
    image_features,
    out_of_range,
    output_features,
)
from shared.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    GoldenImage,
    Manifest,
    load_manifest,
    save_manifest,
    sha256_file,
)
from shared.preprocess import (
    PreprocessSpec,
    compute_mean_std,
    normalise_batch,
    preprocess_batch,
    resize_image,
)

__all__ = [
    "DEFAULT_LIMITS", "DecodeLimits", "ImageInfo", "decode_base64", "decode_image", "probe_image",
    "IMAGE_REASONS", "TASK_REASONS", "BundleError", "ImgqError", "InvalidImage", "InvalidTask",
    "ManifestError", "ParityError",
    "IMAGE_FEATURES", "OUTPUT_FEATURES", "FeatureReference", "ReferenceStats", "bin_counts",
    "build_reference", "image_features", "out_of_range", "output_features",
    "MANIFEST_FILE", "MANIFEST_VERSION", "GoldenImage", "Manifest", "load_manifest",
    "save_manifest", "sha256_file",
    "PreprocessSpec", "compute_mean_std", "normalise_batch", "preprocess_batch", "resize_image",
]  # fmt: skip
