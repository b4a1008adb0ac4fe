"""High-priority latency under a flood of low-priority tasks (worker/broker/priority.py).

The issue: "a flood of 20,000 low-priority tasks queued; high-priority tasks paced at 10% of the
drain rate; their p99 stays within one batch time of their p99 on an idle queue. The batch may
mix priorities."

One run, one private append-only ``redis-server``, one fleet of ``imgq worker`` processes (the
small sample model, as ``bench/throughput.py`` and ``bench/engine.py`` run it: 2 processes x 1
batch thread x 1 onnxruntime thread, batches of 32, no batch wait), kept up throughout:

1. **drain rate**: ``--block`` priority-9 tasks are pushed to a parked key and released onto the
   queue's priority-9 list with one ``RENAME``; rate = tasks / (last ``date_done`` - release);
2. **idle**: ``--high`` priority-0 tasks sent with the stock Celery client
   (``app.send_task("imgq.classify", kwargs={"image": b64}, queue=..., priority=0)``), open
   loop at ``--share`` (10%) of the drain rate, on an empty queue;
3. **flood**: ``--flood`` priority-9 tasks parked, released with one ``RENAME``, then the same
   paced priority-0 stream at once, while the flood drains; the low tasks finished meanwhile
   show that they are not starved.

**Batch time** is the wall time one batch thread takes for a full batch at the fleet's rate,
``max_batch x workers x concurrency / rate``. The verdict uses step 1's rate (full batches of
the backlog alone: the time of the batch an urgent task may find in hand, the strictest of the
figures); those of the whole flood and of the stream's window (when batches are smaller, so
"batch time" there is longer), and ``max_batch / rate`` (the fleet's interval between two full
batches), are printed beside it. This VM's speed drifts by tens of percent between drains, and
the sender shares the cores, so the rates differ.

A task's latency is its result's ``date_done`` (``celery-task-meta-<id>``, written by the
worker) minus ``time.time()`` just before its ``send_task`` (same machine, same clock); results
are read after the stream, so the sender does not poll while it paces. The flood's messages are
made by Celery's own message factory (``MessageTemplate``, as ``ImgqClient.classify_many``) with
priority 9 and pushed in bulk; before the workers start, one stock ``send_task(priority=9)`` and
one ``priority=0`` are checked to land on the lists the benchmark uses, with the same envelope.

    .venv/bin/python bench/priority.py                      # 20,000 flood, 300 high, ~30 s
    .venv/bin/python bench/priority.py --quick              # 2,000 flood, 60 high: smoke run

(plus ~2 minutes to make the sample data and train the model in a new work folder).
    .venv/bin/python bench/priority.py --work-dir /tmp/tp   # reuse throughput.py's data, model
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from harness import (
    BenchFleet,
    add_fleet_arguments,
    cycled,
    imgq_workers,
    sample_images,
    small_bundle,
)

from imgq.localredis import LocalRedis
from imgq.worker.broker.priority import QueueLists
from imgq.worker.client import PUSH_CHUNK_TASKS, ImgqClient
from imgq.worker.wire import SENT_AT_HEADER, TASK_NAME
from imgq.worker.wire.envelope import MessageTemplate

#: Priorities of the two kinds of traffic (kombu's Redis transport: 0 is served first).
HIGH, LOW = 0, 9


# -- sending -----------------------------------------------------------------------------------


def low_template(client: ImgqClient) -> MessageTemplate:
    """Celery's task message of ``send_task(..., priority=LOW)``, made in bulk."""
    template = MessageTemplate(client.app, TASK_NAME, client.queue, 1, None)
    template.properties["priority"] = LOW
    return template


def push_parked(client: ImgqClient, images: Iterable[bytes], key: str) -> list[Any]:
    """Priority-``LOW`` task messages for ``images``, pushed onto ``key`` (oldest at the right,
    as kombu's ``LPUSH`` leaves them), many per round trip; their ``AsyncResult``s."""
    r = client.app.backend.client
    template = low_template(client)
    pending: list[Any] = []
    chunk: list[bytes] = []
    for image in images:
        task_id, message = template.fill(image)
        pending.append(client.app.AsyncResult(task_id))
        chunk.append(message)
        if len(chunk) >= PUSH_CHUNK_TASKS:
            r.lpush(key, *chunk)
            chunk = []
    if chunk:
        r.lpush(key, *chunk)
    return pending


def check_routing(client: ImgqClient, image: bytes, lists: QueueLists) -> None:
    """Before any worker runs: a stock ``send_task`` at each priority lands on the list this
    benchmark expects, and the bulk-made low message has the stock one's envelope."""
    r = client.app.backend.client
    names = lists.names(client.queue)
    r.delete(*names)
    b64 = base64.b64encode(image).decode("ascii")
    for priority in (HIGH, LOW):
        client.app.send_task(TASK_NAME, kwargs={"image": b64}, queue=client.queue,
                             priority=priority)  # fmt: skip
        where = [n for n in names if r.llen(n)]
        expected = lists.list_for(client.queue, priority)
        if where != [expected]:
            raise SystemExit(f"send_task(priority={priority}) went to {where}, not {[expected]}")
        stock = json.loads(r.rpop(expected))
        if priority == LOW:
            _, made = low_template(client).fill(image)
            ours = json.loads(made)
            # ImgqClient's extras: its enqueue time and the image's summary (send_task's
            # kwargsrepr=, which Celery also copies into the properties).
            extras = {SENT_AT_HEADER, "kwargsrepr"}
            for part in ("headers", "properties"):
                if set(ours[part]) - extras != set(stock[part]) - extras:
                    raise SystemExit(
                        f"bulk message {part} {sorted(ours[part])} != stock {sorted(stock[part])}"
                    )
            if ours["properties"]["priority"] != stock["properties"]["priority"]:
                raise SystemExit(f"bulk priority != stock {stock['properties']['priority']}")


def paced_high(
    client: ImgqClient, b64_images: Sequence[str], n: int, rate: float
) -> tuple[list[Any], list[float], float]:
    """Open loop: task ``i`` is sent at ``start + i / rate`` whatever the workers do, with the
    stock client. Returns the results, each task's send time and the achieved rate.

    The collector's objects are frozen meanwhile (as ``throughput.py``'s ``paced``): a full
    collection in the sender shows as latency of the workers."""
    pending: list[Any] = []
    sent_at: list[float] = []
    gc.collect()
    gc.freeze()
    start = time.time()
    for i in range(n):
        wait_s = start + i / rate - time.time()
        if wait_s > 0:
            time.sleep(wait_s)
        sent_at.append(time.time())
        # The header (as ImgqClient.classify sends it) lets the worker report the queue wait.
        pending.append(
            client.app.send_task(
                TASK_NAME,
                kwargs={"image": b64_images[i % len(b64_images)]},
                queue=client.queue,
                priority=HIGH,
                headers={SENT_AT_HEADER: sent_at[-1]},
            )
        )
    achieved = n / max(1e-9, time.time() - start)
    gc.unfreeze()
    return pending, sent_at, achieved


# -- reading results ---------------------------------------------------------------------------


def read_results(client: ImgqClient, pending: Sequence[Any]) -> list[dict[str, Any]]:
    """Per task: ``done`` (epoch seconds of ``date_done``), ``status``, ``batch_size`` and the
    batch's handler milliseconds (preprocess + infer), from the result keys."""
    backend = client.app.backend
    keys = [backend.get_key_for_task(t.id) for t in pending]
    out = []
    for start in range(0, len(keys), 1000):
        for value in backend.client.mget(keys[start : start + 1000]):
            meta = json.loads(value)
            result = meta["result"] if isinstance(meta["result"], dict) else {}
            timings = result.get("timings_ms") or {}
            out.append({
                "done": datetime.fromisoformat(meta["date_done"]).timestamp(),
                "status": meta["status"],
                "batch_size": result.get("batch_size", 0),
                "handler_ms": (timings.get("preprocess") or 0) + (timings.get("infer") or 0),
                "queue_ms": timings.get("queue"),
            })  # fmt: skip
    return out


def percentile(values: Sequence[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def latency_stats(
    sent_at: Sequence[float], results: Sequence[dict[str, Any]], target: float, achieved: float
) -> dict[str, Any]:
    in_order = [(r["done"] - s) * 1000 for r, s in zip(results, sent_at, strict=True)]
    ms = sorted(in_order)
    queued = sorted(r["queue_ms"] for r in results if r["queue_ms"] is not None)
    return {
        "tasks": len(ms),
        "target_rate": target,
        "achieved_rate": achieved,
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1],
        "mean_batch": statistics.mean(r["batch_size"] for r in results),
        "failures": sum(r["status"] != "SUCCESS" for r in results),
        "loadavg_1m": os.getloadavg()[0],
        # The part of it spent in the list, until a worker took the task (the worker's figure).
        "queue_p50_ms": percentile(queued, 50) if len(queued) > 1 else float("nan"),
        "queue_p99_ms": percentile(queued, 99) if len(queued) > 1 else float("nan"),
        "latencies_ms": in_order,  # in send order, for the JSON
    }


# -- the measurements --------------------------------------------------------------------------


def release_low(
    client: ImgqClient, fleet: BenchFleet, images: Sequence[bytes], n: int, lists: QueueLists,
    max_batch: int, high: tuple[Sequence[str], int, float] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Park ``n`` low tasks, release them onto their list at once; with ``high`` = (images,
    count, rate), the paced high stream starts right after the release. Waits for everything;
    the handler time per batch is the mean over the low tasks that rode in full batches."""
    r = client.app.backend.client
    low_list = lists.list_for(client.queue, LOW)
    parked = f"{client.queue}:parked"
    r.delete(parked)
    t0 = time.perf_counter()
    low = push_parked(client, cycled(images, n), parked)
    push_s = time.perf_counter() - t0
    if r.llen(low_list) or r.llen(lists.list_for(client.queue, HIGH)):
        raise RuntimeError("the queue is not empty before the release")
    released = time.time()
    r.rename(parked, low_list)
    out: dict[str, Any] = {"tasks": n, "push_s": push_s}
    if high is not None:
        b64_images, count, rate = high
        pending, sent_at, achieved = paced_high(client, b64_images, count, rate)
        out["low_left_at_stream_end"] = r.llen(low_list)
        fleet.wait_stored(pending, timeout_s=120)
        high_results = read_results(client, pending)
        out["high"] = latency_stats(sent_at, high_results, rate, achieved)
        out["stream_start"], out["high_last_done"] = (
            sent_at[0],
            max(x["done"] for x in high_results),
        )
    fleet.wait_stored(low, timeout_s=60 + n / 20)
    low_results = read_results(client, low)
    last = max(x["done"] for x in low_results)
    full = [x for x in low_results if x["batch_size"] == max_batch]
    out |= {
        "drain_s": last - released,
        "rate": n / (last - released),
        "mean_batch": statistics.mean(x["batch_size"] for x in low_results),
        "full_batch_handler_ms": statistics.mean(x["handler_ms"] for x in full) if full else 0.0,
        "failures": sum(x["status"] != "SUCCESS" for x in low_results),
        "loadavg_1m": os.getloadavg()[0],
    }
    if high is not None:
        window = (out["stream_start"], out["high_last_done"])
        done_in = [x["done"] for x in low_results if window[0] <= x["done"] <= window[1]]
        out["low_done_in_stream"] = len(done_in)
        out["stream_window_s"] = window[1] - window[0]
        out["low_share_in_stream"] = len(done_in) / (len(done_in) + out["high"]["tasks"])
    return out


def idle_high(
    client: ImgqClient, fleet: BenchFleet, b64_images: Sequence[str], count: int, rate: float
) -> dict[str, Any]:
    pending, sent_at, achieved = paced_high(client, b64_images, count, rate)
    fleet.wait_stored(pending, timeout_s=120)
    return latency_stats(sent_at, read_results(client, pending), rate, achieved)


# -- report ------------------------------------------------------------------------------------


def brief(figures: dict[str, Any]) -> dict[str, Any]:
    """``figures`` without the per-task lists, rounded, for the progress lines."""
    return {
        k: brief(v) if isinstance(v, dict) else round(v, 3) if isinstance(v, float) else v
        for k, v in figures.items()
        if not isinstance(v, list)
    }


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The figures as Markdown. The verdict's batch time is a full batch's at step 1's rate;
    the whole flood's and the stream window's are printed beside it."""
    block, idle, flood = res["block"], res["idle"], res["flood"]
    high = flood["high"]
    threads = args.workers * args.concurrency

    def batch_ms(rate: float) -> float:
        return args.max_batch * threads / rate * 1000

    window_rate = (flood["low_done_in_stream"] + high["tasks"]) / flood["stream_window_s"]
    # Every task the fleet served during the flood, high ones included, over the drain.
    flood_rate = (flood["tasks"] + high["tasks"]) / flood["drain_s"]
    window_bt_ms = batch_ms(window_rate)
    flood_bt_ms, bt_ms = batch_ms(flood_rate), batch_ms(block["rate"])
    interval_ms = bt_ms / threads
    diff_ms = high["p99_ms"] - idle["p99_ms"]

    def row(label: str, s: dict[str, Any]) -> str:
        return (
            f"| {label} | {s['tasks']} | {s['target_rate']:.0f} | {s['achieved_rate']:.0f} | "
            f"{s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} | "
            f"{s['queue_p50_ms']:.1f} | {s['queue_p99_ms']:.1f} | {s['mean_batch']:.1f} | "
            f"{s['failures']} | {s['loadavg_1m']:.2f} |"
        )

    def within(limit_ms: float) -> str:
        return "yes" if diff_ms <= limit_ms else "no"

    lines = [
        f"{args.workers} imgq workers x {args.concurrency} batch thread, batches of "
        f"{args.max_batch}, max wait {args.max_wait_ms:g} ms, small model, {os.cpu_count()} cores",
        "",
        f"- drain rate ({block['tasks']:,} priority-{LOW} tasks released at once): "
        f"**{block['rate']:,.0f} tasks/s**, mean batch {block['mean_batch']:.1f}, batch time "
        f"**{bt_ms:.1f} ms** (handler, preprocess + infer: "
        f"{block['full_batch_handler_ms']:.1f} ms); high streams paced at {args.share:.0%} of it",
        f"- flood: {flood['tasks']:,} priority-{LOW} tasks pushed in {flood['push_s']:.1f} s, "
        f"drained in **{flood['drain_s']:.1f} s** from the release ({flood_rate:,.0f} tasks/s "
        f"with the high ones, batch time {flood_bt_ms:.1f} ms; mean batch "
        f"{flood['mean_batch']:.1f}, {flood['failures']} failed)",
        f"- while the high stream ran (first send to last high result, "
        f"{flood['stream_window_s']:.2f} s): **{flood['low_done_in_stream']:,} low tasks "
        f"completed** ({flood['low_done_in_stream'] / flood['stream_window_s']:,.0f} tasks/s, "
        f"{flood['low_share_in_stream']:.0%} of completions); the fleet finished "
        f"{window_rate:,.0f} tasks/s (batch time {window_bt_ms:.1f} ms: batches are smaller while "
        f"urgent tasks come); low tasks still queued after the last high "
        f"send: {flood['low_left_at_stream_end']:,}",
        "",
        f"| priority-{HIGH} stream | tasks | target tasks/s | achieved | p50 ms | p90 ms | p99 ms "
        "| max ms | queued p50 ms | queued p99 ms | mean batch | failed | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("idle queue", idle),
        row(f"{flood['tasks']:,} priority-{LOW} queued", high),
        "",
        "(latency: the result's date_done - send; queued: the worker's take - send)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| idle p50 / p99 ms | {idle['p50_ms']:.1f} / {idle['p99_ms']:.1f} |",
        f"| flood p50 / p99 ms | {high['p50_ms']:.1f} / {high['p99_ms']:.1f} |",
        f"| batch time ms (a full batch, step 1) | {bt_ms:.1f} |",
        f"| p99 difference ms | {diff_ms:+.1f} |",
        f"| p99 difference / batch time | **{diff_ms / bt_ms:.2f}** |",
        f"| ... / the whole flood's batch time ({flood_bt_ms:.1f} ms) | "
        f"{diff_ms / flood_bt_ms:.2f} |",
        f"| ... / the stream window's batch time ({window_bt_ms:.1f} ms) | "
        f"{diff_ms / window_bt_ms:.2f} |",
        f"| ... / max_batch over the fleet's rate ({interval_ms:.1f} ms) | "
        f"{diff_ms / interval_ms:.2f} |",
        f"| flood queued p99 / batch time (the wait for a batch in hand) | "
        f"{high['queue_p99_ms'] / bt_ms:.2f} |",
        "",
        f"within one batch time: {within(bt_ms)}",
        f"(against the whole flood's batch time: {within(flood_bt_ms)}; the stream window's: "
        f"{within(window_bt_ms)}; max_batch over the fleet's rate: {within(interval_ms)})",
    ]
    if flood["low_left_at_stream_end"] == 0:
        lines.append("WARNING: the flood had drained before the high stream ended")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flood", type=int, default=20_000, help="low-priority tasks queued")
    p.add_argument("--high", type=int, default=300, help="high-priority tasks per stream")
    p.add_argument("--block", type=int, default=5000, help="low tasks of the drain-rate block")
    p.add_argument("--share", type=float, default=0.1, help="high stream rate / drain rate")
    add_fleet_arguments(p)
    p.add_argument("--queue", default="imgq")
    p.add_argument("--quick", action="store_true", help="smoke run: flood 2,000, high 60")
    args = p.parse_args(argv)
    if args.quick:
        args.flood, args.high, args.block = 2000, 60, 1000

    wall0 = time.monotonic()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-priority-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    bundle = small_bundle(work, data_dir, args.train_epochs)
    b64_images = [base64.b64encode(i).decode("ascii") for i in images]
    log_dir = work / "logs-priority"
    log_dir.mkdir(exist_ok=True)
    lists = QueueLists()
    say = lambda what: print(f"{what}  (load {os.getloadavg()[0]:.2f})", flush=True)  # noqa: E731
    results: dict[str, Any] = {"args": vars(args)}
    with LocalRedis(work / "redis-priority") as server:
        with ImgqClient(server.url, queue=args.queue) as client:
            redis.Redis.from_url(server.url).flushdb()
            check_routing(client, images[0], lists)
            say("routing checked; starting workers")
            with imgq_workers(server.url, bundle, client, args, log_dir) as fleet:
                say(f"workers up in {fleet.startup_s:.1f} s; warm-up")
                warm = 4 * args.max_batch * args.workers
                release_low(client, fleet, images, warm, lists, args.max_batch)
                say(f"drain rate: {args.block} priority-{LOW} tasks")
                results["block"] = block = release_low(
                    client, fleet, images, args.block, lists, args.max_batch
                )
                rate = args.share * block["rate"]
                say(f"    {block['rate']:.0f} tasks/s; idle stream: {args.high} at {rate:.0f}/s")
                results["idle"] = idle_high(client, fleet, b64_images, args.high, rate)
                say(f"    {brief(results['idle'])}")
                say(f"flood: {args.flood} priority-{LOW} tasks, then {args.high} at {rate:.0f}/s")
                results["flood"] = release_low(
                    client,
                    fleet,
                    images,
                    args.flood,
                    lists,
                    args.max_batch,
                    high=(b64_images, args.high, rate),
                )
                say(f"    {brief(results['flood'])}")
    results["wall_s"] = time.monotonic() - wall0
    print("\n" + report(results, args))
    print(f"\nwall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
