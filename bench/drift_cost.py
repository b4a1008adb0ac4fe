"""Drift statistics' cost in worker CPU per task, side by side: one `imgq worker` with them and one
without drain one queue at the same time (issue 26).

Both workers see the same machine at the same moment, which consecutive drains on this shared VM do
not (its speed drifts by tens of percent between drains): they share one core, Redis and this
process have the others (pinned to a core each, a pair measured the difference between the cores,
bench/tracing.py's off/off control pairs -10% to +10% a drain). Each drain enqueues ``--tasks``
sample-image tasks, parks them, starts the two workers (``IMGQ_DRIFT=true`` and ``false``), releases
the queue and counts each worker's CPU seconds (its process tree) from release to the last result;
cost = CPU per task with / CPU per task without - 1. Which worker starts first alternates between
drains. The median over ``--drains`` drains is the figure.

    .venv/bin/python bench/drift_cost.py                       # small model, 6 drains, ~4 min
    .venv/bin/python bench/drift_cost.py --models mobilenetv2 --tasks 1200 --drains 8
    .venv/bin/python bench/drift_cost.py --work-dir /tmp/dc --profile   # + cProfile of each side

Drains of 6,000 tasks: in drains of 2,000 the worker with drift statistics took as few as 640
tasks, and its share of a drain's fixed costs (start of serving, the last partial batches)
swung its figure from -6% to +25%; at 6,000 the drains agreed within a few points.

The models are ``bench/throughput.py``'s: the ``small`` sample model (``imgq train`` defaults,
briefly trained; its bundle carries the novelty model) and MobileNetV2 at 224x224 with random
weights (``harness.mobilenet_bundle``, novelty fitted on its features of the sample images).
``--profile`` adds one side-by-side drain with each worker under cProfile (thread CPU time) and
prints both profiles' top functions, drift first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import (
    add_fleet_arguments,
    beside_the_pair,
    drain,
    imgq_workers,
    mobilenet_bundle,
    print_profile,
    sample_images,
    small_bundle,
)
from throughput import drift_ab

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient


def bench_model(
    name: str, bundle: Path, url: str, images: list[bytes], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """``args.drains`` side-by-side drains of one model, and their median cost."""
    drains = []
    with ImgqClient(url, queue=f"bench-drift-cost-{name}") as client:
        for i in range(args.drains):
            drains.append(drift_ab(url, bundle, client, images, args, work, on_first=i % 2 == 0))
            d = drains[-1]
            print(
                f"[{name}] drain {i + 1}: with {d['on_cpu_ms_per_task']:.3f} ms/task "
                f"({d['on_tasks']} tasks), without {d['off_cpu_ms_per_task']:.3f} "
                f"({d['off_tasks']}): {d['cost']:+.1%}  (load {d['loadavg_1m']:.2f})",
                flush=True,
            )
        if args.profile:
            profile_dir = work / f"profile-drift-cost-{name}"
            profile_dir.mkdir(exist_ok=True)
            for old in profile_dir.glob("*.prof"):
                old.unlink()
            envs = [{"IMGQ_DRIFT": "true"}, {"IMGQ_DRIFT": "false"}]
            drain(
                url, client, images, args.drift_ab_tasks,
                lambda: imgq_workers(url, bundle, client, args, work, envs=envs,
                                     profile_dir=profile_dir),
            )  # fmt: skip
            for i, label in ((0, "WITH drift statistics"), (1, "WITHOUT drift statistics")):
                print(f"\n==== [{name}] profile of the worker {label} ====")
                one = profile_dir / f"only{i}"
                one.mkdir(exist_ok=True)
                (profile_dir / f"imgq{i}.prof").replace(one / f"imgq{i}.prof")
                print_profile(one, top=args.profile_top)
    costs = [d["cost"] for d in drains]
    return {"bundle": str(bundle), "drains": drains, "median_cost": statistics.median(costs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="small", help="comma-separated: small, mobilenetv2")
    p.add_argument("--tasks", dest="drift_ab_tasks", type=int, default=6000, help="tasks per drain")
    p.add_argument("--drains", type=int, default=6, help="side-by-side drains per model")
    p.add_argument("--profile", action="store_true", help="add a profiled side-by-side drain")
    p.add_argument("--profile-top", type=int, default=25, help="functions per profile table")
    add_fleet_arguments(p)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - {"small", "mobilenetv2"}
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from small, mobilenetv2")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-drift-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    make = {"small": small_bundle, "mobilenetv2": mobilenet_bundle}
    models = {
        name: make[name](work, data_dir, args.train_epochs) if name == "small"
        else make[name](work, data_dir)
        for name in args.models
    }  # fmt: skip
    results: dict[str, Any] = {"args": vars(args)}
    with LocalRedis(work / "redis-drift-cost") as server:
        assert server.process is not None
        beside_the_pair(server.process.pid)  # the pair's core is drift_ab's
        for name, bundle in models.items():
            results[name] = bench_model(name, bundle, server.url, images, args, work)
    print()
    for name in models:
        r = results[name]
        costs = ", ".join(f"{d['cost']:+.1%}" for d in r["drains"])
        print(
            f"{name}: drift statistics cost, side by side, {len(r['drains'])} drains of "
            f"{args.drift_ab_tasks} tasks: {costs}; median **{r['median_cost']:+.1%}** of "
            "worker CPU per task"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
