"""Drift: every worker's input and output statistics summed per window in Redis, a detector that
compares each closed window with the training reference, and de-duplicated alerts.

The three parts, and where they run::

    hot path (per batch)       DriftRecorder.add_to_pipeline: bin counts of the batch, summed
                               locally with numpy, go into the model's *open window* with ONE
                               EVAL (one BITFIELD) inside the batch's pipeline (no extra round trip)
    background thread          DriftRecorder closes the open window when it is full (count) or old
                               (time) with an atomic Lua RENAME, so exactly one worker closes it,
                               then DriftDetector.evaluate judges it
    pure statistics            psi, chi2_homogeneity, holm, evaluate_window, alert_transitions:
                               numpy/scipy on count arrays, unit tested without Redis

Windows hold the summed traffic of *all* workers of one model, because fixed bins merge by
addition (see :mod:`shared.imagestats`). Why these statistics is written up in ``docs/drift.md``:
per feature, a chi-square test of homogeneity between the reference counts and the window counts,
Holm's correction across features, and a PSI floor so that a large window does not alert on a
difference too small to matter. Alert = significant after correction AND PSI >= the floor.

Redis keys, all under ``imgq:drift:<sha12>:`` (see :class:`DriftKeys`): ``window`` (string of
i64 slots, :class:`WindowLayout`: the open window), ``seq`` (window ids), ``window:<id>`` (closed
windows, expire after a day), ``latest`` (JSON:
the last evaluated window's statistics), ``alerts`` (stream of alert and clear events),
``open_alerts`` (hash: feature -> id of its open alert), ``acked`` (hash: alert id -> time), and
``out_of_range`` (list: recent out-of-range thumbnails for the report).

None of them outlives its model: every key but the closed windows expires ``state_ttl_s``
(30 days) after the model was last served or reviewed. Each write refreshes the key it writes
(the open window on every batch, inside the batch's one EVAL); each window closed, judged or
dropped, and each acknowledgement refresh them all, so the state of a model still in use (an
alert open for weeks, an acknowledgement) stays while that of a retired model goes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import redis
from scipy.special import chdtrc

from imgq.shared.errors import ManifestError
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    IMAGE_FEATURES_VERSION,
    OUTPUT_FEATURES,
    RangeCheck,
    ReferenceStats,
    output_features,
)
from imgq.shared.manifest import Manifest
from imgq.worker.metrics import WorkerMetrics, process_metrics
from imgq.worker.settle import WindowCounts

__all__ = [
    "ALL_FEATURES",
    "DriftKeys",
    "DriftRecorder",
    "DriftDetector",
    "FeatureResult",
    "Window",
    "psi",
    "chi2_homogeneity",
    "holm",
    "WindowLayout",
    "evaluate_window",
    "alert_transitions",
    "STATE_TTL_S",
]

log = logging.getLogger("imgq.drift")

#: Every feature a window counts: the image features, then the model-output features.
ALL_FEATURES: tuple[str, ...] = IMAGE_FEATURES + OUTPUT_FEATURES

#: A window's sums are stored as integers: this many per unit (exact to 1e-6 per batch).
SUM_SCALE = 1_000_000
#: Slots of a window's Redis string (see :class:`WindowLayout`).
_N_SLOT, _T0_SLOT, _T1_SLOT, _FIRST_BIN_SLOT = 0, 1, 2, 3

#: Largest side of a stored out-of-range thumbnail, pixels.
THUMBNAIL_PX = 64
#: How many recent out-of-range thumbnails Redis keeps per model.
THUMBNAILS_KEPT = 64
#: Alert stream length kept (approximate trim).
ALERTS_KEPT = 10_000
#: Default lifetime of a model's drift keys after it was last served or reviewed: 30 days.
STATE_TTL_S = 30 * 86_400

# --------------------------------------------------------------------------------------------
# Statistics on count arrays (pure).
# --------------------------------------------------------------------------------------------


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
    # The same as scipy.stats.chi2_contingency(table, correction=False) per row, 100x faster.
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
class Window:
    """One closed window: the summed counts of all workers' traffic over its span.

    Attributes:
        id: Window id (from the model's ``seq`` counter).
        n_images: Images counted.
        start_s: Server time (Unix seconds) of its first batch.
        end_s: Server time of its last batch.
        counts: Count per reference bin, per feature present.
        sums: Sum of the values per continuous feature, for the current mean.
    """

    id: int
    n_images: int
    start_s: float
    end_s: float
    counts: dict[str, np.ndarray]
    sums: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Summary for alerts and logs (no counts)."""
        return {
            "id": self.id,
            "n_images": self.n_images,
            "start": _iso(self.start_s),
            "end": _iso(self.end_s),
            "duration_s": round(self.end_s - self.start_s, 3),
        }


class WindowLayout:
    """Where each number of a window lives in its Redis string: signed 64-bit slots, addressed as
    ``BITFIELD key INCRBY i64 #slot`` does.

    Slot 0 is the image count, 1 and 2 the server time (µs) of the first and last batch, then the
    bins of every feature in :data:`ALL_FEATURES` order (those the reference has), then the sums
    of the continuous features in fixed point (:data:`SUM_SCALE` per unit), for the current mean.
    Every worker derives the same layout from the same reference. One ``BITFIELD`` of a batch's
    ~150 increments costs Redis a fraction of what ~150 ``HINCRBY`` on a hash did (~0.7 ms per
    batch, on the cores the workers share).

    >>> from shared.imagestats import build_reference
    >>> layout = WindowLayout(build_reference(np.arange(40.0)[:, None], ["brightness"], n_bins=4))
    >>> layout.first_bin, layout.sum_slots, layout.size
    ({'brightness': 3}, {'brightness': 7}, 8)
    >>> raw = np.array([5, 2_000_000, 3_500_000, 1, 0, 4, 0, 2_500_000], ">i8").tobytes()
    >>> w = layout.parse(9, raw)
    >>> w.n_images, w.start_s, w.end_s, w.counts["brightness"].tolist(), w.sums["brightness"]
    (5, 2.0, 3.5, [1, 0, 4, 0], 2.5)
    """

    def __init__(self, reference: ReferenceStats) -> None:
        features = reference.features
        self.names = [n for n in ALL_FEATURES if n in features]
        self.first_bin: dict[str, int] = {}
        slot = _FIRST_BIN_SLOT
        for name in self.names:
            self.first_bin[name] = slot
            slot += len(features[name].counts)
        self.sum_slots: dict[str, int] = {}
        for name in self.names:
            if not features[name].categorical:
                self.sum_slots[name] = slot
                slot += 1
        self.size = slot
        self._n_bins = {name: len(features[name].counts) for name in self.names}

    def parse(self, window_id: int, raw: bytes | None) -> Window:
        """The :class:`Window` stored in ``raw`` (the ``GET`` of a window's key; slots never
        written read as 0, a missing key as an empty window)."""
        values = np.zeros(self.size, np.int64)
        stored = np.frombuffer(raw or b"", ">i8")[: self.size]
        values[: len(stored)] = stored
        counts = {
            name: values[first : first + self._n_bins[name]].copy()
            for name, first in self.first_bin.items()
        }
        sums = {name: float(values[slot]) / SUM_SCALE for name, slot in self.sum_slots.items()}
        return Window(
            id=window_id,
            n_images=int(values[_N_SLOT]),
            start_s=float(values[_T0_SLOT]) / 1e6,
            end_s=float(values[_T1_SLOT]) / 1e6,
            counts=counts,
            sums=sums,
        )


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

    @property
    def drifting(self) -> bool:
        """Significant AND at least the PSI floor: the condition for an alert."""
        return self.significant and self.psi >= self.psi_floor

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
        }


def evaluate_window(
    reference: ReferenceStats,
    window: Window,
    *,
    alpha: float,
    psi_floor: float,
    labels: Sequence[str] = (),
) -> list[FeatureResult]:
    """Compare one window with the reference, feature by feature.

    Every feature present in both is tested; features with no values in the window (e.g. the
    outputs of a window of undecodable images) get p = 1. Holm's correction runs over all of
    them together.

    Args:
        reference: Reference histograms (the manifest's ``reference``).
        window: The window's counts and sums.
        alpha: Family-wise false-alarm probability per window.
        psi_floor: Smallest PSI that may alert.
        labels: Class names, for the categorical summary. Defaults to class indices.

    Returns:
        One :class:`FeatureResult` per feature, the largest PSI first.
    """
    names = [n for n in reference.features if n in window.counts]
    n_bins = np.array([len(reference.features[n].counts) for n in names])
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
            )
        )
    return sorted(results, key=lambda r: r.psi, reverse=True)


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


def alert_transitions(
    open_features: Collection[str], results: Sequence[FeatureResult]
) -> tuple[list[FeatureResult], list[str]]:
    """De-duplication: which features open a new alert and which open alerts clear.

    A feature with an open alert does not alert again while it keeps drifting; it clears in the
    first window where it is no longer drifting, and may alert again after that.

    Returns:
        ``(new, cleared)``: results of newly drifting features (in ``results`` order, i.e. by
        effect size) and the names of open features that stopped drifting.
    """
    drifting = {r.name for r in results if r.drifting}
    new = [r for r in results if r.drifting and r.name not in open_features]
    cleared = sorted(f for f in open_features if f not in drifting)
    return new, cleared


# --------------------------------------------------------------------------------------------
# Redis plumbing.
# --------------------------------------------------------------------------------------------


class DriftKeys:
    """The Redis keys of one model's drift state (one place, shared by workers and review).

    >>> DriftKeys("0123456789ab").window(7)
    'imgq:drift:0123456789ab:window:7'
    """

    def __init__(self, short_sha: str) -> None:
        prefix = f"imgq:drift:{short_sha}:"
        self.prefix = prefix
        # Windows are strings of i64 slots (WindowLayout); older imgq kept hashes under
        # "open" and "win:<id>", hence the new names.
        self.open = prefix + "window"
        self.seq = prefix + "seq"
        self.window_prefix = prefix + "window:"
        self.latest = prefix + "latest"
        self.alerts = prefix + "alerts"
        self.open_alerts = prefix + "open_alerts"
        self.acked = prefix + "acked"
        self.out_of_range = prefix + "out_of_range"

    @property
    def state(self) -> tuple[str, ...]:
        """Every key that expires ``state_ttl_s`` after the model was last used: all but the
        windows (the open one has its own refresh, closed ones their own TTL)."""
        return (
            self.seq,
            self.latest,
            self.alerts,
            self.open_alerts,
            self.acked,
            self.out_of_range,
        )

    def window(self, window_id: int) -> str:
        """Key of closed window ``window_id``."""
        return f"{self.window_prefix}{window_id}"

    def ack(
        self, client: redis.Redis, alert_id: str, when: str, *, ttl_s: int = STATE_TTL_S
    ) -> None:
        """Record that alert ``alert_id`` was acknowledged at ``when``, and refresh the TTL of
        every :attr:`state` key: a review is a use of the model. All of them, not only
        ``acked``: the window id sequence must outlive the acknowledgements, or a window id
        reused after ``seq`` expired would show a new alert as already acknowledged."""
        pipe = client.pipeline()
        pipe.hset(self.acked, alert_id, when)
        for key in self.state:
            pipe.expire(key, ttl_s)
        pipe.execute()


# Adds one batch to the open window (a string of i64 slots, see WindowLayout): the image count,
# then "slot increment ..." pairs (bin counts and fixed-point sums) in one BITFIELD; records the
# server time of the first and last batch (µs); refreshes the window's TTL (a window of a model
# no longer served goes; ~1 µs of the ~100 µs a batch costs Redis); returns the new image count.
# A Lua function, so that a larger script (one that also stores the batch's results) can include
# it. ttl: seconds; nil or 0 leaves the window's TTL as it was.
_ADD_WINDOW_FUNCTION_LUA = """
local function add_window(key, n, pairs, ttl)
  local head = redis.call('BITFIELD', key, 'INCRBY', 'i64', '#0', n, 'GET', 'i64', '#1')
  local t = redis.call('TIME')
  local now = t[1] .. string.format('%06d', t[2])
  local ops = {'SET', 'i64', '#2', now}
  if head[2] == 0 then
    ops[#ops + 1] = 'SET'; ops[#ops + 1] = 'i64'; ops[#ops + 1] = '#1'; ops[#ops + 1] = now
  end
  for slot, inc in string.gmatch(pairs, '(%d+) (%-?%d+)') do
    ops[#ops + 1] = 'INCRBY'; ops[#ops + 1] = 'i64'; ops[#ops + 1] = '#' .. slot
    ops[#ops + 1] = inc
  end
  redis.call('BITFIELD', key, unpack(ops))
  if ttl and tonumber(ttl) > 0 then redis.call('EXPIRE', key, ttl) end
  return head[1]
end
"""
# KEYS: the open window. ARGV: images in the batch, "slot increment ..." pairs, and (optional)
# the window's TTL in seconds.
_ADD_LUA = _ADD_WINDOW_FUNCTION_LUA + "return add_window(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# Closes the open window if it is still full (and, for the time closer, old enough): the RENAME
# is atomic, so when several workers see the window full at once exactly one closes it; batches
# that arrive after it start a new open window. With ARGV[5] = 1 (the time closer), an old window
# with fewer images than ARGV[1] is deleted instead (too few to judge; the next starts fresh).
# Either way the model is in use: every state key's TTL is refreshed.
# KEYS: the open window, seq, then the other state keys. ARGV: min images, min age (s), closed
# window key prefix, closed window TTL (s), drop smaller (0/1), state TTL (s).
# Returns {id, images}: id > 0 closed as that window, 0 nothing closed, -1 dropped unjudged.
_CLOSE_LUA = """
local head = redis.call('BITFIELD', KEYS[1], 'GET', 'i64', '#0', 'GET', 'i64', '#1')
local n, drop = head[1], ARGV[5] == '1'
if n < tonumber(ARGV[1]) and not (drop and head[2] > 0) then return {0, n} end
local min_age = tonumber(ARGV[2])
if min_age > 0 then
  local t = redis.call('TIME')
  local age_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 - head[2] / 1e6
  if age_s < min_age then return {0, n} end
end
local id = -1
if n < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
else
  id = redis.call('INCR', KEYS[2])
  local closed = ARGV[3] .. id
  redis.call('RENAME', KEYS[1], closed)
  redis.call('EXPIRE', closed, ARGV[4])
end
for i = 2, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return {id, n}
"""


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
        self.keys = DriftKeys(manifest.short_sha)
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


class DriftRecorder:
    """The worker side of drift: counts each batch into the open window, closes full or old
    windows, and judges them in a background thread (never on the hot path).

    Create it in the process that serves (its thread does not survive a fork); call
    :meth:`close` on shutdown.

    Args:
        redis_client: Client of the broker's Redis.
        manifest: The served model's manifest; its ``reference`` must cover
            :data:`ALL_FEATURES`.
        window_size: A window closes once it has this many images (all workers together).
        window_s: A window older than this closes: judged if it has at least
            ``min_window_size`` images, else dropped unjudged (see :meth:`close_window`).
        alpha: Family-wise false-alarm probability per window. Defaults to 0.001
            (see docs/drift.md).
        psi_floor: Smallest PSI that may alert. Defaults to 0.1.
        min_window_size: Fewest images the time closer judges (the chi-square approximation
            needs a few per bin). Defaults to ``min(50, window_size)``.
        thumbnails_per_s: Most out-of-range thumbnails this worker stores per second.
            Defaults to 5.
        window_ttl_s: How long closed windows stay in Redis. Defaults to one day.
        state_ttl_s: How long every other key of the model's drift state (the open window,
            ``seq``, ``latest``, ``alerts``, ``open_alerts``, ``acked``, ``out_of_range``)
            stays after the model was last served or reviewed; each write, and each window
            closed, refreshes it. Defaults to :data:`STATE_TTL_S` (30 days).
        metrics: Where the detector exports. Defaults to :func:`process_metrics`.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        manifest: Manifest,
        *,
        window_size: int,
        window_s: float,
        alpha: float = 0.001,
        psi_floor: float = 0.1,
        min_window_size: int | None = None,
        thumbnails_per_s: float = 5.0,
        window_ttl_s: int = 86_400,
        state_ttl_s: int = STATE_TTL_S,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        _check_ttl("state_ttl_s", state_ttl_s)
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s!r}")
        missing = [n for n in ALL_FEATURES if n not in manifest.reference.features]
        if missing:
            raise ManifestError(
                f"the manifest's reference statistics lack {missing}; re-export the bundle with "
                "`imgq train` of this imgq version"
            )
        version = manifest.reference.image_features_version
        if version != IMAGE_FEATURES_VERSION:
            raise ManifestError(
                f"the manifest's reference statistics were computed by image statistics version "
                f"{version}; this imgq computes version {IMAGE_FEATURES_VERSION}, whose values "
                "differ, so every window would look drifted: re-export the bundle with `imgq "
                "train` of this imgq version, or serve without drift statistics (IMGQ_DRIFT=false)"
            )
        self.redis = redis_client
        self.manifest = manifest
        self.keys = DriftKeys(manifest.short_sha)
        self.detector = DriftDetector(
            redis_client,
            manifest,
            alpha=alpha,
            psi_floor=psi_floor,
            state_ttl_s=state_ttl_s,
            metrics=metrics,
        )
        self.window_size = window_size
        self.window_s = float(window_s)
        self.min_window_size = min(50, window_size) if min_window_size is None else min_window_size
        self.window_ttl_s = window_ttl_s
        self.state_ttl_s = state_ttl_s
        self._dropped_logged = False
        self._thumbnail_interval_s = 1.0 / thumbnails_per_s
        self._last_thumbnail_s = -math.inf
        ref = manifest.reference.features
        layout = self.detector.layout
        # Every bin of every feature numbered by its slot in the window's Redis string: the hot
        # path counts a batch with one bincount over these numbers.
        n_bins = np.array([len(ref[n].counts) for n in ALL_FEATURES])
        # Edges as one matrix, rows padded with +inf: a batch is binned in one comparison.
        self._edges = np.full((len(ALL_FEATURES), int(n_bins.max()) + 1), np.inf)
        for j, n in enumerate(ALL_FEATURES):
            self._edges[j, : len(ref[n].edges)] = ref[n].edges
        self._first_bin = np.array([layout.first_bin[n] for n in ALL_FEATURES])
        self._last_bin = n_bins - 1
        self._n_slots = layout.size
        # Columns of [image features | output features] that have a sum, and its slot.
        self._sum_columns = np.array(
            [j for j, n in enumerate(ALL_FEATURES) if n in layout.sum_slots]
        )
        self._sum_slots = np.array([layout.sum_slots[ALL_FEATURES[j]] for j in self._sum_columns])
        self._range_check = RangeCheck(manifest.reference, IMAGE_FEATURES)
        self._requests: queue.Queue[str | None] = queue.Queue()
        self._tick_s = min(self.window_s / 4, 5.0)
        self._thread = threading.Thread(target=self._run, name="imgq-drift", daemon=True)
        self._thread.start()

    def out_of_range(self, image_features: np.ndarray) -> list[list[str]]:
        """Per image of an (N, len(IMAGE_FEATURES)) batch, its features outside the training
        range (the task result's ``drift.out_of_range``)."""
        return self._range_check(image_features)

    #: The Lua function ``add_window(key, n, pairs, ttl)`` that the batch's settle script
    #: (``worker/settle.py``) includes, so that the counts go in with the results, once.
    lua_add_window = _ADD_WINDOW_FUNCTION_LUA

    def window_counts(self, image_features: np.ndarray, probs: np.ndarray) -> WindowCounts:
        """This batch's counts for the open window, for the settle script.

        Args:
            image_features: (N, len(IMAGE_FEATURES)) features of the batch's inferred images.
            probs: (N, K) their probabilities, in the same order.
        """
        values = (
            np.hstack([image_features, output_features(probs)])
            if len(probs)
            else np.empty((0, len(ALL_FEATURES)))
        )
        increments = np.bincount(self._bin_numbers(values), minlength=self._n_slots)
        finite = np.where(np.isfinite(values), values, 0.0)  # NaN is counted in the last bin
        increments[self._sum_slots] = np.rint(finite[:, self._sum_columns].sum(axis=0) * SUM_SCALE)
        slots = np.flatnonzero(increments)
        # "slot increment slot increment ...": one argument instead of ~2 per slot, which
        # redis-py would encode one by one (~1 ms per batch of 32).
        pairs = np.column_stack([slots, increments[slots]]).ravel().tolist()
        return WindowCounts(
            self.keys.open, len(image_features), " ".join(map(str, pairs)), self.state_ttl_s
        )

    def add_to_pipeline(self, pipe: Any, image_features: np.ndarray, probs: np.ndarray) -> int:
        """Queue this batch's counts on ``pipe`` as one EVAL of its own (for callers without a
        settle script: tests, benchmarks, tools).

        Returns:
            Index, in ``pipe.execute()``'s reply list, of the open window's new image count; pass
            that reply to :meth:`after_pipeline`.
        """
        counts = self.window_counts(image_features, probs)
        index = len(pipe)
        pipe.eval(_ADD_LUA, 1, counts.key, counts.images, counts.pairs, counts.ttl_s)
        return index

    def _bin_numbers(self, values: np.ndarray) -> np.ndarray:
        """Slot of the bin of every value of ``values``, whose columns are ``ALL_FEATURES``. The
        same bins as :func:`shared.imagestats.bin_counts` (``[edge_i, edge_i+1)``, beyond the
        ends into the outer bins) in one comparison for the whole batch: how many edges each
        value is not below (as ``searchsorted(side="right")`` counts; NaN is below none, so it
        lands in the last bin, where numpy sorts it), less one."""
        idx = (~(values[:, :, None] < self._edges[None])).sum(axis=2)
        np.clip(idx - 1, 0, self._last_bin, out=idx)
        idx += self._first_bin
        return idx.ravel()

    def add_out_of_range_thumbnail(self, pipe: Any, rgb: np.ndarray, features: list[str]) -> bool:
        """Keep a small JPEG of an out-of-range input for ``imgq drift report`` (LPUSH + LTRIM
        on ``pipe``), at most ``thumbnails_per_s`` per second per worker.

        Call it for the first image of a batch whose :meth:`out_of_range` is not empty.

        Returns:
            True when a thumbnail was queued, False when the rate limit skipped it.
        """
        now = time.monotonic()
        if now - self._last_thumbnail_s < self._thumbnail_interval_s:
            return False
        self._last_thumbnail_s = now
        h, w = rgb.shape[:2]
        scale = THUMBNAIL_PX / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]
        )
        if not ok:
            return False
        item = {
            "time": _iso(time.time()),
            "features": features,
            "width": w,
            "height": h,
            "jpeg_b64": base64.b64encode(jpeg.tobytes()).decode("ascii"),
        }
        pipe.lpush(self.keys.out_of_range, json.dumps(item))
        pipe.ltrim(self.keys.out_of_range, 0, THUMBNAILS_KEPT - 1)
        pipe.expire(self.keys.out_of_range, self.state_ttl_s)
        return True

    def after_pipeline(self, window_count: int) -> None:
        """Ask the background thread to close the window when ``window_count`` (the reply at
        :meth:`add_to_pipeline`'s index) reached ``window_size``. Never blocks."""
        if int(window_count) >= self.window_size:
            self._requests.put("full")

    def close_window(
        self, *, min_images: int, min_age_s: float = 0.0, drop_smaller: bool = False
    ) -> int | None:
        """Atomically close the open window if it has ``min_images`` and is ``min_age_s`` old.

        With ``drop_smaller`` (the time closer), a window ``min_age_s`` old with fewer images
        is deleted instead: too few for the chi-square test to mean anything, and left open it
        would linger, mixing this traffic with traffic hours later. Its counts are discarded,
        not carried into the next window (which starts fresh) and not judged; it takes no
        window id, and a log line (``drift_window_dropped``, at INFO the first time in this
        process, since it means traffic below ``min_window_size`` per ``window_s`` is never
        judged, then at DEBUG) says so.

        Returns:
            The closed window's id, or None when it was not closed (not full, not old, another
            worker closed it first, or dropped).
        """
        if drop_smaller and not min_age_s > 0:
            raise ValueError(f"drop_smaller needs a min_age_s > 0, got {min_age_s!r}")
        window_id, n_images = self.redis.eval(
            _CLOSE_LUA,
            1 + len(self.keys.state),
            self.keys.open,
            *self.keys.state,
            min_images,
            min_age_s,
            self.keys.window_prefix,
            self.window_ttl_s,
            int(drop_smaller),
            self.state_ttl_s,
        )
        if window_id == -1:
            self._log_dropped(int(n_images), min_images, min_age_s)
        return int(window_id) if window_id > 0 else None

    def _log_dropped(self, n_images: int, min_images: int, min_age_s: float) -> None:
        """INFO the first time (it means slow traffic is not judged, and says the fix), then
        DEBUG: a slow model drops a window every ``window_s``."""
        level = logging.DEBUG if self._dropped_logged else logging.INFO
        self._dropped_logged = True
        log.log(
            level,
            "drift: dropped the open window of model %s unjudged: %d images after %g s, fewer "
            "than the %d a judged window needs (traffic this slow is never judged; to judge "
            "it, raise IMGQ_DRIFT_WINDOW_S)",
            self.manifest.name,
            n_images,
            min_age_s,
            min_images,
            extra={
                "event": "drift_window_dropped",
                "model": self.manifest.name,
                "n_images": n_images,
            },
        )

    def close(self) -> None:
        """Stop the background thread (a window being judged is finished first)."""
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                request = self._requests.get(timeout=self._tick_s)
            except queue.Empty:
                request = "tick"
            if request is None:
                return
            try:
                if request == "full":
                    window_id = self.close_window(min_images=self.window_size)
                else:
                    window_id = self.close_window(
                        min_images=self.min_window_size, min_age_s=self.window_s, drop_smaller=True
                    )
                if window_id is not None:
                    self.detector.evaluate(window_id)
            except redis.RedisError:
                log.warning("drift: Redis unavailable; will retry", exc_info=True)
            except Exception:  # a bug here must not kill the thread and stop drift detection
                log.exception("drift: evaluating a window failed")


def _check_ttl(name: str, ttl_s: int) -> None:
    """Redis EXPIRE takes whole seconds > 0."""
    if not isinstance(ttl_s, int) or ttl_s < 1:
        raise ValueError(f"{name} must be an integer >= 1 (seconds), got {ttl_s!r}")


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


def _iso(t_s: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(t_s, UTC).isoformat(timespec="milliseconds")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
