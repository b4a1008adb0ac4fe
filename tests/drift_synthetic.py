"""Synthetic drift traffic for the drift tests: feature rows and probabilities drawn from known
distributions, a reference built from them with ``shared/``, and a manifest that carries it."""

from __future__ import annotations

import numpy as np

from imgq.shared.imagestats import IMAGE_FEATURES, output_features
from imgq.shared.manifest import Manifest
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import ReferenceStats, build_reference
from imgq.worker.drift import ALL_FEATURES

LABELS = ("circle", "square", "triangle", "star")
BRIGHTNESS = IMAGE_FEATURES.index("brightness")


def traffic(
    rng: np.random.Generator, n: int, *, brightness: float = 0.0, one_class: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images: image features (every one ~ N(0.5, 0.1), brightness shifted by
    ``brightness``) and the model's probabilities (favouring class 0 when ``one_class``)."""
    features = rng.normal(0.5, 0.1, (n, len(IMAGE_FEATURES)))
    features[:, BRIGHTNESS] += brightness
    alpha = np.array([8.0, 1, 1, 1]) if one_class else np.ones(len(LABELS))
    return features, rng.dirichlet(alpha, n)


def all_features(features: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The :data:`~worker.drift.ALL_FEATURES` matrix of a batch."""
    return np.hstack([features, output_features(probs)])


def make_reference(rng: np.random.Generator, n: int = 2000) -> ReferenceStats:
    """Reference histograms of ``n`` in-distribution synthetic images."""
    values = all_features(*traffic(rng, n))
    return build_reference(values, ALL_FEATURES, categorical={"predicted_class": len(LABELS)})


def make_manifest(reference: ReferenceStats) -> Manifest:
    """A valid manifest of model ``shapes`` that carries ``reference`` (no model file)."""
    return Manifest(
        name="shapes",
        model_file="model.onnx",
        model_sha256="ab" * 32,
        input_name="input",
        output_name="probs",
        input_shape=(None, 32, 32, 3),
        labels=LABELS,
        preprocess=PreprocessSpec(height=32, width=32),
        reference=reference,
    )
