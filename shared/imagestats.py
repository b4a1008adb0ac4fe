"""Cheap per-image statistics and the reference histograms that drift detection compares against.

The trainer computes :func:`image_features` on every training image and stores
:func:`build_reference` of them in the manifest; the worker computes the same features on every
image it serves (from the already decoded array, no second decode) and adds
:func:`bin_counts` of them into Redis. Counts on fixed bins merge by addition, so the counts of
any number of workers sum to the counts of their combined traffic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from shared.preprocess import check_rgb_image

__all__ = [
    "IMAGE_FEATURES",
    "IMAGE_FEATURES_VERSION",
    "OUTPUT_FEATURES",
    "FeatureReference",
    "ReferenceStats",
    "image_features",
    "output_features",
    "build_reference",
    "bin_counts",
    "out_of_range",
    "out_of_range_rows",
]

#: Version of :func:`image_features`' definitions; raise it whenever a value it computes for the
#: same image changes (2: pixel features on a 64 x 64 copy instead of 96 x 96).
IMAGE_FEATURES_VERSION = 2

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
        low: Lower bound of the training range: the reference minimum widened by 10% of the
            span (values below are out of range).
        high: Upper bound of the training range, likewise (values above are out of range).
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

    def __post_init__(self) -> None:
        edges = np.asarray(self.edges, np.float64)
        if len(self.counts) < 1 or len(edges) != len(self.counts) + 1:
            raise ValueError(
                f"feature {self.name!r}: {len(edges)} edges for {len(self.counts)} counts; "
                "need one more edge than counts"
            )
        if np.isnan(edges).any() or not (np.diff(edges) > 0).all():
            raise ValueError(
                f"feature {self.name!r}: edges must increase strictly, got {self.edges}"
            )
        if any(c < 0 for c in self.counts):
            raise ValueError(f"feature {self.name!r}: counts must be >= 0, got {self.counts}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; infinite values are written as the strings ``"inf"`` / ``"-inf"``
        (plain JSON has no infinity) and read back by ``float()``.

        >>> f = FeatureReference("x", (-math.inf, 0.5, math.inf), (3, 4), 0.0, 1.0, 0.4)
        >>> f.to_dict()["edges"]
        ['-inf', 0.5, 'inf']
        >>> FeatureReference.from_dict(f.to_dict()) == f
        True
        """
        return {
            "name": self.name,
            "edges": [_encode_float(e) for e in self.edges],
            "counts": list(self.counts),
            "low": _encode_float(self.low),
            "high": _encode_float(self.high),
            "mean": _encode_float(self.mean),
            "categorical": self.categorical,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureReference:
        """Build from :meth:`to_dict`'s form; a bad value raises ``ValueError``."""
        return cls(
            name=str(data["name"]),
            edges=tuple(_decode_float(e) for e in data["edges"]),
            counts=tuple(int(c) for c in data["counts"]),
            low=_decode_float(data["low"]),
            high=_decode_float(data["high"]),
            mean=_decode_float(data["mean"]),
            categorical=bool(data.get("categorical", False)),
        )


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Reference histograms of all features, keyed by feature name, as stored in the manifest.

    ``image_features_version`` is the :data:`IMAGE_FEATURES_VERSION` of the code that computed
    them: image statistics from another version are not comparable (1: no version stored).
    """

    features: dict[str, FeatureReference]
    n_images: int
    image_features_version: int = IMAGE_FEATURES_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest's ``reference`` section."""
        return {
            "n_images": self.n_images,
            "image_features_version": self.image_features_version,
            "features": {name: f.to_dict() for name, f in self.features.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReferenceStats:
        """Build from :meth:`to_dict`'s form; raises ``ValueError`` on a malformed entry."""
        features = {
            str(name): FeatureReference.from_dict(f) for name, f in data["features"].items()
        }
        for name, f in features.items():
            if f.name != name:
                raise ValueError(f"reference feature stored under {name!r} is named {f.name!r}")
        version = int(data.get("image_features_version", 1))
        return cls(
            features=features, n_images=int(data["n_images"]), image_features_version=version
        )


#: Side of the fixed-size copy the pixel features are computed on.
_COPY_SIDE_PX = 64
#: Largest uint8 luminance counted as dark (< 0.1 of full scale) and smallest counted as bright
#: (> 0.9 of full scale).
_DARK_MAX = 25
_BRIGHT_MIN = 230


def image_features(rgb: np.ndarray, encoded_bytes: int) -> np.ndarray:
    """The :data:`IMAGE_FEATURES` of one decoded RGB uint8 image (original size), float64.

    Pixel features are computed on a fixed ``64 x 64`` resampled copy, so their cost is bounded
    (on one core here: ~0.09 ms for the ~140 x 140 sample images, ~0.23 ms for 640 x 480, where
    the decode alone takes ~4 ms) and sharpness is comparable across source resolutions; size
    features come from the original. A 96 x 96 copy cost twice as much and detected no shift of
    ``bench/drift.py`` better.
    Every feature is invariant to a horizontal flip. Sharpness is ``log1p`` of the variance of
    the Laplacian of luminance (0..255 scale) on the copy: it falls with blur and with upscaled
    low-resolution content.

    Args:
        rgb: ``(height, width, 3)`` uint8 array from :func:`shared.decode.decode_image`.
        encoded_bytes: Length of the encoded payload, for ``bytes_per_pixel``.

    Returns:
        A ``(len(IMAGE_FEATURES),)`` float64 array in :data:`IMAGE_FEATURES` order.

    >>> white = np.full((40, 80, 3), 255, np.uint8)
    >>> f = dict(zip(IMAGE_FEATURES, image_features(white, 800).tolist()))
    >>> f["brightness"], f["bright_fraction"], f["sharpness"], f["aspect"], f["bytes_per_pixel"]
    (1.0, 1.0, 0.0, 2.0, 0.25)
    """
    check_rgb_image(rgb)
    height, width = rgb.shape[:2]
    small = _fixed_copy(rgb)
    luma = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    luma_mean, luma_std = cv2.meanStdDev(luma)
    mean_r, mean_g, mean_b, _ = cv2.mean(small)
    saturation = cv2.mean(cv2.cvtColor(small, cv2.COLOR_RGB2HSV))[1]
    n = luma.size
    # int16 holds the Laplacian of uint8 exactly, and its integer sums give the variance exactly
    # at a fifth of cv2.meanStdDev's cost.
    lap = cv2.Laplacian(luma, cv2.CV_16S)
    lap_var = cv2.norm(lap, cv2.NORM_L2SQR) / n - (cv2.sumElems(lap)[0] / n) ** 2
    return np.array(
        [
            luma_mean[0, 0] / 255.0,
            luma_std[0, 0] / 255.0,
            mean_r / 255.0,
            mean_g / 255.0,
            mean_b / 255.0,
            saturation / 255.0,
            # Integer thresholds: luma < 0.1 * 255 and luma > 0.9 * 255 on uint8 values.
            np.count_nonzero(luma <= _DARK_MAX) / n,
            np.count_nonzero(luma >= _BRIGHT_MIN) / n,
            math.log1p(lap_var),
            width,
            height,
            width / height,
            encoded_bytes / (width * height),
        ],
        np.float64,
    )


def output_features(probs: np.ndarray) -> np.ndarray:
    """The :data:`OUTPUT_FEATURES` of an (N, K) probability batch, as an (N, 3) float64 array.

    >>> output_features(np.array([[0.1, 0.7, 0.2]]))[0].round(3).tolist()
    [1.0, 0.7, 0.5]
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"output_features needs an (N, K >= 2) array, got shape {probs.shape}")
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return np.stack([probs.argmax(axis=1), top2[:, 0], top2[:, 0] - top2[:, 1]], axis=1)


def build_reference(
    values: np.ndarray,
    names: Sequence[str],
    *,
    n_bins: int = 10,
    categorical: dict[str, int] | None = None,
) -> ReferenceStats:
    """Reference histograms from an (N, F) feature matrix: equal-mass bins from the reference
    quantiles (open-ended), extreme quantiles for out-of-range checks. ``categorical`` maps a
    feature name to its number of classes (one bin per class).

    Bins are ``[edge_i, edge_i+1)`` between quantile edges (reference values), with ``-inf``
    and ``+inf`` outer edges so every value lands in a bin. Repeated edges (discrete features)
    are merged, and a value holding more than one bin's share of the data gets a bin of its own,
    so a constant feature has three bins: below, equal, above. The out-of-range bounds are the
    reference minimum and maximum widened by 10% of their span each way: with 13 features, about
    0.3% of in-distribution images have some feature out of range with a 1,000-image reference
    (about 1.2% with 300 images).

    Args:
        values: ``(N, F)`` finite feature values, columns in ``names`` order.
        names: Feature names of the columns.
        n_bins: Number of equal-mass bins for continuous features. Defaults to 10.
        categorical: Class count per categorical feature (e.g. ``{"predicted_class": 4}``).

    >>> ref = build_reference(np.arange(100.0)[:, None], ["x"], n_bins=4)
    >>> ref.features["x"].edges, ref.features["x"].counts
    ((-inf, 24.0, 49.0, 74.0, inf), (24, 25, 25, 26))
    >>> build_reference(np.full((5, 1), 3.0), ["c"]).features["c"].counts
    (0, 5, 0)
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != len(names) or values.shape[0] < 1:
        raise ValueError(
            f"build_reference needs an (N >= 1, {len(names)}) matrix for {len(names)} names, "
            f"got shape {values.shape}"
        )
    if not np.isfinite(values).all():
        bad = [n for n, ok in zip(names, np.isfinite(values).all(axis=0), strict=True) if not ok]
        raise ValueError(f"build_reference got NaN or infinite values in {bad}")
    if not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    categorical = categorical or {}
    unknown = set(categorical) - set(names)
    if unknown:
        raise ValueError(
            f"categorical names {sorted(unknown)} are not among the features {list(names)}"
        )
    features = {}
    for j, name in enumerate(names):
        col = values[:, j]
        if name in categorical:
            n_classes = int(categorical[name])
            edges = np.array([-np.inf, *(np.arange(n_classes - 1) + 0.5), np.inf])
            low, high = -math.inf, math.inf
        else:
            edges = _quantile_edges(col, n_bins)
            span = float(col.max() - col.min())
            low, high = float(col.min()) - 0.1 * span, float(col.max()) + 0.1 * span
        features[name] = FeatureReference(
            name=name,
            edges=tuple(float(e) for e in edges),
            counts=tuple(int(c) for c in _histogram(edges, col)),
            low=low,
            high=high,
            mean=float(col.mean()),
            categorical=name in categorical,
        )
    return ReferenceStats(features=features, n_images=int(values.shape[0]))


def bin_counts(
    reference: ReferenceStats, values: np.ndarray, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Counts per reference bin of an (N, F) feature matrix (columns in ``names`` order): one
    int64 array per feature, the length of its reference ``counts``; they add up across workers.

    >>> ref = build_reference(np.arange(100.0)[:, None], ["x"], n_bins=4)
    >>> bin_counts(ref, np.array([[-5.0], [30.0], [1e9]]), ["x"])["x"].tolist()
    [1, 1, 0, 1]
    """
    values = np.atleast_2d(np.asarray(values, np.float64))
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(
            f"bin_counts needs an (N, {len(names)}) matrix for {len(names)} names, "
            f"got shape {values.shape}"
        )
    return {
        name: _histogram(np.asarray(_feature(reference, name).edges), values[:, j])
        for j, name in enumerate(names)
    }


def out_of_range(reference: ReferenceStats, row: np.ndarray, names: Sequence[str]) -> list[str]:
    """Names of the features of one image whose value lies outside the reference's extreme
    quantiles, so a caller can distrust that single answer.

    Categorical features are never out of range; NaN is always out of range.

    >>> ref = build_reference(np.arange(100.0)[:, None], ["x"])
    >>> out_of_range(ref, np.array([50.0]), ["x"]), out_of_range(ref, np.array([500.0]), ["x"])
    ([], ['x'])
    """
    return out_of_range_rows(reference, np.asarray(row, np.float64).ravel()[None], names)[0]


def out_of_range_rows(
    reference: ReferenceStats, values: np.ndarray, names: Sequence[str]
) -> list[list[str]]:
    """:func:`out_of_range` of every row of an (N, F) feature matrix (columns in ``names``
    order), in one comparison: the worker checks a whole batch at once.

    >>> ref = build_reference(np.arange(100.0)[:, None], ["x"])
    >>> out_of_range_rows(ref, np.array([[50.0], [np.nan], [500.0]]), ["x"])
    [[], ['x'], ['x']]
    """
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[1] != len(names):
        raise ValueError(f"out_of_range got values of shape {values.shape} for {len(names)} names")
    features = [_feature(reference, name) for name in names]
    low = np.array([f.low for f in features], np.float64)
    high = np.array([f.high for f in features], np.float64)
    outside = ~((values >= low) & (values <= high))
    outside &= np.array([not f.categorical for f in features])
    rows_out: list[bool] = outside.any(axis=1).tolist()  # type: ignore[assignment]
    return [
        [names[j] for j in np.flatnonzero(row).tolist()] if any_out else []
        for row, any_out in zip(outside, rows_out, strict=True)
    ]


def _fixed_copy(rgb: np.ndarray) -> np.ndarray:
    """The image resampled to ``_COPY_SIDE_PX`` square, symmetrically (a flipped image gives a
    flipped copy).

    A large image is resized bilinearly to twice the side, then averaged over exact 2 x 2
    blocks (OpenCV's fast ``INTER_AREA`` case): ~0.13 ms for 640 x 480. A fractional
    ``INTER_AREA`` costs ~1 ms there and still ~0.1 ms for 128 x 128, so an image up to twice
    the side is resized bilinearly in one step, which at ratios up to 2 still weighs every
    source pixel (at exactly 2 it *is* the 2 x 2 block mean): ~0.03 ms.
    """
    side = _COPY_SIDE_PX
    if rgb.shape[0] > 2 * side or rgb.shape[1] > 2 * side:
        rgb = cv2.resize(rgb, (2 * side, 2 * side), interpolation=cv2.INTER_LINEAR)
        return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_LINEAR)


def _quantile_edges(col: np.ndarray, n_bins: int) -> np.ndarray:
    """``-inf``, the distinct reference values at the inner equal-mass quantiles, ``+inf``.

    A value holding more than one bin's share gets a bin of its own (``[v, v+ulp)``) unless the
    next edge already closes it with nothing of the reference in between.
    """
    qs = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    inner = np.unique(np.quantile(col, qs, method="inverted_cdf"))
    edges = [-np.inf]
    for i, edge in enumerate(inner):
        edges.append(edge)
        after = inner[i + 1] if i + 1 < len(inner) else np.inf
        heavy = np.count_nonzero(col == edge) * n_bins > len(col)
        if heavy and (after == np.inf or np.any((col > edge) & (col < after))):
            edges.append(np.nextafter(edge, np.inf))
    edges.append(np.inf)
    return np.array(edges)


def _histogram(edges: np.ndarray, col: np.ndarray) -> np.ndarray:
    """int64 counts of ``col`` in the bins ``[edges[i], edges[i+1])``; NaN goes to the last bin."""
    idx = np.searchsorted(edges, col, side="right") - 1
    return np.bincount(idx.clip(0, len(edges) - 2), minlength=len(edges) - 1).astype(np.int64)


def _feature(reference: ReferenceStats, name: str) -> FeatureReference:
    """The reference of one feature, or a KeyError that lists the known names."""
    try:
        return reference.features[name]
    except KeyError:
        raise KeyError(
            f"feature {name!r} is not in the reference; it has {sorted(reference.features)}"
        ) from None


def _encode_float(value: float) -> float | str:
    """JSON-safe float: infinities become ``"inf"`` / ``"-inf"``; NaN is refused."""
    if math.isnan(value):
        raise ValueError("NaN cannot be stored in a reference")
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _decode_float(value: float | str) -> float:
    """Inverse of :func:`_encode_float`; only the two infinity strings are accepted as text."""
    if isinstance(value, str) and value not in ("inf", "-inf"):
        raise ValueError(f"expected a number, 'inf' or '-inf', got {value!r}")
    return float(value)
