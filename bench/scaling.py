"""Horizontal scaling of imgq: drain rate with 1, 2 and 3 worker processes on one queue (issue 6).

Each drain is bench/throughput.py's: ``--tasks`` tasks of the sample images are enqueued and
parked, the workers are started and pinged, the queue is released with one ``RENAME``, and the
rate is tasks / (last result's ``date_done`` - release). Every worker is one process with one
batch thread and one onnxruntime thread, the sizing docs/operations.md recommends. Beside the
rate it prints where the CPU went during the drain — the workers, ``redis-server`` and this
process (which enqueues and then polls the results) — and how many cores that kept busy, because
on a small machine Redis and the producer share the cores with the workers. The same drain with
``IMGQ_TASK_EVENTS=false`` at the largest worker count that fits the cores shows what Celery
task events (Flower) cost.

    .venv/bin/python bench/scaling.py                          # 1, 2, 3 workers, 3,000 tasks
    .venv/bin/python bench/scaling.py --workers 1,2,4 --tasks 5000 --work-dir /tmp/imgq-bench

The model is bench/throughput.py's ``small`` sample model (trained once per work folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import drain, imgq_workers, sample_images, small_bundle, tree_cpu_s

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient


def measure(
    url: str, redis_pid: int, bundle: Path, images: list[bytes], args: argparse.Namespace,
    work: Path, n_workers: int, **env: str,
) -> dict[str, Any]:  # fmt: skip
    """One drain with ``n_workers`` workers, plus the CPU of Redis and of this process."""
    options = argparse.Namespace(**{**vars(args), "workers": n_workers})
    with ImgqClient(url, queue=f"bench-scaling-{n_workers}") as client:
        redis0, own0, t0 = tree_cpu_s([redis_pid]), time.process_time(), time.monotonic()
        result = drain(
            url, client, images, args.tasks,
            lambda: imgq_workers(url, bundle, client, options, work, env=env),
        )  # fmt: skip
        elapsed_s = time.monotonic() - t0
    result["workers"] = n_workers
    result["redis_cpu_ms_per_task"] = (tree_cpu_s([redis_pid]) - redis0) / args.tasks * 1000
    result["producer_cpu_ms_per_task"] = (time.process_time() - own0) / args.tasks * 1000
    # Cores kept busy while draining: CPU per task of everything involved times tasks per second.
    cpu_ms = sum(result[k] for k in ("cpu_ms_per_task", "redis_cpu_ms_per_task"))
    result["busy_cores"] = cpu_ms * result["rate"] / 1000
    result["wall_s"] = elapsed_s
    return result


def report(rows: list[dict[str, Any]], events_off: dict[str, Any] | None) -> str:
    """The figures as a Markdown table, ratios against one worker."""
    base = rows[0]["rate"]
    lines = [
        "| workers | tasks/s | vs 1 worker | worker CPU ms/task | Redis CPU ms/task "
        "| client CPU ms/task | busy cores | mean batch | load avg |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['rate']:,.0f} | {r['rate'] / base:.2f}x "
            f"| {r['cpu_ms_per_task']:.2f} | {r['redis_cpu_ms_per_task']:.2f} "
            f"| {r['producer_cpu_ms_per_task']:.2f} | {r['busy_cores']:.2f} "
            f"| {r['mean_batch']:.1f} | {r['loadavg_1m']:.1f} |"
        )
    if events_off is not None:
        on = next(r for r in rows if r["workers"] == events_off["workers"])
        lines.append(
            f"\nTask events off, {events_off['workers']} workers: {events_off['rate']:,.0f} "
            f"tasks/s, {events_off['cpu_ms_per_task']:.2f} worker CPU ms/task "
            f"(events on: {on['rate']:,.0f} tasks/s, {on['cpu_ms_per_task']:.2f} ms/task; "
            f"on/off rate {on['rate'] / events_off['rate']:.2f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,3", help="comma-separated worker counts")
    p.add_argument("--tasks", type=int, default=3000, help="tasks per drain")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--per-class", type=int, default=100, help="sample images per class")
    p.add_argument("--train-epochs", type=int, default=5, help="epochs for the sample model")
    p.add_argument("--work-dir", help="keep data, model and logs here (reused when re-run)")
    p.add_argument(
        "--no-events-check", action="store_true", help="skip the drain with task events off"
    )
    args = p.parse_args(argv)
    counts = sorted({int(n) for n in args.workers.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        p.error(f"--workers must list counts >= 1, got {args.workers!r}")
    # What bench/harness.py's imgq_workers reads besides the worker count.
    args.concurrency, args.threads, args.max_wait_ms = 1, 1, 0.0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    print(f"work folder {work}; {cores} cores; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    bundle = small_bundle(work, data_dir, args.train_epochs)
    server = LocalRedis(work / "redis").start()
    assert server.process is not None
    rows: list[dict[str, Any]] = []
    events_off = None
    try:
        for n in counts:
            rows.append(measure(server.url, server.process.pid, bundle, images, args, work, n))
            print(f"{n} workers: {rows[-1]}", flush=True)
        if not args.no_events_check:
            n = max(c for c in counts if c <= cores) if counts[0] <= cores else counts[0]
            events_off = measure(
                server.url, server.process.pid, bundle, images, args, work, n,
                IMGQ_TASK_EVENTS="false",
            )  # fmt: skip
            print(f"{n} workers, task events off: {events_off}", flush=True)
    finally:
        server.stop()
    print("\n" + report(rows, events_off))
    return 0


if __name__ == "__main__":
    sys.exit(main())
