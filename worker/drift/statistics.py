"""Drift statistics on count arrays, pure numpy/scipy: PSI, the chi-square test of homogeneity,
Holm's correction, and the verdict on a set of binned features (the notice tier's test, also
the page tier's class-mix test). Unit tested without Redis; why these statistics is written up
in ``docs/drift.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import chdtrc

from imgq.shared.reference import ReferenceStats
from imgq.worker.drift.layout import Window

__all__ = [
    "FeatureResult",
    "chi2_homogeneity",
    "chi2_results",
    "holm",
    "psi",
]


def psi(
    ref_counts: Sequence[int] | np.ndarray,
    cur_counts: Sequence[int] | np.ndarray,
    *,
    smoothing: float = 0.5,
) -> float:
    """Population stability index between two histograms on the same bins.

    ``sum((q - p) * ln(q / p))`` over bins, with ``p`` the reference and ``q`` the current
    shares. It is an effect size: it does not grow with the number of images, unlike a test
    statistic. ``smoothing`` pseudo-counts are added to every bin of both histograms so that an
    empty bin gives a large but finite value instead of infinity.

    Args:
        ref_counts: Reference count per bin.
        cur_counts: Current count per bin, same length.
        smoothing: Pseudo-count added to each bin. Defaults to 0.5.

    Returns:
        The PSI, >= 0; 0.1 is the usual "moderate shift" mark, 0.25 "major".

    >>> psi([50, 50], [50, 50])
    0.0
    >>> round(psi([500, 500], [900, 100]), 3)
    0.876
    """
    p = np.asarray(ref_counts, dtype=np.float64)
    q = np.asarray(cur_counts, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in bins: {p.shape[0]} reference vs {q.shape[0]}")
    return float(_psi_rows(p[None], q[None], np.ones((1, p.size), bool), smoothing)[0])


def _psi_rows(ref: np.ndarray, cur: np.ndarray, real: np.ndarray, smoothing: float) -> np.ndarray:
    """:func:`psi` of every row pair of two (F, B) count matrices whose rows are padded with
    zeros: ``real`` marks the bins that exist (only they get the pseudo-count)."""
    p = np.where(real, ref + smoothing, 0.0)
    q = np.where(real, cur + smoothing, 0.0)
    p /= p.sum(axis=1, keepdims=True)
    q /= q.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(real, (q - p) * np.log(q / p), 0.0)
    return terms.sum(axis=1)


def chi2_homogeneity(
    ref_counts: Sequence[int] | np.ndarray, cur_counts: Sequence[int] | np.ndarray
) -> tuple[float, int, float]:
    """Chi-square test that two histograms on the same bins come from one distribution.

    A test of *homogeneity* (a 2 x bins contingency table), not of goodness of fit: the
    reference is itself a finite sample, and treating its shares as exact would raise false
    alarms when the training set is small. Bins empty in both histograms are dropped.

    Returns:
        ``(statistic, degrees_of_freedom, p_value)``; ``(0.0, 0, 1.0)`` when fewer than two bins
        are occupied or either histogram is empty (nothing to compare).

    >>> stat, dof, p = chi2_homogeneity([100, 100, 100], [100, 100, 100])
    >>> stat, dof, p
    (0.0, 2, 1.0)
    >>> chi2_homogeneity([100, 100, 100], [300, 0, 0])[2] < 1e-50
    True
    """
    table = np.array([ref_counts, cur_counts], dtype=np.float64)
    statistic, dof, p_value = _chi2_rows(table[:1], table[1:])
    return float(statistic[0]), int(dof[0]), float(p_value[0])


def _chi2_rows(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`chi2_homogeneity` of every row pair of two (F, B) count matrices, in one pass: a
    window's features are judged together. Rows may be padded with zeros (bins empty in both
    are dropped anyway)."""
    column = ref + cur
    occupied = column > 0
    n_ref = ref.sum(axis=1, keepdims=True)
    n_cur = cur.sum(axis=1, keepdims=True)
    dof = occupied.sum(axis=1) - 1
    valid = (dof >= 1) & (n_ref[:, 0] > 0) & (n_cur[:, 0] > 0)
    # The same as scipy.stats.chi2_contingency(table, correction=False) per row, far faster.
    with np.errstate(divide="ignore", invalid="ignore"):
        e_ref = n_ref * column / (n_ref + n_cur)
        e_cur = n_cur * column / (n_ref + n_cur)
        terms = (ref - e_ref) ** 2 / e_ref + (cur - e_cur) ** 2 / e_cur
    statistic = np.where(valid, np.where(occupied, terms, 0.0).sum(axis=1), 0.0)
    dof = np.where(valid, dof, 0)
    # chdtrc is the chi-square survival function.
    p_value = np.where(valid, chdtrc(np.maximum(dof, 1), statistic), 1.0)
    return statistic, dof, p_value


def holm(p_values: Sequence[float] | np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down correction: which of ``m`` tests are significant at family-wise ``alpha``.

    The smallest p-value is compared with ``alpha / m``, the next with ``alpha / (m - 1)``, and
    so on until the first one that fails; it and all larger ones are not significant. The
    chance of *any* false alarm among the ``m`` features stays below ``alpha`` whatever their
    correlation (brightness and the channel means move together), and it rejects at least what
    Bonferroni rejects.

    Returns:
        ``(thresholds, significant)``: the level each p-value was compared with, and a boolean
        array, both in the input order.

    >>> t, s = holm([0.001, 0.02, 0.2], alpha=0.05)
    >>> t.round(4).tolist(), s.tolist()
    ([0.0167, 0.025, 0.05], [True, True, False])
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    thresholds = np.empty(m)
    thresholds[order] = alpha / (m - np.arange(m))
    passed = p[order] <= thresholds[order]
    n_significant = m if passed.all() else int(np.argmin(passed))
    significant = np.zeros(m, dtype=bool)
    significant[order[:n_significant]] = True
    return thresholds, significant


@dataclasses.dataclass(frozen=True)
class FeatureResult:
    """The verdict on one feature of one window.

    Attributes:
        name: Feature name.
        n: Values counted for this feature in the window.
        statistic: Chi-square statistic of homogeneity with the reference.
        dof: Its degrees of freedom.
        p_value: Its p-value.
        p_threshold: The Holm level this p-value was compared with.
        significant: True when significant after Holm's correction.
        psi: Population stability index (effect size).
        psi_floor: The PSI an alert needs.
        reference: Reference summary value (mean; for a categorical feature the share of the
            class whose share changed most).
        current: The same summary in the window (None when it cannot be computed).
        summary: Human-readable, e.g. ``"mean 0.46 -> 0.23"``.
        tier: ``"page"`` (output side: the model is likely hurt) or ``"notice"`` (an image
            feature: the input pipeline changed).
        test: ``"chi2"``, ``"rank"``, ``"fisher"`` or ``"resampling"``.
        alternative: ``"two-sided"``, ``"lower"`` or ``"higher"`` (the direction of harm).
        effect: The effect size the floor applies to (PSI for chi-square tests).
        effect_floor: The smallest effect that may alert (``psi_floor`` for chi-square tests).
    """

    name: str
    n: int
    statistic: float
    dof: int
    p_value: float
    p_threshold: float
    significant: bool
    psi: float
    psi_floor: float
    reference: float
    current: float | None
    summary: str
    tier: str = "notice"
    test: str = "chi2"
    alternative: str = "two-sided"
    effect: float | None = None
    effect_floor: float | None = None

    @property
    def drifting(self) -> bool:
        """Significant AND at least the effect floor (PSI for chi-square tests): the condition
        for an alert."""
        effect = self.psi if self.effect is None else self.effect
        floor = self.psi_floor if self.effect_floor is None else self.effect_floor
        return self.significant and effect >= floor

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for alerts, logs and ``imgq drift status``."""
        # Spelled out: dataclasses.asdict deep-copies every field and was a fifth of a window's
        # evaluation.
        return {
            "name": self.name,
            "n": self.n,
            "statistic": self.statistic,
            "dof": self.dof,
            "p_value": self.p_value,
            "p_threshold": self.p_threshold,
            "significant": self.significant,
            "psi": self.psi,
            "psi_floor": self.psi_floor,
            "reference": self.reference,
            "current": self.current,
            "summary": self.summary,
            "drifting": self.drifting,
            "tier": self.tier,
            "test": self.test,
            "alternative": self.alternative,
            "effect": self.psi if self.effect is None else self.effect,
            "effect_floor": self.psi_floor if self.effect_floor is None else self.effect_floor,
        }


def chi2_results(
    reference: ReferenceStats,
    window: Window,
    names: Sequence[str],
    *,
    alpha: float,
    psi_floor: float,
    labels: Sequence[str] = (),
    tier: str = "notice",
) -> list[FeatureResult]:
    """Compare one window with the reference on the binned features ``names``: a chi-square
    test of homogeneity each, Holm's correction over them together, and the PSI floor.

    Features with no values in the window (e.g. the outputs of a window of undecodable images)
    get p = 1.

    Args:
        reference: Reference histograms (the manifest's ``reference``).
        window: The window's counts and sums.
        names: The features to judge (each in both).
        alpha: Family-wise false-alarm probability per window over ``names``.
        psi_floor: Smallest PSI that may alert.
        labels: Class names, for the categorical summary. Defaults to class indices.
        tier: The tier these features belong to. Defaults to ``"notice"``.

    Returns:
        One :class:`FeatureResult` per feature, in ``names`` order.
    """
    names = list(names)
    n_bins = np.array([len(reference.features[n].counts) for n in names], dtype=int)
    # All features as rows of zero-padded matrices: the tests of a window in one numpy pass.
    real = np.arange(int(n_bins.max(initial=1)))[None, :] < n_bins[:, None]
    ref_counts = np.zeros(real.shape)
    cur_counts = np.zeros(real.shape)
    for i, name in enumerate(names):
        ref_counts[i, : n_bins[i]] = reference.features[name].counts
        cur_counts[i, : n_bins[i]] = window.counts[name]
    statistic, dof, p_value = _chi2_rows(ref_counts, cur_counts)
    thresholds, significant = holm(p_value, alpha)
    n_values = cur_counts.sum(axis=1).astype(int).tolist()
    psis = np.where(n_values, _psi_rows(ref_counts, cur_counts, real, 0.5), 0.0).tolist()
    results = []
    for i, name in enumerate(names):
        ref = reference.features[name]
        ref_value, cur_value, summary = _summary(
            ref.categorical,
            ref.mean,
            ref.counts,
            window.counts[name],
            window.sums.get(name),
            labels,
        )
        results.append(
            FeatureResult(
                name=name,
                n=n_values[i],
                statistic=float(statistic[i]),
                dof=int(dof[i]),
                p_value=float(p_value[i]),
                p_threshold=float(thresholds[i]),
                significant=bool(significant[i]),
                psi=psis[i],
                psi_floor=psi_floor,
                reference=ref_value,
                current=cur_value,
                summary=summary,
                tier=tier,
            )
        )
    return results


def _summary(
    categorical: bool,
    ref_mean: float,
    ref_counts: Sequence[int],
    cur: np.ndarray,
    cur_sum: float | None,
    labels: Sequence[str],
) -> tuple[float, float | None, str]:
    """Reference vs current summary: the mean, or the share of the most changed class."""
    n = int(cur.sum())
    if not categorical:
        current = cur_sum / n if cur_sum is not None and n else None
        shown = "n/a" if current is None else f"{current:.3g}"
        return ref_mean, current, f"mean {ref_mean:.3g} -> {shown}"
    p = np.asarray(ref_counts, dtype=np.float64) / max(1, sum(ref_counts))
    q = cur / max(1, n)
    k = int(np.argmax(np.abs(q - p)))
    label = labels[k] if k < len(labels) else str(k)
    return float(p[k]), float(q[k]), f"share of {label!r} {p[k]:.0%} -> {q[k]:.0%}"
