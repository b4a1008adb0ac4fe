"""`imgq demo`: the whole product, end to end, on this machine.

sample data -> training (live progress, curves, parity) -> a local Redis (or IMGQ_BROKER_URL)
-> worker processes -> single-image tasks with a progress bar -> a summary -> a stream in which
half the images are shapes the model never saw (answered as confidently as the others: only its
own features tell them apart) -> the drift page -> `imgq drift report` figures -> everything
stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgq.launcher import WorkerFleet, WorkerProcess, WorkerStartError, worker_env

__all__ = ["main"]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


@contextlib.contextmanager
def _broker(out: Path) -> Iterator[str]:
    """IMGQ_BROKER_URL when it is set, else a private redis-server we start and stop."""
    url = os.environ.get("IMGQ_BROKER_URL")
    if url:
        print("using the Redis named by IMGQ_BROKER_URL")
        yield url
        return
    from imgq.localredis import LocalRedis

    server = LocalRedis(out / "redis").start()
    print(f"started redis-server on 127.0.0.1:{server.port} (data in {server.data_dir})")
    try:
        yield server.url
    finally:
        server.stop()
        print("stopped redis-server")


@contextlib.contextmanager
def _workers(n: int, bundle: Path, url: str, queue: str, out: Path) -> Iterator[WorkerFleet]:
    """Start `n` `imgq worker` processes, each in its own process group; stop them all after."""
    env = worker_env(
        url,
        keep_imgq=True,
        IMGQ_RESULT_BACKEND=url,
        IMGQ_MODEL=str(bundle),
        IMGQ_QUEUE=queue,
        IMGQ_METRICS_PORT="0",
        IMGQ_DRIFT_WINDOW="200",
    )
    fleet = WorkerFleet()
    try:
        for i in range(n):
            log = out / f"worker{i + 1}.log"
            fleet.add(WorkerProcess(f"demo{i + 1}@%h", log, env=env, new_session=True))
        yield fleet
    finally:
        fleet.stop_all(timeout_s=30)
        print(f"stopped {len(fleet)} workers")


def _wait_for_workers(app: Any, fleet: WorkerFleet, timeout_s: float) -> None:
    """Until every worker answers a ping; exits the demo with their logs' ends when one does
    not."""
    try:
        fleet.wait_ready(app, timeout_s)
    except WorkerStartError as exc:
        raise SystemExit(f"workers did not come up: {exc}") from None
    print(f"{len(fleet)} workers answer ping: {', '.join(sorted(fleet.names))}")


def _files_with_labels(data_dir: Path) -> list[tuple[Path, str]]:
    return [
        (f, cls.name)
        for cls in sorted(p for p in data_dir.iterdir() if p.is_dir())
        for f in sorted(cls.iterdir())
        if f.is_file()
    ]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _alert_tiers(url: str, manifest: Any) -> dict[str, str]:
    """Id -> tier (page, notice) of every drift alert of this model so far."""
    from imgq.worker.broker.connection import connect
    from imgq.worker.drift.review import list_alerts

    with connect(url) as client:
        alerts = list_alerts(client, manifest, include_all=True)
        return {a["id"]: a.get("tier", "page") for a in alerts}


def _wait_for_page(
    url: str, manifest: Any, timeout_s: float, seen: set[str]
) -> dict[str, Any] | None:
    """The first drift page of this model not in ``seen``, polled until ``timeout_s``: windows
    are judged by the workers in the background, a moment after they close."""
    from imgq.worker.broker.connection import connect
    from imgq.worker.drift.review import list_alerts

    deadline = time.monotonic() + timeout_s
    with connect(url) as client:
        while time.monotonic() < deadline:
            alerts = list_alerts(client, manifest, include_all=True)
            new = [a for a in alerts if a["id"] not in seen and a.get("tier", "page") == "page"]
            if new:
                return new[0]
            time.sleep(0.5)
    return None


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    from imgq.shared.manifest import load_manifest
    from imgq.trainer.sample_data import CLASS_NAMES, generate
    from imgq.trainer.train import train_bundle
    from imgq.worker.client import ImgqClient
    from imgq.worker.commands.classify import ProgressBar

    started = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, holdout_dir, bundle = out / "data" / "train", out / "data" / "holdout", out / "model"
    report_dir = out / "drift-report"
    for stale in (out / "data", bundle, report_dir, out / "redis"):  # a second run starts clean
        shutil.rmtree(stale, ignore_errors=True)

    _say("1/6 sample data")
    generate(data_dir, classes=4, per_class=args.per_class, size=128, seed=0)
    per_holdout = max(1, -(-args.tasks // 4))
    generate(holdout_dir, classes=4, per_class=per_holdout, size=128, seed=12345)
    unseen_dir = out / "data" / "unseen"
    generate(unseen_dir, classes=8, per_class=-(-args.drift_tasks // 8), size=128, seed=54321)
    print(f"training images in {data_dir}; held-out images in {holdout_dir}")

    _say("2/6 training (early stopping on validation loss, best weights restored)")
    train_bundle(data_dir, bundle, epochs=args.epochs, name="shapes-demo", progress=True)
    manifest = load_manifest(bundle)
    t = manifest.training
    shown = ("best_epoch", "epochs_run", "stopped_early", "overfit_epoch", "best_val_loss",
             "test_accuracy", "fit_s")  # fmt: skip
    print("TRAINING " + json.dumps({k: t.get(k) for k in shown}))
    print("PARITY " + json.dumps(manifest.parity))
    print(f"training curves: {bundle / 'training_curves.png'}")

    queue = "imgq-demo"
    with _broker(out) as url:
        client = ImgqClient(url, url, queue=queue)
        _say(f"3/6 starting {args.workers} workers")
        with _workers(args.workers, bundle, url, queue, out) as fleet:
            _wait_for_workers(client.app, fleet, 120)

            _say(f"4/6 classifying {args.tasks} held-out images, one task each")
            # Production traffic arrives mixed, not class by class (that would be class drift).
            files = _files_with_labels(holdout_dir)
            random.Random(0).shuffle(files)
            files = files[: args.tasks]
            payloads = [f.read_bytes() for f, _ in files]
            t0 = time.monotonic()
            pending = client.classify_many(payloads, top_k=1)
            results = client.results(pending, 300, progress=ProgressBar(len(pending)))
            elapsed = time.monotonic() - t0
            ok = [r for r in results if isinstance(r, dict)]
            correct = sum(
                r["label"] == label
                for r, (_, label) in zip(results, files, strict=True)
                if isinstance(r, dict)
            )
            # enqueue -> answer computed: time in the queue + the batch's preprocess + inference
            latencies = [sum(v or 0.0 for v in r["timings_ms"].values()) for r in ok]
            batches = [r["batch_size"] for r in ok]
            summary = {
                "tasks": len(results),
                "succeeded": len(ok),
                "accuracy": round(correct / max(1, len(ok)), 4),
                "tasks_per_s": round(len(results) / elapsed, 1),
                # enqueued all at once, so mostly time waiting in the queue
                "latency_p50_ms": round(_percentile(latencies, 50), 1),
                "latency_p99_ms": round(_percentile(latencies, 99), 1),
                "mean_batch_size": round(sum(batches) / max(1, len(batches)), 2),
            }
            print("SUMMARY " + json.dumps(summary))
            time.sleep(1.0)  # the last window is judged in the background
            tiers = _alert_tiers(url, manifest)
            seen = set(tiers)
            pages = sum(tier == "page" for tier in tiers.values())
            print(
                f"drift alerts on this in-distribution traffic: {pages} pages, "
                f"{len(tiers) - pages} notices"
            )

            _say(
                f"5/6 new kinds of objects: {args.drift_tasks} more tasks, half of them shapes "
                f"the model never saw ({', '.join(CLASS_NAMES[4:])})"
            )
            new = [
                p.read_bytes() for n in CLASS_NAMES[4:] for p in sorted((unseen_dir / n).iterdir())
            ]
            usual = itertools.cycle(payloads)
            mixed = [b for pair in zip(new, usual, strict=False) for b in pair][: args.drift_tasks]
            pending = client.classify_many(mixed)
            drifted = client.results(pending, 300, progress=ProgressBar(len(pending)))
            flagged = sum(
                bool(r.get("drift", {}).get("novel")) for r in drifted[::2] if isinstance(r, dict)
            )
            print(
                f"{flagged}/{len(drifted[::2])} answers to unseen shapes flagged novel "
                "(drift.novel: unlike every training class in the model's own features)"
            )
            alert = _wait_for_page(url, manifest, timeout_s=60, seen=seen)
            if alert is None:
                print("no drift page was raised", file=sys.stderr)
                return 1
            print("DRIFT ALERT " + json.dumps(alert))
            subprocess.run(
                [sys.executable, "-m", "imgq.cli", "drift", "alerts", "--model", str(bundle)],
                env=dict(os.environ, IMGQ_BROKER_URL=url),
                check=True,
            )

            _say("6/6 drift report")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "imgq.cli",
                    "drift",
                    "report",
                    "--model",
                    str(bundle),
                    "--out",
                    str(report_dir),
                ],
                env=dict(os.environ, IMGQ_BROKER_URL=url),
                check=True,
            )
    _say(f"done in {time.monotonic() - started:.0f} s; what it wrote:")
    for path in (
        data_dir,
        holdout_dir,
        bundle,
        bundle / "training_curves.png",
        bundle / "confusion_matrix.png",
        report_dir,
        *(w.log for w in fleet),
    ):
        print(f"  {path}")
    return 0
