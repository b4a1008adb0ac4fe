"""``imgq models publish BUNDLE_DIR``, ``imgq models list`` and ``imgq models delete VERSION``:
model versions in Redis (``worker/bundles.py``), for workers started without ``--model``."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import redis

from imgq.shared.errors import ImgqError
from imgq.worker.bundles import delete, list_versions, publish, resolve, served_by, stable_key
from imgq.worker.settings import WorkerSettings

__all__ = ["delete_main", "list_main", "publish_main"]

_INSPECT_TIMEOUT_S = 1.0


def _client(settings: WorkerSettings) -> redis.Redis:
    return settings.broker_client(socket_timeout=60)


def publish_main(args: argparse.Namespace) -> int:
    """Store the bundle; print its version, name and size. Exit 1 when it is refused."""
    settings = WorkerSettings.from_env(queue=args.queue)
    try:
        version, stable = publish(
            _client(settings), Path(args.bundle), settings.bundle_max_bytes,
            settings.queue_list, make_stable=args.stable,
        )  # fmt: skip
    except (ImgqError, OSError, redis.RedisError) as exc:
        print(f"imgq models publish: {exc}", file=sys.stderr)
        return 1
    note = f"stable for queue {settings.queue}" if stable else "published"
    print(f"{version.version}  {version.name}  {version.size} bytes  {note}")
    return 0


def list_main(args: argparse.Namespace) -> int:
    """Print every published version (newest first) with its size, whether it is the queue's
    stable version, and the workers that answer serving it."""
    settings = WorkerSettings.from_env(queue=args.queue)
    client = _client(settings)
    try:
        versions = list_versions(client)
        raw = client.get(stable_key(settings.queue_list))
        stable = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""
    except redis.RedisError as exc:
        print(f"imgq models list: Redis: {exc}", file=sys.stderr)
        return 1
    serving = served_by(_statuses(settings))
    for v in versions:
        row = {
            "version": v.version,
            "name": v.name,
            "bytes": v.size,
            "files": len(v.files),
            "stable": v.sha256 == stable,
            "published": datetime.datetime.fromtimestamp(v.published_at, datetime.UTC).isoformat(
                timespec="seconds"
            ),
            "model_sha256": v.model_sha256,
            "served_by": sorted(serving.get(v.version, [])),
        }
        if args.json:
            print(json.dumps(row))
        else:
            mark = "stable" if row["stable"] else "      "
            servers = ", ".join(sorted(serving.get(v.version, []))) or "-"
            print(f"{v.version}  {mark}  {v.name:<20} {v.size:>11} B  {row['published']}  "
                  f"served by: {servers}")  # fmt: skip
    return 0


def delete_main(args: argparse.Namespace) -> int:
    """Remove a published version that no queue has as stable and no worker serves."""
    settings = WorkerSettings.from_env()
    client = _client(settings)
    try:
        version = resolve(client, args.version, settings.queue_list)
        rolling = _rolled_out_on(client, version.sha256)
        if rolling:
            print(f"imgq models delete: version {version.version} is the candidate of the "
                  f"rollout running on {', '.join(rolling)}: `imgq rollout abort` first",
                  file=sys.stderr)  # fmt: skip
            return 1
        servers = served_by(_statuses(settings)).get(version.version, [])
        if servers:
            print(f"imgq models delete: version {version.version} is served by "
                  f"{', '.join(sorted(servers))}", file=sys.stderr)  # fmt: skip
            return 1
        delete(client, version)
    except (ImgqError, redis.RedisError) as exc:
        print(f"imgq models delete: {exc}", file=sys.stderr)
        return 1
    print(f"deleted {version.version}  {version.name}  {version.size} bytes")
    return 0


def _rolled_out_on(client: redis.Redis, sha256: str) -> list[str]:
    """The queues whose running rollout has this version as its candidate."""
    from imgq.worker.rollout.state import RUNNING, Rollout

    queues = []
    for key in client.scan_iter(match="imgq:rollout:*", count=1000):
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        if name.endswith(":stats"):
            continue
        try:
            rollout = Rollout.from_json(client.get(key) or b"")
        except (ValueError, TypeError):
            continue
        if rollout.state == RUNNING and rollout.candidate == sha256:
            queues.append(name.removeprefix("imgq:rollout:"))
    return queues


def _statuses(settings: WorkerSettings) -> list[dict]:
    """Every worker's ``imgq_status`` reply (model sha256), within a second."""
    from imgq.worker.celeryapp.app import make_app
    from imgq.worker.celeryapp.status import STATUS_COMMAND

    app = make_app(settings)
    try:
        return app.control.broadcast(STATUS_COMMAND, reply=True, timeout=_INSPECT_TIMEOUT_S)
    except Exception:  # no worker, or a broker hiccup: the list is still worth printing
        return []
