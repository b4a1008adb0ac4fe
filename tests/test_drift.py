"""Drift: the statistics on count arrays (no Redis), then the recorder and detector on a real
redis-server: counting, window closing (count, time, and the race between workers), alerts,
de-duplication, clearing, thumbnails, metrics, and the TTLs that keep a retired model's keys
from piling up."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from imgq.shared.errors import ManifestError
from imgq.shared.imagestats import IMAGE_FEATURES, OUTPUT_FEATURES
from imgq.shared.manifest import Manifest
from imgq.shared.reference import ReferenceStats, bin_counts, out_of_range
from imgq.worker.drift import (
    ALL_FEATURES,
    STATE_TTL_S,
    DriftDetector,
    DriftKeys,
    DriftRecorder,
    FeatureResult,
    Transition,
    Window,
    WindowLayout,
    alert_transitions,
    chi2_homogeneity,
    evaluate_window,
    holm,
    psi,
)
from imgq.worker.drift.layout import _ADD_LUA
from imgq.worker.metrics import WorkerMetrics
from tests.drift_synthetic import (
    BRIGHTNESS,
    LABELS,
    all_features,
    make_manifest,
    make_reference,
    traffic,
)


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    """Reference histograms of 2,000 in-distribution synthetic images."""
    return make_reference(np.random.default_rng(0))


@pytest.fixture(scope="module")
def manifest(reference: ReferenceStats) -> Manifest:
    return make_manifest(reference)


def window_of(reference: ReferenceStats, values: np.ndarray, window_id: int = 1) -> Window:
    """A window as the workers would have summed it in Redis."""
    counts = bin_counts(reference, values, ALL_FEATURES)
    sums = dict(zip(ALL_FEATURES, values.sum(axis=0).tolist(), strict=True))
    return Window(window_id, len(values), 0.0, 1.0, counts, sums)


def judge(reference: ReferenceStats, values: np.ndarray) -> list[FeatureResult]:
    return evaluate_window(
        reference, window_of(reference, values), alpha=0.01, psi_floor=0.1, labels=LABELS
    )


# ----------------------------------------------------------------------------- statistics


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift() -> None:
    """PSI depends on shares, not sizes, and increases as mass moves."""
    assert psi([10, 20, 30], [100, 200, 300], smoothing=0) == pytest.approx(0.0)
    assert 0 < psi([50, 50], [60, 40]) < psi([50, 50], [80, 20]) < psi([50, 50], [100, 0])


def test_psi_is_finite_with_empty_bins_and_rejects_other_bins() -> None:
    """Smoothing keeps an emptied bin finite; histograms of different bins are refused."""
    assert np.isfinite(psi([100, 0], [0, 100]))
    with pytest.raises(ValueError, match="2 reference vs 3"):
        psi([1, 2], [1, 2, 3])


def test_chi2_homogeneity_ignores_bins_empty_in_both() -> None:
    """Empty bins add no degrees of freedom; a one-sided empty bin is strong evidence."""
    assert chi2_homogeneity([50, 0, 50], [50, 0, 50])[1] == 1
    assert chi2_homogeneity([100, 100], [0, 0]) == (0.0, 0, 1.0)
    assert chi2_homogeneity([100, 100, 0], [50, 50, 100])[2] < 1e-20


def test_chi2_homogeneity_agrees_with_scipy() -> None:
    """The hand-written test gives scipy's chi2_contingency statistic, dof and p-value."""
    from scipy.stats import chi2_contingency

    rng = np.random.default_rng(0)
    for _ in range(20):
        ref, cur = rng.integers(1, 60, 10), rng.integers(1, 60, 10)
        expected = chi2_contingency(np.array([ref, cur]), correction=False)
        statistic, dof, p_value = chi2_homogeneity(ref, cur)
        assert (statistic, dof) == (pytest.approx(expected.statistic), expected.dof)
        assert p_value == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)


def test_holm_stops_at_the_first_failure() -> None:
    """Step-down: a p-value under its own level is not significant after an earlier failure."""
    thresholds, significant = holm([0.004, 0.03, 0.03, 0.04], alpha=0.05)
    assert thresholds.tolist() == pytest.approx([0.0125, 0.05 / 3, 0.025, 0.05])
    assert significant.tolist() == [True, False, False, False]


def test_feature_result_dict_has_every_field_and_the_verdict(reference: ReferenceStats) -> None:
    """The JSON form of a verdict (alerts, logs, `imgq drift status`) carries every field."""
    result = judge(reference, all_features(*traffic(np.random.default_rng(3), 100)))[0]
    fields = {f.name for f in dataclasses.fields(FeatureResult)}
    assert result.to_dict() == {f: getattr(result, f) for f in fields} | {
        "drifting": result.drifting,
        "effect": result.psi if result.effect is None else result.effect,
        "effect_floor": result.psi_floor if result.effect_floor is None else result.effect_floor,
    }


def test_same_distribution_raises_no_alert() -> None:
    """400 in-distribution windows of 200 images: the levels here are 1% per window for a
    notice and 0.5% for a page; allow up to 2% for the sampling noise of 400 windows and of the
    one reference they share."""
    rng = np.random.default_rng(1)
    reference = make_reference(rng)
    alerted = sum(
        any(r.drifting for r in judge(reference, all_features(*traffic(rng, 200))))
        for _ in range(400)
    )
    assert alerted <= 8


def test_shift_alerts_and_names_the_feature(reference: ReferenceStats) -> None:
    """Brightness shifted by one standard deviation: brightness alerts, first, and alone."""
    values = all_features(*traffic(np.random.default_rng(2), 200, brightness=0.1))
    results = judge(reference, values)
    assert [r.name for r in results if r.drifting] == ["brightness"]
    top = results[0]
    assert top.name == "brightness" and top.p_value <= top.p_threshold and top.psi >= 0.1
    assert top.reference == pytest.approx(0.5, abs=0.01)
    assert top.current == pytest.approx(0.6, abs=0.02)
    assert top.summary == f"mean {top.reference:.3g} -> {top.current:.3g}"


def test_class_mix_names_the_class(reference: ReferenceStats) -> None:
    """One class arriving pages on predicted_class and says which class's share changed."""
    values = all_features(*traffic(np.random.default_rng(3), 200, one_class=True))
    top = judge(reference, values)[0]
    assert top.name == "predicted_class" and top.drifting and top.tier == "page"
    assert top.summary.startswith("share of 'circle' 24% -> 9")


def test_tiny_difference_in_huge_window_does_not_alert(reference: ReferenceStats) -> None:
    """A shift of 0.2 standard deviations over 500,000 images is significant but under the
    PSI floor, so it does not alert."""
    values = all_features(*traffic(np.random.default_rng(4), 500_000, brightness=0.02))
    brightness = next(r for r in judge(reference, values) if r.name == "brightness")
    assert brightness.significant
    assert brightness.psi < 0.1
    assert not brightness.drifting


def test_alert_transitions_deduplicate_and_clear(reference: ReferenceStats) -> None:
    """An open feature does not alert again while drifting; it clears once it stops."""
    shifted = judge(
        reference, all_features(*traffic(np.random.default_rng(5), 200, brightness=0.1))
    )
    normal = judge(reference, all_features(*traffic(np.random.default_rng(6), 200)))
    change = alert_transitions({}, shifted)
    assert change.tier == "notice" and [r.name for r in change.new] == ["brightness"]
    assert change.opened == ["brightness"] and change.cleared == []
    assert alert_transitions({"brightness": "1"}, shifted) == Transition(None, [], [], {}, [])
    assert alert_transitions({"brightness": "1"}, normal).cleared == ["brightness"]


def test_window_layout_reads_the_redis_string(reference: ReferenceStats) -> None:
    """Counts, sums, size and span come back from their i64 slots; unwritten slots are 0."""
    layout = WindowLayout(reference)
    assert layout.names == list(ALL_FEATURES)
    slots = np.zeros(layout.size, np.int64)
    slots[:3] = 3, 10_500_000, 12_000_000
    slots[layout.first_bin["brightness"] + 2] = 3
    slots[layout.first_bin["predicted_class"] + 1] = 3
    slots[layout.sum_slots["brightness"]] = 1_500_000
    window = layout.parse(9, slots.astype(">i8").tobytes())
    assert (window.id, window.n_images, window.start_s, window.end_s) == (9, 3, 10.5, 12.0)
    assert window.counts["brightness"][2] == 3 and window.counts["brightness"].sum() == 3
    assert window.counts["predicted_class"].tolist() == [0, 3, 0, 0]
    assert window.sums["brightness"] == 1.5 and window.sums["contrast"] == 0.0
    assert "predicted_class" not in window.sums
    short = layout.parse(9, slots[:4].astype(">i8").tobytes())  # a trailing slot never written
    assert short.n_images == 3 and short.counts["predicted_class"].sum() == 0
    assert layout.parse(9, None).n_images == 0


# ----------------------------------------------------------------------------- Redis


def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)
    return value


@pytest.fixture
def client(redis_server: Any) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(CollectorRegistry())


@pytest.fixture
def make_recorder(
    client: redis.Redis, manifest: Manifest, metrics: WorkerMetrics
) -> Iterator[Callable[..., DriftRecorder]]:
    made: list[DriftRecorder] = []

    def make(**kwargs: Any) -> DriftRecorder:
        options: dict[str, Any] = {"window_size": 100, "window_s": 3600.0, "metrics": metrics}
        options |= kwargs
        made.append(DriftRecorder(client, manifest, **options))
        return made[-1]

    yield make
    for recorder in made:
        recorder.close()


def send(recorder: DriftRecorder, features: np.ndarray, probs: np.ndarray) -> int:
    """One batch through a pipeline that also holds another command, as the worker's does."""
    pipe = recorder.redis.pipeline()
    pipe.set("imgq:test:result", "x")
    index = recorder.add_to_pipeline(pipe, features, probs)
    count = int(pipe.execute()[index])
    recorder.after_pipeline(count)
    return count


def test_recorder_sums_batches_into_the_open_window(
    make_recorder: Callable[..., DriftRecorder], reference: ReferenceStats
) -> None:
    """Two batches: the window holds the summed bin counts, sums, and the image count."""
    recorder = make_recorder()
    rng = np.random.default_rng(7)
    (f1, p1), (f2, p2) = traffic(rng, 8), traffic(rng, 5)
    assert send(recorder, f1, p1) == 8
    assert send(recorder, f2, p2) == 13
    window = WindowLayout(reference).parse(0, recorder.redis.get(recorder.keys.open))
    expected = bin_counts(reference, all_features(np.vstack([f1, f2]), np.vstack([p1, p2])),
                          ALL_FEATURES)  # fmt: skip
    for name in ALL_FEATURES:
        assert window.counts[name].tolist() == expected[name].tolist(), name
    assert window.sums["brightness"] == pytest.approx(
        f1[:, BRIGHTNESS].sum() + f2[:, BRIGHTNESS].sum()
    )
    assert "predicted_class" not in window.sums
    assert window.n_images == 13 and window.start_s <= window.end_s


def test_recorder_bins_equal_shared_bin_counts_at_the_edges(
    make_recorder: Callable[..., DriftRecorder], reference: ReferenceStats
) -> None:
    """Values exactly on bin edges, far outside the reference, and NaN land in the same bins as
    shared.imagestats.bin_counts puts them (the recorder counts with its own faster pass)."""
    recorder = make_recorder()
    inner = [np.array(reference.features[n].edges[1:-1]) for n in IMAGE_FEATURES]
    rows = max(len(e) for e in inner)
    features = np.column_stack([np.resize(e, rows) for e in inner])
    features = np.vstack(
        [
            features,
            np.full(len(IMAGE_FEATURES), -1e9),
            np.full(len(IMAGE_FEATURES), 1e9),
            np.full(len(IMAGE_FEATURES), np.nan),
        ]
    )
    probs = np.tile([0.25, 0.25, 0.25, 0.25], (len(features), 1))
    send(recorder, features, probs)
    window = WindowLayout(reference).parse(0, recorder.redis.get(recorder.keys.open))
    expected = bin_counts(reference, all_features(features, probs), ALL_FEATURES)
    for name in ALL_FEATURES:
        assert window.counts[name].tolist() == expected[name].tolist(), name


def test_recorder_out_of_range_equals_shared_row_by_row(
    make_recorder: Callable[..., DriftRecorder], reference: ReferenceStats
) -> None:
    """The recorder's one-comparison-per-batch check names exactly the features that
    shared.imagestats.out_of_range names for each row: at the limits, beyond them, and NaN."""
    recorder = make_recorder()
    low = np.array([reference.features[n].low for n in IMAGE_FEATURES])
    high = np.array([reference.features[n].high for n in IMAGE_FEATURES])
    rng = np.random.default_rng(5)
    rows = [low, high, np.nextafter(low, -np.inf), np.nextafter(high, np.inf)]
    rows += [np.where(rng.random(len(low)) < 0.3, np.nan, (low + high) / 2) for _ in range(4)]
    rows += [low + (high - low) * rng.uniform(-0.2, 1.2, len(low)) for _ in range(40)]
    features = np.vstack(rows)
    expected = [out_of_range(reference, row, IMAGE_FEATURES) for row in features]
    assert recorder.out_of_range(features) == expected
    assert any(expected) and not all(expected)


def test_exactly_one_of_two_workers_closes_a_full_window(
    make_recorder: Callable[..., DriftRecorder], redis_server: Any, manifest: Manifest
) -> None:
    """Two recorders on separate connections race to close the same full window: one wins,
    the other closes nothing, and the next batch starts a new window."""
    first = make_recorder(window_size=10_000)
    second = DriftRecorder(redis.Redis.from_url(redis_server.url), manifest, window_size=10_000,
                           window_s=3600.0, metrics=WorkerMetrics(CollectorRegistry()))  # fmt: skip
    try:
        send(first, *traffic(np.random.default_rng(8), 120))
        barrier = threading.Barrier(2)
        closed: list[int | None] = []

        def close(recorder: DriftRecorder) -> None:
            barrier.wait()
            closed.append(recorder.close_window(min_images=100))

        threads = [threading.Thread(target=close, args=(r,)) for r in (first, second)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(closed, key=str) == [1, None]
        assert first.detector.layout.parse(1, first.redis.get(first.keys.window(1))).n_images == 120
        assert first.redis.ttl(first.keys.window(1)) > 0
        assert send(second, *traffic(np.random.default_rng(9), 4)) == 4
    finally:
        second.close()


def test_full_window_is_judged_in_the_background(
    make_recorder: Callable[..., DriftRecorder], metrics: WorkerMetrics
) -> None:
    """Filling the window makes the background thread close and judge it: the latest
    statistics appear in Redis and the window counter rises, with no alert on normal traffic."""
    recorder = make_recorder(window_size=100)
    rng = np.random.default_rng(10)
    for _ in range(4):
        send(recorder, *traffic(rng, 30))
    latest = json.loads(wait_for(lambda: recorder.redis.get(recorder.keys.latest)))
    assert latest["window"]["id"] == 1 and latest["window"]["n_images"] == 120
    shares = {"low_confidence_share", "out_of_range_share"}  # no calibration: no accuracy test
    assert {f["name"] for f in latest["features"]} == set(ALL_FEATURES) | shares
    assert not any(f["drifting"] for f in latest["features"])
    assert latest["tier"] == "ok" and latest["estimated_accuracy"] is None
    assert metrics.registry.get_sample_value(
        "imgq_drift_windows_total",
        {"model": "shapes", "drift_id": recorder.manifest.drift_id, "tier": "ok"}) == 1  # fmt: skip
    assert recorder.redis.xlen(recorder.keys.alerts) == 0


def test_old_window_closes_on_time(make_recorder: Callable[..., DriftRecorder]) -> None:
    """A window that never fills is closed once older than window_s, if it has enough images."""
    recorder = make_recorder(window_size=10_000, window_s=0.2, min_window_size=20)
    send(recorder, *traffic(np.random.default_rng(11), 25))
    latest = json.loads(wait_for(lambda: recorder.redis.get(recorder.keys.latest)))
    assert latest["window"]["n_images"] == 25


def test_closer_without_drop_leaves_a_small_window_open(
    make_recorder: Callable[..., DriftRecorder],
) -> None:
    """Too few images for ``min_images``: close_window (without drop_smaller, as the full
    closer calls it) leaves the window open, whatever its age."""
    recorder = make_recorder(window_size=10_000, min_window_size=20)
    send(recorder, *traffic(np.random.default_rng(12), 5))
    assert recorder.close_window(min_images=20) is None
    assert recorder.close_window(min_images=20, min_age_s=1e-6) is None
    assert recorder.detector.layout.parse(0, recorder.redis.get(recorder.keys.open)).n_images == 5
    with pytest.raises(ValueError, match="drop_smaller needs a min_age_s > 0, got 0.0"):
        recorder.close_window(min_images=20, drop_smaller=True)


def test_small_old_window_is_dropped_unjudged(
    make_recorder: Callable[..., DriftRecorder],
    metrics: WorkerMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (keys piling up): a window that never reaches min_window_size no longer
    lingers. Once older than window_s the time closer deletes it without judging it (no window
    id, no latest, no window counted) and says so once at INFO, then at DEBUG; the next batch
    starts a fresh window."""
    recorder = make_recorder(window_size=10_000, window_s=0.2, min_window_size=20)
    keys = recorder.keys

    def dropped() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", "") == "drift_window_dropped"]

    with caplog.at_level(logging.DEBUG, logger="imgq.drift"):
        send(recorder, *traffic(np.random.default_rng(12), 5))
        first = wait_for(dropped)[0]
        assert first.levelno == logging.INFO and first.n_images == 5  # type: ignore[attr-defined]
        assert "5 images after 0.2 s, fewer than the 20" in first.getMessage()
        assert not recorder.redis.exists(keys.open, keys.seq, keys.latest)
        assert send(recorder, *traffic(np.random.default_rng(13), 3)) == 3
        assert wait_for(lambda: len(dropped()) == 2)
        assert dropped()[1].levelno == logging.DEBUG
    assert not recorder.redis.exists(keys.seq, keys.latest, keys.window(1))
    assert not metrics.registry.get_sample_value("imgq_drift_windows_total", {"model": "shapes"})


def assert_ttl(client: redis.Redis, key: str, ttl_s: int) -> None:
    """``key`` exists and expires within ``ttl_s`` (and not much sooner: it was just set)."""
    assert ttl_s - 5 <= client.ttl(key) <= ttl_s, (key, client.ttl(key))


def test_batch_sets_the_ttl_of_the_open_window_and_thumbnails(
    make_recorder: Callable[..., DriftRecorder],
) -> None:
    """Each batch refreshes the open window's TTL inside its one EVAL; a stored thumbnail
    refreshes the list's. A model no longer served leaves nothing behind."""
    recorder = make_recorder(state_ttl_s=1000, thumbnails_per_s=1000.0)
    keys = recorder.keys
    send(recorder, *traffic(np.random.default_rng(20), 8))
    assert_ttl(recorder.redis, keys.open, 1000)
    recorder.redis.expire(keys.open, 10)
    send(recorder, *traffic(np.random.default_rng(21), 8))
    assert_ttl(recorder.redis, keys.open, 1000)
    pipe = recorder.redis.pipeline()
    recorder.add_out_of_range_thumbnail(pipe, np.zeros((8, 8, 3), np.uint8), ["brightness"])
    pipe.execute()
    assert_ttl(recorder.redis, keys.out_of_range, 1000)


def test_add_script_keeps_its_interface_without_a_ttl(client: redis.Redis) -> None:
    """_ADD_LUA still takes (images, pairs) alone, as before the TTL; then, or with a TTL of 0,
    the window's TTL is left as it was."""
    assert client.eval(_ADD_LUA, 1, "imgq:test:window", 3, "5 2 6 1") == 3
    assert client.eval(_ADD_LUA, 1, "imgq:test:window", 2, "5 1", 0) == 5
    assert client.ttl("imgq:test:window") == -1
    raw = np.frombuffer(client.get("imgq:test:window") or b"", ">i8")
    assert raw[0] == 5 and raw[5:7].tolist() == [3, 1]


def test_default_state_ttl_is_thirty_days(make_recorder: Callable[..., DriftRecorder]) -> None:
    """Without state_ttl_s the open window lives 30 days after its last batch."""
    recorder = make_recorder()
    send(recorder, *traffic(np.random.default_rng(22), 4))
    assert STATE_TTL_S == 30 * 86_400
    assert_ttl(recorder.redis, recorder.keys.open, STATE_TTL_S)


def test_judged_window_alert_clear_and_ack_set_ttls(
    client: redis.Redis, make_recorder: Callable[..., DriftRecorder]
) -> None:
    """After a window is judged with an alert, then a clear, then an acknowledgement, every key
    of the model has a TTL: closed windows window_ttl_s, the rest state_ttl_s, refreshed by
    each close (an alert open for weeks stays while the model is served) and by the ack."""
    recorder = make_recorder(window_size=100_000, state_ttl_s=1000, window_ttl_s=500)
    keys = recorder.keys
    rng = np.random.default_rng(23)
    send(recorder, *traffic(rng, 200, brightness=0.15))
    window_id = recorder.close_window(min_images=1)
    assert window_id == 1 and recorder.detector.evaluate(window_id) is not None
    assert_ttl(client, keys.window(1), 500)
    for key in (keys.seq, keys.latest, keys.alerts, keys.open_alerts):
        assert_ttl(client, key, 1000)
    # Still drifting: no write to the alert keys, but the close keeps them alive.
    for key in (keys.alerts, keys.open_alerts):
        client.expire(key, 10)
    send(recorder, *traffic(rng, 200, brightness=0.15))
    assert recorder.close_window(min_images=1) == 2
    assert recorder.detector.evaluate(2) is None
    for key in (keys.seq, keys.latest, keys.alerts, keys.open_alerts):
        assert_ttl(client, key, 1000)
    send(recorder, *traffic(rng, 200))
    assert recorder.close_window(min_images=1) == 3
    assert recorder.detector.evaluate(3) is None
    assert client.hlen(keys.open_alerts) == 0 and client.xlen(keys.alerts) == 2
    client.expire(keys.seq, 10)
    keys.ack(client, "1", "2024-01-01T00:00:00+00:00", ttl_s=2000)
    assert client.hget(keys.acked, "1") == b"2024-01-01T00:00:00+00:00"
    for key in (keys.acked, keys.seq, keys.latest, keys.alerts):
        assert_ttl(client, key, 2000)
    for key in client.scan_iter(keys.prefix + "*"):
        assert client.ttl(key) > 0, key


def test_keys_of_a_model_no_longer_served_expire(
    make_recorder: Callable[..., DriftRecorder],
) -> None:
    """With a short state_ttl_s, a judged window's state and an open window vanish on their
    own once the model stops being served."""
    recorder = make_recorder(window_size=100_000, state_ttl_s=2, window_ttl_s=1)
    send(recorder, *traffic(np.random.default_rng(24), 60, brightness=0.3))
    window_id = recorder.close_window(min_images=1)
    assert window_id is not None and recorder.detector.evaluate(window_id) is not None
    send(recorder, *traffic(np.random.default_rng(25), 5))
    assert recorder.redis.exists(recorder.keys.open, recorder.keys.alerts)
    wait_for(lambda: not list(recorder.redis.scan_iter(recorder.keys.prefix + "*")), 10.0)


def test_alerts_are_deduplicated_cleared_logged_and_counted(
    client: redis.Redis,
    manifest: Manifest,
    make_recorder: Callable[..., DriftRecorder],
    metrics: WorkerMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Shifted, shifted, normal, shifted windows: alert, nothing new, clear, alert again; each
    alert is in the stream, in one structured log line, and in the metrics."""
    recorder = make_recorder(window_size=100_000)
    detector = DriftDetector(client, manifest, metrics=metrics)
    keys = DriftKeys(manifest.drift_id)
    rng = np.random.default_rng(13)
    outcomes = []
    with caplog.at_level(logging.INFO, logger="imgq.drift"):
        for shift in (0.15, 0.15, 0.0, 0.15):
            send(recorder, *traffic(rng, 200, brightness=shift))
            window_id = recorder.close_window(min_images=1)
            assert window_id is not None
            outcomes.append(detector.evaluate(window_id))
    first, repeat, normal, again = outcomes
    assert first is not None and again is not None and repeat is None and normal is None
    assert first["id"] == "1" and again["id"] == "4"
    top = first["features"][0]
    assert top["feature"] == "brightness" and top["psi"] >= top["psi_floor"] == 0.1
    assert top["p_value"] <= top["p_threshold"] and top["summary"].startswith("mean 0.5")
    assert first["model"] == "shapes" and first["window"]["n_images"] == 200
    events = [json.loads(fields[b"json"]) for _, fields in client.xrange(keys.alerts)]
    assert [e["type"] for e in events] == ["alert", "clear", "alert"]
    assert events[1]["features"] == {"brightness": "1"}
    assert client.hgetall(keys.open_alerts) == {b"brightness": b"4"}
    alert_lines = [r for r in caplog.records if getattr(r, "event", "") == "drift_alert"]
    assert len(alert_lines) == 2 and alert_lines[0].drift["id"] == "1"  # type: ignore[attr-defined]
    assert "brightness" in alert_lines[0].getMessage()
    sample = metrics.registry.get_sample_value
    m = {"model": "shapes", "drift_id": manifest.drift_id}
    assert sample("imgq_drift_alerts_total", m | {"tier": "notice"}) == 2
    assert sample("imgq_drift_alerts_total", m | {"tier": "page"}) == 0
    features = m | {"feature": "brightness", "tier": "notice"}
    assert sample("imgq_drift_alert_features_total", features) == 2
    assert (
        sample(
            "imgq_drift_alerts_open",
            m | {"tier": "notice"},
        )
        == 1
    )
    assert (
        sample(
            "imgq_drift_alerts_open",
            m | {"tier": "page"},
        )
        == 0
    )
    assert (
        sample(
            "imgq_drift_windows_total",
            m | {"tier": "notice"},
        )
        == 3
    )
    assert (
        sample(
            "imgq_drift_psi",
            m | {"feature": "brightness"},
        )
        >= 0.1
    )


def test_out_of_range_and_thumbnails(
    make_recorder: Callable[..., DriftRecorder], reference: ReferenceStats
) -> None:
    """An extreme feature is named; its thumbnail is stored small, as JPEG, and rate-limited."""
    recorder = make_recorder(thumbnails_per_s=0.001)
    row = np.full(len(IMAGE_FEATURES), 0.5)
    assert recorder.out_of_range(row[None]) == [[]]
    row[BRIGHTNESS] = 5.0
    assert recorder.out_of_range(row[None]) == [["brightness"]]
    rgb = np.zeros((300, 150, 3), np.uint8)
    pipe = recorder.redis.pipeline()
    assert recorder.add_out_of_range_thumbnail(pipe, rgb, ["brightness"])
    assert not recorder.add_out_of_range_thumbnail(pipe, rgb, ["brightness"])
    pipe.execute()
    items = [json.loads(x) for x in recorder.redis.lrange(recorder.keys.out_of_range, 0, -1)]
    assert len(items) == 1 and items[0]["features"] == ["brightness"]
    jpeg = np.frombuffer(base64.b64decode(items[0]["jpeg_b64"]), np.uint8)
    assert cv2.imdecode(jpeg, cv2.IMREAD_COLOR).shape == (64, 32, 3)


def test_recorder_refuses_a_reference_without_drift_features(
    client: redis.Redis, manifest: Manifest
) -> None:
    """A bundle whose reference lacks features fails with a message naming them and the fix."""
    partial = ReferenceStats({n: f for n, f in manifest.reference.features.items()
                              if n not in OUTPUT_FEATURES}, 2000)  # fmt: skip
    bad = dataclasses.replace(manifest, reference=partial)
    with pytest.raises(ManifestError, match=r"lack \['predicted_class', 'confidence', 'margin'\]"):
        DriftRecorder(client, bad, window_size=100, window_s=60.0)


def test_recorder_refuses_a_reference_of_other_image_statistics(
    client: redis.Redis, manifest: Manifest
) -> None:
    """A reference computed by another version of the image statistics (an old bundle's manifest
    stores none: version 1) is refused with the fix, instead of alerting on every window."""
    stored = manifest.reference.to_dict()
    del stored["image_features_version"]
    old = dataclasses.replace(manifest, reference=ReferenceStats.from_dict(stored))
    assert old.reference.image_features_version == 1
    with pytest.raises(ManifestError, match="image statistics version 1; this imgq computes "):
        DriftRecorder(client, old, window_size=100, window_s=60.0)


def test_recorder_refuses_bad_settings(client: redis.Redis, manifest: Manifest) -> None:
    """Settings are checked when the recorder starts, with what was given."""
    with pytest.raises(ValueError, match="window_size must be an integer >= 1, got 0"):
        DriftRecorder(client, manifest, window_size=0, window_s=60.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        DriftRecorder(client, manifest, window_size=10, window_s=60.0, alpha=1.5)
    with pytest.raises(ValueError, match=r"state_ttl_s must be an integer >= 1 \(seconds\), got 0"):
        DriftRecorder(client, manifest, window_size=10, window_s=60.0, state_ttl_s=0)
    with pytest.raises(ValueError, match="state_ttl_s must be an integer >= 1"):
        DriftDetector(client, manifest, state_ttl_s=2.5)  # type: ignore[arg-type]
