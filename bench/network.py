"""Workers a network away from Redis (issue 24): drain rate and latency at 50% load through a
delay proxy (``bench/delayproxy.py``), side by side with loopback in one run.

For each mode — ``overlap`` (default settings: the next batch is taken while this one is served,
its settle shares a round trip with a take) and ``serial`` (``IMGQ_PREFETCH=false``: take, serve,
settle, one after the other, as before issue 24) — and each round trip (``--rtts``, ms; 0 is a
direct connection, no proxy):

* drain: ``--tasks`` tasks enqueued and parked, the workers (default 2 processes x 1 batch thread,
  small model) started with their broker URL through the proxy, the queue released; rate =
  tasks / (last result stored - release); and the share of loopback's rate in the same mode;
* paced open-loop load at 50% of the mode's loopback drain rate (the same offered load at every
  round trip): p50/p99 from enqueue to result stored, and p99 against loopback's p99 in round
  trips.

The client enqueues and polls over a direct connection, so the figures are the workers'; the
proxy's own cost is the drain through it at 0 ms against the direct drain (``proxy 0``). Last,
the client itself through the proxy: ``classify_many`` of ``--client-tasks`` tasks and
``results`` of the same, served by workers on loopback.

    .venv/bin/python bench/network.py                       # ~12 minutes on 2 cores
    .venv/bin/python bench/network.py --rtts 0,2 --modes overlap --tasks 3000 --paced-s 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from delayproxy import DelayProxy
from harness import add_fleet_arguments, drain, imgq_workers, paced, sample_images, small_bundle

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient

_MODES = {"overlap": "true", "serial": "false"}


def _proxied(url: str, port: int) -> str:
    """``url`` with its port replaced by the proxy's."""
    head, _, tail = url.rpartition(":")
    return f"{head}:{port}/{tail.split('/', 1)[1]}"


def measure(
    url: str,
    bundle: Path,
    images: list[bytes],
    args: argparse.Namespace,
    work: Path,
    mode: str,
    rtt_ms: float | None,
    load_rate: float | None,
) -> dict[str, Any]:
    """One drain, then the paced load at ``load_rate`` (None: half this drain's rate), with
    workers ``rtt_ms`` away (None: direct)."""
    env = {"IMGQ_PREFETCH": _MODES[mode]}
    with ImgqClient(url, queue=f"net-{mode}") as client:

        def run(worker_url: str) -> dict[str, Any]:
            def keep(rate: float) -> list[dict[str, Any]]:
                return [paced(client, images, load_rate or rate / 2, args.paced_s)]

            return drain(
                url,
                client,
                images,
                args.tasks,
                lambda: imgq_workers(worker_url, bundle, client, args, work, env=env),
                keep=keep,
            )

        if rtt_ms is None:
            return run(url)
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        with DelayProxy((host, int(port)), rtt_ms) as proxy:
            return run(_proxied(url, proxy.port))


def client_side(url: str, bundle: Path, images: list[bytes], args: argparse.Namespace,
                work: Path, rtt_ms: float) -> dict[str, float]:  # fmt: skip
    """``classify_many`` + ``results`` of ``--client-tasks`` tasks by a client ``rtt_ms``
    away, answered by workers on loopback."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with DelayProxy((host, int(port)), rtt_ms) as proxy:
        with ImgqClient(_proxied(url, proxy.port), queue="net-client") as client:
            with imgq_workers(url, bundle, client, args, work):
                client.classify_many(images[:10])
                t0 = time.perf_counter()
                pending = client.classify_many(images[i % len(images)]
                                               for i in range(args.client_tasks))  # fmt: skip
                t1 = time.perf_counter()
                outcomes = client.results(pending, timeout_s=120)
                t2 = time.perf_counter()
    return {
        "enqueue_per_s": args.client_tasks / (t1 - t0),
        "enqueue_to_all_results_s": t2 - t0,
        "results_after_enqueue_s": t2 - t1,
        "failures": sum(not isinstance(o, dict) for o in outcomes),
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The figures as Markdown tables."""
    lines = [
        f"workers {args.workers} x {args.concurrency} thread, small model, {args.tasks} tasks per "
        f"drain, paced {args.paced_s:g} s at 50% of the mode's loopback drain rate",
        "",
        "| mode | round trip | drain tasks/s | of loopback | p50 ms | p99 ms | "
        "p99 - loopback p99 | in round trips | mean batch | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in args.modes:
        rows = results[mode]
        base = rows["direct"]
        base_p99 = base["paced"][0]["p99_ms"] if base.get("paced") else float("nan")
        for key, m in rows.items():
            p = m["paced"][0] if m.get("paced") else None
            rtt = 0.0 if key in ("direct", "proxy 0") else float(key)
            extra = p["p99_ms"] - base_p99 if p else float("nan")
            in_rtts = f"{extra / rtt:.1f}" if p and rtt else "-"
            label = "loopback (direct)" if key == "direct" else (
                "loopback through the proxy" if key == "proxy 0" else f"{key} ms")  # fmt: skip
            lines.append(
                f"| {mode} | {label} | {m['rate']:.0f} | {m['rate'] / base['rate']:.0%} | "
                + (
                    f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {extra:+.1f} | {in_rtts} | "
                    if p
                    else "- | - | - | - | "
                )  # fmt: skip
                + f"{m['mean_batch']:.1f} | {m['loadavg_1m']:.2f} |"
            )
    if "overlap" in results and "serial" in results:
        lines += ["", "| round trip | overlap / serial drain |", "|---|---:|"]
        for key in results["overlap"]:
            if key in results["serial"]:
                ratio = results["overlap"][key]["rate"] / results["serial"][key]["rate"]
                lines.append(f"| {key} | {ratio:.2f}x |")
    if results.get("client"):
        lines += ["", "| client round trip | classify_many tasks/s | results after enqueue s |",
                  "|---|---:|---:|"]  # fmt: skip
        for key, c in results["client"].items():
            lines.append(
                f"| {key} ms | {c['enqueue_per_s']:.0f} | {c['results_after_enqueue_s']:.2f} |"
            )
    return "\n".join(lines)


def _say(mode: str, what: str) -> None:
    print(f"[{mode}] {what} (load {os.getloadavg()[0]:.2f})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtts", default="0.5,2,5", help="round trips to add, ms (besides loopback)")
    p.add_argument("--modes", default="overlap,serial", help="overlap, serial")
    p.add_argument("--tasks", type=int, default=6000, help="tasks per drain")
    p.add_argument("--paced-s", type=float, default=10.0, help="seconds of paced load")
    p.add_argument("--client-tasks", type=int, default=2000)
    p.add_argument("--no-client", action="store_true", help="skip the client's own figures")
    add_fleet_arguments(p)
    p.add_argument("--report", metavar="JSON", help="only print the tables of a --json file")
    args = p.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        print(report(saved, argparse.Namespace(**saved["args"])))
        return 0
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rtts = [float(x) for x in args.rtts.split(",") if x.strip()]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imgq-network-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; load average {os.getloadavg()}", flush=True)
    data_dir, images = sample_images(work, args.per_class)
    bundle = small_bundle(work, data_dir, args.train_epochs)
    results: dict[str, Any] = {"args": dict(vars(args))}
    server = LocalRedis(work / "redis").start()
    try:
        for mode in args.modes:
            rows: dict[str, Any] = {}
            results[mode] = rows
            rows["direct"] = measure(server.url, bundle, images, args, work, mode, None, None)
            load = rows["direct"]["paced"][0]["target_rate"]
            _say(mode, f"direct: {rows['direct']['rate']:.0f} tasks/s")
            for rtt in [0.0, *rtts]:
                key = "proxy 0" if rtt == 0 else f"{rtt:g}"
                rows[key] = measure(server.url, bundle, images, args, work, mode, rtt, load)
                _say(mode, f"{key} ms: {rows[key]['rate']:.0f} tasks/s, p99 "
                     f"{rows[key]['paced'][0]['p99_ms']:.1f} ms")  # fmt: skip
        if not args.no_client:
            results["client"] = {}
            for rtt in [0.0, *rtts]:
                results["client"][f"{rtt:g}"] = client_side(server.url, bundle, images, args,
                                                             work, rtt)  # fmt: skip
                print(f"client {rtt:g} ms: {results['client'][f'{rtt:g}']}", flush=True)
    finally:
        server.stop()
    print("\n" + report(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
