"""What a model rollout costs: how long a worker serves nothing while it switches versions, and
what shadowing costs per task.

Two trained sample models (``imgq train`` for 5 and for 3 epochs: two ONNX files) are published;
workers are started with only the Redis URL, so they follow the queue's rollout.

- Switch: one worker drains a parked queue; a quarter of the way in ``rollout start v2 --canary
  100`` (the worker fetches, loads and checks v2 beside v1 while serving), later ``promote``. The
  gaps between consecutive stored results around each event, beside the largest gap of the
  same length of time before the first (the baseline, same run), and the throughput while v2
  loads beside the throughput before.
- Shadow: drains of the same tasks with no rollout and with ``--canary 0 --shadow 100``,
  alternated: tasks/s and worker CPU per task, and the ratio.

Run: ``.venv/bin/python bench/rollout.py --work-dir /tmp/rollout-work``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from harness import (
    BenchFleet,
    add_fleet_arguments,
    cycled,
    done_at,
    drain,
    sample_images,
    small_bundle,
    start_fleet,
    stored_records,
    worker_env,
)

from imgq.localredis import LocalRedis
from imgq.worker.bundles import publish
from imgq.worker.client import ImgqClient
from imgq.worker.rollout.state import abort, promote, read_rollout, start


def following_workers(
    url: str, client: ImgqClient, args: argparse.Namespace, log_dir: Path, n: int
) -> BenchFleet:
    """``n`` `imgq worker` processes given only the Redis URL (they follow the rollout)."""
    workers = []
    for i in range(n):
        name = f"follow{i}@bench"
        command = [sys.executable, "-m", "imgq.cli", "worker", "--queue", client.queue,
                   "--hostname", name, "--concurrency", str(args.concurrency),
                   "--threads", str(args.threads), "--max-batch", str(args.max_batch),
                   "--max-wait-ms", str(args.max_wait_ms), "--loglevel", "WARNING"]  # fmt: skip
        env = worker_env(url, IMGQ_METRICS_PORT="0", OMP_NUM_THREADS="1",
                         IMGQ_MODEL_CACHE=str(log_dir / "cache"))  # fmt: skip
        workers.append((name, command, env))
    return start_fleet(client, log_dir, workers)


def stored(client: ImgqClient, pending: list[Any]) -> list[tuple[float, str]]:
    """``(date_done, version)`` of every stored result, in the order they were stored."""
    records = stored_records(client, pending)
    return sorted((done_at(r), r["result"]["model"]["version"]) for r in records)


def wait_done(client: ImgqClient, task: Any, timeout_s: float = 300.0) -> None:
    r = client.app.backend.client
    key = client.app.backend.get_key_for_task(task.id)
    deadline = time.monotonic() + timeout_s
    while not r.exists(key):
        if time.monotonic() > deadline:
            raise TimeoutError("the drain stalled")
        time.sleep(0.01)


def max_gap(times: list[float], lo: float, hi: float) -> float:
    """The longest time between consecutive stored results within ``[lo, hi]``."""
    inside = [t for t in times if lo <= t <= hi]
    return max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=float("nan"))


def rate(times: list[float], lo: float, hi: float) -> float:
    return sum(lo <= t < hi for t in times) / (hi - lo) if hi > lo else float("nan")


def switch(url: str, client: ImgqClient, images: list[bytes], args: argparse.Namespace,
           log_dir: Path, versions: tuple[str, str]) -> dict[str, Any]:  # fmt: skip
    """One worker drains ``args.switch_tasks``; every ``args.every_s`` seconds a rollout of the
    other version starts (``--canary 25``: loaded beside the stable one) or is promoted."""
    r = redis.Redis.from_url(url)
    parked = f"{client.queue}:parked"
    r.delete(client.queue, parked)
    pending = client.classify_many(cycled(images, args.switch_tasks))
    r.rename(client.queue, parked)
    events: list[tuple[str, float]] = []
    stable, other = versions
    with following_workers(url, client, args, log_dir, 1):
        r.rename(parked, client.queue)
        wait_done(client, pending[len(pending) // 10])
        while not r.exists(client.app.backend.get_key_for_task(pending[-len(pending) // 10].id)):
            time.sleep(args.every_s)
            if not events or events[-1][0] == "promote":
                events.append(("start", time.time()))
                start(r, client.queue, other, canary=25.0)
            else:
                events.append(("promote", time.time()))
                promote(r, client.queue)
                stable, other = other, stable
        wait_done(client, pending[-1])
    done = stored(client, pending)
    times = [t for t, _ in done]
    window_s = min(2.0, args.every_s / 2)
    # Windows of the same length: from each event on, and half-way between events (baselines).
    # A window the drain had ended before has no gap (NaN): left out.
    at_event = {kind: [g for k, t in events if k == kind
                       if math.isfinite(g := 1000 * max_gap(times, t, t + window_s))]
                for kind in ("start", "promote")}  # fmt: skip
    half = args.every_s / 2
    gaps = [1000 * max_gap(times, t + half, t + half + window_s) for _, t in events[:-1]]
    between = [g for g in gaps if math.isfinite(g)]
    return {
        "tasks": len(done),
        "events": len(events),
        "window_s": window_s,
        "max_gap_ms_at_start": at_event["start"],
        "max_gap_ms_at_promote": at_event["promote"],
        "max_gap_ms_between": between,
        "rate_after_start": statistics.median(
            rate(times, t, t + window_s) for k, t in events if k == "start"
        ),  # fmt: skip
        "rate_between": statistics.median(
            rate(times, t + args.every_s / 2, t + args.every_s / 2 + window_s)
            for _, t in events[:-1]
        ),
    }


def shadow_cost(url: str, client: ImgqClient, images: list[bytes], args: argparse.Namespace,
                log_dir: Path, v2: str) -> dict[str, Any]:  # fmt: skip
    """Drains with and without a 100% shadow, alternated ``args.rounds`` times."""
    r = redis.Redis.from_url(url)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "shadow": []}
    for _ in range(args.rounds):
        for kind in ("plain", "shadow"):
            current = read_rollout(r, client.queue)
            if current is not None and current.state == "running":
                abort(r, client.queue, "bench")
            if kind == "shadow":
                start(r, client.queue, v2, canary=0.0, shadow=100.0)

            def fleet() -> BenchFleet:
                return following_workers(url, client, args, log_dir, args.workers)

            res = drain(url, client, images, args.shadow_tasks, fleet)
            runs[kind].append(res)
            print(f"    {kind:<6} {res['rate']:7.0f} tasks/s  {res['cpu_ms_per_task']:.3f} ms "
                  f"CPU/task  failures {res['failures']}", flush=True)  # fmt: skip
    abort(r, client.queue, "bench")

    def med(kind: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[kind])

    return {
        "plain_rate": med("plain", "rate"),
        "shadow_rate": med("shadow", "rate"),
        "plain_cpu_ms": med("plain", "cpu_ms_per_task"),
        "shadow_cpu_ms": med("shadow", "cpu_ms_per_task"),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--switch-tasks", type=int, default=40_000)
    p.add_argument("--every-s", type=float, default=4.0, help="seconds between switch events")
    p.add_argument("--shadow-tasks", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=2)
    add_fleet_arguments(p)
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-rollout-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    v1_dir = small_bundle(work, data_dir, args.train_epochs)
    v2_dir = small_bundle(work, data_dir, max(1, args.train_epochs - 2))
    log_dir = work / "logs-rollout"
    log_dir.mkdir(exist_ok=True)
    figures: dict[str, Any] = {"args": vars(args)}
    with LocalRedis(work / "redis-rollout") as server:
        r = redis.Redis.from_url(server.url)
        r.flushdb()
        with ImgqClient(server.url, queue="imgq") as client:
            v1, _ = publish(r, v1_dir, 1 << 30, client.queue, make_stable=True)
            v2, _ = publish(r, v2_dir, 1 << 30, client.queue)
            print(f"v1 {v1.version}, v2 {v2.version}; switch: {args.switch_tasks} tasks, one "
                  "worker", flush=True)  # fmt: skip
            figures["switch"] = s = switch(server.url, client, images, args, log_dir,
                                           (v1.sha256, v2.sha256))  # fmt: skip
            print(json.dumps(s, indent=1), flush=True)
            publish(r, v1_dir, 1 << 30, client.queue, make_stable=True)
            print(f"shadow: {args.shadow_tasks} tasks, {args.workers} workers", flush=True)
            figures["shadow"] = sh = shadow_cost(server.url, client, images, args, log_dir,
                                                 v2.sha256)  # fmt: skip
    per_task = 1000 / sh["shadow_rate"] - 1000 / sh["plain_rate"]
    med = statistics.median
    print(
        f"\nswitch ({s['events']} events, one worker): largest gap between stored results in the "
        f"{s['window_s']:g} s after a rollout start (candidate loaded beside the stable one), "
        f"median {med(s['max_gap_ms_at_start']):.0f} ms, "
        f"worst {max(s['max_gap_ms_at_start']):.0f}; "
        f"after a promote median {med(s['max_gap_ms_at_promote']):.0f} ms, worst "
        f"{max(s['max_gap_ms_at_promote']):.0f}; between events (baseline) median "
        f"{med(s['max_gap_ms_between']):.0f} ms, worst {max(s['max_gap_ms_between']):.0f}; "
        f"throughput after a start {s['rate_after_start']:.0f} vs {s['rate_between']:.0f} tasks/s"
    )
    print(
        f"shadow 100%: {sh['shadow_rate']:.0f} vs {sh['plain_rate']:.0f} tasks/s "
        f"({sh['shadow_rate'] / sh['plain_rate']:.2f}x), worker CPU {sh['shadow_cpu_ms']:.3f} "
        f"vs {sh['plain_cpu_ms']:.3f} ms per task (+{sh['shadow_cpu_ms'] - sh['plain_cpu_ms']:.3f}"
        f" ms), wall +{per_task:.3f} ms per task at the fleet's rate"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
