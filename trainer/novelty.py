"""Fit the novelty model of a bundle (``shared/novelty.py``) to the training images' penultimate
features, set its threshold on the held-out images, and write its review gallery.

No TensorFlow: the trainer calls it with Keras' features, the benchmarks with onnxruntime's.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from imgq.shared.novelty import GalleryImage, NoveltyModel
from imgq.trainer.dataset import Dataset, Split, thumbnail_jpeg

__all__ = [
    "MAX_COMPONENTS",
    "MIN_ABOVE",
    "NOVELTY_QUANTILE",
    "SHRINKAGE",
    "bundle_novelty",
    "describe_novelty",
    "fit_novelty",
    "gallery_rows",
    "with_gallery",
    "with_threshold",
]

#: Share of held-out images at or below the threshold: 0.5% of in-distribution images are
#: novel. The 99th percentile also let mild, harmless shifts (noise, heavy JPEG) push more
#: images over it than new classes need to be seen (docs/drift.md).
NOVELTY_QUANTILE = 0.995
#: Fewest held-out images above the threshold: a reference share of 0 or 1 image is mostly
#: the luck of a small validation split.
MIN_ABOVE = 3
#: Weight of the classes' shared covariance in each class's own (a class of a few hundred
#: images estimates its own covariance of ~100 components poorly).
SHRINKAGE = 0.1
#: Most principal components kept: the worker's products and the manifest stay small for wide
#: features (MobileNetV2's 1,280). The sample model's 192 features keep 99.8% of their variance
#: in 64, and 64 components separate unseen classes as well as 128 did (docs/drift.md).
MAX_COMPONENTS = 64
#: Components whose variance is below this share of the largest are dropped (dead units).
_MIN_VARIANCE_SHARE = 1e-7
#: Training images per class in the review page's gallery, most in all, their largest side.
_GALLERY_PER_CLASS, _GALLERY_MAX, _GALLERY_PX = 8, 64, 96


def _components(features: np.ndarray, max_components: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the principal axes (``(D, r)``, largest variance first) worth keeping."""
    centre = features.mean(axis=0)
    centred = features - centre
    variance, axes = np.linalg.eigh(centred.T @ centred / max(1, len(features) - 1))
    order = np.argsort(variance)[::-1]
    variance, axes = variance[order], axes[:, order]
    keep = int(np.count_nonzero(variance > _MIN_VARIANCE_SHARE * max(variance[0], 1e-30)))
    return centre, axes[:, : max(1, min(keep, max_components))]


def _whitening(
    z: np.ndarray, y: np.ndarray, n_classes: int, shrinkage: float
) -> tuple[np.ndarray, np.ndarray]:
    """Class means ``(K, r)`` and each class's Cholesky factor of its shrunk precision matrix
    ``(K, r, r)``: ``||(z - m_k) @ L_k||**2`` is the squared Mahalanobis distance to class k."""
    r = z.shape[1]
    means = np.stack(
        [z[y == k].mean(axis=0) if np.any(y == k) else np.zeros(r) for k in range(n_classes)]
    )
    residual = z - means[y]
    shared = residual.T @ residual / max(1, len(z) - n_classes)
    # A ridge of a millionth of the mean variance keeps every matrix invertible.
    ridge = 1e-6 * max(float(np.trace(shared)) / r, 1e-12) * np.eye(r)
    factors = np.empty((n_classes, r, r))
    for k in range(n_classes):
        own = residual[y == k]
        covariance = shared
        if len(own) > 1:
            covariance = (1 - shrinkage) * (own.T @ own / (len(own) - 1)) + shrinkage * shared
        precision = np.linalg.inv(covariance + ridge)
        factors[k] = np.linalg.cholesky((precision + precision.T) / 2)
    return means, factors


def fit_novelty(
    train_features: np.ndarray,
    train_y: np.ndarray,
    held_out_features: np.ndarray,
    n_classes: int,
    *,
    output_name: str,
    quantile: float = NOVELTY_QUANTILE,
    shrinkage: float = SHRINKAGE,
    max_components: int = MAX_COMPONENTS,
) -> NoveltyModel:
    """The novelty model of a classifier, from its penultimate features.

    Per-class Gaussians are fitted to the training images; the threshold is the held-out
    images' ``quantile``: an order statistic of them, so exactly ``k = max(MIN_ABOVE,
    floor((1 - quantile) * n))`` of the ``n`` lie above it (the manifest's ``quantile`` is the
    share at or below it, ``1 - k / n``). ``(k, n)`` is the reference share the page tier tests a
    window's against with Fisher's exact test, which is exact for a threshold set this way.

    Args:
        train_features: ``(N, D)`` features of the training images.
        train_y: Their class indices.
        held_out_features: ``(M, D)`` features of images not trained on (validation and test).
        n_classes: ``K``.
        output_name: The ONNX output that holds the features.
        quantile: Share of held-out images at or below the threshold. Defaults to
            :data:`NOVELTY_QUANTILE`.
        shrinkage: Weight of the shared covariance in each class's. Defaults to
            :data:`SHRINKAGE`.
        max_components: Most principal components kept. Defaults to :data:`MAX_COMPONENTS`.

    Raises:
        ValueError: too few images, or features that are not finite.
    """
    f = np.asarray(train_features, np.float64)
    held = np.asarray(held_out_features, np.float64)
    y = np.asarray(train_y, np.int64)
    if f.ndim != 2 or len(f) < 2 or held.ndim != 2 or len(held) < 1 or held.shape[1] != f.shape[1]:
        raise ValueError(
            f"fit_novelty needs (N >= 2, D) training and (M >= 1, D) held-out features, got "
            f"{f.shape} and {held.shape}"
        )
    if len(y) != len(f) or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"fit_novelty needs one class index in 0..{n_classes - 1} per image")
    if not (np.isfinite(f).all() and np.isfinite(held).all()):
        raise ValueError("fit_novelty got NaN or infinite features")
    centre, axes = _components(f, max_components)
    means, factors = _whitening((f - centre) @ axes, y, n_classes, shrinkage)
    unscaled = NoveltyModel(
        output_name=output_name,
        centre=centre.astype(np.float32),
        projection=axes.astype(np.float32),
        means=means.astype(np.float32),
        whitening=factors.astype(np.float32),
        threshold=1.0,
        quantile=quantile,
        held_out_novel=(0, 1),
        shrinkage=shrinkage,
    )
    return with_threshold(unscaled, held, quantile)


def with_threshold(
    model: NoveltyModel, held_out_features: np.ndarray, quantile: float = NOVELTY_QUANTILE
) -> NoveltyModel:
    """``model`` with its threshold set on these held-out images (see :func:`fit_novelty`).

    >>> m = fit_novelty(np.eye(3)[[0, 1, 2] * 4] + 0.1 * np.arange(12)[:, None],
    ...                 np.array([0, 1, 2] * 4), np.eye(3), 3, output_name="f")
    >>> with_threshold(m, np.random.default_rng(0).normal(size=(400, 3))).held_out_novel
    (3, 400)
    """
    squared = np.sort(model.score(held_out_features)[0] ** 2 * model.threshold)
    if not np.isfinite(squared).all():
        raise ValueError("with_threshold got NaN or infinite held-out features")
    above = max(MIN_ABOVE, int(np.floor((1 - quantile) * len(squared) + 1e-9)))
    above = min(above, len(squared) - 1)
    threshold = float(squared[len(squared) - 1 - above])
    if not threshold > 0:  # every held-out image on a class mean: nothing to scale by
        threshold = float(np.finfo(np.float32).tiny)
    above = int(np.count_nonzero(squared > threshold))
    return dataclasses.replace(
        model,
        threshold=threshold,
        quantile=1.0 - above / len(squared) if above else quantile,
        held_out_novel=(above, len(squared)),
    )


def gallery_rows(y: np.ndarray) -> list[int]:
    """Up to eight rows per class, classes in turn, at most 64: the training images the review
    page may show beside a novel input.

    >>> gallery_rows(np.array([0, 0, 1, 1, 1]))
    [0, 2, 1, 3, 4]
    """
    queues = [list(np.flatnonzero(y == k)[:_GALLERY_PER_CLASS]) for k in np.unique(y)]
    rows: list[int] = []
    while any(queues) and len(rows) < _GALLERY_MAX:
        for q in queues:
            if q and len(rows) < _GALLERY_MAX:
                rows.append(int(q.pop(0)))
    return rows


def with_gallery(
    model: NoveltyModel, gallery: list[GalleryImage], features: np.ndarray
) -> NoveltyModel:
    """``model`` with its review gallery: the images and their features (``(G, D)``)."""
    points = model.project(features) if len(gallery) else np.zeros((0, 0), np.float32)
    return dataclasses.replace(
        model, gallery=tuple(gallery), gallery_points=points.astype(np.float32)
    )


def bundle_novelty(
    data: Dataset, split: Split, features: dict[str, np.ndarray], out: Path, *, output_name: str
) -> NoveltyModel:
    """A bundle's novelty model: fitted on the training split's features, its threshold from
    the held-out images (validation and test), and its gallery, training thumbnails written to
    ``out/novelty/``.

    Args:
        data: The data set.
        split: Its split.
        features: Penultimate features by split: ``"train"``, ``"val"``, ``"test"``.
        out: The bundle folder.
        output_name: The ONNX output that holds the features.
    """
    held_out = np.concatenate([features["val"], features["test"]])
    model = fit_novelty(
        features["train"], data.y[split.train], held_out, len(data.class_names),
        output_name=output_name,
    )  # fmt: skip
    folder = out / "novelty"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    gallery: list[GalleryImage] = []
    kept: list[int] = []
    for i in gallery_rows(data.y[split.train]):
        row = split.train[i]
        label = data.class_names[int(data.y[row])]
        jpeg = thumbnail_jpeg(data.files[row], _GALLERY_PX)
        if jpeg is None:
            continue
        name = f"novelty/{len(gallery):02d}_{label}.jpg"
        (out / name).write_bytes(jpeg)
        gallery.append(GalleryImage(file=name, label=label))
        kept.append(i)
    return with_gallery(model, gallery, features["train"][kept])


def describe_novelty(novelty: NoveltyModel | None) -> str:
    """What a bundle's novelty model is made of, one line for `imgq train`'s summary."""
    if novelty is None:
        return "novelty: none (the model has no dense layer)\n"
    k, n = novelty.held_out_novel
    d, r = novelty.projection.shape
    return (
        f"novelty: per-class Gaussians on {r} of {d} feature components; threshold at the "
        f"{novelty.quantile:.1%} point of {n} held-out images ({k} above it)\n"
    )
