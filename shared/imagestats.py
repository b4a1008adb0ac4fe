"""Cheap per-image statistics and the reference histograms that drift detection compares against.

The trainer computes :func:`image_features` on every training image and stores
:func:`build_reference` of them in the manifest; the worker computes the same features on every
image it serves (from the already decoded array, no second decode) and adds
:func:`bin_counts` of them into Redis. Counts on fixed bins merge by addition, so the counts of
any number of workers sum to the counts of their combined traffic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_FEATURES",
    "OUTPUT_FEATURES",
    "FeatureReference",
    "ReferenceStats",
    "image_features",
    "output_features",
    "build_reference",
    "bin_counts",
    "out_of_range",
]

#: Per-image input features, in column order of :func:`image_features`.
IMAGE_FEATURES: tuple[str, ...] = (
    "brightness",  # mean luminance, 0..1
    "contrast",  # std of luminance, 0..1
    "mean_r",  # mean red, 0..1
    "mean_g",
    "mean_b",
    "saturation",  # mean HSV saturation, 0..1
    "dark_fraction",  # share of pixels with luminance < 0.1
    "bright_fraction",  # share of pixels with luminance > 0.9
    "sharpness",  # log1p of Laplacian variance of luminance on a fixed-size copy
    "width",  # original width, pixels
    "height",  # original height, pixels
    "aspect",  # width / height
    "bytes_per_pixel",  # encoded bytes / (width * height): compression level
)

#: Per-image model-output features, in column order of :func:`output_features`.
OUTPUT_FEATURES: tuple[str, ...] = (
    "predicted_class",  # categorical: index of the top-1 label
    "confidence",  # top-1 probability
    "margin",  # top-1 minus top-2 probability
)


@dataclasses.dataclass(frozen=True)
class FeatureReference:
    """Fixed bins and reference counts of one feature.

    Attributes:
        name: Feature name.
        edges: Increasing bin edges, ``len(counts) + 1`` of them; the first is ``-inf`` and the
            last ``+inf`` for continuous features so every value falls in a bin.
        counts: Reference count per bin.
        low: Lower extreme quantile of the reference (values below are out of range).
        high: Upper extreme quantile of the reference (values above are out of range).
        mean: Reference mean, for summaries ("brightness 0.46 -> 0.23").
        categorical: True for class indices (bins are the classes; never out of range).
    """

    name: str
    edges: tuple[float, ...]
    counts: tuple[int, ...]
    low: float
    high: float
    mean: float
    categorical: bool = False

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureReference:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Reference histograms of all features, keyed by feature name, as stored in the manifest."""

    features: dict[str, FeatureReference]
    n_images: int

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceStats:
        raise NotImplementedError


def image_features(rgb: np.ndarray, encoded_bytes: int) -> np.ndarray:
    """The :data:`IMAGE_FEATURES` of one decoded RGB uint8 image (original size), float64."""
    raise NotImplementedError


def output_features(probs: np.ndarray) -> np.ndarray:
    """The :data:`OUTPUT_FEATURES` of an (N, K) probability batch, as an (N, 3) float64 array."""
    raise NotImplementedError


def build_reference(
    values: np.ndarray,
    names: Sequence[str],
    *,
    n_bins: int = 10,
    categorical: dict[str, int] | None = None,
) -> ReferenceStats:
    """Reference histograms from an (N, F) feature matrix: equal-mass bins from the reference
    quantiles (open-ended), extreme quantiles for out-of-range checks. ``categorical`` maps a
    feature name to its number of classes (one bin per class)."""
    raise NotImplementedError


def bin_counts(
    reference: ReferenceStats, values: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Counts per reference bin of an (N, F) feature matrix (columns in ``names`` order): one
    int64 array per feature, the length of its reference ``counts``; they add up across workers."""
    raise NotImplementedError


def out_of_range(reference: ReferenceStats, row: np.ndarray, names: Sequence[str]) -> list[str]:
    """Names of the features of one image whose value lies outside the reference's extreme
    quantiles, so a caller can distrust that single answer."""
    raise NotImplementedError
