"""Throughput of imgq against a plain Celery worker and against no queue at all (issue 4).

For each model — the default sample model (``small`` CNN at 32x32, trained briefly by
``trainer.train.train_bundle``) and MobileNetV2 at 224x224 (random weights exported with the
trainer's ``export_onnx``: throughput does not depend on the weights, and training it here would
take most of an hour) — it measures on this machine's cores:

(a) naive: ``bench/naive_worker.py``, one Celery task per image, prefork, one process per core;
(b) imgq: ``imgq worker`` processes (default 2 processes x 1 batch thread x 1 onnxruntime thread);
(c) limit: the same decode + preprocess + inference in 2 processes x 1 thread, no queue.

* drain rate: ``--tasks`` tasks are enqueued and parked under another key, the workers are
  started and pinged (start-up reported separately), then the queue is released with one
  ``RENAME``; rate = tasks / (last result's ``date_done`` - release);
* worker CPU seconds per task (``/proc/<pid>/stat`` of the worker processes and their children,
  from release to the last result) against (c)'s CPU seconds per image;
* paced open-loop load on (b) at 50% and 90% of its drain rate: p50/p95/p99 latency from enqueue
  to result stored, and the mean batch size;
* bulk enqueue rate of ``ImgqClient.classify_many`` (no worker running).

Everything runs against a private ``redis-server`` (append-only, as deployed) that is stopped at
the end, together with every worker. The load average is printed beside the figures: the cores
are shared, so a busy machine shows up there.

    .venv/bin/python bench/throughput.py                      # both models, ~10 minutes
    .venv/bin/python bench/throughput.py --quick              # smaller, ~3 minutes
    .venv/bin/python bench/throughput.py --models small --tasks 2000 --profile

Profiling hook: ``--profile`` adds one more drain of (b) with every worker thread under cProfile
and prints where the time goes. The hook works for any worker run by hand, too::

    .venv/bin/python bench/throughput.py profile-worker OUT.prof -- --model DIR --queue imgq

runs ``imgq worker --model DIR --queue imgq`` with a cProfile profiler in each of its threads
(``threading.setprofile``; ``python -m cProfile`` would see only the main thread, which merely
waits) and writes the merged statistics to ``OUT.prof`` when the worker exits (SIGTERM). The
profilers count each thread's CPU time (``time.thread_time``), not wall time, so idle waits drop
out and other processes on the shared cores do not inflate the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from harness import (
    BenchFleet,
    add_fleet_arguments,
    cycled,
    drain,
    imgq_workers,
    mobilenet_bundle,
    naive_workers,
    paced,
    pair_and_rest_cores,
    print_profile,
    profile_worker,
    sample_images,
    small_bundle,
)

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient

# -- (c) the in-process limit ----------------------------------------------------------------------


def _limit_share(bundle_dir: str, images: Sequence[bytes]) -> tuple[float, float]:
    """Wall and CPU seconds of decode + preprocess + inference, one image at a time."""
    import cv2

    from imgq.shared.bundle import ModelBundle
    from imgq.shared.decode import decode_image
    from imgq.shared.preprocess import preprocess_batch

    cv2.setNumThreads(1)  # as `imgq worker` runs OpenCV (worker/commands/worker.py)
    bundle = ModelBundle.load(bundle_dir, device="cpu", threads=1, check_golden=False)
    spec = bundle.manifest.preprocess
    for data in images[:20]:  # warm up
        bundle.predict(preprocess_batch([decode_image(data)], spec))
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for data in images:
        bundle.predict(preprocess_batch([decode_image(data)], spec))
    return time.perf_counter() - wall0, time.process_time() - cpu0


def _full_batch_ms(bundle_dir: str, images: Sequence[bytes], max_batch: int) -> float:
    """Median time of decode + preprocess + inference of one full batch, one thread."""
    from imgq.shared.bundle import ModelBundle
    from imgq.shared.decode import decode_image
    from imgq.shared.preprocess import preprocess_batch

    bundle = ModelBundle.load(bundle_dir, device="cpu", threads=1, check_golden=False)
    spec = bundle.manifest.preprocess
    batch = list(images[:max_batch])
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        bundle.predict(preprocess_batch([decode_image(d) for d in batch], spec))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1000


def in_process_limit(
    bundle_dir: Path, images: Sequence[bytes], n: int, procs: int, max_batch: int
) -> dict[str, float]:
    """(c): ``n`` images split over ``procs`` processes of one thread each."""
    work = list(cycled(images, n))
    shares = [(str(bundle_dir), work[i::procs]) for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        timings = pool.starmap(_limit_share, shares)
        batch_ms = pool.apply(_full_batch_ms, (str(bundle_dir), images, max_batch))
    wall = max(t[0] for t in timings)
    cpu = sum(t[1] for t in timings)
    return {"rate": n / wall, "cpu_ms_per_task": cpu / n * 1000, "full_batch_ms": batch_ms}


# -- measurements ----------------------------------------------------------------------------------


def bulk_enqueue(url: str, images: Sequence[bytes], n: int) -> dict[str, float]:
    """Rate of ``classify_many`` into a queue no worker reads (then deleted)."""
    with ImgqClient(url, queue="bench-bulk") as client:
        client.classify_many(images[:10])  # connect
        t0 = time.perf_counter()
        client.classify_many(cycled(images, n))
        elapsed = time.perf_counter() - t0
        redis.Redis.from_url(url).delete("bench-bulk")
    mean_bytes = sum(len(i) for i in images) / len(images)
    return {
        "rate": n / elapsed,
        "mean_image_bytes": mean_bytes,
        "mb_per_s": n * mean_bytes / elapsed / 1e6,
    }


def drift_ab(
    url: str,
    bundle: Path,
    client: ImgqClient,
    images: Sequence[bytes],
    args: argparse.Namespace,
    work: Path,
    on_first: bool = True,
) -> dict[str, Any]:
    """Drift statistics' cost side by side: one worker with them and one without drain one queue
    at the same time, so both see the same machine (this VM's speed drifts by tens of percent
    between consecutive drains, more than the cost measured), both pinned to one core
    (:func:`~harness.pair_and_rest_cores`; pin Redis and this process to the rest); CPU per
    task of each.
    ``on_first=False`` starts the worker without drift first (alternate it between rounds)."""
    envs = [{"IMGQ_DRIFT": "true"}, {"IMGQ_DRIFT": "false"}]
    if not on_first:
        envs.reverse()
    on, off = (0, 1) if on_first else (1, 0)
    pinned = (pair_and_rest_cores()[0],)
    d = drain(
        url,
        client,
        images,
        args.drift_ab_tasks,
        lambda: imgq_workers(url, bundle, client, args, work, envs=envs, cores=pinned),
    )
    on_tasks, off_tasks = d["drift_tasks"], args.drift_ab_tasks - d["failures"] - d["drift_tasks"]
    on_ms = d["worker_cpu_s"][on] / max(1, on_tasks) * 1000
    off_ms = d["worker_cpu_s"][off] / max(1, off_tasks) * 1000
    return {
        "on_tasks": on_tasks,
        "off_tasks": off_tasks,
        "on_cpu_ms_per_task": on_ms,
        "off_cpu_ms_per_task": off_ms,
        "cost": on_ms / off_ms - 1,
        "failures": d["failures"],
        "loadavg_1m": d["loadavg_1m"],
    }


def bench_model(
    name: str, bundle: Path, url: str, images: Sequence[bytes], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """All measurements of one model."""
    out: dict[str, Any] = {"bundle": str(bundle)}
    say = lambda what: print(f"[{name}] {what}  (load {os.getloadavg()[0]:.2f})", flush=True)  # noqa: E731
    # (c) is short and this VM's speed drifts by tens of percent over minutes: measure it at the
    # start, after the naive drain and at the end, and compare with the median.
    out["limits"] = []

    def limit() -> None:
        say("(c) in-process limit")
        out["limits"].append(
            in_process_limit(bundle, images, args.tasks, args.workers, args.max_batch)
        )
        say(f"    {out['limits'][-1]}")

    limit()
    with ImgqClient(url, queue=f"bench-naive-{name}") as client:
        client.task_name = "imgq_naive.classify"
        say("(a) naive drain")
        out["naive"] = drain(
            url,
            client,
            images,
            args.naive_tasks,
            lambda: naive_workers(url, bundle, client, args, work),
        )
        say(f"    {out['naive']}")

    limit()
    with ImgqClient(url, queue=f"bench-imgq-{name}") as client:
        say("(b) imgq drain, then paced load at 50% and 90% of the drain rate")
        out["imgq"] = drain(
            url,
            client,
            images,
            args.tasks,
            lambda: imgq_workers(url, bundle, client, args, work),
            keep=lambda rate: [paced(client, images, s * rate, args.paced_s) for s in (0.5, 0.9)],
        )
        say(f"    {out['imgq']}")
        # Drift's cost is a few percent: alternate drains without and with it, so that the
        # machine's drift in speed falls on both alike, and compare medians.
        out["drift_off"], out["drift_on"] = [], [out["imgq"]]
        for i in range(args.drift_pairs):
            for key, drift in (("drift_off", "false"), ("drift_on", "true")):
                if key == "drift_on" and i == args.drift_pairs - 1:
                    continue  # the drain above was the first of the drains with drift statistics
                say(f"(b) imgq drain, drift statistics {'on' if drift == 'true' else 'off'}")

                def start(drift: str = drift) -> BenchFleet:
                    return imgq_workers(url, bundle, client, args, work, env={"IMGQ_DRIFT": drift})

                out[key].append(drain(url, client, images, args.tasks, start))
                say(f"    {out[key][-1]}")
        out["drift_ab"] = []
        for i in range(args.drift_ab):
            say("(b) drift statistics side by side: one worker with, one without")
            out["drift_ab"].append(
                drift_ab(url, bundle, client, images, args, work, on_first=i % 2 == 0)
            )
            say(f"    {out['drift_ab'][-1]}")
        if args.profile:
            profile_dir = work / f"profile-{name}"
            profile_dir.mkdir(exist_ok=True)
            say(f"(b) profiled imgq drain -> {profile_dir}")
            drain(
                url,
                client,
                images,
                args.tasks,
                lambda: imgq_workers(url, bundle, client, args, work, profile_dir=profile_dir),
            )
            print_profile(profile_dir)
    limit()
    out["limit"] = sorted(out["limits"], key=lambda m: m["rate"])[len(out["limits"]) // 2]
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The figures as Markdown, with the targets of issue 4."""
    lines = [
        f"bulk enqueue (classify_many, {args.tasks} tasks of "
        f"{results['bulk']['mean_image_bytes'] / 1000:.1f} kB): "
        f"**{results['bulk']['rate']:.0f} tasks/s** ({results['bulk']['mb_per_s']:.1f} MB/s of "
        "images; target >= 3,000)",
        "",
    ]

    def cap(m: dict[str, Any]) -> float:
        """Tasks/s the worker processes could reach with ``args.workers`` cores to themselves."""
        return float(args.workers * 1000 / m["cpu_ms_per_task"])

    def row(label: str, m: dict[str, Any], batch: str) -> str:
        return (
            f"| {label} | {m['rate']:.0f} | {m['cpu_ms_per_task']:.2f} | {cap(m):.0f} | "
            f"{m.get('redis_cpu_ms_per_task', float('nan')):.2f} | "
            f"{m.get('poller_cpu_ms_per_task', float('nan')):.2f} | {m['startup_s']:.1f} | "
            f"{batch} | {m['loadavg_1m']:.2f} |"
        )

    def rates(drains: list[dict[str, Any]], per: float, spec: str) -> str:
        return ", ".join(format(d["rate"] / per, spec) for d in drains)

    def median_cpu(drains: list[dict[str, Any]]) -> float:
        return statistics.median(d["cpu_ms_per_task"] for d in drains)

    def ab_lines(rounds: list[dict[str, Any]]) -> list[str]:
        if not rounds:
            return []
        each = ", ".join(
            f"{a['on_cpu_ms_per_task']:.3f} vs {a['off_cpu_ms_per_task']:.3f} ({a['cost']:+.1%})"
            for a in rounds
        )
        cost = statistics.median(a["cost"] for a in rounds)
        return [
            f"- drift statistics, side by side (one worker with, one without, one queue, "
            f"{len(rounds)} drains; worker CPU ms/task with vs without): {each}; "
            f"**median {cost:+.1%}**"
        ]

    for name in args.models:
        m = results[name]
        lim, naive, imgq = m["limit"], m["naive"], m["imgq"]
        on, off = m["drift_on"], m["drift_off"]
        drift_ms = median_cpu(on) - median_cpu(off)
        lines += [
            f"**{name}** ({m['bundle']})",
            "",
            "| | drain tasks/s | worker CPU ms/task | CPU-bound tasks/s | Redis CPU ms/task | "
            "bench poller CPU ms/task | start-up s | mean batch | load 1m |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            row(f"(a) naive Celery, prefork {args.workers}", naive, "1"),
            row(
                f"(b) imgq, {args.workers} x {args.concurrency} thread",
                imgq,
                f"{imgq['mean_batch']:.1f}",
            ),
            *[
                row(f"(b) imgq, drift on, run {i + 2}", d, f"{d['mean_batch']:.1f}")
                for i, d in enumerate(on[1:])
            ],
            *[
                row(f"(b) imgq, drift off, run {i + 1}", d, f"{d['mean_batch']:.1f}")
                for i, d in enumerate(off)
            ],
            f"| (c) in-process, {args.workers} x 1 thread, median of "
            f"{len(m.get('limits', [lim]))} | {lim['rate']:.0f} | "
            f"{lim['cpu_ms_per_task']:.2f} (per image) | {cap(lim):.0f} | - | - | - | 1 | - |",
            "",
            f"- (c) runs: {rates(m.get('limits', [lim]), 1.0, '.0f')} tasks/s; every imgq "
            f"drain against the median (c): drift on {rates(on, lim['rate'], '.0%')}, drift "
            f"off {rates(off, lim['rate'], '.0%')}",
            f"- measured: (b)/(a) = **{imgq['rate'] / naive['rate']:.2f}x**; (b)/(c) = "
            f"**{imgq['rate'] / lim['rate']:.0%}**; CPU-bound: (b)/(a) = "
            f"**{cap(imgq) / cap(naive):.2f}x**, (b)/(c) = **{cap(imgq) / cap(lim):.0%}**",
            f"- framework CPU per task (b) - (c) = "
            f"{imgq['cpu_ms_per_task'] - lim['cpu_ms_per_task']:.2f} ms, (a) - (c) = "
            f"{naive['cpu_ms_per_task'] - lim['cpu_ms_per_task']:.2f} ms",
            f"- drift statistics, consecutive drains: median worker CPU {median_cpu(on):.3f} "
            f"ms/task with, {median_cpu(off):.3f} without ({len(on)} and {len(off)} drains): "
            f"{drift_ms:+.3f} ms/task ({drift_ms / median_cpu(off):+.1%})",
            *ab_lines(m.get("drift_ab", [])),
            f"- one full batch ({args.max_batch}) decode + preprocess + infer, 1 thread: "
            f"{lim['full_batch_ms']:.1f} ms -> p99 target at 50% load: "
            f"{args.max_wait_ms + 3 * lim['full_batch_ms']:.0f} ms",
            "",
            "| paced load | target tasks/s | achieved | p50 ms | p95 ms | p99 ms | mean batch | "
            "load 1m |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for share, p in zip(("50%", "90%"), imgq["paced"], strict=True):
            lines.append(
                f"| {share} | {p['target_rate']:.0f} | {p['achieved_rate']:.0f} | "
                f"{p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | "
                f"{p['mean_batch']:.1f} | {p['loadavg_1m']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["profile-worker"]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit("usage: throughput.py profile-worker OUT.prof -- WORKER OPTIONS...")
        return profile_worker(argv[1], argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default="small,mobilenetv2", help="comma-separated: small, mobilenetv2"
    )
    p.add_argument("--tasks", type=int, default=5000, help="tasks per drain")
    p.add_argument("--naive-tasks", type=int, help="tasks for the naive drain (default --tasks)")
    p.add_argument("--paced-s", type=float, default=10.0, help="seconds per paced load level")
    add_fleet_arguments(p)
    p.add_argument("--profile", action="store_true", help="add a profiled drain of imgq")
    p.add_argument(
        "--drift-pairs",
        type=int,
        default=3,
        help="drains without and with drift statistics, alternating, for drift's cost",
    )
    p.add_argument(
        "--drift-ab",
        type=int,
        default=6,
        help="drains by one worker with and one without drift statistics at once, for its cost",
    )
    p.add_argument("--drift-ab-tasks", type=int, default=2000, help="tasks per side-by-side drain")
    p.add_argument(
        "--quick",
        action="store_true",
        help="1,000 tasks, 5 s paced levels, 40 images per class, 3 epochs",
    )
    p.add_argument("--report", metavar="JSON", help="only print the tables of a --json file")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved, argparse.Namespace(**saved["args"])))
        return 0
    if args.quick:
        args.tasks, args.paced_s, args.per_class, args.train_epochs = 1000, 5.0, 40, 3
        args.drift_pairs, args.drift_ab, args.drift_ab_tasks = 1, 1, 1000
    args.naive_tasks = args.naive_tasks or args.tasks
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {"small", "mobilenetv2"}
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from small, mobilenetv2")

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    bundles = {
        "small": lambda: small_bundle(work, data_dir, args.train_epochs),
        "mobilenetv2": lambda: mobilenet_bundle(work, data_dir),
    }
    models = {name: bundles[name]() for name in args.models}
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}}
    server = LocalRedis(work / "redis").start()
    try:
        results["bulk"] = bulk_enqueue(server.url, images, args.tasks)
        print(f"bulk enqueue {results['bulk']}", flush=True)
        for name, bundle in models.items():
            results[name] = bench_model(name, bundle, server.url, images, args, work)
    finally:
        server.stop()
    text = report(results, args)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
