"""Novelty: how far an image lies from every class in the model's own penultimate features.

Pixel statistics cannot tell a harmless change (noise, a darker room) from a new kind of object,
and the model answers both confidently. Its penultimate features can: the trainer fits one
Gaussian per class to the training images' features (per-class means and covariances, each
covariance shrunk a tenth towards the classes' shared one, in the top principal components),
and an image's novelty is its smallest Mahalanobis distance to a class, over the threshold the
held-out images set (their 99th percentile). ``docs/drift.md`` says why this score (measured
against kNN, energy and the shared-covariance Mahalanobis distance), where its threshold comes
from, and what it does not see.

The worker asks onnxruntime for the features beside the probabilities (one forward pass) and
scores a whole batch with two products (onto the principal axes, then every class's whitening at
once); the stored arrays travel in the manifest as base64 of little-endian float32, checked on
load like any hostile input.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from typing import Any

import numpy as np

__all__ = [
    "NOVELTY_METHOD",
    "GalleryImage",
    "NoveltyModel",
    "decode_array",
    "encode_array",
]

#: The score :class:`NoveltyModel` computes (the manifest's ``novelty.method``).
NOVELTY_METHOD = "class_gaussian"
#: Most float32 values one stored array may hold (16 MiB): a hostile manifest cannot make a
#: worker allocate more.
_MAX_ARRAY_VALUES = 1 << 22
#: The manifest's numbers of a novelty model, with their defaults (None: required).
_NUMBERS: dict[str, float | None] = {"threshold": None, "quantile": None, "shrinkage": 0.1}
#: Rows per matrix product: OpenBLAS runs a product of a few rows on the calling thread, a
#: larger one on a thread per core (unless the process limits them), whose spinning cost a
#: batch of 32 MobileNetV2 features ~40 times the CPU of the product (docs/drift.md).
_ROWS_PER_PRODUCT = 8


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b``, :data:`_ROWS_PER_PRODUCT` rows of ``a`` at a time."""
    if len(a) <= _ROWS_PER_PRODUCT:
        return a @ b
    out = np.empty((len(a), b.shape[1]), np.result_type(a, b))
    for i in range(0, len(a), _ROWS_PER_PRODUCT):
        np.matmul(a[i : i + _ROWS_PER_PRODUCT], b, out=out[i : i + _ROWS_PER_PRODUCT])
    return out


def encode_array(values: np.ndarray) -> dict[str, Any]:
    """A float array as JSON: its shape and the base64 of its little-endian float32 bytes.

    >>> encode_array(np.array([[1.0, 2.0]]))
    {'shape': [1, 2], 'float32_b64': 'AACAPwAAAEA='}
    """
    a = np.ascontiguousarray(values, dtype="<f4")
    return {"shape": list(a.shape), "float32_b64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(data: Any, name: str, ndim: int) -> np.ndarray:
    """The float32 array :func:`encode_array` wrote, checked: ``ndim`` dimensions, a byte length
    that matches the shape, at most :data:`_MAX_ARRAY_VALUES` values, all finite.

    Raises:
        ValueError: any of those fails; the message names ``name``.

    >>> decode_array(encode_array(np.eye(2)), "x", 2).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if not isinstance(data, dict) or not isinstance(data.get("float32_b64"), str):
        raise ValueError(f"novelty {name} must be {{'shape': [...], 'float32_b64': '...'}}")
    shape = data.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != ndim
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ValueError(f"novelty {name} needs a shape of {ndim} integers >= 0, got {shape!r}")
    size = math.prod(shape)
    if size > _MAX_ARRAY_VALUES or len(data["float32_b64"]) > 4 * (4 * size + 2) // 3 + 4:
        raise ValueError(f"novelty {name} of shape {shape} is larger than imgq reads")
    try:
        raw = base64.b64decode(data["float32_b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"novelty {name} is not valid base64: {exc}") from exc
    if len(raw) != 4 * size:
        raise ValueError(f"novelty {name} has {len(raw)} bytes for shape {shape}")
    array = np.frombuffer(raw, "<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"novelty {name} holds NaN or infinite values")
    return array


@dataclasses.dataclass(frozen=True)
class GalleryImage:
    """A training image the review page shows beside a novel input that lies near it.

    Attributes:
        file: Its thumbnail, relative to the bundle (``novelty/00_circle.jpg``).
        label: Its class.
    """

    file: str
    label: str


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class NoveltyModel:
    """What scoring an image's novelty needs, as the manifest stores it (``novelty``).

    The features ``f`` (the ONNX output :attr:`output_name`) are projected on the training
    features' principal axes, ``z = (f - centre) @ projection``; class ``k``'s squared
    Mahalanobis distance is ``||(z - means[k]) @ whitening[k]||**2`` (``whitening[k]`` is the
    Cholesky factor of the class's shrunk precision matrix); the novelty is the square root of
    the smallest one over :attr:`threshold`, so above 1 is novel.

    Attributes:
        output_name: The ONNX output holding the penultimate features.
        centre: ``(D,)`` mean training feature.
        projection: ``(D, r)`` principal axes kept.
        means: ``(K, r)`` class means, projected.
        whitening: ``(K, r, r)``, as above.
        threshold: Squared distance above which an image is novel: the held-out images'
            :attr:`quantile`.
        quantile: The share of held-out images at or below the threshold (0.99).
        held_out_novel: ``(k, n)``: of the ``n`` held-out images that set the threshold, ``k``
            lie above it (the page tier's reference share).
        shrinkage: Weight of the shared covariance in each class's.
        gallery: Training images the review page shows beside novel inputs.
        gallery_points: ``(G, r)`` their projected features (nearest first on the page).
    """

    output_name: str
    centre: np.ndarray
    projection: np.ndarray
    means: np.ndarray
    whitening: np.ndarray
    threshold: float
    quantile: float
    held_out_novel: tuple[int, int]
    shrinkage: float = 0.1
    gallery: tuple[GalleryImage, ...] = ()
    gallery_points: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 0), np.float32)
    )
    _stacked: np.ndarray = dataclasses.field(init=False, repr=False)
    _offsets: np.ndarray = dataclasses.field(init=False, repr=False)
    _shift: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        d, r = self.projection.shape if self.projection.ndim == 2 else (0, 0)
        k = self.means.shape[0] if self.means.ndim == 2 else 0
        problems = []
        if self.centre.shape != (d,) or d < 1 or r < 1:
            problems.append(
                f"centre {self.centre.shape} and projection {self.projection.shape} do not fit"
            )
        if self.means.shape != (k, r) or k < 1:
            problems.append(f"means {self.means.shape} do not fit axes {self.projection.shape}")
        if self.whitening.shape != (k, r, r):
            problems.append(f"whitening {self.whitening.shape} does not fit {self.means.shape}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            problems.append(f"threshold must be a positive number, got {self.threshold!r}")
        if not 0.0 < self.quantile < 1.0:
            problems.append(f"quantile must be in (0, 1), got {self.quantile!r}")
        k_ref, n_ref = self.held_out_novel
        if not 0 <= k_ref <= n_ref or n_ref < 1:
            problems.append(f"held_out_novel must be (k, n), 0 <= k <= n: {self.held_out_novel}")
        points, g = self.gallery_points.shape, len(self.gallery)
        if points[0] != g or (g and points != (g, r)):
            problems.append(
                f"gallery_points {self.gallery_points.shape} do not fit {len(self.gallery)} "
                f"images of {r} components"
            )
        if problems:
            raise ValueError("invalid novelty model: " + "; ".join(problems))
        # One product for every class: z @ [W_1 | ... | W_K] - [m_1 W_1 | ... | m_K W_K].
        stacked = np.ascontiguousarray(self.whitening.transpose(1, 0, 2).reshape(r, k * r))
        offsets = np.einsum("kr,krs->ks", self.means, self.whitening).reshape(-1)
        object.__setattr__(self, "_stacked", stacked.astype(np.float32))
        object.__setattr__(self, "_offsets", offsets.astype(np.float32))
        # (f - centre) @ P as f @ P - centre @ P: no (N, D) temporary per batch.
        object.__setattr__(self, "_shift", (self.centre @ self.projection).astype(np.float32))

    @property
    def n_features(self) -> int:
        """``D``, the width of the features output."""
        return int(self.centre.shape[0])

    def project(self, features: np.ndarray) -> np.ndarray:
        """``(N, r)``: the features on the principal axes."""
        f = np.asarray(features, np.float32)
        if f.ndim != 2 or f.shape[1] != self.n_features:
            raise ValueError(f"novelty needs (N, {self.n_features}) features, got shape {f.shape}")
        return _product(f, self.projection) - self._shift

    def score(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each image's novelty (above 1: novel) and its projected features.

        Args:
            features: ``(N, D)`` penultimate features of a batch.

        Returns:
            ``(novelty, z)``: ``(N,)`` float64 and ``(N, r)`` float32. NaN features give NaN.
        """
        z = self.project(features)
        n, (k, r) = len(z), self.means.shape
        w = _product(z, self._stacked)
        w -= self._offsets
        squared = np.einsum("nkr,nkr->nk", w.reshape(n, k, r), w.reshape(n, k, r))
        nearest = squared.min(axis=1) if n else np.empty(0, np.float32)
        return np.sqrt(nearest.astype(np.float64) / self.threshold), z

    def nearest_gallery(self, z: np.ndarray, count: int = 4) -> list[int]:
        """Positions in :attr:`gallery` of the ``count`` images nearest to one projected
        feature vector ``z`` (Euclidean on the principal axes), nearest first."""
        if not len(self.gallery):
            return []
        distance = ((self.gallery_points - np.asarray(z, np.float32)) ** 2).sum(axis=1)
        return [int(i) for i in np.argsort(distance, kind="stable")[:count]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest's ``novelty`` section."""
        return {
            "method": NOVELTY_METHOD,
            "output_name": self.output_name,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "held_out_novel": list(self.held_out_novel),
            "shrinkage": self.shrinkage,
            "centre": encode_array(self.centre),
            "projection": encode_array(self.projection),
            "means": encode_array(self.means),
            "whitening": encode_array(self.whitening),
            "gallery": [dataclasses.asdict(g) for g in self.gallery],
            "gallery_points": encode_array(self.gallery_points),
        }

    @classmethod
    def from_dict(cls, data: Any) -> NoveltyModel:
        """Build from :meth:`to_dict`'s form; anything malformed raises ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"novelty must be a JSON object, got {type(data).__name__}")
        if data.get("method") != NOVELTY_METHOD:
            raise ValueError(
                f"unknown novelty method {data.get('method')!r}; this imgq scores "
                f"{NOVELTY_METHOD!r}"
            )
        held_out = data["held_out_novel"]
        if not (
            isinstance(held_out, list)
            and len(held_out) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in held_out)
        ):
            raise ValueError(f"novelty held_out_novel must be [k, n], got {held_out!r:.60}")
        numbers: dict[str, float] = {}
        for key, default in _NUMBERS.items():
            value = data.get(key, default)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"novelty {key} must be a number, got {value!r:.60}")
            numbers[key] = float(value)
        if not 0.0 <= numbers["shrinkage"] <= 1.0:
            raise ValueError(f"novelty shrinkage must be in [0, 1], got {numbers['shrinkage']!r}")
        gallery = data.get("gallery", [])
        if not isinstance(gallery, list) or not all(
            isinstance(g, dict) and all(isinstance(g.get(key), str) for key in ("file", "label"))
            for g in gallery
        ):
            raise ValueError("novelty gallery must be a list of {'file': str, 'label': str}")
        return cls(
            output_name=str(data["output_name"]),
            centre=decode_array(data["centre"], "centre", 1),
            projection=decode_array(data["projection"], "projection", 2),
            means=decode_array(data["means"], "means", 2),
            whitening=decode_array(data["whitening"], "whitening", 3),
            threshold=numbers["threshold"],
            quantile=numbers["quantile"],
            held_out_novel=(held_out[0], held_out[1]),
            shrinkage=numbers["shrinkage"],
            gallery=tuple(GalleryImage(file=g["file"], label=g["label"]) for g in gallery),
            gallery_points=decode_array(data["gallery_points"], "gallery_points", 2),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoveltyModel) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]
