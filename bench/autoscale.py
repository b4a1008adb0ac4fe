"""Autoscaling on paper (issue 25): arrival traces replayed through a model of KEDA and the HPA
(bench/autoscale_model.py) with imgq's measured drain rate per worker and start-up time, against
a fixed fleet sized for the peak.

    .venv/bin/python bench/autoscale.py                     # the table (seconds; seeded)
    .venv/bin/python bench/autoscale.py --rate 127 --startup-s 14   # MobileNetV2 on CPU
    .venv/bin/python bench/autoscale.py startup --work-dir /tmp/as  # measure the start-up

Traces (arrival rates in multiples of one worker's drain rate, Poisson arrivals, seeded):

- ``burst``: 10 minutes idle, 20 at 1.5 workers' worth, 10 at ten times that (15), 20 at 1.5
  again, 10 idle: scale from zero, a 10x burst, the way down and back to zero;
- ``pulses``: an hour of 2-minute pulses at 6 workers' worth every 6 minutes, 0.2 between:
  lulls shorter than the scale-down window;
- ``daily``: 24 hours between 0.3 (04:00) and 8 workers' worth (16:00), a cosine, after the
  night before (6 hours of warm-up, not counted).

Rows: the settings deploy/kubernetes/base/scaledobject.yaml ships (a backlog target of drain
rate x 2 s, docs/operations.md, and a throughput target of 80% of the drain rate) and
alternatives, each on the same arrivals. Figures: the queue wait
(enqueue to pick-up) p50 / p99 / max, worker-minutes against the fixed fleet's, the most pods,
how many times the replica count changed.

``startup`` times ``imgq worker`` from process start to answering a ping (it answers once its
model is loaded and checked), with the tiny test model and the sample model, from a folder and
fetched from Redis as a Kubernetes pod does, beside a baseline (the interpreter importing the
worker's libraries); the simulation's ``--startup-s`` default is that
measured figure plus the pod's scheduling and container start (``--schedule-s``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from autoscale_model import Policy, Rules, Settings, SimResult, simulate

#: The sample model's drain rate per worker process (one core), docs/benchmarks.md
#: ("The engine alone, and one Redis's ceiling": 1 / worker CPU per task).
SAMPLE_RATE = 1745.0
#: `imgq worker` start to ping, sample model fetched from Redis (``startup``; docs/benchmarks.md).
MEASURED_STARTUP_S = 7.2
#: Scheduling and container start of a pod on a node that has the image (assumed).
SCHEDULE_S = 2.0
#: The acceptable queue wait the shipped target is made from (docs/operations.md).
WAIT_OBJECTIVE_S = 2.0

#: Tasks served per second per worker the throughput trigger aims at: 80% of the drain rate.
UTILISATION = 0.8

HPA_DEFAULT_UP = Rules(0, (Policy("Percent", 100, 15), Policy("Pods", 4, 15)))
HPA_DEFAULT_DOWN = Rules(300, (Policy("Percent", 100, 15),))
SHIPPED_UP = Rules(0, (Policy("Percent", 100, 15), Policy("Pods", 8, 15)))
SHIPPED_DOWN = Rules(300, (Policy("Percent", 20, 60), Policy("Pods", 1, 60)))


def shipped(rate: float) -> Settings:
    """deploy/kubernetes/base/scaledobject.yaml's settings for workers of ``rate`` tasks/s."""
    return Settings(
        target=rate * WAIT_OBJECTIVE_S, throughput_target=rate * UTILISATION,
        up=SHIPPED_UP, down=SHIPPED_DOWN, polling_s=15, cooldown_s=300, max_replicas=20,
    )  # fmt: skip


def variants(rate: float) -> list[tuple[str, Settings]]:
    """The shipped settings and the alternatives the table compares."""
    base = shipped(rate)
    backlog_only = dataclasses.replace(base, throughput_target=None)
    fast_down = Rules(0, (Policy("Percent", 100, 15),))
    return [
        ("**shipped**: backlog 2 s x rate + throughput 80%, up 100% or 8 pods/15 s, "
         "down 20% or 1 pod/min after 5 min", base),
        ("backlog trigger alone, same behaviour", backlog_only),
        ("backlog trigger alone, HPA default behaviour",
         dataclasses.replace(backlog_only, up=HPA_DEFAULT_UP, down=HPA_DEFAULT_DOWN)),
        ("shipped, HPA default up (100% or 4 pods/15 s)",
         dataclasses.replace(base, up=HPA_DEFAULT_UP)),
        ("shipped, HPA default down (100%/15 s after 5 min)",
         dataclasses.replace(base, down=HPA_DEFAULT_DOWN)),
        ("shipped, fast down (no window, 100%/15 s), cooldown 30 s",
         dataclasses.replace(base, down=fast_down, cooldown_s=30)),
        ("shipped, polling 30 s (KEDA's default)", dataclasses.replace(base, polling_s=30)),
        ("shipped, backlog target 1 s x rate", dataclasses.replace(base, target=rate * 1.0)),
        ("shipped, backlog target 4 s x rate", dataclasses.replace(base, target=rate * 4.0)),
        ("shipped, throughput 90%", dataclasses.replace(base, throughput_target=rate * 0.9)),
    ]  # fmt: skip


def _piecewise(parts: list[tuple[float, float]]) -> Callable[[float], float]:
    """Rate (in workers' worth) of a trace made of (minutes, level) parts."""
    edges = np.cumsum([m * 60 for m, _ in parts])

    def level(t: float) -> float:
        i = int(np.searchsorted(edges, t, side="right"))
        return parts[min(i, len(parts) - 1)][1]

    return level


def _daily(t: float) -> float:
    """0.3 workers' worth at 04:00, 8 at 16:00; ``t`` in seconds from 04:00."""
    return 0.3 + 7.7 * (1 - math.cos(2 * math.pi * t / 86400)) / 2


@dataclasses.dataclass(frozen=True)
class Trace:
    """Arrival rate in workers' worth over ``duration_s``, after ``warmup_s`` that bring the
    fleet to where the trace finds it (not counted), replayed in steps of ``step_s``."""

    duration_s: float
    level: Callable[[float], float]
    step_s: float
    warmup_s: float = 0.0


TRACES: dict[str, Trace] = {
    # From an idle fleet of zero: scale from zero, the burst, back to zero.
    "burst": Trace(70 * 60, _piecewise([(10, 0.0), (20, 1.5), (10, 15.0), (20, 1.5), (10, 0.0)]),
                   step_s=0.5),
    # Pulses: 2 minutes at 6 workers' worth every 6 minutes, a trickle (0.2) between.
    "pulses": Trace(60 * 60, _piecewise([(4, 0.2), (2, 6.0)] * 10), step_s=0.5),
    # A day from 04:00, after the night from 22:00 (the fleet as the night left it).
    "daily": Trace(24 * 3600, _daily, step_s=1.0, warmup_s=6 * 3600),
}  # fmt: skip


def arrivals(trace: Trace, rate: float, seed: int) -> tuple[np.ndarray, float]:
    """Tasks arriving in each step, warm-up first (Poisson), and the peak rate in tasks/s."""
    t = np.arange(-trace.warmup_s, trace.duration_s, trace.step_s)
    rates = np.array([trace.level(x) for x in t]) * rate
    counts = np.random.default_rng(seed).poisson(rates * trace.step_s).astype(float)
    return counts, float(rates.max())


def _row(name: str, r: SimResult, fixed: SimResult) -> str:
    return (
        f"| {name} | {r.wait_p50_s:.1f} | {r.wait_p99_s:.1f} | {r.wait_max_s:.1f} "
        f"| {r.worker_minutes:,.0f} | {r.worker_minutes / fixed.worker_minutes:.2f}x "
        f"| {r.max_pods} | {r.scale_changes} |"
    )


def run_tables(args: argparse.Namespace) -> None:
    startup_s = args.startup_s if args.startup_s is not None else MEASURED_STARTUP_S + SCHEDULE_S
    print(f"drain rate {args.rate:,.0f} tasks/s per worker, pod start-up {startup_s:.1f} s, "
          f"scrape 15 s, HPA sync 15 s, tolerance 10%, seed {args.seed}\n")  # fmt: skip
    for name in args.traces:
        started = time.perf_counter()
        trace = TRACES[name]
        counts, peak = arrivals(trace, args.rate, args.seed)
        warmup = int(trace.warmup_s / trace.step_s)
        fixed_pods = math.ceil(peak / args.rate)
        fixed = simulate(counts[warmup:], trace.step_s, args.rate, startup_s, None,
                         fixed_pods=fixed_pods)  # fmt: skip
        print(f"### {name}: {int(counts[warmup:].sum()):,} tasks, peak {peak:,.0f} tasks/s\n")
        print("| fleet | wait p50 s | wait p99 s | wait max s | worker-minutes | vs fixed "
              "| most pods | replica changes |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        print(_row(f"fixed, {fixed_pods} pods (the peak / rate)", fixed, fixed))
        for label, settings in variants(args.rate):
            result = simulate(counts, trace.step_s, args.rate, startup_s, settings,
                              phase_s=args.phase_s, warmup_steps=warmup)  # fmt: skip
            print(_row(label, result, fixed))
        print(f"\n({time.perf_counter() - started:.1f} s)\n")


# -- the start-up measurement ----------------------------------------------------------------------


def measure_startup(args: argparse.Namespace) -> None:
    """Start one `imgq worker` at a time, ``--repeat`` times per configuration, and time it
    from process start to its first answered ping."""
    from harness import ROOT, sample_images, small_bundle, start_fleet

    from imgq.launcher import worker_env
    from imgq.localredis import LocalRedis
    from imgq.worker.client import ImgqClient

    sys.path.insert(0, str(ROOT))
    from tests.tinymodel import make_tiny_bundle

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-autoscale-"))
    work.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_bundle(work / "model-tiny")
    data_dir, _ = sample_images(work, 100)
    sample = small_bundle(work, data_dir, epochs=5)
    with LocalRedis(work / "redis-startup") as server:
        url = server.url
        publish = [sys.executable, "-m", "imgq.cli", "models", "publish", str(sample)]
        subprocess.run(publish, env=worker_env(url), check=True, capture_output=True)
        configs = [("tiny model, folder", ["--model", str(tiny)]),
                   ("sample model, folder", ["--model", str(sample)]),
                   ("sample model, fetched from Redis", [])]  # fmt: skip
        imports = "import celery, cv2, numpy, onnxruntime, redis"
        baseline = []
        for _ in range(args.repeat):
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", imports], check=True)
            baseline.append(time.monotonic() - started)
        base = statistics.median(baseline)
        print(f"baseline, the interpreter importing {imports[7:]}: median {base:.1f} s")
        with ImgqClient(url) as client:
            for label, options in configs:
                times = []
                for i in range(args.repeat):
                    cache = work / f"cache-{len(times)}-{time.monotonic_ns()}"
                    name = f"start{i}@bench"
                    command = [sys.executable, "-m", "imgq.cli", "worker", "--hostname", name,
                               "--loglevel", "WARNING", *options]  # fmt: skip
                    env = worker_env(url, IMGQ_METRICS_PORT="0", IMGQ_MODEL_CACHE=str(cache))
                    with start_fleet(client, work, [(name, command, env)]) as fleet:
                        times.append(fleet.startup_s)
                each = ", ".join(f"{t:.1f}" for t in times)
                median = statistics.median(times)
                print(f"{label}: median {median:.1f} s ({median / base:.1f}x the baseline), "
                      f"max {max(times):.1f} s ({each})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", nargs="?", default="simulate", choices=("simulate", "startup"))
    p.add_argument("--rate", type=float, default=SAMPLE_RATE, help="tasks/s per worker")
    p.add_argument("--startup-s", type=float, help="pod start-up (default: measured + schedule)")
    p.add_argument("--traces", nargs="+", default=list(TRACES), choices=list(TRACES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase-s", type=float, default=7.0, help="scrape/sync/poll clock offset")
    p.add_argument("--repeat", type=int, default=3, help="startup: starts per configuration")
    p.add_argument("--work-dir", help="startup: keep data, models and logs here")
    args = p.parse_args()
    if args.command == "startup":
        measure_startup(args)
    else:
        run_tables(args)


if __name__ == "__main__":
    main()
