"""Drift tiers (issue 18): the page tier's tests on synthetic counts (one-sided, partial shifts,
their false-alarm rates), the window's tier, and alerts by tier on a real redis-server: one
shift opens one alert, a page opens above an open notice, and every verdict is kept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from scipy.stats import fisher_exact, mannwhitneyu

from imgq.shared.calibration import Calibration
from imgq.shared.imagestats import IMAGE_FEATURES
from imgq.shared.manifest import Manifest
from imgq.shared.reference import ReferenceStats
from imgq.worker.drift import DriftDetector, DriftKeys, DriftRecorder, evaluate_window
from imgq.worker.drift.harm import AccuracyTest, fisher_greater, rank_test_lower
from imgq.worker.drift.verdict import window_tier
from imgq.worker.metrics import WorkerMetrics
from tests.drift_synthetic import (
    LABELS,
    make_calibration,
    make_manifest,
    make_reference,
    traffic,
    window_of,
)

CONTRAST = IMAGE_FEATURES.index("contrast")


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    return make_reference(np.random.default_rng(0))


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    return make_calibration(np.random.default_rng(1))


def judge(
    reference: ReferenceStats, calibration: Calibration, features: np.ndarray, probs: np.ndarray
) -> tuple[str, dict[str, Any]]:
    """The window's tier and its verdicts by name, as the detector judges them."""
    results = evaluate_window(
        reference,
        window_of(reference, features, probs, calibration),
        labels=LABELS,
        accuracy_test=AccuracyTest(calibration.held_out_confidence, resamples=5000),
    )
    return window_tier(results), {r.name: r for r in results}


# ----------------------------------------------------------------------------- the tests


def test_rank_test_agrees_with_scipy_on_tied_values() -> None:
    """The rank test on bin counts is Mann-Whitney's with ties (asymptotic, no continuity)."""
    ref, cur = np.array([30, 20, 10, 5]), np.array([10, 10, 20, 25])
    bins = np.arange(4.0)
    z, p, effect = rank_test_lower(cur, ref)  # is `ref` lower than `cur`?
    expected = mannwhitneyu(
        np.repeat(bins, ref), np.repeat(bins, cur), alternative="less",
        method="asymptotic", use_continuity=False,
    )  # fmt: skip
    assert p == pytest.approx(expected.pvalue, rel=1e-9) and effect > 0.2
    assert rank_test_lower([1, 2], [0, 0]) == (0.0, 1.0, 0.0)


def test_fisher_greater_agrees_with_scipy() -> None:
    """The share test is Fisher's exact test, one-sided."""
    for k_cur, n_cur, k_ref, n_ref in ((7, 200, 2, 360), (0, 50, 3, 100), (40, 200, 40, 200)):
        table = [[k_cur, n_cur - k_cur], [k_ref, n_ref - k_ref]]
        expected = fisher_exact(table, alternative="greater").pvalue
        assert fisher_greater(k_cur, n_cur, k_ref, n_ref) == pytest.approx(expected, rel=1e-9)
    assert fisher_greater(1, 0, 1, 10) == 1.0


def test_accuracy_test_p_values_are_calibrated_under_no_change() -> None:
    """Windows drawn like the held-out values get p <= 0.01 about 1% of the time, and a drop
    of 10 points in a fifth of the window is caught."""
    rng = np.random.default_rng(2)
    held_out = np.clip(rng.beta(20, 1, 600), 0, 1)
    test = AccuracyTest(held_out, resamples=5000)
    truth = np.clip(rng.beta(20, 1, 200_000), 0, 1)
    p_values = [test.p_value(rng.choice(truth, 200).mean(), 200) for _ in range(400)]
    assert np.mean(np.array(p_values) <= 0.01) <= 0.03
    harmed = np.r_[rng.choice(truth, 160), rng.choice(truth, 40) - 0.5]
    assert test.p_value(harmed.mean(), 200) < 0.001
    with pytest.raises(ValueError, match=">= 2 held-out values"):
        AccuracyTest([0.9])


def test_in_distribution_windows_rarely_page_or_notice(
    reference: ReferenceStats, calibration: Calibration
) -> None:
    """300 in-distribution windows of 200: the page tier's level is 0.5% per window and the
    notice tier's 0.1%; allow up to 1% each for the sampling noise of 300 windows."""
    rng = np.random.default_rng(3)
    tiers = [judge(reference, calibration, *traffic(rng, 200))[0] for _ in range(300)]
    assert tiers.count("page") <= 3 and tiers.count("notice") <= 3


def test_image_statistics_alone_only_notice(
    reference: ReferenceStats, calibration: Calibration
) -> None:
    """Brightness moved, the answers did not: a notice, and no page test alerts."""
    tier, results = judge(
        reference, calibration, *traffic(np.random.default_rng(4), 200, brightness=0.15)
    )
    assert tier == "notice" and results["brightness"].drifting
    assert not any(r.drifting for r in results.values() if r.tier == "page")


def test_a_fifth_of_unsure_answers_pages(
    reference: ReferenceStats, calibration: Calibration
) -> None:
    """A fifth of the answers unsure (the model hurt on part of the traffic): a page, from the
    low-confidence share and the estimated accuracy, one-sided."""
    features, probs = traffic(np.random.default_rng(5), 200, unsure=0.2)
    tier, results = judge(reference, calibration, features, probs)
    assert tier == "page"
    share = results["low_confidence_share"]
    assert share.drifting and share.alternative == "higher" and share.test == "fisher"
    assert share.current is not None and share.current > share.reference + 0.1
    accuracy = results["estimated_accuracy"]
    assert accuracy.drifting and accuracy.current is not None
    assert accuracy.current < accuracy.reference - 0.05
    assert accuracy.summary.startswith("estimated accuracy")


def test_a_tenth_of_foreign_inputs_pages_on_the_out_of_range_share(
    reference: ReferenceStats, calibration: Calibration
) -> None:
    """A tenth of the inputs far outside the training range, answered confidently: a page from
    the out-of-range share alone (the outputs look as usual)."""
    tier, results = judge(
        reference, calibration, *traffic(np.random.default_rng(6), 200, foreign=0.1)
    )
    assert tier == "page" and results["out_of_range_share"].drifting
    assert results["out_of_range_share"].summary.endswith("-> 10.0%")
    assert not results["estimated_accuracy"].drifting


def test_more_confident_answers_do_not_page(
    reference: ReferenceStats, calibration: Calibration
) -> None:
    """The confidence tests are one-sided: a model surer than at export is no harm."""
    rng = np.random.default_rng(7)
    features, _ = traffic(rng, 200)
    probs = np.tile([0.997, 0.001, 0.001, 0.001], (200, 1))
    probs = np.take_along_axis(probs, rng.permuted(np.tile(np.arange(4), (200, 1)), axis=1), 1)
    tier, results = judge(reference, calibration, features, probs)
    assert results["confidence"].p_value > 0.5 and not results["confidence"].drifting
    assert not results["low_confidence_share"].drifting
    assert not results["estimated_accuracy"].drifting and tier == "ok"


def test_window_without_calibration_has_no_accuracy_test(reference: ReferenceStats) -> None:
    """A bundle exported before calibration: no estimated-accuracy test, the rest as usual."""
    features, probs = traffic(np.random.default_rng(8), 200)
    results = evaluate_window(reference, window_of(reference, features, probs))
    names = {r.name for r in results}
    assert "estimated_accuracy" not in names and "low_confidence_share" in names


# ----------------------------------------------------------------------------- the detector


@pytest.fixture
def client(redis_server: Any) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_server.url) as c:
        yield c


@pytest.fixture
def manifest(reference: ReferenceStats, calibration: Calibration) -> Manifest:
    return make_manifest(reference, calibration)


def judged(
    client: redis.Redis, manifest: Manifest, metrics: WorkerMetrics, batches: list[Any]
) -> list[dict[str, Any] | None]:
    """Each (features, probs) as one window through a recorder; the detector's alerts."""
    recorder = DriftRecorder(
        client, manifest, window_size=100_000, window_s=3600.0, metrics=metrics
    )
    try:
        alerts = []
        for features, probs in batches:
            pipe = client.pipeline()
            recorder.add_to_pipeline(pipe, features, probs)
            pipe.execute()
            window_id = recorder.close_window(min_images=1)
            assert window_id is not None
            alerts.append(recorder.detector.evaluate(window_id))
        return alerts
    finally:
        recorder.close()


def test_one_shift_opens_one_alert_as_it_grows(client: redis.Redis, manifest: Manifest) -> None:
    """Issue 18: a shift whose first window moves brightness and whose second also moves
    contrast opened two alerts; now contrast joins the open alert."""
    rng = np.random.default_rng(9)
    partly = traffic(rng, 200, brightness=0.15)
    fully = traffic(rng, 200, brightness=0.15)
    fully[0][:, CONTRAST] += 0.15
    metrics = WorkerMetrics(CollectorRegistry())
    first, second = judged(client, manifest, metrics, [partly, fully])
    assert first is not None and first["tier"] == "notice" and second is None
    keys = DriftKeys(manifest.drift_id)
    assert client.hgetall(keys.open_alerts) == {b"brightness": b"1", b"contrast": b"1"}
    assert client.xlen(keys.alerts) == 1
    sample = metrics.registry.get_sample_value
    m = {"model": "shapes", "drift_id": manifest.drift_id}
    assert (
        sample(
            "imgq_drift_alerts_open",
            m | {"tier": "notice"},
        )
        == 1
    )


def test_a_page_opens_above_an_open_notice_and_carries_its_tier(
    client: redis.Redis, manifest: Manifest
) -> None:
    """A notice open, then the model is hurt: a page opens (its own tier, the estimated
    accuracy beside it), counted under tier="page"; the verdict history keeps both windows,
    newest first, with their tiers."""
    rng = np.random.default_rng(10)
    metrics = WorkerMetrics(CollectorRegistry())
    notice, page = judged(
        client,
        manifest,
        metrics,
        [traffic(rng, 200, brightness=0.15), traffic(rng, 200, brightness=0.15, unsure=0.3)],
    )
    assert notice is not None and notice["tier"] == "notice"
    assert page is not None and page["tier"] == "page" and page["id"] == "2"
    assert page["estimated_accuracy"] < 0.85
    page_features = [f["feature"] for f in page["features"] if f["tier"] == "page"]
    assert "low_confidence_share" in page_features
    assert page["features"][0]["tier"] == "page"  # page evidence first
    keys = DriftKeys(manifest.drift_id)
    verdicts = [json.loads(v) for v in client.lrange(keys.verdicts, 0, -1)]
    assert [(v["window"]["id"], v["tier"]) for v in verdicts] == [(2, "page"), (1, "notice")]
    assert all(f["tier"] in ("page", "notice") for f in verdicts[0]["features"])
    assert keys.verdicts in keys.state and client.ttl(keys.verdicts) > 0
    sample = metrics.registry.get_sample_value
    m = {"model": "shapes", "drift_id": manifest.drift_id}
    assert sample("imgq_drift_alerts_total", m | {"tier": "page"}) == 1
    assert sample("imgq_drift_alerts_total", m | {"tier": "notice"}) == 1
    features = m | {"feature": "low_confidence_share", "tier": "page"}
    assert sample("imgq_drift_alert_features_total", features) == 1
    assert (
        sample(
            "imgq_drift_alerts_open",
            m | {"tier": "page"},
        )
        == 1
    )
    assert (
        sample(
            "imgq_drift_alerts_open",
            m | {"tier": "notice"},
        )
        == 1
    )
    assert sample("imgq_drift_estimated_accuracy", m) < 0.85


def test_page_counters_exist_at_zero_once_a_version_is_loaded(
    client: redis.Redis, manifest: Manifest
) -> None:
    """Issue 25: the alert counter of each tier is exported at 0 as soon as the detector of a
    model version exists, before any window is judged, so the first page is a step that
    Prometheus' increase() sees (a series whose first sample is 1 shows no increase)."""
    metrics = WorkerMetrics(CollectorRegistry())
    DriftDetector(client, manifest, metrics=metrics)
    sample = metrics.registry.get_sample_value
    m = {"model": "shapes", "drift_id": manifest.drift_id}
    assert sample("imgq_drift_alerts_total", m | {"tier": "page"}) == 0
    assert sample("imgq_drift_alerts_total", m | {"tier": "notice"}) == 0


def test_detector_refuses_a_bad_page_alpha(client: redis.Redis, manifest: Manifest) -> None:
    with pytest.raises(ValueError, match="page_alpha must be in"):
        DriftDetector(client, manifest, page_alpha=0.0)
