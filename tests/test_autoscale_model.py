"""bench/autoscale_model.py against hand-computed cases: the HPA's replica arithmetic (tolerance,
rate policies, stabilisation windows) and KEDA's scale from and to zero."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "autoscale_model.py"
_spec = importlib.util.spec_from_file_location("autoscale_model", _PATH)
assert _spec is not None and _spec.loader is not None
model = importlib.util.module_from_spec(_spec)
sys.modules["autoscale_model"] = model  # dataclasses look their module up by name
_spec.loader.exec_module(model)

UP = model.Rules(0, (model.Policy("Percent", 100, 15), model.Policy("Pods", 4, 15)))
DOWN = model.Rules(300, (model.Policy("Percent", 20, 60), model.Policy("Pods", 1, 60)))


@pytest.mark.parametrize(
    ("current", "metric", "expected"),
    [
        (4, 1000.0, 10),  # 1000 / 100 per pod
        (4, 435.0, 4),  # ratio 1.0875: within the tolerance, no change
        (4, 450.0, 5),  # ratio 1.125: ceil(4.5)
        (4, 360.0, 4),  # ratio 0.9: no change
        (4, 350.0, 4),  # ratio 0.875: ceil(3.5) = 4
        (4, 250.0, 3),
        (1, 0.0, 0),  # the HPA's floor (1) comes later
    ],
)
def test_raw_desired(current: int, metric: float, expected: int) -> None:
    assert model.raw_desired(current, metric, 100.0, 0.1) == expected


def test_scale_up_is_limited_per_period_then_by_max_replicas() -> None:
    """From 2 pods asked to go to 20: max(double, +4) per 15 s: 6, 12, then 24 capped at 20."""
    hpa = model.Hpa(model.Settings(target=100, up=UP, down=DOWN, max_replicas=20))
    assert hpa.step(0, 2, 2000) == 6
    assert hpa.step(5, 6, 2000) == 6  # the 4 added at t=0 are inside this period
    assert hpa.step(15, 6, 2000) == 12
    assert hpa.step(30, 12, 2000) == 20
    assert hpa.step(45, 20, 2000) == 20


def test_scale_down_waits_for_the_window_then_goes_by_the_larger_policy() -> None:
    """At 20 pods the load drops to a tenth: the highest recommendation of the last 300 s (20)
    holds until t=345; then max(20%, 1 pod) per 60 s: 20 -> 16, held for the period, -> 12."""
    hpa = model.Hpa(model.Settings(target=100, up=UP, down=DOWN, max_replicas=20))
    replicas, seen = 20, {}
    for t in range(0, 406, 15):
        replicas = hpa.step(t, replicas, 2000 if t <= 45 else 200)
        seen[t] = replicas
    assert all(seen[t] == 20 for t in range(0, 331, 15))
    assert seen[345] == 16  # int(20 * 0.8) = 16 against 20 - 1 = 19: the larger change
    assert seen[360] == seen[375] == seen[390] == 16  # the 4 removed at 345 fill the period
    assert seen[405] == 12  # int(16 * 0.8)


def test_select_policy_min_takes_the_smaller_change() -> None:
    down = model.Rules(0, (model.Policy("Percent", 50, 60), model.Policy("Pods", 1, 60)), "Min")
    hpa = model.Hpa(model.Settings(target=100, up=UP, down=down, max_replicas=20))
    assert hpa.step(0, 10, 100) == 9  # Pods: 9, Percent: 5; Min keeps the most pods


def test_keda_wakes_from_zero_and_returns_to_zero() -> None:
    """One cohort of tasks at t=0 on an idle fleet: KEDA's first look (t=0.5, the end of the
    first step) asks for a pod, which drains after its 10 s start-up; after the cooldown
    (300 s from the last look that saw work) the fleet is back to zero."""
    settings = model.Settings(target=100, up=UP, down=DOWN, cooldown_s=300)
    arrivals = [50.0] + [0.0] * 1399  # 700 s in steps of 0.5 s
    r = model.simulate(arrivals, 0.5, rate=100.0, startup_s=10.0, settings=settings)
    assert r.tasks == 50 and r.max_pods == 1
    assert r.wait_max_s == pytest.approx(10.5)  # asked at 0.5, drains at 10.5; arrived at 0.25
    # Looks (and scrapes) at 0.5, 15, 30, ...: active at 0.5 only (the scrape at 15 saw the
    # queue empty); the look at 315 is the first 300 s past it: the pod lived 0.5 -> 315.
    assert r.worker_minutes == pytest.approx(314.5 / 60)
    assert r.scale_changes == 2


def test_fixed_fleet_never_changes() -> None:
    r = model.simulate([200.0] * 10, 1.0, rate=100.0, startup_s=5.0, settings=None, fixed_pods=2)
    assert r.scale_changes == 0 and r.max_pods == 2 and r.wait_max_s == 0.0
