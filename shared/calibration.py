"""Confidence calibration of a model's probabilities: temperature scaling fitted at export on
held-out images, applied by the worker to estimate a window's accuracy without labels.

A model trained to low training loss is over-confident: its top-1 probability over-states how
often it is right. Temperature scaling (Guo et al., 2017) divides the logits by one number ``T``
fitted to minimise the negative log-likelihood of held-out labels; it keeps every answer's top-1
and makes the mean top-1 probability an estimate of accuracy (CBPE, as in NannyML). The model
outputs probabilities, so the logits are their logarithms (up to a constant per image, which
softmax ignores).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["Calibration", "calibrated_top1", "fit_temperature"]

#: The temperatures :func:`fit_temperature` searches between.
_T_MIN, _T_MAX = 0.05, 20.0
#: Smallest probability taken as a log (a softmax output can underflow to 0).
_P_MIN = 1e-12


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calibration:
    """How the bundle's probabilities are calibrated, as stored in the manifest.

    Attributes:
        temperature: The logits are divided by it (1 = unchanged; > 1 softens).
        n_images: Held-out images it was fitted on.
        nll_before: Their mean negative log-likelihood with the raw probabilities (None:
            not recorded).
        nll_after: The same after scaling.
        ece_before: Expected calibration error (10 equal-width confidence bins) before.
        ece_after: The same after scaling.
        held_out_confidence: Calibrated top-1 probability of every held-out image (validation
            and test splits), rounded to 1e-6: the drift detector resamples them to judge a
            window's estimated accuracy.
    """

    temperature: float
    n_images: int
    nll_before: float | None = None
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    held_out_confidence: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not all(0.0 <= c <= 1.0 for c in self.held_out_confidence):
            raise ValueError("calibration held_out_confidence values must be in [0, 1]")
        if not _T_MIN <= self.temperature <= _T_MAX:
            raise ValueError(
                f"calibration temperature must be in [{_T_MIN}, {_T_MAX}], got {self.temperature!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = dataclasses.asdict(self) | {"held_out_confidence": list(self.held_out_confidence)}
        return {"method": "temperature"} | data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Build from :meth:`to_dict`'s form; a bad value raises ``ValueError``."""
        if data.get("method", "temperature") != "temperature":
            raise ValueError(f"unknown calibration method {data.get('method')!r}")

        def figure(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(
            temperature=float(data["temperature"]),
            n_images=int(data["n_images"]),
            nll_before=figure("nll_before"),
            nll_after=figure("nll_after"),
            ece_before=figure("ece_before"),
            ece_after=figure("ece_after"),
            held_out_confidence=tuple(float(c) for c in data.get("held_out_confidence", [])),
        )


def _log_scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Log-softmax of ``log(probs) / temperature``, row by row."""
    logits = np.log(np.maximum(np.asarray(probs, np.float64), _P_MIN)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``log(probs) / temperature``, row by row."""
    return np.exp(_log_scaled(probs, temperature))


def calibrated_top1(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The calibrated top-1 probability of each row of an (N, K) probability batch.

    >>> calibrated_top1(np.array([[0.9, 0.1]]), 1.0).round(3).tolist()
    [0.9]
    >>> calibrated_top1(np.array([[0.9, 0.1]]), 2.0).round(3).tolist()
    [0.75]
    """
    if len(probs) == 0:
        return np.empty(0)
    return _scaled(probs, temperature).max(axis=1)


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.maximum(probs[np.arange(len(y)), y], _P_MIN)).mean())


def _ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: the share-weighted |accuracy - confidence| per confidence bin."""
    top1 = probs.max(axis=1)
    right = probs.argmax(axis=1) == y
    bins = np.minimum((top1 * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        sel = bins == b
        total += sel.mean() * abs(right[sel].mean() - top1[sel].mean())
    return float(total)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> Calibration:
    """Fit the temperature that minimises the held-out negative log-likelihood, raised if
    need be until the mean calibrated confidence is at most the accuracy by Laplace's rule of
    succession, ``(right + 1) / (N + 2)``: a validation split the model gets all right makes the
    likelihood rise for ever as ``T -> 0`` (every answer certain), and the mean confidence of
    the images it was fitted on should not claim more than they show.

    Args:
        probs: (N, K) probabilities of held-out images (not trained on).
        y: Their true class indices.

    Returns:
        The :class:`Calibration`, with the before/after figures.

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 2000)
    >>> right = rng.random(2000) < 0.8      # 80% right, but the model says 99%
    >>> top = np.where(right, y, 1 - y)
    >>> probs = np.where(np.arange(2) == top[:, None], 0.99, 0.01)
    >>> c = fit_temperature(probs, y)
    >>> c.temperature > 1, round(float(calibrated_top1(probs, c.temperature).mean()), 2)
    (True, 0.8)
    >>> never_wrong = np.where(np.arange(2) == y[:, None], 0.9, 0.1)
    >>> t = fit_temperature(never_wrong, y).temperature
    >>> 0.05 < t < 1, 0.99 < float(calibrated_top1(never_wrong, t).mean()) < 1
    (True, True)
    """
    from scipy.optimize import brentq, minimize_scalar

    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
        raise ValueError(
            f"fit_temperature needs (N, K) probabilities and N labels, got {probs.shape} and "
            f"{y.shape}"
        )
    fit = minimize_scalar(
        lambda t: _nll(_scaled(probs, t), y),
        bounds=(_T_MIN, _T_MAX),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(fit.x)
    laplace = (int((probs.argmax(axis=1) == y).sum()) + 1) / (len(y) + 2)

    def excess(temperature: float) -> float:
        return float(calibrated_top1(probs, temperature).mean()) - laplace

    if excess(t) > 0:  # the mean confidence falls as T rises
        t = _T_MAX if excess(_T_MAX) > 0 else float(brentq(excess, t, _T_MAX, xtol=1e-6))
    after = _scaled(probs, t)
    return Calibration(
        temperature=t,
        n_images=len(y),
        nll_before=_nll(probs, y),
        nll_after=_nll(after, y),
        ece_before=_ece(probs, y),
        ece_after=_ece(after, y),
    )
