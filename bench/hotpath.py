"""Where a worker's CPU goes per task, stage by stage, with and without drift statistics.

One process runs the worker's own batch loop (``BatchRunner.run_once``: the bulk take, parse,
decode, drift features, resize, one model pass, one Redis pipeline) against a private append-only
``redis-server`` until a queue of ``--tasks`` sample-image tasks is drained. Each stage is timed
in place with this thread's CPU clock (``time.thread_time``), so waiting on Redis and other
processes on the shared cores do not count; the stages are the module functions and methods the
loop calls, wrapped for the measurement. Drains without and with drift statistics alternate
``--rounds`` times and the medians are printed, because drift's cost is a few percent of a task,
within the drift of this machine's speed from one drain to the next.

    .venv/bin/python bench/hotpath.py --work-dir /tmp/tp-s10
    .venv/bin/python bench/hotpath.py --model /tmp/tp-s10/model-mobilenetv2-224 --tasks 1000

The model is bench/throughput.py's ``small`` sample model unless ``--model`` names a bundle.
This is the profile behind docs/benchmarks.md's "where the time goes"; ``bench/throughput.py
--profile`` gives cProfile's view of whole worker processes (start-up included).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from throughput import sample_images, small_bundle

import worker.batching as batching
from imgq.localredis import LocalRedis
from worker.bundle import ModelBundle
from worker.client import ImgqClient
from worker.drift import DriftDetector, DriftRecorder
from worker.intake import Intake, Lane
from worker.metrics import WorkerMetrics
from worker.settings import WorkerSettings

#: Module functions of worker/batching.py timed in place, in the order a task meets them.
_FUNCTIONS = ("parse_message", "decode_base64", "decode_image", "image_features", "resize_image",
              "normalise_batch", "json_dumps")  # fmt: skip
#: Methods timed in place: (class, method, stage name).
_METHODS = (
    (ModelBundle, "predict", "onnxruntime (predict)"),
    (DriftRecorder, "out_of_range", "drift: out-of-range check"),
    (DriftRecorder, "add_to_pipeline", "drift: bin counts (EVAL queued)"),
    (DriftDetector, "evaluate", "drift: window verdicts"),
    (batching.BatchRunner, "_store_once", "Redis pipeline (results, acks, events, drift)"),
    (Lane, "take", "bulk take (LMOVE transaction)"),
)

Timings = dict[str, float]
_WHOLE = "whole loop (window verdicts included)"


def _timed(name: str, fn: Callable[..., Any], totals: Timings) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.thread_time() - t0

    return wrapper


def instrument(totals: Timings) -> None:
    """Wrap every stage so that its thread CPU time adds up in ``totals`` (seconds)."""
    for name in _FUNCTIONS:
        setattr(batching, name, _timed(name, getattr(batching, name), totals))
    for cls, method, name in _METHODS:
        setattr(cls, method, _timed(name, getattr(cls, method), totals))


def drain_once(
    url: str, bundle: ModelBundle, images: list[bytes], n: int, drift: bool, totals: Timings
) -> float:
    """Serve ``n`` tasks in this thread; returns the thread CPU seconds of the whole loop."""
    r = redis.Redis.from_url(url)
    queue = "hotpath"
    with ImgqClient(url, queue=queue) as client:
        client.classify_many(images[i % len(images)] for i in range(n))
        settings = WorkerSettings(broker_url=url, queue=queue, drift_enabled=drift)
        intake = Intake(r, queue, f"hotpath-{drift}", lease_ttl_s=60)
        intake.renew_lease()
        recorder = (
            DriftRecorder(r, bundle.manifest, window_size=settings.drift_window, window_s=300)
            if drift
            else None
        )
        events = batching.TaskEvents(client.app, "hotpath@bench", 0)
        runner = batching.BatchRunner(
            settings, bundle, r, intake.lanes[0], client.app.backend,
            WorkerMetrics(CollectorRegistry()), recorder, events,
        )  # fmt: skip
        totals.clear()
        t0 = time.thread_time()
        while r.llen(queue):
            runner.run_once()
        loop_s = time.thread_time() - t0
        if recorder is not None:
            recorder.close()  # windows still being judged are finished (and counted) first
    return loop_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", help="bench/throughput.py's work folder (data and models)")
    p.add_argument("--model", help="a bundle to serve instead of the small sample model")
    p.add_argument("--tasks", type=int, default=3000, help="tasks per drain")
    p.add_argument("--rounds", type=int, default=3, help="drains without and with drift each")
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-hotpath-"))
    data_dir, images = sample_images(work, 100)
    model_dir = Path(args.model) if args.model else small_bundle(work, data_dir, 5)
    bundle = ModelBundle.load(model_dir, device="cpu", threads=1, check_golden=False)
    bundle.calibrate_infer_batch(32)
    gc.collect()
    gc.freeze()  # as the worker does after start-up
    totals: Timings = defaultdict(float)
    instrument(totals)
    runs: dict[bool, list[Timings]] = {False: [], True: []}
    with LocalRedis(work / "redis-hotpath") as server:
        for _ in range(args.rounds):
            for drift in (False, True):
                loop_s = drain_once(server.url, bundle, images, args.tasks, drift, totals)
                # The window verdicts run in the recorder's own thread: add them to the loop.
                whole_s = loop_s + totals["drift: window verdicts"]
                runs[drift].append({_WHOLE: whole_s, **totals})
                us = whole_s / args.tasks * 1e6
                print(f"drift {'on ' if drift else 'off'}: {us:.0f} us/task", flush=True)
    stages = list(runs[True][0])

    def median_us(drift: bool, stage: str) -> float:
        return statistics.median(t.get(stage, 0.0) for t in runs[drift]) / args.tasks * 1e6

    print(f"\n{model_dir} ({bundle.manifest.name}), {args.tasks} tasks per drain, median of "
          f"{args.rounds}; infer_batch {bundle.infer_batch}\n")  # fmt: skip
    print("| stage (thread CPU per task) | drift off µs | drift on µs |")
    print("|---|---:|---:|")
    for stage in stages:
        print(f"| {stage} | {median_us(False, stage):.1f} | {median_us(True, stage):.1f} |")
    off, on = median_us(False, _WHOLE), median_us(True, _WHOLE)
    print(f"\ndrift statistics: {on - off:+.1f} µs per task ({(on - off) / off:+.1%} of the loop "
          "without them)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
