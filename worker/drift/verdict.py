"""A window's verdict: every feature's test in its tier, the window's tier, and which alerts
open, grow or clear. Pure; the detector stores what it decides.

Tiers (``docs/drift.md``): *page* when an output-side test of
:mod:`~imgq.worker.drift.harm` shows likely harm, *notice* when only image statistics moved,
*ok* otherwise. Each tier has its own family-wise false-alarm level per window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from imgq.shared.imagestats import IMAGE_FEATURES
from imgq.shared.reference import ReferenceStats
from imgq.worker.drift.harm import AccuracyTest, page_results
from imgq.worker.drift.layout import Window
from imgq.worker.drift.statistics import FeatureResult, chi2_results

__all__ = [
    "ALERT_TIERS",
    "HOLD_P_VALUE",
    "NOTICE_ALPHA",
    "PAGE_ALPHA",
    "Transition",
    "alert_transitions",
    "evaluate_window",
    "window_tier",
]

#: The tiers of an alert: a page (the model is likely hurt) wakes someone, a notice does not.
ALERT_TIERS = ("page", "notice")
#: Family-wise false-alarm level per window of the notice tier (the image features).
NOTICE_ALPHA = 0.001
#: Family-wise false-alarm level per window of the page tier (the output-side tests).
PAGE_ALPHA = 0.005
#: An open feature stays open while its uncorrected p-value is at most this and its effect at
#: least half its floor: a shift hovering at the alert threshold does not clear and re-open
#: (one shift, one alert).
HOLD_P_VALUE = 0.05


def evaluate_window(
    reference: ReferenceStats,
    window: Window,
    *,
    alpha: float = NOTICE_ALPHA,
    psi_floor: float = 0.1,
    labels: Sequence[str] = (),
    page_alpha: float = PAGE_ALPHA,
    accuracy_test: AccuracyTest | None = None,
    novel_reference: tuple[int, int] | None = None,
) -> list[FeatureResult]:
    """Judge one window against the reference, both tiers.

    Args:
        reference: Reference histograms (the manifest's ``reference``).
        window: The window's counts and sums.
        alpha: The notice tier's family-wise false-alarm probability per window (Holm over the
            image features). Defaults to :data:`NOTICE_ALPHA`.
        psi_floor: Smallest PSI of an image feature that may alert. Defaults to 0.1.
        labels: Class names, for the class-mix summary. Defaults to class indices.
        page_alpha: The page tier's family-wise level (Holm over its tests). Defaults to
            :data:`PAGE_ALPHA`.
        accuracy_test: Held-out calibrated confidences for the estimated-accuracy test; None
            leaves it out.
        novel_reference: The novelty model's ``held_out_novel`` for the novel-share test;
            None (a bundle without novelty) leaves it out, and judges as before novelty.

    Returns:
        One :class:`FeatureResult` per feature or test: alerting ones first, page before
        notice, then the largest PSI first.
    """
    names = [n for n in IMAGE_FEATURES if n in reference.features and n in window.counts]
    results = chi2_results(reference, window, names, alpha=alpha, psi_floor=psi_floor)
    results += page_results(
        reference, window, alpha=page_alpha, labels=labels, accuracy_test=accuracy_test,
        novel_reference=novel_reference,
    )  # fmt: skip
    return sorted(results, key=lambda r: (not r.drifting, r.tier != "page", -r.psi))


def window_tier(results: Sequence[FeatureResult]) -> str:
    """``"page"`` when a page-tier test alerts, else ``"notice"`` when an image feature does,
    else ``"ok"``.

    >>> r = FeatureResult("brightness", 200, 50.0, 9, 1e-9, 1e-4, True, 0.5, 0.1, 0.5, 0.3, "")
    >>> window_tier([r]), window_tier([dataclasses.replace(r, tier="page")]), window_tier([])
    ('notice', 'page', 'ok')
    """
    tiers = {r.tier for r in results if r.drifting}
    return "page" if "page" in tiers else "notice" if tiers else "ok"


def _holding(r: FeatureResult) -> bool:
    """Still drifting enough to keep an open alert open (see :data:`HOLD_P_VALUE`)."""
    effect = r.psi if r.effect is None else r.effect
    floor = r.psi_floor if r.effect_floor is None else r.effect_floor
    return r.drifting or (r.p_value <= HOLD_P_VALUE and effect >= floor / 2)


@dataclasses.dataclass(frozen=True)
class Transition:
    """What one window changes in the alert state.

    Attributes:
        tier: The new alert's tier, or None when no alert opens.
        new: The features of the new alert (every feature alerting in the window, those
            already open included), alerting page tests first.
        opened: Features that join the open-alert map under the new alert's id.
        joined: Features newly alerting that join an alert already open, with its id.
        cleared: Open features no longer drifting.
    """

    tier: str | None
    new: list[FeatureResult]
    opened: list[str]
    joined: dict[str, str]
    cleared: list[str]


def alert_transitions(
    open_alerts: Mapping[str, str], results: Sequence[FeatureResult]
) -> Transition:
    """De-duplication: one shift opens one alert.

    An alert opens when a window alerts and no alert of its tier or above is open (a page
    when no page is open, a notice when nothing is open). Features that start alerting while
    such an alert is open join it instead of opening another (a shift that begins mid-window
    first moves a few features, then more). An open feature clears in the first window where
    it no longer holds (not alerting, and no longer near it: :data:`HOLD_P_VALUE`).

    Args:
        open_alerts: Open feature -> id of its alert.
        results: The window's verdicts.
    """
    by_name = {r.name: r for r in results}
    cleared = sorted(f for f in open_alerts if f not in by_name or not _holding(by_name[f]))
    still_open = {f: i for f, i in open_alerts.items() if f not in cleared}
    alerting = [r for r in results if r.drifting]
    fresh = [r.name for r in alerting if r.name not in still_open]
    tier = window_tier(results)
    open_page = [i for f, i in still_open.items() if f in by_name and by_name[f].tier == "page"]
    if tier == "page" and not open_page or tier == "notice" and not still_open:
        return Transition(tier, alerting, fresh, {}, cleared)
    target = max(open_page or still_open.values(), key=_id_order, default=None)
    joined = {f: target for f in fresh} if target is not None else {}
    return Transition(None, [], [], joined, cleared)


def _id_order(alert_id: str) -> tuple[int, str]:
    """Alert ids are window ids: numeric order, text for anything else."""
    return (int(alert_id), "") if alert_id.isdigit() else (-1, alert_id)
