"""What the batch engine costs on its own, and how many tasks one Redis can serve (issue 16).

Two drains of the same messages (sample images of ~13 kB, the small model's traffic) by two
`imgq worker` processes on a private append-only redis-server, in one run:

- **null**: workers with ``--handlers null``: the engine alone (take, parse, settle: results,
  ack; task events) answers each task ``{"ok": true}``;
- **small** (the baseline): workers with the classification handler and the small sample model,
  drift statistics on, as in production.

For each: tasks/s, worker CPU per task, Redis CPU per task. Redis is single-threaded, so
``1 / Redis CPU per task`` is the most tasks/s one Redis can serve with imgq's protocol (its
ceiling), whatever the number of workers; dividing it by one worker process's tasks/s (one core:
``1 / worker CPU per task``) says how many worker processes one Redis can feed.

    .venv/bin/python bench/engine.py --work-dir /tmp/tp          # ~3 minutes
    .venv/bin/python bench/engine.py --work-dir /tmp/tp --rounds 3 --mobilenetv2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import drain, imgq_workers, mobilenet_bundle, sample_images, small_bundle

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient
from imgq.worker.handlers.null import NULL_TASK_NAME


def _drains(
    url: str, bundle: Path, images: list[bytes], args: argparse.Namespace, log_dir: Path, **kw: Any
) -> dict[str, list[dict[str, Any]]]:
    """``args.rounds`` drains of each kind, alternating (the machine's speed drifts)."""
    out: dict[str, list[dict[str, Any]]] = {"null": [], "model": []}
    for _ in range(args.rounds):
        for kind in ("null", "model"):
            with ImgqClient(url, queue=f"bench-{kind}") as client:
                if kind == "null":
                    client.task_name = NULL_TASK_NAME
                env = {"IMGQ_HANDLERS": "null"} if kind == "null" else {}

                def start(client: ImgqClient = client, env: dict[str, str] = env) -> Any:
                    return imgq_workers(url, bundle, client, args, log_dir, env=env)

                out[kind].append(drain(url, client, images, args.tasks, start))
    return out


def _row(label: str, drains: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    med = {k: statistics.median(d[k] for d in drains)
           for k in ("rate", "cpu_ms_per_task", "redis_cpu_ms_per_task")}  # fmt: skip
    ceiling = 1000.0 / med["redis_cpu_ms_per_task"]
    per_process = 1000.0 / med["cpu_ms_per_task"]
    line = (f"| {label} | {med['rate']:,.0f} | {med['cpu_ms_per_task']:.3f} | "
            f"{med['redis_cpu_ms_per_task']:.4f} | {ceiling:,.0f} | {per_process:,.0f} | "
            f"{ceiling / per_process:,.1f} |")  # fmt: skip
    return line, med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", help="bench/throughput.py's work folder (data and models)")
    p.add_argument("--tasks", type=int, default=10_000, help="tasks per drain")
    p.add_argument("--rounds", type=int, default=2, help="drains of each kind")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mobilenetv2", action="store_true", help="also the MobileNetV2 drains")
    args = p.parse_args(argv)
    args.concurrency, args.threads, args.max_batch, args.max_wait_ms = 1, 1, 32, 0.0
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-engine-"))
    data_dir, images = sample_images(work, per_class=100)
    models = {"small": small_bundle(work, data_dir, epochs=5)}
    if args.mobilenetv2:
        models["mobilenetv2"] = mobilenet_bundle(work, data_dir)
    log_dir = work / "logs-engine"
    log_dir.mkdir(exist_ok=True)
    rows: list[str] = []
    with LocalRedis(work / "redis-engine") as server:
        for name, bundle in models.items():
            drains = _drains(server.url, bundle, images, args, log_dir)
            if not rows:
                rows.append(_row("null handler (the engine alone)", drains["null"])[0])
            line, med = _row(f"{name} model, drift on (baseline)", drains["model"])
            rows.append(line)
            null_cpu = statistics.median(d["cpu_ms_per_task"] for d in drains["null"])
            print(f"{name}: the engine is {null_cpu / med['cpu_ms_per_task']:.0%} of a task's "
                  f"worker CPU ({null_cpu:.3f} of {med['cpu_ms_per_task']:.3f} ms)")  # fmt: skip
    print(f"\n{args.workers} workers x 1 batch thread, batches of 32, {args.tasks} tasks per "
          f"drain, medians of {args.rounds} drains; messages of ~{len(images[0]) * 1.8 / 1e3:.0f}"
          " kB in Redis.\n")  # fmt: skip
    print(
        "| drain | tasks/s | worker CPU ms/task | Redis CPU ms/task | one Redis's ceiling, "
        "tasks/s | tasks/s per worker process (1 core) | worker processes one Redis feeds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
