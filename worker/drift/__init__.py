"""Drift: every worker's input and output statistics summed per window in Redis, a detector that
compares each closed window with the training reference, and de-duplicated alerts.

The three parts, and where they run::

    hot path (per batch)       DriftRecorder.window_counts: bin counts of the batch, summed
                               locally with numpy, go into the model's *open window* inside the
                               batch's settle script (worker/broker/settle.py; no extra round trip)
    background thread          DriftRecorder closes the open window when it is full (count) or old
                               (time) with an atomic Lua RENAME, so exactly one worker closes it,
                               then DriftDetector.evaluate judges it
    pure statistics            psi, chi2_homogeneity, holm (statistics.py), the page tier's
                               output-side tests (harm.py), evaluate_window, window_tier,
                               alert_transitions (verdict.py): numpy/scipy on count arrays,
                               unit tested without Redis

Windows hold the summed traffic of *all* workers of one model, because fixed bins merge by
addition (see :mod:`shared.imagestats`). Why these statistics is written up in ``docs/drift.md``:
two tiers, each with its own family-wise false-alarm level per window. *Notice*: per image
feature, a chi-square test of homogeneity with the reference, Holm's correction, and a PSI floor.
*Page*: output-side evidence of harm (class mix; confidence, margin, estimated accuracy lower;
more low-confidence answers, more inputs out of range), one-sided where the direction of harm is
known, with effect floors. A window pages, notices, or is ok.

Redis keys, all under ``imgq:drift:<drift_id>:`` (see :class:`DriftKeys`): ``window`` (string of
i64 slots, :class:`WindowLayout`: the open window), ``seq`` (window ids), ``window:<id>`` (closed
windows, expire after a day), ``latest`` (JSON:
the last evaluated window's verdict), ``verdicts`` (list: the last 500 verdicts, newest first),
``alerts`` (stream of alert and clear events),
``open_alerts`` (hash: feature -> id of its open alert), ``acked`` (hash: alert id -> time),
``out_of_range`` (list: recent out-of-range thumbnails for the report) and ``samples`` (capped
stream: sampled inputs with the model's answers, :mod:`~imgq.worker.drift.samples`).

None of them outlives its model: every key but the closed windows expires ``state_ttl_s``
(30 days) after the model was last served or reviewed. Each write refreshes the key it writes
(the open window on every batch, inside the batch's one EVAL); each window closed, judged or
dropped, and each acknowledgement refresh them all, so the state of a model still in use (an
alert open for weeks, an acknowledgement) stays while that of a retired model goes.

The package, one concept per module: :mod:`~imgq.worker.drift.statistics`,
:mod:`~imgq.worker.drift.harm` and :mod:`~imgq.worker.drift.verdict` (pure),
:mod:`~imgq.worker.drift.layout` (Redis keys, window slots, Lua),
:mod:`~imgq.worker.drift.detector`, :mod:`~imgq.worker.drift.recorder`, and
:mod:`~imgq.worker.drift.review` (``imgq drift status | alerts | windows | report``),
:mod:`~imgq.worker.drift.page` (``imgq drift serve``) and :mod:`~imgq.worker.drift.samples`
(``imgq drift samples``).

Pages reach people through :mod:`~imgq.worker.drift.notify` (the alert streams to a signed
webhook, once per alert across a fleet), :mod:`~imgq.worker.drift.webhook` (one POST) and
:mod:`~imgq.worker.drift.notify_cli` (``imgq drift notify``).
"""

from __future__ import annotations

from imgq.worker.drift.detector import DriftDetector
from imgq.worker.drift.layout import (
    ALL_FEATURES,
    STATE_TTL_S,
    DriftKeys,
    Window,
    WindowLayout,
)
from imgq.worker.drift.recorder import DriftRecorder
from imgq.worker.drift.statistics import (
    FeatureResult,
    chi2_homogeneity,
    holm,
    psi,
)
from imgq.worker.drift.verdict import (
    NOTICE_ALPHA,
    PAGE_ALPHA,
    Transition,
    alert_transitions,
    evaluate_window,
    window_tier,
)

__all__ = [
    "ALL_FEATURES",
    "DriftDetector",
    "DriftKeys",
    "DriftRecorder",
    "FeatureResult",
    "NOTICE_ALPHA",
    "PAGE_ALPHA",
    "STATE_TTL_S",
    "Transition",
    "Window",
    "WindowLayout",
    "alert_transitions",
    "chi2_homogeneity",
    "evaluate_window",
    "holm",
    "psi",
    "window_tier",
]
