"""A queue's rollout state in Redis: which candidate version, what share it answers (canary) or
shadows, and how the rollout ended; the commands that change it, atomically.

Keys::

    imgq:rollout:<queue>                 JSON: the queue's current (or last) rollout
    imgq:rollout:<queue>:<id>:stats      hash: per-version task counts, shadow comparisons
    imgq:stable:<queue>                  the stable version's sha256 (worker/bundles.py)

A task goes to the candidate when the hash of the rollout id and its task id falls under the
canary share: the choice is the same on every worker and for every delivery of the task, so a
redelivered task is answered by the version that answered it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import time
from typing import Any, Final

import redis

from imgq.worker.bundles import BUNDLES_KEY, PublishError, resolve, stable_key
from imgq.worker.drift.records import finite

__all__ = [
    "ABORTED",
    "PROMOTED",
    "RUNNING",
    "Rollout",
    "RolloutError",
    "abort",
    "in_share",
    "promote",
    "read_rollout",
    "rollout_key",
    "stable_version",
    "start",
    "stats_key",
]

_SHA256: Final = re.compile(r"[0-9a-f]{64}")
RUNNING: Final = "running"
PROMOTED: Final = "promoted"
ABORTED: Final = "aborted"
_STATES: Final = (RUNNING, PROMOTED, ABORTED)
#: How long a rollout's record and counts stay after it ends.
STATS_TTL_S: Final = 30 * 86_400


class RolloutError(PublishError):
    """A rollout command cannot be carried out; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One rollout of a candidate version on a queue.

    Attributes:
        id: Random hex id: salts the canary and shadow choices, names the counts.
        candidate: The candidate version's sha256.
        stable: The stable version's sha256 when the rollout started.
        canary: Percent of tasks the candidate answers (0 to 100).
        shadow: Percent of the stable version's tasks the candidate also runs, unanswered.
        state: ``running``, ``promoted`` or ``aborted``.
        reason: Why it ended (an automatic abort says which check failed, on which worker).
        started_at: Epoch seconds.
        ended_at: Epoch seconds, or None while running.
        max_failure_rate: The candidate's share of model failures that aborts the rollout.
        min_tasks: Tasks the candidate must have answered before its failure rate is judged.
    """

    id: str
    candidate: str
    stable: str
    canary: float
    shadow: float
    state: str = RUNNING
    reason: str = ""
    started_at: float = 0.0
    ended_at: float | None = None
    max_failure_rate: float = 0.05
    min_tasks: int = 50

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Rollout:
        """Raises:
        ValueError: not a rollout's JSON (an entry in Redis is hostile input)."""
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("not a rollout")
        ok = (
            all(isinstance(data[k], str) for k in ("id", "candidate", "stable", "reason"))
            and data["state"] in _STATES
            and all(_number(data[k]) for k in ("canary", "shadow", "max_failure_rate"))
            and 0 <= data["canary"] <= 100 and 0 <= data["shadow"] <= 100
            and 0 <= data["max_failure_rate"] <= 1
            and _number(data["started_at"])
            and (data["ended_at"] is None or _number(data["ended_at"]))
            and type(data["min_tasks"]) is int and data["min_tasks"] >= 0
            and len(data["id"]) <= 64 and len(data["reason"]) <= 1000
            and all(_SHA256.fullmatch(data[k]) for k in ("candidate", "stable"))
        )  # fmt: skip
        if not ok:
            raise ValueError("not a rollout")
        return cls(**data)


def _number(value: Any) -> bool:
    return finite(value) is not None


def rollout_key(queue: str) -> str:
    """The key of ``queue``'s (prefixed list name's) current or last rollout."""
    return f"imgq:rollout:{queue}"


def stats_key(queue: str, rollout_id: str) -> str:
    """The hash of a rollout's counts (tasks, failures, milliseconds per version; shadow)."""
    return f"imgq:rollout:{queue}:{rollout_id}:stats"


def in_share(rollout_id: str, task_id: str, percent: float, purpose: str = "canary") -> bool:
    """Whether ``task_id`` falls in the ``percent`` share of tasks chosen for ``purpose``: the
    same answer on every worker and every delivery.

    >>> in_share("r1", "task-1", 0.0), in_share("r1", "task-1", 100.0)
    (False, True)
    """
    digest = hashlib.blake2b(f"{purpose}:{rollout_id}:{task_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < percent / 100.0 * 2**64


def read_rollout(client: redis.Redis, queue: str) -> Rollout | None:
    """The queue's current or last rollout; None when there is none or the entry is not one."""
    raw = client.get(rollout_key(queue))
    if not isinstance(raw, bytes | str):
        return None
    try:
        return Rollout.from_json(raw)
    except (ValueError, TypeError):
        return None


def stable_version(client: redis.Redis, queue: str) -> str | None:
    """The sha256 the queue's stable key holds; None when it holds none (or not a sha256)."""
    raw = client.get(stable_key(queue))
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else ""
    return text if _SHA256.fullmatch(text) else None


def start(
    client: redis.Redis,
    queue: str,
    candidate: str,
    *,
    canary: float,
    shadow: float = 0.0,
    max_failure_rate: float = 0.05,
    min_tasks: int = 50,
) -> Rollout:
    """Start rolling ``candidate`` (a published version, by prefix) out on ``queue``.

    Raises:
        RolloutError: a rollout is running, the queue has no stable version, the candidate is
            the stable version, or a share is outside 0..100.
    """
    for name, value in (("--canary", canary), ("--shadow", shadow)):
        if not (_number(value) and 0 <= value <= 100):
            raise RolloutError(f"{name} is a percentage from 0 to 100, got {value!r}")
    if not (_number(max_failure_rate) and 0 <= max_failure_rate <= 1):
        raise RolloutError(f"the failure rate is a fraction 0..1, got {max_failure_rate!r}")
    if isinstance(min_tasks, bool) or not isinstance(min_tasks, int) or min_tasks < 0:
        raise RolloutError(f"--min-tasks is a count >= 0, got {min_tasks!r}")
    chosen = resolve(client, candidate, queue)
    rollout_id = secrets.token_hex(6)
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(rollout_key(queue), stable_key(queue))
                current = read_rollout(pipe, queue)
                if current is not None and current.state == RUNNING:
                    raise RolloutError(
                        f"rollout {current.id} of {current.candidate[:12]} is running on queue "
                        f"{queue!r}: promote or abort it first (`imgq rollout status`)"
                    )
                stable = stable_version(pipe, queue)
                if stable is None:
                    raise RolloutError(
                        f"queue {queue!r} has no stable version to roll out from: publish one "
                        "with `imgq models publish DIR --stable`"
                    )
                if stable == chosen.sha256:
                    raise RolloutError(f"{chosen.version} is already the stable version")
                rollout = Rollout(
                    rollout_id, chosen.sha256, stable, float(canary), float(shadow),
                    started_at=time.time(), max_failure_rate=float(max_failure_rate),
                    min_tasks=int(min_tasks),
                )  # fmt: skip
                pipe.multi()
                pipe.set(rollout_key(queue), rollout.to_json())
                pipe.execute()
                return rollout
            except redis.WatchError:
                continue


def promote(client: redis.Redis, queue: str) -> Rollout:
    """Make the running rollout's candidate the queue's stable version.

    Raises:
        RolloutError: no rollout is running.
    """
    return _end(client, queue, PROMOTED, "promoted")


def abort(client: redis.Redis, queue: str, reason: str, rollout_id: str | None = None) -> Rollout:
    """Return the queue to its stable version; with ``rollout_id``, only if that rollout is
    still the running one (a worker's automatic abort must not end a later rollout).

    Raises:
        RolloutError: no rollout is running (or not that one).
    """
    return _end(client, queue, ABORTED, reason, rollout_id)


def _end(
    client: redis.Redis, queue: str, state: str, reason: str, rollout_id: str | None = None
) -> Rollout:
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(rollout_key(queue), BUNDLES_KEY)
                current = read_rollout(pipe, queue)
                if current is None or current.state != RUNNING:
                    raise RolloutError(f"no rollout is running on queue {queue!r}")
                if rollout_id is not None and current.id != rollout_id:
                    raise RolloutError(f"rollout {rollout_id} is no longer the running one")
                if state == PROMOTED and pipe.hget(BUNDLES_KEY, current.candidate) is None:
                    raise RolloutError(
                        f"candidate {current.candidate[:12]} is no longer published (deleted?): "
                        "`imgq rollout abort`, or publish it again first"
                    )
                ended = dataclasses.replace(
                    current, state=state, reason=reason[:500], ended_at=time.time()
                )
                pipe.multi()
                pipe.set(rollout_key(queue), ended.to_json())
                if state == PROMOTED:
                    pipe.set(stable_key(queue), ended.candidate)
                pipe.expire(stats_key(queue, ended.id), STATS_TTL_S)
                pipe.execute()
                return ended
            except redis.WatchError:
                continue
