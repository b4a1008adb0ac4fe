"""What tracing costs a worker (issue 27): CPU per task with tracing off, and on at sampling 1.0
and 0.01, side by side; with ``--baseline REV``, also the code of commit REV ("today", before
tracing existed), to show that off costs nothing.

Each round drains, for every configuration, a pair of `imgq worker`s side by side: "off" and
the configuration, each on its own queue holding the same ``--tasks`` tasks (parked until both
workers answer a ping, then released in one transaction), so that both see the same machine at
the same moment: this VM's speed moves CPU per task by tens of percent between consecutive
drains, more than the cost measured. Both workers of a pair are pinned to the same core
(``taskset``), Redis and this process to the others, and which one starts first alternates
between rounds: pinned to two cores, a pair measured the difference between the cores (an
off/off pair -10% to +10% per drain), on one core it holds within a point. One pair is "off"
against "off": the spread of its ratios is the measure's noise. A worker's CPU
(``/proc/<pid>/stat``) is read from the release until its last result is stored plus
``--settle-s`` (so that the spans it still buffers are exported: the batch span processor's
default delay is 5 s), and divided by its tasks. The report gives each round's ratio to its
pair's "off" and their median.

Tracing workers export OTLP over HTTP to a receiver in this process (``imgq/otlpsink.py``, it
only counts), with ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``; the tasks carry no context
(``ImgqClient.classify_many`` from a process without OpenTelemetry), so the ratio decides.

Beside it, the figure without the noise of whole drains, paired as ``bench/hotpath.py
--interleaved`` pairs drift's cost: the worker's own batch loop in this process drains
``--tasks`` with tracing on for every other batch (each batch's CPU, every thread; the span
processor's export thread counted for tracing), ``--interleaved`` drains per ratio.

    .venv/bin/python bench/tracing.py --work-dir /tmp/trace-bench --baseline 3a67833
    .venv/bin/python bench/tracing.py --work-dir /tmp/trace-bench --rounds 5 --tasks 5000
    .venv/bin/python bench/tracing.py --report /tmp/trace-bench/tracing.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import redis
from harness import (
    ROOT,
    BenchFleet,
    add_fleet_arguments,
    beside_the_pair,
    cycled,
    sample_images,
    small_bundle,
    start_fleet,
    tree_cpu_s,
)
from hotpath import loaded_runner

from imgq.launcher import worker_env
from imgq.localredis import LocalRedis
from imgq.otlpsink import OtlpSink
from imgq.shared.bundle import ModelBundle
from imgq.worker.client import ImgqClient
from imgq.worker.settings import WorkerSettings
from imgq.worker.tracing import start_tracing

#: The configurations compared with "off" (the first); "today" is added by ``--baseline``, and
#: "off (control)" is off against off: the measure's noise.
OFF = "off"
CONTROL = "off (control)"
SAMPLED = {"on, sampling 1.0": "1.0", "on, sampling 0.01": "0.01"}
TODAY = "today (--baseline)"
#: Batches served before an interleaved drain is measured (the first spans, the first export).
_WARM_UP_BATCHES = 6


def baseline_tree(work: Path, rev: str) -> Path:
    """A folder whose ``imgq`` package is commit ``rev``'s (its worker/, shared/ and trainer/
    linked in as pyproject's package-dir installs them); with it first on ``PYTHONPATH`` a
    worker runs that commit's code with this environment's packages."""
    src = work / f"baseline-{rev}"
    tree = src / "tree"
    if not (tree / "imgq").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        folders = ["imgq", "worker", "shared", "trainer"]
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, *folders],
                                 capture_output=True, check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        package = tree / "imgq"
        package.mkdir(parents=True)
        for module in (src / "imgq").glob("*.py"):
            (package / module.name).symlink_to(module)
        for name in ("worker", "shared", "trainer"):
            (package / name).symlink_to(src / name)
    check = subprocess.run(
        [sys.executable, "-c", "import imgq.worker.engine as m; print(m.__file__)"],
        env={**os.environ, **_first_on_path(tree)}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    if not check.stdout.strip().startswith(str(tree)):
        raise SystemExit(f"the baseline tree is not imported first: {check.stdout.strip()}")
    return tree


def _first_on_path(tree: Path) -> dict[str, str]:
    """``tree`` first on the module path, before the working folder (a worker runs in the
    repository, whose own imgq/ would come first) and the editable install."""
    return {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}


def worker_envs(url: str, sink: OtlpSink, tree: Path | None) -> dict[str, dict[str, str]]:
    """Each configuration's environment (this shell's OTEL_* and IMGQ_* left out)."""
    base = {k: v for k, v in worker_env(url).items() if not k.startswith("OTEL_")}
    base |= {"IMGQ_METRICS_PORT": "0", "OMP_NUM_THREADS": "1"}
    envs = {OFF: dict(base), CONTROL: dict(base)}
    for name, ratio in SAMPLED.items():
        envs[name] = base | {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": ratio,
        }
    if tree is not None:
        envs[TODAY] = base | _first_on_path(tree)
    return envs


def one_pair(
    url: str,
    bundle: Path,
    images: list[bytes],
    envs: dict[str, dict[str, str]],
    pair: tuple[str, str],
    core: int,
    args: argparse.Namespace,
    log_dir: Path,
) -> dict[str, dict[str, float]]:
    """The two configurations' workers, pinned to ``core``, drain their own queue of
    ``args.tasks`` at the same time; each one's CPU seconds per task."""
    r = redis.Redis.from_url(url)
    queues = {name: f"bench-trace-{i}" for i, name in enumerate(pair)}
    pending: dict[str, list[bytes]] = {}
    for name, queue in queues.items():
        with ImgqClient(url, queue=queue) as client:
            r.delete(queue, f"{queue}:parked")
            results = client.classify_many(cycled(images, args.tasks))
            pending[name] = [client.app.backend.get_key_for_task(t.id) for t in results]
            r.rename(queue, f"{queue}:parked")
    workers = []
    for i, name in enumerate(pair):
        node = f"trace{i}@bench"
        command = ["taskset", "-c", str(core), sys.executable, "-m", "imgq.cli", "worker",
                   "--model", str(bundle), "--queue", queues[name], "--hostname", node,
                   "--concurrency", "1", "--threads", str(args.threads), "--max-batch",
                   str(args.max_batch), "--max-wait-ms", "0", "--loglevel", "WARNING"]  # fmt: skip
        workers.append((node, command, envs[name]))
    with ImgqClient(url) as pinger, start_fleet(pinger, log_dir, workers) as fleet:
        pids = dict(zip(pair, fleet.pids, strict=True))
        cpu0 = {name: tree_cpu_s([pid]) for name, pid in pids.items()}
        pipe = r.pipeline(transaction=True)
        for queue in queues.values():
            pipe.rename(f"{queue}:parked", queue)
        pipe.execute()
        released = time.monotonic()
        return _drained(r, fleet, pending, pids, cpu0, released, args)


def _drained(
    r: redis.Redis,
    fleet: BenchFleet,
    pending: dict[str, list[bytes]],
    pids: dict[str, int],
    cpu0: dict[str, float],
    released: float,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """Wait for each configuration's results; its CPU ``args.settle_s`` after its last one."""
    done_at: dict[str, float] = {}
    out: dict[str, dict[str, float]] = {}
    confirmed = dict.fromkeys(pending, 0)
    deadline = released + 120 + args.tasks / 10
    while len(out) < len(pending):
        now = time.monotonic()
        if now > deadline or fleet.exited():
            raise RuntimeError(f"not drained: {sorted(set(pending) - set(done_at))}")
        for name, keys in pending.items():
            while name not in done_at and confirmed[name] < len(keys):
                chunk = keys[confirmed[name] : confirmed[name] + 200]
                if r.exists(*chunk) < len(chunk):
                    break
                confirmed[name] += len(chunk)
            if name not in done_at and confirmed[name] == len(keys):
                done_at[name] = now
            if name in done_at and name not in out and now >= done_at[name] + args.settle_s:
                cpu_s = tree_cpu_s([pids[name]]) - cpu0[name]
                out[name] = {"cpu_ms_per_task": cpu_s / args.tasks * 1000,
                             "drain_s": done_at[name] - released}  # fmt: skip
        time.sleep(0.02)
    return out


def _exporter_cpu_s() -> float:
    """CPU seconds of this process's span processor threads (they export in the background)."""
    return sum(
        time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        for t in threading.enumerate()
        if t.name.startswith("OtelBatch") and t.ident is not None
    )


def interleaved(
    url: str, bundle: ModelBundle, images: list[bytes], ratio: float, args: argparse.Namespace
) -> dict[str, float]:
    """One drain of ``args.tasks`` by the worker's own batch loop in this process
    (``BatchEngine.run_once``, the classification handler, drift statistics on), tracing on for
    every other batch: each batch's CPU (every thread of the process) counts for its kind, and
    the span processor's thread for tracing. Consecutive batches see the machine at the same
    speed, which two workers on shared cores do not."""
    settings = WorkerSettings(traces_exporters=("otlp",), traces_sampler="parentbased_traceidratio",
                              traces_sampler_arg=ratio)  # fmt: skip
    tracer = start_tracing(settings, "interleaved@bench")
    assert tracer is not None
    r = redis.Redis.from_url(url)
    sums = {True: [0.0, 0], False: [0.0, 0]}
    with ImgqClient(url, queue="hotpath") as client:
        tasks = args.tasks + _WARM_UP_BATCHES * args.max_batch
        runner, recorder = loaded_runner(client, bundle, images, tasks, drift=True)
        for warm_up in range(_WARM_UP_BATCHES):  # first spans, first export: not counted
            runner.tracing = tracer if warm_up % 2 else None
            runner.run_once()
        tracer.provider.force_flush()
        exporter0 = _exporter_cpu_s()
        on = False
        while r.llen("hotpath"):
            runner.tracing = tracer if on else None
            p0, e0 = time.process_time(), _exporter_cpu_s()
            served = runner.run_once()
            sums[on][0] += time.process_time() - p0 - (_exporter_cpu_s() - e0)
            sums[on][1] += served
            on = not on
        tracer.provider.force_flush()
        sums[True][0] += _exporter_cpu_s() - exporter0
        tracer.close()
        if recorder is not None:
            recorder.close()
    on_us, off_us = (sums[k][0] / max(1, sums[k][1]) * 1e6 for k in (True, False))
    return {"on_us": on_us, "off_us": off_us, "cost": on_us / off_us - 1}


def in_process(args: argparse.Namespace, work: Path, endpoint: str) -> dict[str, list[Any]]:
    """``args.interleaved`` interleaved drains per sampling ratio."""
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint  # read by the OTLP exporter
    model_dir = small_bundle(work, work / f"data-{args.per_class}", args.train_epochs)
    bundle = ModelBundle.load(model_dir, device="cpu", threads=1, check_golden=False)
    bundle.calibrate_infer_batch(args.max_batch)
    _, images = sample_images(work, args.per_class)
    gc.collect()
    gc.freeze()  # as the worker does after start-up
    cv2.setNumThreads(1)
    out: dict[str, list[Any]] = {}
    with LocalRedis(work / "redis-interleaved") as server:
        for name, ratio in SAMPLED.items():
            out[name] = []
            for _ in range(args.interleaved):
                out[name].append(interleaved(server.url, bundle, images, float(ratio), args))
                print(f"    {name}: {out[name][-1]}", flush=True)
    return out


def report(results: dict[str, Any]) -> str:
    """The figures as Markdown: each configuration's CPU per task against the "off" worker that
    drained beside it, per round, and the median."""
    rounds = results["rounds"]
    names = list(rounds[0]) if rounds else []
    lines = [
        "| worker, beside off | CPU ms/task, each round | off's, each round | vs off, each round "
        "| median vs off |",
        "|---|---|---|---|---:|",
    ]
    for name in names:
        on = [r[name]["on"]["cpu_ms_per_task"] for r in rounds]
        off = [r[name]["off"]["cpu_ms_per_task"] for r in rounds]
        ratios = [a / b - 1 for a, b in zip(on, off, strict=True)]
        lines.append(
            f"| {name} | {', '.join(f'{c:.3f}' for c in on)} | "
            f"{', '.join(f'{c:.3f}' for c in off)} | {', '.join(f'{x:+.1%}' for x in ratios)} | "
            f"**{statistics.median(ratios):+.1%}** |"
        )
    paired = results.get("interleaved")
    if paired:
        lines += ["", "| in process, tracing on every other batch | on µs/task | off µs/task | "
                  "cost, each drain | cost, all |", "|---|---|---|---|---:|"]  # fmt: skip
        for name, drains in paired.items():
            on = ", ".join(f"{d['on_us']:.0f}" for d in drains)
            off = ", ".join(f"{d['off_us']:.0f}" for d in drains)
            each = ", ".join(f"{d['cost']:+.1%}" for d in drains)
            mean_on = statistics.mean(d["on_us"] for d in drains)
            mean_off = statistics.mean(d["off_us"] for d in drains)
            lines.append(f"| {name} | {on} | {off} | {each} | **{mean_on / mean_off - 1:+.1%}** |")
    sink = results["sink"]
    lines += [
        "",
        f"- {results['args']['tasks']} tasks per worker per round, {len(rounds)} rounds, "
        f"load average {', '.join(f'{x:.2f}' for x in results['loadavg_1m'])} (1 min, after "
        "each round)",
        f"- spans received: {sink['requests']} OTLP requests, {sink['bytes'] / 1e6:.1f} MB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=3000, help="tasks per worker per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle-s", type=float, default=6.0,
                   help="seconds after a worker's last result before its CPU is read")  # fmt: skip
    p.add_argument("--baseline", metavar="REV", help="also run commit REV's worker ('today')")
    p.add_argument(
        "--interleaved",
        type=int,
        default=3,
        metavar="DRAINS",
        help="in-process drains per ratio, tracing on every other batch (0: none)",
    )
    p.add_argument("--report", metavar="JSON", help="only print the table of a --json file")
    add_fleet_arguments(p)
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return 0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-tracing-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    bundle = small_bundle(work, data_dir, args.train_epochs)
    tree = baseline_tree(work, args.baseline) if args.baseline else None
    sink = OtlpSink(keep=False).start()
    server = LocalRedis(work / "redis").start()
    results: dict[str, Any] = {"args": vars(args), "rounds": [], "loadavg_1m": []}
    try:
        if args.interleaved:
            print("in process: tracing on every other batch", flush=True)
            results["interleaved"] = in_process(args, work, sink.endpoint)
        envs = worker_envs(server.url, sink, tree)
        others = [name for name in envs if name != OFF]
        assert server.process is not None
        core = beside_the_pair(server.process.pid)
        for i in range(args.rounds):
            first = i % 2 == 0  # off started first (and on the first queue), or second
            print(f"round {i + 1}: off {'first' if first else 'second'}, core {core}", flush=True)
            measured: dict[str, Any] = {}
            for name in others:
                order = (OFF, name) if first else (name, OFF)
                pair = one_pair(server.url, bundle, images, envs, order, core, args, work)
                measured[name] = {"off": pair[OFF], "on": pair[name]}
                print(f"    {name}: {measured[name]}", flush=True)
            results["rounds"].append(measured)
            results["loadavg_1m"].append(os.getloadavg()[0])
    finally:
        server.stop()
        sink.stop()
    results["sink"] = {"requests": sink.requests, "bytes": sink.bytes}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
