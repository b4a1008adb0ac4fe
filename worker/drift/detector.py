"""The detector: judges each closed window against the training reference and keeps the alert
state, shared by all workers, in Redis (open alerts, the alert stream, the latest verdict and
the verdict history).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import orjson
import redis

from imgq.shared.manifest import Manifest
from imgq.worker.drift.harm import AccuracyTest
from imgq.worker.drift.layout import (
    ALERTS_KEPT,
    STATE_TTL_S,
    DriftKeys,
    Window,
    WindowLayout,
    _check_ttl,
    _iso,
    _text,
)
from imgq.worker.drift.statistics import FeatureResult
from imgq.worker.drift.verdict import (
    ALERT_TIERS,
    NOTICE_ALPHA,
    PAGE_ALPHA,
    alert_transitions,
    evaluate_window,
    window_tier,
)
from imgq.worker.metrics import WorkerMetrics, process_metrics

__all__ = ["DriftDetector"]

log = logging.getLogger("imgq.drift")


class DriftDetector:
    """Judges closed windows and keeps the alert state, shared by all workers, in Redis.

    Args:
        redis_client: Client of the broker's Redis.
        manifest: The served model's manifest (reference statistics, labels, name, hash).
        alpha: The notice tier's family-wise false-alarm probability per window. Defaults to
            :data:`NOTICE_ALPHA` (see docs/drift.md).
        psi_floor: Smallest PSI of an image feature that may alert. Defaults to 0.1.
        page_alpha: The page tier's family-wise false-alarm probability per window. Defaults
            to :data:`PAGE_ALPHA`.
        state_ttl_s: Seconds the model's alert state (``latest``, ``alerts``, ``open_alerts``)
            lives after its last write. Defaults to :data:`STATE_TTL_S` (30 days).
        metrics: Where to export. Defaults to this process's :func:`process_metrics`.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        manifest: Manifest,
        *,
        alpha: float = NOTICE_ALPHA,
        psi_floor: float = 0.1,
        page_alpha: float = PAGE_ALPHA,
        state_ttl_s: int = STATE_TTL_S,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        for name, value in (("alpha", alpha), ("page_alpha", page_alpha)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        if not psi_floor >= 0.0:
            raise ValueError(f"psi_floor must be >= 0, got {psi_floor!r}")
        _check_ttl("state_ttl_s", state_ttl_s)
        self.redis = redis_client
        self.manifest = manifest
        self.keys = DriftKeys(manifest.drift_id)
        self.alpha = alpha
        self.page_alpha = page_alpha
        self.psi_floor = psi_floor
        calibration = manifest.calibration
        self.accuracy_test = (
            AccuracyTest(calibration.held_out_confidence)
            if calibration is not None and len(calibration.held_out_confidence) >= 2
            else None
        )
        self.novel_reference = (
            manifest.novelty.held_out_novel if manifest.novelty is not None else None
        )
        self.state_ttl_s = state_ttl_s
        self.metrics = metrics or process_metrics()
        # Both tiers' counters exist at 0 from now on: a rule's increase() sees no page in a
        # series whose first scrape already counts it.
        for tier in ALERT_TIERS:
            self.metrics.drift_alerts.labels(
                model=manifest.name, drift_id=manifest.drift_id, tier=tier
            )
        self._psi_gauges: dict[str, Any] = {}
        self.layout = WindowLayout(manifest.reference)

    def prepare(self, window_size: int) -> None:
        """Compute now what judging a full window of ``window_size`` images needs (the
        estimated-accuracy test's resampled null distribution). With a novelty model, every
        full window is judged on that one (:class:`AccuracyTest`'s ``window_cap``); without,
        each window size has its own, as before novelty."""
        if self.accuracy_test is None:
            return
        if self.manifest.novelty is not None:
            self.accuracy_test.window_cap = window_size
        self.accuracy_test.p_value(self.accuracy_test.reference_mean, window_size)

    def evaluate(self, window_id: int) -> dict[str, Any] | None:
        """Judge closed window ``window_id``: store its verdict as the latest and in the
        history, open an alert (with its tier) when the window alerts and none of its tier is
        open, add newly drifting features to an open one, clear those that stopped, log and
        export metrics.

        Returns:
            The new alert (as stored and logged), or None when none opened.
        """
        raw = self.redis.get(self.keys.window(window_id))
        if not isinstance(raw, bytes) or not raw:  # bytes: clients here never decode responses
            log.warning("drift window %s of %s is gone (expired?)", window_id, self.keys.prefix)
            return None
        reference = self.manifest.reference
        window = self.layout.parse(window_id, raw)
        results = evaluate_window(
            reference,
            window,
            alpha=self.alpha,
            psi_floor=self.psi_floor,
            labels=self.manifest.labels,
            page_alpha=self.page_alpha,
            accuracy_test=self.accuracy_test,
            novel_reference=self.novel_reference,
        )
        estimated = self.estimated_accuracy(window)
        latest = {
            "model": self.manifest.name,
            "model_sha256": self.manifest.model_sha256,
            "window": window.to_dict(),
            "tier": window_tier(results),
            "estimated_accuracy": estimated,
            "alpha": self.alpha,
            "page_alpha": self.page_alpha,
            "psi_floor": self.psi_floor,
            "evaluated_at": _iso(time.time()),
            "features": [r.to_dict() | {"counts": _counts(window, r)} for r in results],
        }
        # Optimistic transaction on the open-alert hash: if another worker judges a window at the
        # same moment, EXEC fails and this re-reads the state that worker left.
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.keys.open_alerts)
                    alert, clear, still_open = self._transition(pipe, window, results, latest)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if clear is not None:
            log.info(
                "drift cleared on model %s: %s",
                self.manifest.name,
                ", ".join(clear["features"]),
                extra={"event": "drift_cleared", "model": self.manifest.name, "drift": clear},
            )
        if alert is not None:
            log.warning(
                "drift %s on model %s: %s",
                alert["tier"],
                self.manifest.name,
                "; ".join(
                    f"{f['feature']} {f['summary']} (PSI {f['psi']:.2f})" for f in alert["features"]
                ),
                extra={"event": "drift_alert", "drift": alert},
            )
        self._export(results, latest, alert, still_open)
        return alert

    def estimated_accuracy(self, window: Window) -> float | None:
        """Mean calibrated top-1 probability of the window's answers (CBPE), or None when the
        bundle has no calibration or the window no answers."""
        n = int(window.counts["confidence"].sum()) if "confidence" in window.counts else 0
        if self.manifest.calibration is None or n == 0:
            return None
        return round(window.calibrated_confidence_sum / n, 6)

    def _transition(
        self, pipe: Any, window: Window, results: list[FeatureResult], latest: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, str]]:
        """Inside the transaction: store the latest statistics, open new alerts, clear ended
        ones. Returns the alert and clear events written (None when there is none) and the
        open-alert map as the transaction leaves it."""
        open_alerts = {_text(k): _text(v) for k, v in pipe.hgetall(self.keys.open_alerts).items()}
        change = alert_transitions(open_alerts, results)
        alert = clear = None
        ttl_s = self.state_ttl_s
        pipe.multi()
        verdict = _json(latest)
        pipe.set(self.keys.latest, verdict, ex=ttl_s)
        pipe.lpush(self.keys.verdicts, verdict)
        pipe.ltrim(self.keys.verdicts, 0, 499)
        pipe.expire(self.keys.verdicts, ttl_s)
        if change.tier is not None:
            alert = {
                "type": "alert",
                "id": str(window.id),
                "tier": change.tier,
                "model": self.manifest.name,
                "model_sha256": self.manifest.model_sha256,
                "window": window.to_dict(),
                "estimated_accuracy": latest["estimated_accuracy"],
                "features": [_alert_feature(r) for r in change.new],
                "still_open": sorted(open_alerts.keys() - set(change.cleared)),
                "time": _iso(time.time()),
            }
            pipe.xadd(
                self.keys.alerts, {"json": _json(alert)}, maxlen=ALERTS_KEPT, approximate=True
            )
        opened = {f: str(window.id) for f in change.opened} | change.joined
        if opened:
            pipe.hset(self.keys.open_alerts, mapping=opened)
        if change.cleared:
            clear = {
                "type": "clear",
                "window": window.to_dict(),
                "time": _iso(time.time()),
                "features": {f: open_alerts[f] for f in change.cleared},
            }
            pipe.xadd(
                self.keys.alerts, {"json": _json(clear)}, maxlen=ALERTS_KEPT, approximate=True
            )
            pipe.hdel(self.keys.open_alerts, *change.cleared)
        if alert or opened or clear:
            pipe.expire(self.keys.alerts, ttl_s)
            pipe.expire(self.keys.open_alerts, ttl_s)  # a no-op when the last one cleared
        still_open = {f: i for f, i in open_alerts.items() if f not in change.cleared} | opened
        return alert, clear, still_open

    def _export(
        self,
        results: list[FeatureResult],
        latest: dict[str, Any],
        alert: dict[str, Any] | None,
        open_alerts: dict[str, str],
    ) -> None:
        """Prometheus: PSI per feature, windows judged by tier, alerts raised by tier, open
        alerts by tier (``open_alerts``: the map the transaction left), and the estimated
        accuracy."""
        model, drift_id = self.manifest.name, self.manifest.drift_id
        psi = self._psi_gauges
        for r in results:
            if r.name not in psi:  # a child per feature, made once: labels() costs each window
                psi[r.name] = self.metrics.drift_psi.labels(
                    model=model, drift_id=drift_id, feature=r.name
                )
            psi[r.name].set(r.psi)
        self.metrics.drift_windows.labels(model=model, drift_id=drift_id, tier=latest["tier"]).inc()
        if alert is not None:
            tier = alert["tier"]
            self.metrics.drift_alerts.labels(model=model, drift_id=drift_id, tier=tier).inc()
            for f in alert["features"]:
                self.metrics.drift_alert_features.labels(
                    model=model, drift_id=drift_id, feature=f["feature"], tier=tier
                ).inc()
        if latest["estimated_accuracy"] is not None:
            self.metrics.drift_estimated_accuracy.labels(model=model, drift_id=drift_id).set(
                latest["estimated_accuracy"]
            )
        tiers = {r.name: r.tier for r in results}
        by_tier: dict[str, set[str]] = {tier: set() for tier in ALERT_TIERS}
        for feature, alert_id in open_alerts.items():
            by_tier[tiers.get(feature, "notice")].add(alert_id)
        by_tier["notice"] -= by_tier["page"]  # an alert with a page feature is a page
        for tier, ids in by_tier.items():
            self.metrics.drift_alerts_open.labels(model=model, drift_id=drift_id, tier=tier).set(
                len(ids)
            )


def _json(value: Any) -> bytes:
    """A verdict or alert as JSON at orjson's speed (a window's verdict is ~20 kB), numpy's
    floats as numbers; what orjson refuses, the standard library writes."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value).encode()


def _counts(window: Window, r: FeatureResult) -> list[int]:
    """The window's counts behind a verdict: its bins, or ``[in, out]`` of a share test."""
    if r.name in window.counts:
        return [int(c) for c in window.counts[r.name]]
    if r.test == "fisher" and r.current is not None:
        k = round(r.statistic)
        return [k, r.n - k]
    return []


def _alert_feature(r: FeatureResult) -> dict[str, Any]:
    """One drifted feature as it appears in an alert."""
    return {
        "feature": r.name,
        "tier": r.tier,
        "test": r.test,
        "alternative": r.alternative,
        "effect": r.psi if r.effect is None else round(r.effect, 4),
        "effect_floor": r.psi_floor if r.effect_floor is None else r.effect_floor,
        "psi": round(r.psi, 4),
        "psi_floor": r.psi_floor,
        "chi2": round(r.statistic, 2),
        "dof": r.dof,
        "p_value": r.p_value,
        "p_threshold": r.p_threshold,
        "reference": r.reference,
        "current": r.current,
        "summary": r.summary,
    }
