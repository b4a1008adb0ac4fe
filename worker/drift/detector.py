"""The detector: judges each closed window against the training reference and keeps the alert
state, shared by all workers, in Redis (open alerts, the alert stream, the latest verdict).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from imgq.shared.manifest import Manifest
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
from imgq.worker.drift.statistics import (
    FeatureResult,
    alert_transitions,
    evaluate_window,
)
from imgq.worker.metrics import WorkerMetrics, process_metrics

__all__ = ["DriftDetector"]

log = logging.getLogger("imgq.drift")


class DriftDetector:
    """Judges closed windows and keeps the alert state, shared by all workers, in Redis.

    Args:
        redis_client: Client of the broker's Redis.
        manifest: The served model's manifest (reference statistics, labels, name, hash).
        alpha: Family-wise false-alarm probability per window. Defaults to 0.001
            (see docs/drift.md).
        psi_floor: Smallest PSI that may alert. Defaults to 0.1.
        state_ttl_s: Seconds the model's alert state (``latest``, ``alerts``, ``open_alerts``)
            lives after its last write. Defaults to :data:`STATE_TTL_S` (30 days).
        metrics: Where to export. Defaults to this process's :func:`process_metrics`.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        manifest: Manifest,
        *,
        alpha: float = 0.001,
        psi_floor: float = 0.1,
        state_ttl_s: int = STATE_TTL_S,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if not psi_floor >= 0.0:
            raise ValueError(f"psi_floor must be >= 0, got {psi_floor!r}")
        _check_ttl("state_ttl_s", state_ttl_s)
        self.redis = redis_client
        self.manifest = manifest
        self.keys = DriftKeys(manifest.drift_id)
        self.alpha = alpha
        self.psi_floor = psi_floor
        self.state_ttl_s = state_ttl_s
        self.metrics = metrics or process_metrics()
        self.layout = WindowLayout(manifest.reference)

    def evaluate(self, window_id: int) -> dict[str, Any] | None:
        """Judge closed window ``window_id``: store its statistics as the latest, open alerts
        for newly drifting features, clear those that stopped, log and export metrics.

        Returns:
            The new alert (as stored and logged), or None when nothing new drifted.
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
        )
        latest = {
            "model": self.manifest.name,
            "model_sha256": self.manifest.model_sha256,
            "window": window.to_dict(),
            "alpha": self.alpha,
            "psi_floor": self.psi_floor,
            "evaluated_at": _iso(time.time()),
            "features": [r.to_dict() | {"counts": window.counts[r.name].tolist()} for r in results],
        }
        # Optimistic transaction on the open-alert hash: if another worker judges a window at the
        # same moment, EXEC fails and this re-reads the state that worker left.
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.keys.open_alerts)
                    alert, clear = self._transition(pipe, window, results, latest)
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
                "drift alert on model %s: %s",
                self.manifest.name,
                "; ".join(
                    f"{f['feature']} {f['summary']} (PSI {f['psi']:.2f})" for f in alert["features"]
                ),
                extra={"event": "drift_alert", "drift": alert},
            )
        self._export(results, alert)
        return alert

    def _transition(
        self, pipe: Any, window: Window, results: list[FeatureResult], latest: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Inside the transaction: store the latest statistics, open new alerts, clear ended
        ones. Returns the alert and clear events written (None when there is none)."""
        open_alerts = {_text(k): _text(v) for k, v in pipe.hgetall(self.keys.open_alerts).items()}
        new, cleared = alert_transitions(open_alerts, results)
        alert = clear = None
        ttl_s = self.state_ttl_s
        pipe.multi()
        pipe.set(self.keys.latest, json.dumps(latest), ex=ttl_s)
        pipe.lpush(self.keys.verdicts, json.dumps(latest))
        pipe.ltrim(self.keys.verdicts, 0, 499)
        pipe.expire(self.keys.verdicts, ttl_s)
        if new:
            alert = {
                "type": "alert",
                "id": str(window.id),
                "model": self.manifest.name,
                "model_sha256": self.manifest.model_sha256,
                "window": window.to_dict(),
                "features": [_alert_feature(r) for r in new],
                "still_open": sorted(open_alerts.keys() - set(cleared)),
                "time": _iso(time.time()),
            }
            pipe.xadd(
                self.keys.alerts, {"json": json.dumps(alert)}, maxlen=ALERTS_KEPT, approximate=True
            )
            pipe.hset(self.keys.open_alerts, mapping={r.name: str(window.id) for r in new})
        if cleared:
            clear = {
                "type": "clear",
                "window": window.to_dict(),
                "time": _iso(time.time()),
                "features": {f: open_alerts[f] for f in cleared},
            }
            pipe.xadd(
                self.keys.alerts, {"json": json.dumps(clear)}, maxlen=ALERTS_KEPT, approximate=True
            )
            pipe.hdel(self.keys.open_alerts, *cleared)
        if new or cleared:
            pipe.expire(self.keys.alerts, ttl_s)
            pipe.expire(self.keys.open_alerts, ttl_s)  # a no-op when the last one cleared
        return alert, clear

    def _export(self, results: list[FeatureResult], alert: dict[str, Any] | None) -> None:
        """Prometheus: PSI per feature, windows judged, alerts raised and open now."""
        model = self.manifest.name
        for r in results:
            self.metrics.drift_psi.labels(model=model, feature=r.name).set(r.psi)
        self.metrics.drift_windows.labels(model=model).inc()
        for f in alert["features"] if alert else ():
            self.metrics.drift_alerts.labels(model=model, feature=f["feature"]).inc()
        self.metrics.drift_alerts_open.labels(model=model).set(
            self.redis.hlen(self.keys.open_alerts)
        )


def _alert_feature(r: FeatureResult) -> dict[str, Any]:
    """One drifted feature as it appears in an alert."""
    return {
        "feature": r.name,
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
