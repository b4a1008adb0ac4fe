"""The page tier's tests: evidence on the output side that the model is being hurt, pure
numpy/scipy on a window's counts, unit tested without Redis.

Six tests, seven with a novelty model, each one-sided where the direction of harm is known,
judged together with Holm's correction at the page tier's own family-wise level
(``docs/drift.md``):

==========================  =================================================  ==============
test                        what it compares                                   direction
==========================  =================================================  ==============
``predicted_class``         class mix, chi-square of homogeneity               two-sided
``confidence``              top-1 probability, rank test on the bins           lower
``margin``                  top-1 minus top-2, rank test on the bins           lower
``low_confidence_share``    answers in the reference's lowest confidence bin   higher
``out_of_range_share``      inputs with a pixel feature outside the training   higher
                            range, against held-out images (Fisher's exact)
``estimated_accuracy``      mean calibrated top-1 probability (CBPE), against  lower
                            the held-out images, by resampling them
``novel_share``             inputs above the novelty threshold of the model's  higher
                            penultimate features, against held-out images
                            (Fisher's exact)
==========================  =================================================  ==============

The share tests see a minority of harmed, foreign or new inputs that moves a mean or a whole
histogram too little. With a novelty model, the out-of-range share alone is no evidence of harm:
pixels outside the training range that the model's features do not find novel (noise, a darker
room) page only when another page test agrees, else they are notice evidence. Every test
compares the window with a *sample* (the held-out images'
outputs), so the reference's own sampling noise is part of the null distribution instead of a
source of false alarms. Each test also has an effect floor (:data:`EFFECT_FLOORS`), so a very
large window does not page on a difference too small to matter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import gammaln, ndtr

from imgq.shared.reference import ReferenceStats
from imgq.worker.drift.layout import Window
from imgq.worker.drift.statistics import FeatureResult, chi2_results, holm, psi

__all__ = [
    "EFFECT_FLOORS",
    "NOVELTY_EFFECT_FLOORS",
    "PAGE_TESTS",
    "AccuracyTest",
    "fisher_greater",
    "page_results",
    "rank_test_lower",
]

#: The page tier's tests, in the order they are reported.
PAGE_TESTS: tuple[str, ...] = (
    "predicted_class",
    "confidence",
    "margin",
    "low_confidence_share",
    "out_of_range_share",
    "estimated_accuracy",
    "novel_share",
)

#: Smallest effect that may page, per test: PSI for the class mix; for confidence and margin
#: the probability that a window answer ranks below a reference answer, less 0.5; for the
#: shares the increase (0.03 = 3 points); for the estimated accuracy the drop (0.01 = 1 point).
#: The novel share's 4.5 points: a tenth of the inputs from classes the model never saw, about
#: half of them novel, is some 5 points; harmless noise raises it by one or two (docs/drift.md).
EFFECT_FLOORS: dict[str, float] = {
    "predicted_class": 0.1,
    "confidence": 0.1,
    "margin": 0.1,
    "low_confidence_share": 0.03,
    "out_of_range_share": 0.02,
    "estimated_accuracy": 0.01,
    "novel_share": 0.045,
}
#: The floors that differ where the bundle has a novelty model: its novel share sees partial
#: harm from inputs the model never saw (which the 1-point estimated-accuracy floor was set
#: for, issue 18), so the estimate pages on a drop of 2 points, above what harmless changes
#: cost (noise of sigma 20: 1 point, docs/benchmarks.md).
NOVELTY_EFFECT_FLOORS: dict[str, float] = {"estimated_accuracy": 0.02}


def rank_test_lower(
    ref_counts: Sequence[int] | np.ndarray, cur_counts: Sequence[int] | np.ndarray
) -> tuple[float, float, float]:
    """One-sided Mann-Whitney test that the window's values are lower than the reference's,
    on counts in the same ordered bins (values in one bin are ties).

    Binned counts are what the workers sum, and the rank test needs nothing else: each bin's
    values share one mid-rank, and the variance has the tie correction.

    Returns:
        ``(z, p_value, effect)``: the normal score, its one-sided p-value, and
        ``P(window < reference) + P(tie) / 2 - 0.5`` (0 when alike, up to 0.5);
        ``(0.0, 1.0, 0.0)`` when either side is empty.

    >>> z, p, effect = rank_test_lower([10, 10, 10], [10, 10, 10])
    >>> round(p, 3), effect
    (0.5, 0.0)
    >>> z, p, effect = rank_test_lower([10, 10, 10], [25, 5, 0])
    >>> p < 0.001, round(effect, 3)
    (True, 0.278)
    """
    r = np.asarray(ref_counts, np.float64)
    c = np.asarray(cur_counts, np.float64)
    n_r, n_c = r.sum(), c.sum()
    if n_r == 0 or n_c == 0:
        return 0.0, 1.0, 0.0
    ref_above = n_r - np.cumsum(r)  # reference values in higher bins than each bin
    u = float((c * (ref_above + 0.5 * r)).sum())  # pairs where the window value is lower
    mean = n_r * n_c / 2.0
    n = n_r + n_c
    ties = r + c
    variance = n_r * n_c / 12.0 * ((n + 1) - float((ties**3 - ties).sum()) / (n * (n - 1)))
    if variance <= 0:
        return 0.0, 1.0, 0.0
    z = (u - mean) / math.sqrt(variance)
    return z, float(ndtr(-z)), float(u / (n_r * n_c) - 0.5)


def fisher_greater(k_cur: int, n_cur: int, k_ref: int, n_ref: int) -> float:
    """One-sided Fisher's exact test that the window's share ``k_cur / n_cur`` is higher than
    the reference sample's ``k_ref / n_ref``: exact for the few counts of rare events, and
    valid whatever the reference's size.

    The p-value is the hypergeometric tail, summed from the log-gamma function: the same
    figure as ``scipy.stats.hypergeom.sf`` (to ~1e-12) at a hundredth of its cost (each
    window has up to three of these).

    >>> round(fisher_greater(5, 100, 5, 100), 3)
    0.626
    >>> fisher_greater(30, 200, 3, 300) < 1e-9
    True
    >>> fisher_greater(0, 200, 3, 300), round(fisher_greater(4, 4, 0, 1), 12)
    (1.0, 0.2)
    """
    if n_cur <= 0 or n_ref <= 0 or k_cur <= 0:
        return 1.0
    total, drawn, marked = n_cur + n_ref, n_cur, k_cur + k_ref
    x = np.arange(k_cur, min(marked, drawn) + 1, dtype=np.float64)
    log_pmf = (
        _log_choose(marked, x) + _log_choose(total - marked, drawn - x)
        - _log_choose(total, drawn)
    )  # fmt: skip
    return float(min(1.0, np.exp(log_pmf).sum()))


def _log_choose(n: float | np.ndarray, k: float | np.ndarray) -> np.ndarray:
    """``log(n choose k)``."""
    return np.asarray(
        gammaln(np.add(n, 1)) - gammaln(np.add(k, 1)) - gammaln(np.subtract(n, k) + 1)
    )


class AccuracyTest:
    """Is a window's estimated accuracy (mean calibrated top-1 probability) lower than the
    held-out images'? A one-sided test whose null distribution comes from resampling the
    held-out values: a window of ``n`` drawn from them, minus a resample of the held-out set
    itself (its own sampling noise), ``resamples`` times. Confidence is skewed (most answers
    near 1, a few far below), so a normal approximation would be wrong in the tail that
    decides; the resampled quantiles are exact for that skew.

    The null distribution costs 0.1-0.3 s of CPU per window size. A window closes once it
    holds ``window_size`` images or more (the batch that fills it counts whole), so full windows
    have sizes from ``window_size`` to ``window_size + max_batch - 1``; with ``window_cap``
    (bundles with a novelty model) a window larger than the cap is judged on the cap's null
    distribution, which is wider than its own (a larger window's mean varies less): slightly
    conservative, and one null distribution for every full window instead of one per size.

    Args:
        held_out: Calibrated top-1 probabilities of the held-out images.
        resamples: Resamples per window size. Defaults to 20,000 (p-values down to 5e-5).
        seed: Seed of the resampling. Defaults to 0.
        window_cap: Largest window size with a null distribution of its own (None: every size
            has its own, as before novelty). Defaults to None.

    >>> test = AccuracyTest(np.r_[np.full(360, 0.99), np.full(40, 0.6)])
    >>> round(test.reference_mean, 3)
    0.951
    >>> test.p_value(0.951, 200) > 0.3, test.p_value(0.90, 200) < 1e-3
    (True, True)
    >>> capped = AccuracyTest(test.values, window_cap=200)
    >>> capped.p_value(0.93, 231) == test.p_value(0.93, 200) >= test.p_value(0.93, 231)
    True
    """

    def __init__(
        self,
        held_out: Sequence[float] | np.ndarray,
        *,
        resamples: int = 20_000,
        seed: int = 0,
        window_cap: int | None = None,
    ) -> None:
        self.values = np.asarray(held_out, np.float64)
        if self.values.ndim != 1 or len(self.values) < 2:
            raise ValueError(f"AccuracyTest needs >= 2 held-out values, got {self.values.shape}")
        self.reference_mean = float(self.values.mean())
        self.resamples = resamples
        self.seed = seed
        self.window_cap = window_cap
        self._cache: dict[int, np.ndarray] = {}

    def _null_drops(self, n: int) -> np.ndarray:
        """Sorted resampled drops (reference mean minus window mean) under no change, made once
        per window size (~0.1 s for windows of 200)."""
        if n in self._cache:
            return self._cache[n]
        rng = np.random.default_rng([self.seed, n])
        m = len(self.values)
        drops = np.empty(self.resamples)
        chunk = max(1, (1 << 22) // (n + m))
        for i in range(0, self.resamples, chunk):
            k = min(chunk, self.resamples - i)
            window = self.values[rng.integers(0, m, (k, n))].mean(axis=1)
            reference = self.values[rng.integers(0, m, (k, m))].mean(axis=1)
            drops[i : i + k] = reference - window
        drops.sort()
        if len(self._cache) >= 16:  # window sizes vary only for windows closed on time
            self._cache.pop(next(iter(self._cache)))
        self._cache[n] = drops
        return drops

    def p_value(self, window_mean: float, n: int) -> float:
        """One-sided p-value of a window of ``n`` answers whose mean is ``window_mean``."""
        if n < 1 or not math.isfinite(window_mean):
            return 1.0
        if self.window_cap is not None:
            n = min(n, self.window_cap)
        drops = self._null_drops(int(n))
        exceed = len(drops) - int(np.searchsorted(drops, self.reference_mean - window_mean))
        return (exceed + 1) / (len(drops) + 1)


def page_results(
    reference: ReferenceStats,
    window: Window,
    *,
    alpha: float,
    labels: Sequence[str] = (),
    accuracy_test: AccuracyTest | None = None,
    floors: dict[str, float] | None = None,
    novel_reference: tuple[int, int] | None = None,
) -> list[FeatureResult]:
    """The page tier's verdicts on one window: the tests of :data:`PAGE_TESTS` whose inputs
    the reference has, with Holm's correction over them at family-wise ``alpha``.

    Args:
        reference: The manifest's reference (output features from held-out images).
        window: The window's counts.
        alpha: The page tier's family-wise false-alarm probability per window.
        labels: Class names, for the class-mix summary.
        accuracy_test: The held-out calibrated confidences (None: not tested; a bundle without
            calibration).
        floors: Effect floors by test. Defaults to :data:`EFFECT_FLOORS`, with
            :data:`NOVELTY_EFFECT_FLOORS` where there is a novelty model.
        novel_reference: ``(k, n)`` held-out images above the novelty threshold (the
            manifest's ``novelty.held_out_novel``); None (no novelty model): no novel-share
            test, and the out-of-range share pages on its own, as before novelty.

    Returns:
        One :class:`FeatureResult` per test run, in :data:`PAGE_TESTS` order: ``tier="page"``,
        but ``"notice"`` for an out-of-range share that alerts alone where there is a novelty
        model (nothing on the output side nor the novel share agrees).
    """
    novelty = NOVELTY_EFFECT_FLOORS if novel_reference is not None else {}
    floors = EFFECT_FLOORS | novelty | (floors or {})
    features = reference.features
    results: list[FeatureResult] = []
    if "predicted_class" in features and "predicted_class" in window.counts:
        results += chi2_results(
            reference, window, ["predicted_class"], alpha=1.0, psi_floor=floors["predicted_class"],
            labels=labels, tier="page",
        )  # fmt: skip
    for name in ("confidence", "margin"):
        if name in features and name in window.counts:
            results.append(_rank_result(reference, window, name, floors[name]))
    if "confidence" in features and "confidence" in window.counts:
        results.append(_low_confidence_result(reference, window, floors["low_confidence_share"]))
    if reference.held_out_out_of_range is not None:
        k_ref, n_ref = reference.held_out_out_of_range
        results.append(
            _share_result(
                "out_of_range_share",
                "share out of range",
                window.out_of_range,
                window.n_images,
                k_ref,
                n_ref,
                floors["out_of_range_share"],
            )  # fmt: skip
        )
    if accuracy_test is not None and "confidence" in window.counts:
        results.append(_accuracy_result(accuracy_test, window, floors["estimated_accuracy"]))
    if novel_reference is not None:
        k_ref, n_ref = novel_reference
        results.append(
            _share_result(
                "novel_share",
                "share novel",
                window.novel,
                window.n_images,
                k_ref,
                n_ref,
                floors["novel_share"],
            )  # fmt: skip
        )
    thresholds, significant = holm([r.p_value for r in results], alpha)
    judged = [
        _with(r, p_threshold=float(t), significant=bool(s))
        for r, t, s in zip(results, thresholds, significant, strict=True)
    ]
    return _pixels_alone_notice(judged) if novel_reference is not None else judged


def _with(r: FeatureResult, **changes: Any) -> FeatureResult:
    """``dataclasses.replace(r, **changes)`` without its introspection (~10 us a call, seven
    calls a window): a copy of the frozen result's fields, some of them changed."""
    new = object.__new__(FeatureResult)
    new.__dict__.update(r.__dict__, **changes)
    return new


def _pixels_alone_notice(results: list[FeatureResult]) -> list[FeatureResult]:
    """The out-of-range share as notice evidence when it alerts and no other page test does:
    inputs whose pixels left the training range but whose features the model finds familiar,
    with outputs as usual, are a changed input pipeline, not a hurt model (issue 26)."""
    if not any(r.name == "out_of_range_share" and r.drifting for r in results):
        return results
    if any(r.name != "out_of_range_share" and r.drifting for r in results):
        return results
    return [
        _with(r, tier="notice", summary=r.summary + " (novelty and outputs as usual)")
        if r.name == "out_of_range_share"
        else r
        for r in results
    ]


def _rank_result(
    reference: ReferenceStats, window: Window, name: str, floor: float
) -> FeatureResult:
    """Is the window's ``name`` (confidence, margin) lower than the reference's?"""
    ref = reference.features[name]
    cur = window.counts[name]
    n = int(cur.sum())
    z, p_value, effect = rank_test_lower(ref.counts, cur)
    current = window.sums[name] / n if n and name in window.sums else None
    shown = "n/a" if current is None else f"{current:.3g}"
    return FeatureResult(
        name=name, n=n, statistic=z, dof=0, p_value=p_value, p_threshold=0.0,
        significant=False, psi=psi(ref.counts, cur) if n else 0.0, psi_floor=0.0,
        reference=ref.mean, current=current, summary=f"mean {ref.mean:.3g} -> {shown}",
        tier="page", test="rank", alternative="lower", effect=effect, effect_floor=floor,
    )  # fmt: skip


def _low_confidence_result(
    reference: ReferenceStats, window: Window, floor: float
) -> FeatureResult:
    """Is the share of answers in the reference's lowest confidence bin higher?"""
    ref = reference.features["confidence"]
    cur = window.counts["confidence"]
    below = f"share below {ref.edges[1]:.3g}"
    return _share_result(
        "low_confidence_share", below, int(cur[0]), int(cur.sum()), ref.counts[0],
        sum(ref.counts), floor,
    )  # fmt: skip


def _share_result(
    name: str, what: str, k_cur: int, n_cur: int, k_ref: int, n_ref: int, floor: float
) -> FeatureResult:
    """Fisher's exact test that the window's share ``k_cur / n_cur`` is higher."""
    p_ref = k_ref / n_ref if n_ref else 0.0
    p_cur = k_cur / n_cur if n_cur else None
    shown = "n/a" if p_cur is None else f"{p_cur:.1%}"
    return FeatureResult(
        name=name, n=n_cur, statistic=float(k_cur), dof=0,
        p_value=fisher_greater(k_cur, n_cur, k_ref, n_ref), p_threshold=0.0, significant=False,
        psi=psi([k_ref, n_ref - k_ref], [k_cur, n_cur - k_cur]) if n_cur else 0.0, psi_floor=0.0,
        reference=p_ref, current=p_cur, summary=f"{what} {p_ref:.1%} -> {shown}",
        tier="page", test="fisher", alternative="higher",
        effect=0.0 if p_cur is None else p_cur - p_ref, effect_floor=floor,
    )  # fmt: skip


def _accuracy_result(test: AccuracyTest, window: Window, floor: float) -> FeatureResult:
    """Is the window's estimated accuracy (mean calibrated top-1) lower than held-out's?"""
    n = int(window.counts["confidence"].sum())
    current = window.calibrated_confidence_sum / n if n else None
    shown = "n/a" if current is None else f"{current:.1%}"
    drop = 0.0 if current is None else test.reference_mean - current
    return FeatureResult(
        name="estimated_accuracy", n=n, statistic=drop, dof=0,
        p_value=1.0 if current is None else test.p_value(current, n), p_threshold=0.0,
        significant=False, psi=0.0, psi_floor=0.0, reference=test.reference_mean,
        current=current, summary=f"estimated accuracy {test.reference_mean:.1%} -> {shown}",
        tier="page", test="resampling", alternative="lower", effect=drop, effect_floor=floor,
    )  # fmt: skip
