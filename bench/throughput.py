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
import gc
import itertools
import json
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import TimeoutError as ResultTimeout

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient

ROOT = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The drain's wait for results: tasks per confirmed chunk, seconds between looks.
_WAIT_CHUNK = 200
_WAIT_POLL_S = 0.02


# -- models and images -----------------------------------------------------------------------------


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
    """MobileNetV2 with random weights, exported by the trainer's ``export_onnx``, with a
    manifest (reference statistics from the sample images, no golden set)."""
    out = work / f"model-mobilenetv2-{size_px}"
    if (out / "manifest.json").is_file():
        return out
    import numpy as np
    import onnxruntime as ort

    from imgq.shared.decode import decode_image
    from imgq.shared.imagestats import (
        IMAGE_FEATURES,
        OUTPUT_FEATURES,
        build_reference,
        decoded_image_features,
        output_features,
    )
    from imgq.shared.labelled import list_labelled_files
    from imgq.shared.manifest import Manifest, save_manifest, sha256_file
    from imgq.shared.preprocess import PreprocessSpec, preprocess_batch
    from imgq.trainer.export import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, export_onnx
    from imgq.trainer.model import build_model

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
    probs = session.run([OUTPUT_NAME], {INPUT_NAME: preprocess_batch(images, spec)})[0]
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
        ),
        out,
    )
    return out


# -- (c) the in-process limit ----------------------------------------------------------------------


def _limit_share(bundle_dir: str, images: Sequence[bytes]) -> tuple[float, float]:
    """Wall and CPU seconds of decode + preprocess + inference, one image at a time."""
    import cv2

    from imgq.shared.bundle import ModelBundle
    from imgq.shared.decode import decode_image
    from imgq.shared.preprocess import preprocess_batch

    cv2.setNumThreads(1)  # as `imgq worker` runs OpenCV (worker/main.py)
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
    work = list(_cycle(images, n))
    shares = [(str(bundle_dir), work[i::procs]) for i in range(procs)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        timings = pool.starmap(_limit_share, shares)
        batch_ms = pool.apply(_full_batch_ms, (str(bundle_dir), images, max_batch))
    wall = max(t[0] for t in timings)
    cpu = sum(t[1] for t in timings)
    return {"rate": n / wall, "cpu_ms_per_task": cpu / n * 1000, "full_batch_ms": batch_ms}


# -- workers ---------------------------------------------------------------------------------------


def _tree_cpu_s(pids: Sequence[int]) -> float:
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


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid``, with those of its children that have exited (Redis's
    forked append-only-file rewrites)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / _CLK_TCK


class Workers:
    """Worker processes started for one measurement; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self,
        commands: list[list[str]],
        names: list[str],
        envs: list[dict[str, str]],
        log_dir: Path,
        client: ImgqClient,
    ) -> None:
        self.names, self.client = names, client
        started = time.monotonic()
        self.procs = []
        for name, cmd, env in zip(names, commands, envs, strict=True):
            log = (log_dir / f"{name.split('@')[0]}.log").open("ab")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=ROOT))
        self._wait_for_ping()
        self.startup_s = time.monotonic() - started

    def _wait_for_ping(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        answered: set[str] = set()
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"a worker exited with {proc.returncode}: see its log")
            missing = [n for n in self.names if n not in answered]
            for reply in self.client.app.control.ping(destination=missing, timeout=0.5):
                answered.update(reply)
            if answered >= set(self.names):
                return
        self.stop()
        raise RuntimeError(f"workers {sorted(set(self.names) - answered)} did not answer a ping")

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
                dead = [p.pid for p in self.procs if p.poll() is not None]
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
            dead = [p.pid for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"workers {dead} died with {unfinished} tasks unfinished")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _worker_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    return {
        **env,
        "IMGQ_BROKER_URL": url,
        "IMGQ_METRICS_PORT": "0",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


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
) -> Workers:
    """(b): ``args.workers`` `imgq worker` processes on the client's queue; with ``envs``, one
    process per entry, each with its own extra environment."""
    envs = list(envs) if envs is not None else [env or {}] * args.workers
    names = [f"imgq{i}@bench" for i in range(len(envs))]
    commands = []
    for name in names:
        options = [
            "--model",
            str(bundle),
            "--queue",
            client.queue,
            "--hostname",
            name,
            "--concurrency",
            str(args.concurrency),
            "--threads",
            str(args.threads),
            "--max-batch",
            str(args.max_batch),
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--loglevel",
            "WARNING",
        ]
        if profile_dir is None:
            commands.append([sys.executable, "-m", "imgq.cli", "worker", *options])
        else:
            out = profile_dir / f"{name.split('@')[0]}.prof"
            commands.append([sys.executable, __file__, "profile-worker", str(out), "--", *options])
    return Workers(commands, names, [_worker_env(url, **e) for e in envs], log_dir, client)


def naive_workers(
    url: str, bundle: Path, client: ImgqClient, args: argparse.Namespace, log_dir: Path
) -> Workers:
    """(a): one prefork Celery worker with one process per core."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "naive_worker.py"),
        "--model",
        str(bundle),
        "--broker",
        url,
        "--queue",
        client.queue,
        "--concurrency",
        str(args.workers),
        "--hostname",
        "naive@bench",
    ]
    return Workers([cmd], ["naive@bench"], [_worker_env(url)], log_dir, client)


# -- measurements ----------------------------------------------------------------------------------


def _cycle(images: Sequence[bytes], n: int) -> Iterator[bytes]:
    return itertools.islice(itertools.cycle(images), n)


def _done_times(client: ImgqClient, pending: Sequence[Any]) -> list[float]:
    """Epoch seconds at which each task's result was stored (its ``date_done``)."""
    backend = client.app.backend
    keys = [backend.get_key_for_task(r.id) for r in pending]
    times = []
    for start in range(0, len(keys), 1000):
        for value in backend.client.mget(keys[start : start + 1000]):
            times.append(datetime.fromisoformat(json.loads(value)["date_done"]).timestamp())
    return times


def _failures(outcomes: Sequence[Any]) -> int:
    return sum(not isinstance(o, dict) for o in outcomes)


def bulk_enqueue(url: str, images: Sequence[bytes], n: int) -> dict[str, float]:
    """Rate of ``classify_many`` into a queue no worker reads (then deleted)."""
    with ImgqClient(url, queue="bench-bulk") as client:
        client.classify_many(images[:10])  # connect
        t0 = time.perf_counter()
        client.classify_many(_cycle(images, n))
        elapsed = time.perf_counter() - t0
        redis.Redis.from_url(url).delete("bench-bulk")
    mean_bytes = sum(len(i) for i in images) / len(images)
    return {
        "rate": n / elapsed,
        "mean_image_bytes": mean_bytes,
        "mb_per_s": n * mean_bytes / elapsed / 1e6,
    }


def drain(
    url: str,
    client: ImgqClient,
    images: Sequence[bytes],
    n: int,
    start: Callable[[], Workers],
    keep: Callable[[float], Any] | None = None,
) -> dict[str, Any]:
    """Enqueue ``n`` tasks, park them, start the workers, release the queue, time the drain.

    ``keep(drain_rate)`` runs with the workers still up after the drain (the paced load)."""
    r = redis.Redis.from_url(url)
    parked = f"{client.queue}:parked"
    r.delete(client.queue, parked)
    pending = client.classify_many(_cycle(images, n))
    r.rename(client.queue, parked)
    redis_pid = int(r.info("server")["process_id"])
    with start() as workers:
        cpu0 = [_tree_cpu_s([pid]) for pid in workers.pids]
        redis0, self0 = _process_cpu_s(redis_pid), time.process_time()
        released = time.time()
        r.rename(parked, client.queue)
        workers.wait_stored(pending, timeout_s=60 + n / 20)
        worker_cpu_s = [_tree_cpu_s([pid]) - c for pid, c in zip(workers.pids, cpu0, strict=True)]
        cpu_s = sum(worker_cpu_s)
        redis_s, self_s = _process_cpu_s(redis_pid) - redis0, time.process_time() - self0
        outcomes = workers.results(pending, timeout_s=30)
        last = max(_done_times(client, pending))
        result = {
            "rate": n / (last - released),
            "cpu_ms_per_task": cpu_s / n * 1000,
            "redis_cpu_ms_per_task": redis_s / n * 1000,
            "poller_cpu_ms_per_task": self_s / n * 1000,
            "startup_s": workers.startup_s,
            "failures": _failures(outcomes),
            "mean_batch": statistics.mean(
                o.get("batch_size", 1) for o in outcomes if isinstance(o, dict)
            ),
            "loadavg_1m": os.getloadavg()[0],
            "worker_cpu_s": worker_cpu_s,
            # Results with a "drift" entry came from a worker with drift statistics on.
            "drift_tasks": sum(isinstance(o, dict) and "drift" in o for o in outcomes),
        }
        if keep is not None:
            result["paced"] = keep(result["rate"])
    return result


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
    between consecutive drains, more than the cost measured); CPU per task of each.
    ``on_first=False`` starts the worker without drift first (alternate it between rounds)."""
    envs = [{"IMGQ_DRIFT": "true"}, {"IMGQ_DRIFT": "false"}]
    if not on_first:
        envs.reverse()
    on, off = (0, 1) if on_first else (1, 0)
    d = drain(
        url,
        client,
        images,
        args.drift_ab_tasks,
        lambda: imgq_workers(url, bundle, client, args, work, envs=envs),
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


def paced(client: ImgqClient, images: Sequence[bytes], rate: float, duration_s: float) -> dict:
    """Open-loop load: task ``i`` is enqueued at ``start + i / rate`` whatever the workers do.

    The garbage collector's objects are frozen first: a full collection in this process (its
    thousands of pending results) paused the sender ~100 ms near the end of a 10 s level,
    after it had taken the send time of the tasks in hand, which showed as a latency spike of
    the workers (docs/benchmarks.md, Throughput)."""
    n = max(1, int(rate * duration_s))
    source = _cycle(images, n)
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
        for done, sent in zip(_done_times(client, pending), sent_at, strict=True)
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
        "failures": _failures(outcomes),
        "loadavg_1m": os.getloadavg()[0],
    }


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

                def start(drift: str = drift) -> Workers:
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


# -- the profiling hook ----------------------------------------------------------------------------


def profile_worker(out_path: str, worker_args: list[str]) -> int:
    """Run `imgq worker WORKER_ARGS` with cProfile in every thread; merged stats to ``out_path``
    at exit."""
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
    p.add_argument("--workers", type=int, default=2, help="worker processes (cores)")
    p.add_argument("--concurrency", type=int, default=1, help="batch threads per imgq worker")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads per process")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0.0)
    p.add_argument("--train-epochs", type=int, default=5, help="epochs for the sample model")
    p.add_argument("--per-class", type=int, default=100, help="sample images per class")
    p.add_argument("--work-dir", help="keep data, models and logs here (reused when re-run)")
    p.add_argument("--json", help="also write the figures to this JSON file")
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
