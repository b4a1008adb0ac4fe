"""A rollout's counts: tasks, failures and milliseconds per version, and the shadow comparison
(top-1 agreement, score differences, the confusion between the two versions' answers).

Batches count in memory; the rollout thread adds the counts to the rollout's stats hash once a
second, so the hot path makes no extra round trip. Counts of a worker killed before its next
flush are lost (at most a second of them): the figures are for judging a candidate, not for
billing.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any, Final

import redis

from imgq.shared.errors import ImgqError
from imgq.worker.handler import Failure, Outcome, Success
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.rollout.state import STATS_TTL_S, Rollout, stats_key

__all__ = ["Tally", "read_stats"]

logger = logging.getLogger("imgq.rollout")

#: Separates the stable and the candidate label in a confusion field of the stats hash.
_SEP: Final = "\x1f"
_FLOATS: Final = ("ms", "score_diff")
_VERSION_FIELDS: Final = ("tasks", "failure", "invalid", "ms", "shadow", "shadow_failure")


class Tally:
    """Counts of the running rollout, kept in memory until :meth:`flush`.

    Args:
        client: The broker's Redis.
        queue: The queue's list name (names the stats hash).
        metrics: ``imgq_model_tasks`` by version and outcome.
    """

    def __init__(self, client: redis.Redis, queue: str, metrics: WorkerMetrics) -> None:
        self.redis = client
        self.queue = queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: dict[str, collections.defaultdict[str, float]] = {}

    def _counter(self, rollout_id: str) -> collections.defaultdict[str, float]:
        return self._pending.setdefault(rollout_id, collections.defaultdict(float))

    def count(
        self, rollout: Rollout | None, version: str, outcomes: Sequence[Outcome], ms: float
    ) -> None:
        """Answers of ``version``: successes, failures of the model, failures of the input."""
        kinds = collections.Counter(_kind(o) for o in outcomes if _kind(o))
        for kind, n in kinds.items():
            self.metrics.model_tasks.labels(version, kind).inc(n)
        if rollout is None or not kinds:
            return
        with self._lock:
            c = self._counter(rollout.id)
            c[f"{version}:tasks"] += sum(kinds.values())
            c[f"{version}:failure"] += kinds["failure"]
            c[f"{version}:invalid"] += kinds["invalid"]
            c[f"{version}:ms"] += ms

    def shadow(
        self,
        rollout: Rollout,
        version: str,
        pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]],
        runs: Sequence[Outcome],
        ms: float,
    ) -> None:
        """The candidate's shadow runs: its failures count toward its failure rate; where both
        answered, the two answers are compared."""
        kinds = collections.Counter(_kind(o) for o in runs if _kind(o))
        if kinds:
            self.metrics.model_tasks.labels(version, "shadow").inc(sum(kinds.values()))
        with self._lock:
            c = self._counter(rollout.id)
            c[f"{version}:shadow"] += sum(kinds.values())
            c[f"{version}:shadow_failure"] += kinds["failure"]
            for stable, candidate in pairs:
                scores = {t["label"]: t["score"] for t in candidate["top_k"]}
                c["shadow:n"] += 1
                c["shadow:agree"] += stable["label"] == candidate["label"]
                c["shadow:score_diff"] += abs(stable["score"] - scores.get(stable["label"], 0.0))
                c[f"confusion:{stable['label']}{_SEP}{candidate['label']}"] += 1
            c["shadow:runs"] += sum(kinds.values())
            c["shadow:failed"] += kinds["failure"] + kinds["invalid"]
            c["shadow:ms"] += ms

    def flush(self) -> None:
        """Add the counts kept so far to each rollout's stats hash. A field Redis refuses (not a
        number: hostile data) loses its counts; the others are added once."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        pipe = self.redis.pipeline(transaction=False)
        for rollout_id, counts in pending.items():
            key = stats_key(self.queue, rollout_id)
            for field, value in counts.items():
                if field.rsplit(":", 1)[-1] in _FLOATS:
                    pipe.hincrbyfloat(key, field, float(value))
                elif value:
                    pipe.hincrby(key, field, int(value))
            pipe.expire(key, STATS_TTL_S)
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.ConnectionError, redis.TimeoutError):
            with self._lock:  # nothing was added: kept for the next flush
                for rollout_id, counts in pending.items():
                    mine = self._counter(rollout_id)
                    for field, value in counts.items():
                        mine[field] += value
            raise
        refused = sum(isinstance(r, Exception) for r in replies)
        if refused:
            logger.warning("rollout: Redis refused %d of the rollout's counts (a field that is "
                           "not a number?)", refused)  # fmt: skip

    def failing(self, rollout: Rollout) -> str | None:
        """Why the candidate must be aborted (its model failures, answered or shadowed, past
        the threshold), or None."""
        stats = read_stats(self.redis, self.queue, rollout)
        mine = stats["versions"].get(rollout.candidate[:12], {})
        tasks = int(mine.get("tasks", 0) + mine.get("shadow", 0))
        failures = int(mine.get("failure", 0) + mine.get("shadow_failure", 0))
        if tasks < max(1, rollout.min_tasks) or failures / tasks <= rollout.max_failure_rate:
            return None
        return (
            f"candidate {rollout.candidate[:12]} failed {failures} of {tasks} tasks "
            f"({failures / tasks:.1%}), over the rollout's limit of {rollout.max_failure_rate:.1%}"
        )


def _kind(outcome: Outcome) -> str:
    if isinstance(outcome, Success):
        return "success"
    if isinstance(outcome, Failure):
        return "invalid" if isinstance(outcome.error, ImgqError) else "failure"
    return ""  # deferred: counted when served


def read_stats(client: redis.Redis, queue: str, rollout: Rollout) -> dict[str, Any]:
    """The rollout's counts: per version (tasks answered, failure, invalid, ms per task; shadow
    runs and their model failures) and the shadow comparison (runs, n compared, agreement, mean
    score difference, confusion stable label -> candidate's)."""
    raw = client.hgetall(stats_key(queue, rollout.id))
    versions: dict[str, dict[str, float]] = {}
    shadow: dict[str, Any] = {"n": 0, "agree": 0, "runs": 0, "failed": 0, "score_diff": 0.0,
                              "ms": 0.0}  # fmt: skip
    confusion: dict[str, dict[str, int]] = {}
    for k, v in raw.items():
        field, value = _text(k), _number(v)
        if value is None:
            continue
        head, _, rest = field.partition(":")
        if head == "shadow" and rest in shadow:
            shadow[rest] = value
        elif head == "confusion" and _SEP in rest:
            stable, candidate = rest.split(_SEP, 1)
            confusion.setdefault(stable, {})[candidate] = int(value)
        elif rest in _VERSION_FIELDS and len(head) <= 64:
            versions.setdefault(head, {})[rest] = value
    for counts in versions.values():
        counts["ms_per_task"] = counts.get("ms", 0.0) / max(1.0, counts.get("tasks", 0.0))
    n = shadow["n"]
    shadow.update(
        agreement=shadow["agree"] / n if n else None,
        mean_score_diff=shadow["score_diff"] / n if n else None,
        ms_per_task=shadow["ms"] / shadow["runs"] if shadow["runs"] else None,
        confusion=confusion,
    )
    return {"versions": versions, "shadow": shadow}


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _number(value: bytes | str) -> float | None:
    try:
        number = float(_text(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None
