"""Where a worker's CPU goes per task, stage by stage, with and without drift statistics.

One process runs the worker's own batch loop (``BatchEngine.run_once`` with the classification
handler: the bulk take, parse, decode, drift features, resize, one model pass, one Redis round
trip) against a private append-only
``redis-server`` until a queue of ``--tasks`` sample-image tasks is drained. Each stage is timed
in place with this thread's CPU clock (``time.thread_time``), so waiting on Redis and other
processes on the shared cores do not count; the stages are the module functions and methods the
loop calls, wrapped for the measurement. Drains without and with drift statistics alternate
``--rounds`` times and the medians are printed, because drift's cost is a few percent of a task,
within the drift of this machine's speed from one drain to the next.

    .venv/bin/python bench/hotpath.py --work-dir /tmp/tp-s10
    .venv/bin/python bench/hotpath.py --model /tmp/tp-s10/model-mobilenetv2-224 --tasks 1000

``--interleaved DRAINS`` measures drift's cost paired instead: one drain with drift statistics
on for every other batch, each batch timed by the thread's CPU clock (plus the recorder
thread's window verdicts). Consecutive batches see the machine at the same speed, so the
comparison holds to a few tenths of a percent where separate drains differ by tens of percent.

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

import cv2
import redis
from harness import sample_images, small_bundle
from prometheus_client import CollectorRegistry

import imgq.worker.engine as engine_module
import imgq.worker.handlers.classify as classify
from imgq.localredis import LocalRedis
from imgq.shared.bundle import ModelBundle
from imgq.shared.novelty import NoveltyModel
from imgq.shared.reference import RangeCheck
from imgq.worker.broker.intake import Intake, Lane
from imgq.worker.client import ImgqClient
from imgq.worker.drift import DriftDetector, DriftRecorder
from imgq.worker.engine import BatchEngine
from imgq.worker.handlers.classify import ClassifyHandler
from imgq.worker.metrics import WorkerMetrics
from imgq.worker.settings import WorkerSettings
from imgq.worker.storing import BatchStore
from imgq.worker.wire import TASK_NAME
from imgq.worker.wire.events import TaskEvents

#: Module functions timed in place where the engine and the handler call them, in the order a
#: task meets them.
_FUNCTIONS = ((engine_module, "parse_message"), (classify, "decode_base64"),
              (classify, "probe_image"), (classify, "decode_image"), (classify, "image_features"),
              (classify, "resize_image"), (classify, "normalise_batch"))  # fmt: skip
#: Methods timed in place: (class, method, stage name).
_METHODS = (
    (ModelBundle, "predict", "onnxruntime (predict)"),
    (ModelBundle, "predict_with_features", "onnxruntime (predict, with features)"),
    (RangeCheck, "outside", "drift: out-of-range check"),
    (NoveltyModel, "score", "drift: novelty"),
    (DriftRecorder, "observe_batch", "drift: the batch's statistics (all of them)"),
    (DriftRecorder, "window_counts", "drift: bin counts (for the settle script)"),
    (DriftDetector, "evaluate", "drift: window verdicts"),
    (BatchStore, "_store_once", "Redis round trip (settle script, events)"),
    (Lane, "take", "bulk take (LMOVE transaction)"),
)

Timings = dict[str, float]
_QUEUE = "hotpath"
_WHOLE = "whole loop (window verdicts included)"
_PROCESS = "whole process, every thread (process CPU)"


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
    for module, name in _FUNCTIONS:
        setattr(module, name, _timed(name, getattr(module, name), totals))
    for cls, method, name in _METHODS:
        setattr(cls, method, _timed(name, getattr(cls, method), totals))


def loaded_runner(
    client: ImgqClient, bundle: ModelBundle, images: list[bytes], n: int, drift: bool
) -> tuple[BatchEngine, DriftRecorder | None]:
    """``n`` sample-image tasks queued, and a batch engine on them as a worker has it."""
    url = client.broker_url
    r = redis.Redis.from_url(url)
    client.classify_many(images[i % len(images)] for i in range(n))
    settings = WorkerSettings(broker_url=url, queue=_QUEUE, drift_enabled=drift)
    intake = Intake(
        r, _QUEUE, f"hotpath-{drift}", lease_ttl_s=60, max_message_bytes=settings.max_message_bytes
    )
    intake.renew_lease()
    recorder = (
        DriftRecorder(r, bundle.manifest, window_size=settings.drift_window, window_s=300)
        if drift
        else None
    )
    events = TaskEvents(client.app, "hotpath@bench", 0)
    metrics = WorkerMetrics(CollectorRegistry())
    handler = ClassifyHandler(bundle, settings, metrics, recorder)
    runner = BatchEngine(settings, {TASK_NAME: handler}, r, intake.lanes[0], client.app.backend,
                         metrics, events)  # fmt: skip
    return runner, recorder


def _set_drift(runner: BatchEngine, recorder: DriftRecorder | None) -> None:
    """Turn drift statistics on or off between two batches of one engine."""
    handler = runner.handlers[TASK_NAME]
    assert isinstance(handler, ClassifyHandler)
    handler.drift = recorder
    handler.observers = [recorder] if recorder is not None else []
    runner.observer = recorder


def drain_once(
    url: str, bundle: ModelBundle, images: list[bytes], n: int, drift: bool, totals: Timings
) -> tuple[float, float]:
    """Serve ``n`` tasks in this thread; returns the CPU seconds of the whole loop in this thread
    and in the whole process (every thread: the drift thread's verdicts, and any helper thread
    a library starts, which the thread clock cannot see)."""
    r = redis.Redis.from_url(url)
    with ImgqClient(url, queue=_QUEUE) as client:
        runner, recorder = loaded_runner(client, bundle, images, n, drift)
        totals.clear()
        t0, p0 = time.thread_time(), time.process_time()
        while r.llen(_QUEUE):
            runner.run_once()
        loop_s = time.thread_time() - t0
        if recorder is not None:
            recorder.close()  # windows still being judged are finished (and counted) first
        process_s = time.process_time() - p0
    return loop_s, process_s


def interleaved_drain(
    url: str, bundle: ModelBundle, images: list[bytes], n: int, totals: Timings
) -> dict[bool | str, list[float]]:
    """Serve ``n`` tasks with drift statistics on for every other batch: the paired measure of
    their cost. Consecutive batches are ~30 ms apart, so both kinds see the machine at the same
    speed, which separate drains (or two workers on two cores) do not on this VM.

    Returns:
        Per kind (drift on: True), ``[thread CPU seconds, tasks]``; the window verdicts, which
        run in the recorder's thread, are added to the drift batches. ``"process"``: the
        process's CPU seconds (every thread) over the drain, and its tasks.
    """
    r = redis.Redis.from_url(url)
    sums: dict[bool | str, list[float]] = {False: [0.0, 0.0], True: [0.0, 0.0]}
    with ImgqClient(url, queue=_QUEUE) as client:
        runner, recorder = loaded_runner(client, bundle, images, n, drift=True)
        assert recorder is not None
        totals.clear()
        drift = False
        p0 = time.process_time()
        while r.llen(_QUEUE):
            _set_drift(runner, recorder if drift else None)
            t0 = time.thread_time()
            served = runner.run_once()
            sums[drift][0] += time.thread_time() - t0
            sums[drift][1] += served
            drift = not drift
        recorder.close()
        sums[True][0] += totals["drift: window verdicts"]
        # Every thread of the process: what the thread clocks above cannot see shows here.
        sums["process"] = [time.process_time() - p0, float(n)]
    return sums


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", help="bench/throughput.py's work folder (data and models)")
    p.add_argument("--model", help="a bundle to serve instead of the small sample model")
    p.add_argument("--tasks", type=int, default=3000, help="tasks per drain")
    p.add_argument("--rounds", type=int, default=3, help="drains without and with drift each")
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="DRAINS",
        help="instead: DRAINS drains with drift statistics on for every other batch",
    )
    args = p.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-hotpath-"))
    data_dir, images = sample_images(work, 100)
    model_dir = Path(args.model) if args.model else small_bundle(work, data_dir, 5)
    bundle = ModelBundle.load(model_dir, device="cpu", threads=1, check_golden=False)
    bundle.calibrate_infer_batch(32)
    gc.collect()
    gc.freeze()  # as the worker does after start-up
    cv2.setNumThreads(1)  # as `imgq worker` runs OpenCV (worker/commands/worker.py)
    totals: Timings = defaultdict(float)
    instrument(totals)
    if args.interleaved:
        return report_interleaved(work, bundle, images, args, totals)
    runs: dict[bool, list[Timings]] = {False: [], True: []}
    with LocalRedis(work / "redis-hotpath") as server:
        for _ in range(args.rounds):
            for drift in (False, True):
                loop_s, process_s = drain_once(
                    server.url, bundle, images, args.tasks, drift, totals
                )
                # The window verdicts run in the recorder's own thread: add them to the loop.
                whole_s = loop_s + totals["drift: window verdicts"]
                runs[drift].append({_WHOLE: whole_s, _PROCESS: process_s, **totals})
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
    for stage, what in ((_WHOLE, "the loop"), (_PROCESS, "the process")):
        off, on = median_us(False, stage), median_us(True, stage)
        print(f"\ndrift statistics by {what}: {on - off:+.1f} µs per task ({(on - off) / off:+.1%} "
              f"of {what} without them)")  # fmt: skip
    return 0


def report_interleaved(
    work: Path, bundle: ModelBundle, images: list[bytes], args: argparse.Namespace, totals: Timings
) -> int:
    """Print drift's cost per drain of ``--interleaved`` and over all of them."""
    costs = []
    total: dict[bool | str, list[float]] = {False: [0.0, 0.0], True: [0.0, 0.0]}
    with LocalRedis(work / "redis-hotpath") as server:
        for i in range(args.interleaved):
            sums = interleaved_drain(server.url, bundle, images, args.tasks, totals)
            on_us, off_us = (sums[k][0] / max(1.0, sums[k][1]) * 1e6 for k in (True, False))
            costs.append(on_us / off_us - 1)
            for k in (False, True):
                total[k] = [a + b for a, b in zip(total[k], sums[k], strict=True)]
            seen_us = (sums[True][0] + sums[False][0]) / args.tasks * 1e6
            process_us = sums["process"][0] / args.tasks * 1e6
            print(f"drain {i + 1}: drift on {on_us:.0f} µs/task ({sums[True][1]:.0f} tasks), "
                  f"off {off_us:.0f} ({sums[False][1]:.0f}): {costs[-1]:+.1%}; process CPU "
                  f"{process_us:.0f} µs/task, threads timed {seen_us:.0f}", flush=True)  # fmt: skip
    on_us, off_us = (total[k][0] / total[k][1] * 1e6 for k in (True, False))
    print(f"\n{args.interleaved} drains of {args.tasks} tasks, drift statistics on for every "
          f"other batch: {on_us:.0f} vs {off_us:.0f} µs of thread CPU per task, "
          f"{on_us - off_us:+.0f} µs ({on_us / off_us - 1:+.1%}); per drain median "
          f"{statistics.median(costs):+.1%}, range {min(costs):+.1%} to "
          f"{max(costs):+.1%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
