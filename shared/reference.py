"""The reference statistics of a model's training images: fixed-bin histograms per feature, and
the checks made against them (bin counts of new images, which features are out of range).

The trainer computes :func:`build_reference` of the training images' features
(:mod:`imgq.shared.imagestats`) and stores it in the manifest; workers count their images on the
same bins. Counts on fixed bins merge by addition, so the counts of any number of workers sum to
the counts of their combined traffic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from imgq.shared.imagestats import IMAGE_FEATURES_VERSION

__all__ = [
    "FeatureReference",
    "RangeCheck",
    "ReferenceStats",
    "bin_counts",
    "build_reference",
    "leave_one_out_outside",
    "out_of_range",
    "out_of_range_rows",
]


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

    ``held_out_out_of_range`` is ``(k, n)``: of ``n`` held-out images (not the ones the range
    was taken from), ``k`` had some image feature out of range; the drift detector compares a
    window's share with it. None in references older than it (the share is then not tested).
    """

    features: dict[str, FeatureReference]
    n_images: int
    image_features_version: int = IMAGE_FEATURES_VERSION
    held_out_out_of_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.held_out_out_of_range is not None:
            k, n = self.held_out_out_of_range
            if not 0 <= k <= n or n < 1:
                raise ValueError(
                    f"held_out_out_of_range must be (k, n) with 0 <= k <= n and n >= 1, got "
                    f"{self.held_out_out_of_range}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest's ``reference`` section."""
        data: dict[str, Any] = {
            "n_images": self.n_images,
            "image_features_version": self.image_features_version,
            "features": {name: f.to_dict() for name, f in self.features.items()},
        }
        if self.held_out_out_of_range is not None:
            data["held_out_out_of_range"] = list(self.held_out_out_of_range)
        return data

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
        held_out = data.get("held_out_out_of_range")
        return cls(
            features=features,
            n_images=int(data["n_images"]),
            image_features_version=version,
            held_out_out_of_range=None
            if held_out is None
            else (int(held_out[0]), int(held_out[1])),
        )


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
    reference minimum and maximum widened by 10% of their span each way, so that few
    in-distribution images have a feature out of range (the rate by reference size is in
    ``docs/drift.md``).

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
    order), in one comparison: the worker checks a whole batch at once (with a
    :class:`RangeCheck` it keeps).

    >>> ref = build_reference(np.arange(100.0)[:, None], ["x"])
    >>> out_of_range_rows(ref, np.array([[50.0], [np.nan], [500.0]]), ["x"])
    [[], ['x'], ['x']]
    """
    return RangeCheck(reference, names)(values)


def leave_one_out_outside(values: np.ndarray) -> int:
    """How many rows of an (N, F) feature matrix would be out of range of a reference built
    from the *other* rows (their min and max widened by 10% of the span, as
    :func:`build_reference` does): a held-out estimate of the out-of-range rate from the
    training images themselves. Only a row holding a feature's minimum or maximum can be out,
    so it costs one pass. A range from N - 1 rows is a little narrower than from N, so the
    estimate errs high (towards fewer false alarms).

    >>> leave_one_out_outside(np.r_[np.arange(100.0), 1000.0][:, None])  # only the 1000
    1
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if n < 3:
        return 0
    order = np.argsort(values, axis=0, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=0)
    outside = np.zeros(n, bool)
    for end, inner, other_end in ((0, 1, -1), (-1, -2, 0)):
        rows = order[end]  # the row holding each feature's minimum (maximum)
        x = sorted_values[end]
        lo = np.minimum(sorted_values[inner], sorted_values[other_end])
        hi = np.maximum(sorted_values[inner], sorted_values[other_end])
        span = hi - lo
        out = (x < lo - 0.1 * span) | (x > hi + 0.1 * span)
        outside[rows[out]] = True
    return int(outside.sum())


class RangeCheck:
    """:func:`out_of_range_rows` for one reference and feature order, its bounds gathered once:
    the worker checks every batch."""

    def __init__(self, reference: ReferenceStats, names: Sequence[str]) -> None:
        features = [_feature(reference, name) for name in names]
        self.names = list(names)
        self._low = np.array([f.low for f in features], np.float64)
        self._high = np.array([f.high for f in features], np.float64)
        self._checked = np.array([not f.categorical for f in features])

    def outside(self, values: np.ndarray) -> np.ndarray:
        """(N, F) booleans: which feature of which row is out of range."""
        values = np.asarray(values, np.float64)
        if values.ndim != 2 or values.shape[1] != len(self.names):
            raise ValueError(
                f"out_of_range got values of shape {values.shape} for {len(self.names)} names"
            )
        outside = ~((values >= self._low) & (values <= self._high))
        outside &= self._checked
        return outside

    def count(self, values: np.ndarray) -> int:
        """How many rows have some feature out of range (a window's out-of-range count).

        >>> check = RangeCheck(build_reference(np.arange(100.0)[:, None], ["x"]), ["x"])
        >>> check.count(np.array([[50.0], [np.nan], [500.0]]))
        2
        """
        return int(self.outside(values).any(axis=1).sum())

    def __call__(self, values: np.ndarray) -> list[list[str]]:
        return self.names_of(self.outside(values))

    def names_of(self, outside: np.ndarray) -> list[list[str]]:
        """Per row of an :meth:`outside` matrix, the names of its features out of range, in
        one pass over the cells that are (a shift can put every image of a batch out of
        range)."""
        names = self.names
        found: list[list[str]] = [[] for _ in range(len(outside))]
        rows, columns = np.nonzero(outside)
        for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
            found[row].append(names[column])
        return found


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
