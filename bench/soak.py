"""Soak: a long, steady stream of tasks through real workers; memory must stay flat and no task
may be lost (issue 7).

It starts a private ``redis-server`` (append-only, as deployed) and ``--workers`` `imgq worker`
processes with their production defaults (drift statistics on), then keeps them busy with
``--tasks`` tasks made from the sample data set: chunks of ``--chunk`` tasks are enqueued with
``ImgqClient.classify_many`` one chunk ahead of the results being collected, so the workers
never run dry. Every ``--bad-every``-th task is a corrupt image (alternately not an image and a
truncated JPEG), so the error path runs all along too.

Printed: each worker's resident memory (``VmRSS``) when idle after start, after every chunk, and
at the end; then lost tasks (no result within ``--timeout-s`` after the last enqueue), tasks
with the wrong outcome (a good image failing or a corrupt one succeeding), what is left in the
queue and in flight, and the memory growth from the first chunk (warm) to the end.
Exit status 1 when any task was lost or got the wrong outcome.

    .venv/bin/python bench/soak.py                          # 20,000 tasks, 2 workers
    .venv/bin/python bench/soak.py --tasks 100000 --work-dir /tmp/imgq-soak

The sample model is trained once (TensorFlow, ~1 minute) and kept in ``--work-dir``; pass
``--model DIR`` to soak another bundle.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import TimeoutError as ResultTimeout
from harness import BenchFleet, imgq_workers, sample_images, small_bundle

from imgq.localredis import LocalRedis
from imgq.shared.errors import InvalidImage
from imgq.worker.client import ImgqClient


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def task_stream(images: Sequence[bytes], n: int, bad_every: int) -> Iterator[tuple[bytes, bool]]:
    """``n`` (image, is_good) pairs cycling through ``images``, every ``bad_every``-th corrupt."""
    bad = [b"this is not an image at all", images[0][: len(images[0]) // 2]]
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            yield bad[(i // bad_every) % 2], False
        else:
            yield images[i % len(images)], True


def chunks(pairs: Iterator[tuple[bytes, bool]], size: int) -> Iterator[list[tuple[bytes, bool]]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    while chunk := list(itertools.islice(pairs, size)):
        yield chunk


def check(outcomes: Sequence[Any], good: Sequence[bool]) -> tuple[int, int]:
    """(lost, wrong): tasks with no result, and tasks whose outcome is not what their input
    deserves (a result dict for a good image, InvalidImage for a corrupt one)."""
    lost = sum(isinstance(o, ResultTimeout) for o in outcomes)
    wrong = sum(
        not isinstance(o, ResultTimeout) and not isinstance(o, dict if g else InvalidImage)
        for o, g in zip(outcomes, good, strict=True)
    )
    return lost, wrong


def soak(args: argparse.Namespace, work: Path) -> int:
    data_dir, images = sample_images(work, args.per_class)
    bundle = Path(args.model) if args.model else small_bundle(work, data_dir, args.train_epochs)
    server = LocalRedis(work / "redis").start()
    try:
        with (
            ImgqClient(server.url) as client,
            imgq_workers(
                server.url, bundle, client, args, work, env={"IMGQ_METRICS_PORT": "0"}
            ) as fleet,
        ):
            return _run(args, client, fleet, images, redis.Redis.from_url(server.url))
    finally:
        server.stop()


def _run(
    args: argparse.Namespace,
    client: ImgqClient,
    fleet: BenchFleet,
    images: Sequence[bytes],
    r: redis.Redis,
) -> int:
    pids = fleet.pids

    def report(label: str) -> list[float]:
        rss = [rss_mib(p) for p in pids]
        shown = "  ".join(f"{m:7.1f}" for m in rss)
        print(f"{label:>16}  RSS MiB per worker: {shown}", flush=True)
        return rss

    print(f"{len(pids)} workers, {args.tasks} tasks, 1 in {args.bad_every} corrupt", flush=True)
    start_rss = report("idle after start")
    totals = collections.Counter[str]()
    warm_rss: list[float] = []

    def collect(pending: list[Any], good: list[bool]) -> None:
        lost, wrong = check(fleet.results(pending, args.timeout_s), good)
        totals.update(done=len(pending), lost=lost, wrong=wrong)
        rss = report(f"{totals['done']} done")
        warm_rss[:] = warm_rss or rss

    # One chunk is enqueued ahead of the one whose results are collected: no idle gaps.
    in_flight: collections.deque[tuple[list[Any], list[bool]]] = collections.deque()
    started = time.monotonic()
    for pairs in chunks(task_stream(images, args.tasks, args.bad_every), args.chunk):
        in_flight.append((client.classify_many(i for i, _ in pairs), [g for _, g in pairs]))
        if len(in_flight) == 2:
            collect(*in_flight.popleft())
    while in_flight:
        collect(*in_flight.popleft())
    elapsed_s = time.monotonic() - started
    end_rss = report("end")
    left = r.llen(client.queue) + sum(r.llen(k) for k in r.keys("imgq:inflight:*"))
    done, lost, wrong = totals["done"], totals["lost"], totals["wrong"]
    growth = [e - w for e, w in zip(end_rss, warm_rss, strict=True)]
    print(f"{done} tasks in {elapsed_s:.0f} s ({done / elapsed_s:.0f} tasks/s)")
    print(f"lost {lost}; wrong outcome {wrong}; left in queue or in flight {left}")
    print(
        "RSS MiB start -> warm -> end: "
        + "; ".join(
            f"{s:.1f} -> {w:.1f} -> {e:.1f}"
            for s, w, e in zip(start_rss, warm_rss, end_rss, strict=True)
        )
        + f"; growth warm -> end {max(growth):+.1f} MiB at most"
    )
    return 1 if lost or wrong or left else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--chunk", type=int, default=2_500, help="tasks per enqueue and per report")
    p.add_argument("--bad-every", type=int, default=50, help="every N-th task corrupt; 0: none")
    p.add_argument("--timeout-s", type=float, default=300.0, help="wait for a chunk's results")
    p.add_argument("--model", help="bundle to serve (default: the sample model, trained once)")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=int, default=1, help="batch threads per worker")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per worker")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--train-epochs", type=int, default=5, help="epochs for the sample model")
    p.add_argument("--per-class", type=int, default=100, help="sample images per class")
    p.add_argument("--work-dir", help="keep data, model and logs here (reused when re-run)")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    return soak(args, work)


if __name__ == "__main__":
    sys.exit(main())
