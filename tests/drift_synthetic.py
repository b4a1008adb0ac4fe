"""Synthetic drift traffic for the drift tests: feature rows and probabilities drawn from known
distributions, a reference built from them with ``shared/``, and a manifest that carries it
(with a calibration whose held-out confidences come from the same distribution)."""

from __future__ import annotations

import dataclasses

import numpy as np

from imgq.shared.calibration import Calibration, calibrated_top1
from imgq.shared.imagestats import IMAGE_FEATURES, PIXEL_FEATURES, output_features
from imgq.shared.manifest import Manifest
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import RangeCheck, ReferenceStats, bin_counts, build_reference
from imgq.worker.drift import ALL_FEATURES, Window

LABELS = ("circle", "square", "triangle", "star")
BRIGHTNESS = IMAGE_FEATURES.index("brightness")
#: Dirichlet concentration of an in-distribution answer: a confident model (top-1 ~0.9).
CONFIDENT = np.array([30.0, 1, 1, 1])


def traffic(
    rng: np.random.Generator,
    n: int,
    *,
    brightness: float = 0.0,
    one_class: bool = False,
    unsure: float = 0.0,
    foreign: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic images: image features (every one ~ N(0.5, 0.1), brightness shifted by
    ``brightness``) and the model's probabilities, confident, for a random class (class 0 when
    ``one_class``). A share ``unsure`` of the answers is unsure (flat probabilities: the
    model hurt on part of the traffic), a share ``foreign`` of the images has its brightness
    far outside the training range."""
    features = rng.normal(0.5, 0.1, (n, len(IMAGE_FEATURES)))
    features[:, BRIGHTNESS] += brightness
    features[: round(n * foreign), BRIGHTNESS] = 5.0
    if one_class:
        probs = rng.dirichlet(np.array([8.0, 1, 1, 1]), n)
    else:  # confident, for a class at random
        probs = rng.dirichlet(CONFIDENT, n)
        probs = np.take_along_axis(probs, rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1), 1)
    n_unsure = round(n * unsure)
    probs[n - n_unsure :] = rng.dirichlet(np.ones(len(LABELS)), n_unsure)
    return features, probs


def all_features(features: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The :data:`~worker.drift.ALL_FEATURES` matrix of a batch."""
    return np.hstack([features, output_features(probs)])


def make_reference(rng: np.random.Generator, n: int = 2000) -> ReferenceStats:
    """Reference histograms of ``n`` in-distribution synthetic images, and the out-of-range
    count of ``n`` more (held out)."""
    values = all_features(*traffic(rng, n))
    reference = build_reference(values, ALL_FEATURES, categorical={"predicted_class": 4})
    held_out = traffic(rng, n)[0][:, : len(PIXEL_FEATURES)]
    outside = RangeCheck(reference, PIXEL_FEATURES).count(held_out)
    return dataclasses.replace(reference, held_out_out_of_range=(outside, n))


def make_calibration(rng: np.random.Generator, n: int = 1000) -> Calibration:
    """Temperature 1 and the top-1 probabilities of ``n`` held-out in-distribution answers."""
    confidence = calibrated_top1(traffic(rng, n)[1], 1.0)
    return Calibration(
        temperature=1.0, n_images=n, held_out_confidence=tuple(confidence.round(6).tolist())
    )


def make_manifest(reference: ReferenceStats, calibration: Calibration | None = None) -> Manifest:
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
        calibration=calibration,
    )


def window_of(
    reference: ReferenceStats,
    features: np.ndarray,
    probs: np.ndarray,
    calibration: Calibration | None = None,
    window_id: int = 1,
) -> Window:
    """A window as the workers would have summed it in Redis."""
    values = all_features(features, probs)
    counts = bin_counts(reference, values, ALL_FEATURES)
    sums = dict(zip(ALL_FEATURES, values.sum(axis=0).tolist(), strict=True))
    outside = RangeCheck(reference, PIXEL_FEATURES).count(features[:, : len(PIXEL_FEATURES)])
    calibrated = 0.0
    if calibration is not None:
        calibrated = float(calibrated_top1(probs, calibration.temperature).sum())
    return Window(window_id, len(values), 0.0, 1.0, counts, sums, outside, calibrated)
