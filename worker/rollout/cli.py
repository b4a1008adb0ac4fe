"""``imgq rollout start VERSION [--canary PCT] [--shadow PCT]``, ``status``, ``promote`` and
``abort``: a new model version on a queue's running workers, judged side by side with the
stable one (``worker/rollout/``)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

import redis

from imgq.shared.errors import ImgqError
from imgq.worker.bundles import drift_ids, list_versions, served_by
from imgq.worker.commands.models import _statuses
from imgq.worker.drift.layout import DriftKeys
from imgq.worker.drift.records import printable
from imgq.worker.rollout.state import Rollout, abort, promote, read_rollout, start
from imgq.worker.rollout.tally import read_stats
from imgq.worker.settings import WorkerSettings

__all__ = ["abort_main", "promote_main", "start_main", "status_main"]


def _run(name: str, args: argparse.Namespace, command: Callable[..., int]) -> int:
    settings = WorkerSettings.from_env(queue=args.queue)
    client = settings.broker_client(socket_timeout=30)
    try:
        return command(client, settings)
    except (ImgqError, redis.RedisError) as exc:
        print(f"imgq rollout {name}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


def start_main(args: argparse.Namespace) -> int:
    """Start a rollout; the workers load the candidate within seconds."""

    def command(client: redis.Redis, settings: WorkerSettings) -> int:
        rollout = start(
            client, settings.queue_list, args.version, canary=args.canary, shadow=args.shadow,
            max_failure_rate=args.max_failure_rate, min_tasks=args.min_tasks,
        )  # fmt: skip
        print(f"rollout {rollout.id}: candidate {rollout.candidate[:12]} on queue "
              f"{settings.queue}, canary {rollout.canary:g}%, shadow {rollout.shadow:g}% "
              f"(stable {rollout.stable[:12]})")  # fmt: skip
        return 0

    return _run("start", args, command)


def promote_main(args: argparse.Namespace) -> int:
    """Make the candidate the stable version on every worker."""

    def command(client: redis.Redis, settings: WorkerSettings) -> int:
        rollout = promote(client, settings.queue_list)
        print(f"rollout {rollout.id}: {rollout.candidate[:12]} is now the stable version of "
              f"queue {settings.queue}")  # fmt: skip
        pinned = sorted(
            node
            for reply in _statuses(settings)
            for node, status in reply.items()
            if isinstance(status, dict) and status.get("loaded") and not status.get("follows")
            and status.get("version") != rollout.candidate[:12]
            and status.get("queue") == settings.queue
        )  # fmt: skip
        if pinned:
            print(f"note: pinned workers (--model / --model-version) serve on unchanged: "
                  f"{', '.join(pinned)}", file=sys.stderr)  # fmt: skip
        return 0

    return _run("promote", args, command)


def abort_main(args: argparse.Namespace) -> int:
    """Return every worker to the stable version."""

    def command(client: redis.Redis, settings: WorkerSettings) -> int:
        rollout = abort(client, settings.queue_list, args.reason)
        print(f"rollout {rollout.id}: aborted; queue {settings.queue} serves "
              f"{rollout.stable[:12]}")  # fmt: skip
        return 0

    return _run("abort", args, command)


def status_main(args: argparse.Namespace) -> int:
    """The rollout, and per version side by side: tasks, failures, latency, drift, workers;
    the shadow comparison. Exit 1 when the queue never had a rollout."""

    def command(client: redis.Redis, settings: WorkerSettings) -> int:
        rollout = read_rollout(client, settings.queue_list)
        if rollout is None:
            print(f"imgq rollout status: no rollout on queue {settings.queue}", file=sys.stderr)
            return 1
        report = describe(client, rollout, settings.queue_list, served_by(_statuses(settings)))
        print(json.dumps(report, indent=2) if args.json else _text(report))
        return 0

    return _run("status", args, command)


def describe(
    client: redis.Redis, rollout: Rollout, queue: str, serving: dict[str, list[str]]
) -> dict[str, Any]:
    """Everything `status` shows, as JSON."""
    stats = read_stats(client, queue, rollout)
    names = {v.sha256: v for v in list_versions(client)}
    ids = drift_ids(client, list(names.values()))
    versions = {}
    for role, sha in (("stable", rollout.stable), ("candidate", rollout.candidate)):
        counts = stats["versions"].get(sha[:12], {})
        tasks = int(counts.get("tasks", 0))
        runs = tasks + int(counts.get("shadow", 0))
        failures = int(counts.get("failure", 0) + counts.get("shadow_failure", 0))
        published = names.get(sha)
        versions[role] = {
            "version": sha[:12],
            "name": published.name if published else None,
            "tasks": tasks,
            "failures": int(counts.get("failure", 0)),
            "shadow_runs": int(counts.get("shadow", 0)),
            "shadow_failures": int(counts.get("shadow_failure", 0)),
            "invalid_inputs": int(counts.get("invalid", 0)),
            "failure_rate": failures / runs if runs else None,
            "ms_per_task": round(counts.get("ms_per_task", 0.0), 3) if tasks else None,
            "drift": _drift(client, ids.get(sha)),
            "served_by": sorted(serving.get(sha[:12], [])),
        }
    when = datetime.datetime.fromtimestamp
    return {
        "rollout": rollout.id,
        "state": rollout.state,
        "reason": rollout.reason,
        "canary_percent": rollout.canary,
        "shadow_percent": rollout.shadow,
        "max_failure_rate": rollout.max_failure_rate,
        "started": when(rollout.started_at, datetime.UTC).isoformat(timespec="seconds"),
        "ended": when(rollout.ended_at, datetime.UTC).isoformat(timespec="seconds")
        if rollout.ended_at
        else None,  # fmt: skip
        "versions": versions,
        "shadow": stats["shadow"],
    }


def _drift(client: redis.Redis, drift_id: str | None) -> dict[str, Any] | None:
    """The version's last judged drift window against its own reference, in brief."""
    if drift_id is None:
        return None
    keys = DriftKeys(drift_id)
    raw = client.get(keys.latest)
    open_alerts = client.hlen(keys.open_alerts)
    try:
        latest = json.loads(raw) if isinstance(raw, bytes) else None
    except ValueError:
        latest = None
    if not isinstance(latest, dict):
        return {"windows": None, "open_alerts": open_alerts}
    features = [f for f in latest.get("features", []) if isinstance(f, dict)]
    return {
        "last_window": latest.get("window"),
        "tier": latest.get("tier"),
        "estimated_accuracy": latest.get("estimated_accuracy"),
        "drifting": sorted(str(f.get("name")) for f in features if f.get("drifting")),
        "open_alerts": open_alerts,
    }


def _text(report: dict[str, Any]) -> str:
    lines = [
        f"rollout {report['rollout']}  {report['state']}"
        + (f"  ({printable(report['reason'])})" if report["reason"] else ""),
        f"canary {report['canary_percent']:g}%  shadow {report['shadow_percent']:g}%  "
        f"started {report['started']}" + (f"  ended {report['ended']}" if report["ended"] else ""),
        "",
        f"{'':<18}{'stable':>24}{'candidate':>24}",
    ]
    stable, candidate = report["versions"]["stable"], report["versions"]["candidate"]
    rows = [
        ("version", "version"), ("name", "name"), ("tasks", "tasks"), ("failures", "failures"),
        ("shadow runs", "shadow_runs"), ("shadow failures", "shadow_failures"),
        ("invalid inputs", "invalid_inputs"), ("failure rate", "failure_rate"),
        ("ms per task", "ms_per_task"), ("served by", "served_by"),
    ]  # fmt: skip
    for title, key in rows:
        lines.append(f"{title:<18}{_cell(stable[key]):>24}{_cell(candidate[key]):>24}")
    for title, key in (("drift tier", "tier"), ("est. accuracy", "estimated_accuracy"),
                       ("drifting", "drifting"), ("open alerts", "open_alerts")):  # fmt: skip
        lines.append(
            f"{title:<18}{_cell((stable['drift'] or {}).get(key)):>24}"
            f"{_cell((candidate['drift'] or {}).get(key)):>24}"
        )
    shadow = report["shadow"]
    if shadow["runs"]:
        lines += ["", f"shadow: {int(shadow['runs'])} runs, {int(shadow['failed'])} failed, "
                      f"{shadow['ms_per_task']:.2f} ms per run"]  # fmt: skip
    if shadow["n"]:
        lines += [
            f"{int(shadow['n'])} tasks compared, top-1 agreement {shadow['agreement']:.2%}, "
            f"mean |score difference| {shadow['mean_score_diff']:.4f}",
            "confusion (stable answer -> candidate answer):",
        ]
        for stable_label, row in sorted(shadow["confusion"].items()):
            cells = ", ".join(f"{label}: {n}" for label, n in sorted(row.items()))
            lines.append(printable(f"  {stable_label}: {cells}"))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        value = ", ".join(map(str, value)) or "-"
    return printable(str(value))[:22]
