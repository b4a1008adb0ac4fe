"""A model of KEDA driving a HorizontalPodAutoscaler, and of a queue drained by the pods it
makes: what ``bench/autoscale.py`` replays arrival traces through.

The HPA part follows the controller's replica calculation for an external metric with an
``AverageValue`` target (what KEDA's Prometheus trigger gives it): desired = ceil(metric /
target) unless metric / (target x current) is within the tolerance of 1; then the behaviour:
the stabilisation windows (the lowest recommendation of the scale-up window, the highest of the
scale-down window) and the rate policies (Pods or Percent per period, counted from the scale
events inside the period, combined by selectPolicy). KEDA adds what the HPA cannot do: from 0
to 1 when the metric passes the activation threshold, and back to 0 after cooldownPeriod
without activity, each at its polling interval.

The queue is a fluid FIFO: arrivals in cohorts per step, each ready pod drains ``rate`` tasks
per second; a task's wait is from its arrival to the step that takes it. Pods count from the
moment they are asked for (a starting pod holds its core) until they are removed; they drain
only after ``startup_s``. Prometheus scrapes the backlog every ``scrape_s``; KEDA and the HPA
read the last scrape.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Hpa", "Policy", "Rules", "Settings", "SimResult", "raw_desired", "simulate"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """One HPA scaling policy: at most ``value`` pods (``Pods``) or percent (``Percent``) of
    change within any ``period_s``."""

    kind: str
    value: int
    period_s: int


@dataclasses.dataclass(frozen=True)
class Rules:
    """``behavior.scaleUp`` or ``behavior.scaleDown``."""

    window_s: int
    policies: tuple[Policy, ...]
    select: str = "Max"


@dataclasses.dataclass(frozen=True)
class Settings:
    """A ScaledObject's scaling settings, and the timings around it."""

    target: float
    up: Rules
    down: Rules
    activation: float = 0.0
    polling_s: float = 15.0
    cooldown_s: float = 300.0
    min_replicas: int = 0
    max_replicas: int = 20
    tolerance: float = 0.1
    hpa_sync_s: float = 15.0
    scrape_s: float = 15.0
    #: A second trigger: tasks served per second (``rate(imgq_tasks_total[1m])``) per pod; the
    #: HPA follows whichever trigger asks for more pods. None: the backlog trigger alone.
    throughput_target: float | None = None
    rate_window_s: float = 60.0


def raw_desired(current: int, metric: float, target: float, tolerance: float) -> int:
    """The HPA's replica count for an external metric with an AverageValue target.

    >>> raw_desired(4, 1000.0, 200.0, 0.1)   # 1000 / 200 = 5 pods
    5
    >>> raw_desired(4, 840.0, 200.0, 0.1)    # ratio 1.05: within the tolerance, stays
    4
    """
    ratio = metric / (target * current)
    if abs(1.0 - ratio) <= tolerance:
        return current
    return math.ceil(metric / target)


class Hpa:
    """The HPA controller's state for one target: recommendations and scale events."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.recommendations: list[tuple[float, int]] = []
        self.up_events: list[tuple[float, int]] = []
        self.down_events: list[tuple[float, int]] = []

    def _stabilised(self, now: float, current: int, desired: int) -> int:
        up_rec = down_rec = desired
        for at, rec in self.recommendations:
            if at > now - self.s.up.window_s:
                up_rec = min(up_rec, rec)
            if at > now - self.s.down.window_s:
                down_rec = max(down_rec, rec)
        longest = max(self.s.up.window_s, self.s.down.window_s)
        self.recommendations = [(a, r) for a, r in self.recommendations if a > now - longest]
        self.recommendations.append((now, desired))
        return min(max(current, up_rec), down_rec)

    @staticmethod
    def _changed(events: list[tuple[float, int]], now: float, period_s: int) -> int:
        return sum(change for at, change in events if at > now - period_s)

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.s.up
        if rules.select == "Disabled":
            return current
        pick = min if rules.select == "Min" else max
        proposals = []
        for p in rules.policies:
            start = current - self._changed(self.up_events, now, p.period_s)
            if p.kind == "Pods":
                proposals.append(start + p.value)
            else:
                proposals.append(math.ceil(start * (1 + p.value / 100)))
        return pick(proposals)

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.s.down
        if rules.select == "Disabled":
            return current
        pick = max if rules.select == "Min" else min
        proposals = []
        for p in rules.policies:
            start = current + self._changed(self.down_events, now, p.period_s)
            if p.kind == "Pods":
                proposals.append(start - p.value)
            else:
                proposals.append(int(start * (1 - p.value / 100)))
        return pick(proposals)

    def step(self, now: float, current: int, metric: float, throughput: float = 0.0) -> int:
        """The replica count one sync sets (``current`` > 0), and the event it records; with
        two triggers, the larger of their proposals (as the HPA does with several metrics)."""
        s = self.s
        proposal = raw_desired(current, metric, s.target, s.tolerance)
        if s.throughput_target is not None:
            by_rate = raw_desired(current, throughput, s.throughput_target, s.tolerance)
            proposal = max(proposal, by_rate)
        desired = self._stabilised(now, current, proposal)
        floor, ceiling = max(1, s.min_replicas), s.max_replicas
        if desired > current:
            limit = min(max(self._up_limit(now, current), current), ceiling)
            desired = min(desired, limit)
        elif desired < current:
            limit = max(min(self._down_limit(now, current), current), floor)
            desired = max(desired, limit)
        if desired > current:
            self.up_events.append((now, desired - current))
        elif desired < current:
            self.down_events.append((now, current - desired))
        horizon = max([p.period_s for p in (*s.up.policies, *s.down.policies)], default=0)
        self.up_events = [e for e in self.up_events if e[0] > now - horizon]
        self.down_events = [e for e in self.down_events if e[0] > now - horizon]
        return desired


@dataclasses.dataclass
class SimResult:
    """What one replay gives."""

    wait_p50_s: float
    wait_p99_s: float
    wait_max_s: float
    worker_minutes: float
    max_pods: int
    scale_changes: int
    tasks: int
    left_s: float


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, q * cumulative[-1]))
    return float(values[order][min(index, len(order) - 1)])


def simulate(
    arrivals: Sequence[float] | np.ndarray,
    dt: float,
    rate: float,
    startup_s: float,
    settings: Settings | None,
    fixed_pods: int = 0,
    phase_s: float = 0.0,
    warmup_steps: int = 0,
    batch: int = 32,
) -> SimResult:
    """Replay ``arrivals`` (tasks arriving in each step of ``dt`` seconds) through a fleet that
    ``settings`` scales (or ``fixed_pods`` pods, started before the trace, when ``settings`` is
    None), each pod draining ``rate`` tasks/s once ``startup_s`` after it was asked for.
    ``phase_s`` offsets the scrape, sync and polling clocks from the trace's start. Runs on
    after the trace until the queue is empty; the first ``warmup_steps`` steps only bring the
    fleet to the state the trace finds it in (nothing of them is counted).

    The backlog Prometheus scrapes is the queue plus the tasks in flight: a busy worker holds a
    batch in hand and one taken ahead, up to ``2 x batch``, each in flight about a batch's
    serving time (``batch / rate``), so in flight = served per second x ``2 x batch / rate``,
    at most ``2 x batch`` per ready pod (Little's law)."""
    pods: list[float] = [-1e9] * fixed_pods  # the time each pod was asked for
    hpa = Hpa(settings) if settings is not None else None
    queue: collections.deque[list[float]] = collections.deque()  # [arrived at, tasks]
    backlog = 0.0
    waits: list[float] = []
    served: list[float] = []
    scraped = 0.0
    served_total = 0.0
    counter_samples: collections.deque[tuple[float, float]] = collections.deque()
    throughput = 0.0
    last_active = -math.inf
    next_scrape = next_sync = next_poll = phase_s
    pod_seconds = 0.0
    max_pods = len(pods)
    changes = 0
    n = len(arrivals)
    step = 0
    while step < n or backlog > 1e-9:
        now = step * dt
        counted = step >= warmup_steps
        if step < n and arrivals[step] > 0:
            queue.append([now + dt / 2, float(arrivals[step])])
            backlog += float(arrivals[step])
        pod_seconds += len(pods) * dt * counted
        ready = sum(now - asked >= startup_s for asked in pods)
        capacity = ready * rate * dt
        served_before = served_total
        while capacity > 1e-12 and queue:
            head = queue[0]
            take = min(capacity, head[1])
            if head[0] >= warmup_steps * dt:
                waits.append(max(0.0, now + dt / 2 - head[0]))
                served.append(take)
            head[1] -= take
            capacity -= take
            backlog -= take
            served_total += take
            if head[1] <= 1e-12:
                queue.popleft()
        step += 1
        if step > n + 86400 / dt:
            break  # a fleet that never drains: reported by left_s
        now = step * dt  # scrapes and decisions at the end of the step, for the next
        if settings is None or hpa is None:
            continue
        if now >= next_scrape:
            in_flight = min(
                (served_total - served_before) / dt * 2 * batch / rate, ready * 2 * batch
            )
            scraped, next_scrape = backlog + in_flight, next_scrape + settings.scrape_s
            counter_samples.append((now, served_total))
            while counter_samples[0][0] < now - settings.rate_window_s:
                counter_samples.popleft()
            first_at, first = counter_samples[0]
            throughput = (served_total - first) / max(now - first_at, settings.scrape_s)
        wanted = len(pods)
        if now >= next_poll:  # KEDA's own loop: activation and scale to zero
            next_poll += settings.polling_s
            rate_active = settings.throughput_target is not None and throughput > 0
            if scraped > settings.activation or rate_active:
                last_active = now
                if not pods:
                    wanted = max(1, settings.min_replicas)
            elif pods and settings.min_replicas == 0 and now - last_active >= settings.cooldown_s:
                wanted = 0
        if now >= next_sync:
            next_sync += settings.hpa_sync_s
            if pods and wanted == len(pods):
                wanted = hpa.step(now, len(pods), scraped, throughput)
        changes += wanted != len(pods) and counted
        if wanted > len(pods):
            pods += [now] * (wanted - len(pods))
        elif wanted < len(pods):
            pods.sort()  # the Deployment removes the newest (not yet ready first) pods
            del pods[wanted:]
        max_pods = max(max_pods, len(pods) * counted)
    w, q = np.asarray(waits), np.asarray(served)
    total = float(q.sum())
    return SimResult(
        wait_p50_s=_weighted_quantile(w, q, 0.50) if total else 0.0,
        wait_p99_s=_weighted_quantile(w, q, 0.99) if total else 0.0,
        wait_max_s=float(w.max()) if total else 0.0,
        worker_minutes=pod_seconds / 60,
        max_pods=max_pods,
        scale_changes=changes,
        tasks=int(round(total)),
        left_s=max(0.0, step * dt - n * dt),
    )
