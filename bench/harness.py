"""What the benchmarks share: sample data and models, CPU accounting, worker fleets, the drain,
the profiled worker.

``bench/throughput.py``, ``scaling.py``, ``soak.py``, ``hotpath.py`` and ``peak_rss.py`` import
it as ``from harness import ...`` (Python puts a script's own folder first on its module path, so
``python bench/x.py`` finds it from any working folder). It is no benchmark itself: running it
does nothing. Worker processes are :mod:`imgq.launcher`'s; this module adds what a measurement
needs on top: the start-up time, waiting for results at almost no CPU, and the CPU seconds of a
process tree.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import TimeoutError as ResultTimeout

from imgq.launcher import WorkerFleet, WorkerProcess, worker_env
from imgq.worker.client import ImgqClient

ROOT = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The drain's wait for results: tasks per confirmed chunk, seconds between looks.
_WAIT_CHUNK = 200
_WAIT_POLL_S = 0.02
#: Bounds on a measurement's workers: answering a ping after start, a warm shutdown.
_STARTUP_TIMEOUT_S = 180.0
_STOP_TIMEOUT_S = 60.0
#: The benchmark whose ``profile-worker`` command runs a worker under cProfile.
_THROUGHPUT = Path(__file__).with_name("throughput.py")


# -- models and images -----------------------------------------------------------------------------


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark's imgq fleet and its sample model (throughput.py's defaults:
    2 processes x 1 batch thread x 1 onnxruntime thread, batches of 32, no batch wait)."""
    p.add_argument("--workers", type=int, default=2, help="worker processes (cores)")
    p.add_argument("--concurrency", type=int, default=1, help="batch threads per imgq worker")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per process")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--train-epochs", type=int, default=5, help="epochs for the sample model")
    p.add_argument("--per-class", type=int, default=100, help="sample images per class")
    p.add_argument("--work-dir", help="keep data, models and logs here (reused when re-run)")
    p.add_argument("--json", help="also write the figures to this JSON file")


def sample_images(work: Path, per_class: int) -> tuple[Path, list[bytes]]:
    """The sample data set (made once per work folder) and its encoded files, shuffled."""
    from imgq.shared.labelled import list_labelled_files
    from imgq.trainer.sample_data import generate

    data_dir = work / f"data-{per_class}"
    if not data_dir.is_dir():
        generate(data_dir, classes=4, per_class=per_class, size=128, seed=0)
    files, _ = list_labelled_files(data_dir)
    # Mixed classes, as traffic arrives: in folder order every drift window would hold one or two
    # classes and raise a class-mix alert.
    random.Random(0).shuffle(files)
    return data_dir, [f.read_bytes() for f in files]


def small_bundle(work: Path, data_dir: Path, epochs: int) -> Path:
    """The default architecture and input size (`imgq train` defaults), briefly trained."""
    out = work / f"model-small-e{epochs}"
    if not (out / "manifest.json").is_file():
        from imgq.trainer.train import train_bundle  # TensorFlow: only when a model must be made

        train_bundle(data_dir, out, epochs=epochs, patience=epochs, progress=False, name="sample")
    return out


def mobilenet_bundle(work: Path, data_dir: Path, size_px: int = 224) -> Path:
    """MobileNetV2 with random weights, exported by the trainer's ``export_onnx`` (probabilities
    and penultimate features), with a manifest (reference statistics and the novelty model from
    the sample images, no golden set)."""
    out = work / f"model-mobilenetv2-{size_px}-novelty"
    if (out / "manifest.json").is_file():
        return out
    import numpy as np
    import onnxruntime as ort

    from imgq.shared.decode import decode_image
    from imgq.shared.imagestats import (
        IMAGE_FEATURES,
        OUTPUT_FEATURES,
        decoded_image_features,
        output_features,
    )
    from imgq.shared.labelled import list_labelled_files
    from imgq.shared.manifest import Manifest, save_manifest, sha256_file
    from imgq.shared.preprocess import PreprocessSpec, preprocess_batch
    from imgq.shared.reference import build_reference
    from imgq.trainer.export import FEATURES_NAME, INPUT_NAME, MODEL_FILE, OUTPUT_NAME, export_onnx
    from imgq.trainer.model import build_model
    from imgq.trainer.novelty import fit_novelty

    files, labels = list_labelled_files(data_dir)
    classes = tuple(sorted(set(labels)))
    spec = PreprocessSpec(height=size_px, width=size_px, mean=(0.5,) * 3, std=(0.25,) * 3)
    out.mkdir(parents=True, exist_ok=True)
    model_path = export_onnx(
        build_model("mobilenetv2", (size_px, size_px, 3), len(classes)), spec, out / MODEL_FILE
    )
    encoded = [f.read_bytes() for f in files[::4]]
    images = [decode_image(data) for data in encoded]
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    outputs = [OUTPUT_NAME, FEATURES_NAME]
    probs, features = session.run(outputs, {INPUT_NAME: preprocess_batch(images, spec)})
    y = np.array([classes.index(label) for label in labels[::4]])
    held = [decode_image(f.read_bytes()) for f in files[2::8]]
    held_features = session.run([FEATURES_NAME], {INPUT_NAME: preprocess_batch(held, spec)})[0]
    novelty = fit_novelty(features, y, held_features, len(classes), output_name=FEATURES_NAME)
    feats = decoded_image_features(images, [len(d) for d in encoded], spec)
    reference = build_reference(
        np.hstack([feats, output_features(probs)]),
        IMAGE_FEATURES + OUTPUT_FEATURES,
        categorical={"predicted_class": len(classes)},
    )
    save_manifest(
        Manifest(
            name=f"mobilenetv2-{size_px}-untrained",
            model_file=MODEL_FILE,
            model_sha256=sha256_file(model_path),
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            input_shape=spec.input_shape,
            labels=classes,
            preprocess=spec,
            reference=reference,
            novelty=novelty,
        ),
        out,
    )
    return out


# -- CPU accounting --------------------------------------------------------------------------------


@functools.cache
def pair_and_rest_cores() -> tuple[int, set[int]]:
    """The core a measured pair of workers shares, and the cores for the rest (Redis, the
    benchmark process), of the cores this process had when first asked: on one core, a pair sees
    the same machine (cache, a busy sibling, the hypervisor's steal) at the same moment; on two
    cores it measures the difference between them.
    """
    cores = sorted(os.sched_getaffinity(0))
    return cores[0], set(cores[1:]) or {cores[0]}


def beside_the_pair(redis_pid: int) -> int:
    """Pin this process and every thread of Redis to the cores the measured pair does not use;
    returns the pair's core."""
    core, rest = pair_and_rest_cores()
    os.sched_setaffinity(0, rest)
    for task in Path(f"/proc/{redis_pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), rest)
    return core


def tree_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their living descendants."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    members, frontier = set(pids), list(pids)
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parent.items() if p == pid and c not in members]
        members.update(children)
        frontier.extend(children)
    return sum(ticks.get(pid, 0) for pid in members) / _CLK_TCK


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``, with those of its children that have exited (Redis's
    forked append-only-file rewrites)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / _CLK_TCK


# -- workers ---------------------------------------------------------------------------------------


class BenchFleet(WorkerFleet):
    """Worker processes started for one measurement (:func:`start_fleet`); stopped (SIGTERM,
    then SIGKILL) at the end of the ``with`` block.

    Args:
        client: The client whose queue the workers serve and whose results are awaited.
    """

    def __init__(self, client: ImgqClient) -> None:
        super().__init__(stop_timeout_s=_STOP_TIMEOUT_S)
        self.client = client
        #: Seconds from the first start until every worker answered a ping.
        self.startup_s = float("nan")

    def wait_stored(self, pending: Sequence[Any], timeout_s: float) -> None:
        """Wait until every task of ``pending`` has a stored result, at almost no CPU: the
        drain's measure must not compete with the workers for the cores. ``client.results``
        parses every result as it arrives (0.11-0.13 ms of CPU per task on the small model,
        ~10% of what a worker spends); this asks Redis only whether the newest key of the
        oldest unfinished chunk exists, every 20 ms, and confirms a chunk with one
        ``EXISTS`` of all its keys. Results are read afterwards (:meth:`results`)."""
        backend = self.client.app.backend
        r = backend.client
        keys = [backend.get_key_for_task(t.id) for t in pending]
        deadline = time.monotonic() + timeout_s
        next_check = time.monotonic() + 5.0
        start = 0
        while start < len(keys):
            chunk = keys[start : start + _WAIT_CHUNK]
            if r.exists(chunk[-1]) and r.exists(*chunk) == len(chunk):
                start += len(chunk)
                continue
            now = time.monotonic()
            if now > deadline:
                return
            if now > next_check:
                next_check = now + 5.0
                dead = [w.pid for w in self.exited()]
                if dead:
                    raise RuntimeError(f"workers {dead} died with tasks unfinished")
            time.sleep(_WAIT_POLL_S)

    def results(self, pending: Sequence[Any], timeout_s: float) -> list[Any]:
        """``client.results``, in slices, failing early when a worker has died."""
        deadline = time.monotonic() + timeout_s
        while True:
            outcomes = self.client.results(pending, timeout_s=min(5.0, timeout_s))
            unfinished = sum(isinstance(o, ResultTimeout) for o in outcomes)
            if not unfinished or time.monotonic() > deadline:
                return outcomes
            dead = [w.pid for w in self.exited()]
            if dead:
                raise RuntimeError(f"workers {dead} died with {unfinished} tasks unfinished")

    def __enter__(self) -> BenchFleet:
        return self


def start_fleet(
    client: ImgqClient, log_dir: Path, workers: Sequence[tuple[str, list[str], dict[str, str]]]
) -> BenchFleet:
    """Start one process per ``(node name, command, environment)`` and wait until all answer a
    ping; each appends to ``LOG_DIR/<name before the @>.log``. Stops them all when one fails."""
    started = time.monotonic()
    fleet = BenchFleet(client)
    try:
        for name, command, env in workers:
            log = log_dir / f"{name.split('@')[0]}.log"
            fleet.add(WorkerProcess(name, log, command=command, env=env, append_log=True, cwd=ROOT))
        fleet.wait_ready(client.app, timeout_s=_STARTUP_TIMEOUT_S)
    except BaseException:
        fleet.stop_all()
        raise
    fleet.startup_s = time.monotonic() - started
    return fleet


def _bench_env(url: str, **extra: str) -> dict[str, str]:
    """A worker's environment: none of this shell's IMGQ_* settings, no metrics port, one
    OpenMP thread."""
    return worker_env(url, IMGQ_METRICS_PORT="0", OMP_NUM_THREADS="1", **extra)


def imgq_workers(
    url: str,
    bundle: Path,
    client: ImgqClient,
    args: argparse.Namespace,
    log_dir: Path,
    *,
    profile_dir: Path | None = None,
    env: dict[str, str] | None = None,
    envs: Sequence[dict[str, str]] | None = None,
    cores: Sequence[int] | None = None,
) -> BenchFleet:
    """(b): ``args.workers`` `imgq worker` processes on the client's queue; with ``envs``, one
    process per entry, each with its own extra environment. With ``profile_dir``, each runs
    under ``bench/throughput.py profile-worker`` and writes ``imgq<i>.prof`` there. With
    ``cores``, process ``i`` is pinned to core ``cores[i % len(cores)]`` (``taskset``)."""
    envs = list(envs) if envs is not None else [env or {}] * args.workers
    workers = []
    for i, extra in enumerate(envs):
        name = f"imgq{i}@bench"
        options = ["--model", str(bundle), "--queue", client.queue, "--hostname", name,
                   "--concurrency", str(args.concurrency), "--threads", str(args.threads),
                   "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                   "--loglevel", "WARNING"]  # fmt: skip
        if profile_dir is None:
            command = [sys.executable, "-m", "imgq.cli", "worker", *options]
        else:
            profile = str(profile_dir / f"imgq{i}.prof")
            command = [sys.executable, str(_THROUGHPUT), "profile-worker", profile, "--", *options]
        if cores:
            command = ["taskset", "-c", str(cores[i % len(cores)]), *command]
        workers.append((name, command, _bench_env(url, **extra)))
    return start_fleet(client, log_dir, workers)


def naive_workers(
    url: str, bundle: Path, client: ImgqClient, args: argparse.Namespace, log_dir: Path
) -> BenchFleet:
    """(a): one prefork Celery worker (``bench/naive_worker.py``) with one process per core."""
    command = [sys.executable, str(ROOT / "bench" / "naive_worker.py"), "--model", str(bundle),
               "--broker", url, "--queue", client.queue, "--concurrency", str(args.workers),
               "--hostname", "naive@bench"]  # fmt: skip
    return start_fleet(client, log_dir, [("naive@bench", command, _bench_env(url))])


# -- the drain -------------------------------------------------------------------------------------


def cycled(images: Sequence[bytes], n: int) -> Iterator[bytes]:
    """``n`` images, going round ``images`` as often as it takes."""
    return itertools.islice(itertools.cycle(images), n)


def stored_records(client: ImgqClient, pending: Sequence[Any]) -> list[dict[str, Any]]:
    """The stored result record of each task (Celery's ``celery-task-meta-<id>``), in order."""
    backend = client.app.backend
    keys = [backend.get_key_for_task(r.id) for r in pending]
    records = []
    for start in range(0, len(keys), 1000):
        records += [json.loads(v) for v in backend.client.mget(keys[start : start + 1000])]
    return records


def done_times(client: ImgqClient, pending: Sequence[Any]) -> list[float]:
    """Epoch seconds at which each task's result was stored (its ``date_done``)."""
    return [done_at(record) for record in stored_records(client, pending)]


def done_at(record: dict[str, Any]) -> float:
    """Epoch seconds of a result record's ``date_done``."""
    return datetime.fromisoformat(record["date_done"]).timestamp()


def count_failures(outcomes: Sequence[Any]) -> int:
    """Outcomes that are not a result (an exception, a timeout)."""
    return sum(not isinstance(o, dict) for o in outcomes)


def drain(
    url: str,
    client: ImgqClient,
    images: Sequence[bytes],
    n: int,
    start: Callable[[], BenchFleet],
    keep: Callable[[float], Any] | None = None,
    inspect: Callable[[Sequence[Any], float], Any] | None = None,
) -> dict[str, Any]:
    """Enqueue ``n`` tasks, park them, start the workers, release the queue, time the drain.

    ``keep(drain_rate)`` runs with the workers still up after the drain (the paced load);
    ``inspect(pending, released_at)`` too, before it, its answer under ``"inspect"``."""
    r = redis.Redis.from_url(url)
    parked = f"{client.queue}:parked"
    r.delete(client.queue, parked)
    pending = client.classify_many(cycled(images, n))
    r.rename(client.queue, parked)
    redis_pid = int(r.info("server")["process_id"])
    with start() as workers:
        cpu0 = [tree_cpu_s([pid]) for pid in workers.pids]
        redis0, self0 = process_cpu_s(redis_pid), time.process_time()
        released = time.time()
        r.rename(parked, client.queue)
        workers.wait_stored(pending, timeout_s=60 + n / 20)
        worker_cpu_s = [tree_cpu_s([pid]) - c for pid, c in zip(workers.pids, cpu0, strict=True)]
        cpu_s = sum(worker_cpu_s)
        redis_s, self_s = process_cpu_s(redis_pid) - redis0, time.process_time() - self0
        outcomes = workers.results(pending, timeout_s=30)
        last = max(done_times(client, pending))
        result = {
            "rate": n / (last - released),
            "cpu_ms_per_task": cpu_s / n * 1000,
            "redis_cpu_ms_per_task": redis_s / n * 1000,
            "poller_cpu_ms_per_task": self_s / n * 1000,
            "startup_s": workers.startup_s,
            "failures": count_failures(outcomes),
            "mean_batch": statistics.mean(
                o.get("batch_size", 1) for o in outcomes if isinstance(o, dict)
            ),
            "loadavg_1m": os.getloadavg()[0],
            "worker_cpu_s": worker_cpu_s,
            # Results with a "drift" entry came from a worker with drift statistics on.
            "drift_tasks": sum(isinstance(o, dict) and "drift" in o for o in outcomes),
        }
        if inspect is not None:
            result["inspect"] = inspect(pending, released)
        if keep is not None:
            result["paced"] = keep(result["rate"])
    return result


def paced(
    client: ImgqClient,
    images: Sequence[bytes],
    rate: float,
    duration_s: float,
    keep_pending: bool = False,
) -> dict:
    """Open-loop load: task ``i`` is enqueued at ``start + i / rate`` whatever the workers do.

    The garbage collector's objects are frozen first: a full collection in this process (its
    thousands of pending results) paused the sender ~100 ms near the end of a 10 s level,
    after it had taken the send time of the tasks in hand, which showed as a latency spike of
    the workers (docs/benchmarks.md, Throughput)."""
    n = max(1, int(rate * duration_s))
    source = cycled(images, n)
    pending: list[Any] = []
    sent_at: list[float] = []
    gc.collect()
    gc.freeze()
    start = time.time()
    while len(pending) < n:
        due = min(n, int((time.time() - start) * rate) + 1)
        if due > len(pending):
            now = time.time()
            batch = client.classify_many(itertools.islice(source, due - len(pending)))
            pending += batch
            sent_at += [now] * len(batch)
        else:
            time.sleep(max(0.0, start + len(pending) / rate - time.time()))
    achieved = n / (time.time() - start)
    gc.unfreeze()
    outcomes = client.results(pending, timeout_s=120)
    latency_ms = sorted(
        (done - sent) * 1000
        for done, sent in zip(done_times(client, pending), sent_at, strict=True)
    )
    q = statistics.quantiles(latency_ms, n=100, method="inclusive")
    return {
        "target_rate": rate,
        "achieved_rate": achieved,
        "tasks": n,
        "p50_ms": q[49],
        "p95_ms": q[94],
        "p99_ms": q[98],
        "mean_batch": statistics.mean(o["batch_size"] for o in outcomes if isinstance(o, dict)),
        "failures": count_failures(outcomes),
        "loadavg_1m": os.getloadavg()[0],
    } | ({"pending": pending, "sent_at": sent_at} if keep_pending else {})


# -- profiling -------------------------------------------------------------------------------------


def profile_worker(out_path: str, worker_args: list[str]) -> int:
    """Run `imgq worker WORKER_ARGS` with cProfile in every thread; merged stats to ``out_path``
    at exit. Started as ``bench/throughput.py profile-worker OUT.prof -- WORKER_ARGS`` (see
    there, and :func:`imgq_workers` with ``profile_dir``)."""
    import atexit
    import cProfile
    import pstats
    import threading

    profiles: list[cProfile.Profile] = []

    def start_in_thread(*_: Any) -> None:
        # First event in a new thread: replace this Python-level hook by a C-level profiler.
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()

    def dump() -> None:
        for profile in profiles:
            profile.disable()
        pstats.Stats(*profiles).dump_stats(out_path)

    threading.setprofile(start_in_thread)
    atexit.register(dump)
    start_in_thread()
    from imgq.cli import main as imgq_main

    return imgq_main(["worker", *worker_args])


def print_profile(profile_dir: Path, top: int = 30) -> None:
    """Merged statistics of the profiled workers, by own time and by cumulative time."""
    import pstats

    files = sorted(str(p) for p in profile_dir.glob("*.prof"))
    if not files:
        print(f"no profiles written in {profile_dir} (did the workers exit cleanly?)")
        return
    stats = pstats.Stats(*files)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
