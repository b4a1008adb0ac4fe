"""Workers a network away from Redis (issue 24): drain rate and latency at 50% load through a
delay proxy (``bench/delayproxy.py``), side by side with loopback in one run.

This VM's speed moves by tens of percent within minutes, and other work shares its two cores:
drains one after the other compare the machine's moods, not the settings. So every figure is
paired: two `imgq worker` processes (the default 2 processes x 1 batch thread) serve ONE queue
at the same time, worker A through a proxy of its own at 0 ms (loopback through the proxy, the
issue's baseline) and worker B through one that adds ``--rtts`` ms of round trip; each is
judged by the tasks it served (the workers' own Celery task events say which served what). At
0 ms, A connects directly: the proxy's own cost.

* drain: ``--tasks`` tasks enqueued and parked, the pair started, the queue released; each
  worker's rate = its tasks / (its last result stored - release); B's rate against A's;
* paced open-loop load at 50% of the pair's drain rate: p50/p99 from enqueue to result stored
  of the tasks each served, and B's p99 over A's in round trips.

For each mode — ``overlap`` (default settings: the next batch is taken while this one is
served, its settle carries the next take's reads) and ``serial`` (``IMGQ_PREFETCH=false``:
take, serve, settle, one after the other, as before issue 24) — and each round trip; at 0 ms
the pair measures the proxy's own cost. First, before and after on loopback: a serial and an
overlapping worker, both direct, on one queue. Last, the client itself through the proxy:
``classify_many`` and ``results`` of ``--client-tasks`` tasks, served by workers on loopback,
alternating direct and proxied runs (medians).

    .venv/bin/python bench/network.py                       # ~15 minutes on 2 cores
    .venv/bin/python bench/network.py --rtts 2 --modes overlap --tasks 3000 --paced-s 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pybase64
import redis
from delayproxy import DelayProxy
from harness import (
    add_fleet_arguments,
    done_at,
    drain,
    imgq_workers,
    paced,
    sample_images,
    small_bundle,
    stored_records,
)

from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient

_MODES = {"overlap": "true", "serial": "false"}
_DIRECT, _PROXIED = "imgq0@bench", "imgq1@bench"


class ServedBy:
    """Which worker served each task, from the workers' Celery task events."""

    def __init__(self, url: str) -> None:
        self.host: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pubsub = redis.Redis.from_url(url).pubsub()
        self._pubsub.psubscribe(**{"/*.celeryev/task.multi": self._on_message})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _on_message(self, message: dict[str, Any]) -> None:
        envelope = json.loads(message["data"])
        for event in json.loads(pybase64.b64decode(envelope["body"])):
            if event.get("type") == "task-succeeded":
                with self._lock:
                    self.host[event["uuid"]] = event["hostname"]

    def wait(self, task_ids: Sequence[str], timeout_s: float = 30.0) -> None:
        """Until every task's event has arrived."""
        deadline = time.monotonic() + timeout_s
        while any(t not in self.host for t in task_ids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._thread.stop()
        self._thread.join(5)
        self._pubsub.close()


def _proxied(url: str, port: int) -> str:
    """``url`` with its port replaced by the proxy's."""
    head, _, tail = url.rpartition(":")
    return f"{head}:{port}/{tail.split('/', 1)[1]}"


def _target(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def _per_worker(client: ImgqClient, pending: Sequence[Any], served: ServedBy, since: float,
                sent_at: Sequence[float] | None = None) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per worker: tasks served, its drain rate from ``since`` (epoch s), and with ``sent_at``
    its latency percentiles (ms)."""
    served.wait([p.id for p in pending])
    done = [done_at(r) for r in stored_records(client, pending)]
    out: dict[str, dict[str, float]] = {}
    for name in (_DIRECT, _PROXIED):
        mine = [i for i, p in enumerate(pending) if served.host.get(p.id) == name]
        if not mine:
            out[name] = {"tasks": 0}
            continue
        figures = {"tasks": len(mine), "rate": len(mine) / (max(done[i] for i in mine) - since)}
        if sent_at is not None:
            q = statistics.quantiles([(done[i] - sent_at[i]) * 1000 for i in mine], n=100,
                                     method="inclusive")  # fmt: skip
            figures |= {"p50_ms": q[49], "p99_ms": q[98]}
        out[name] = figures
    return out


def measure_pair(
    url: str,
    bundle: Path,
    images: list[bytes],
    args: argparse.Namespace,
    work: Path,
    modes: tuple[str, str],
    rtt_a: float | None,
    rtt_b: float | None,
) -> dict[str, Any]:
    """One drain and one paced load by two workers serving one queue, A in ``modes[0]``,
    ``rtt_a`` ms away through a proxy of its own (None: a direct connection), B in
    ``modes[1]``, ``rtt_b`` ms away."""
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(ImgqClient(url, queue=f"net-{'-'.join(modes)}"))
        envs = []
        for rtt, mode in zip((rtt_a, rtt_b), modes, strict=True):
            env = {"IMGQ_PREFETCH": _MODES[mode]}
            if rtt is not None:
                proxy = stack.enter_context(DelayProxy(_target(url), rtt))
                env["IMGQ_BROKER_URL"] = _proxied(url, proxy.port)
            envs.append(env)
        served = ServedBy(url)
        stack.callback(served.close)
        loads: list[dict[str, Any]] = []

        def keep(rate: float) -> None:
            loads.append(paced_pair(client, images, rate / 2, args.paced_s, served))

        def by_worker(pending: Sequence[Any], released: float) -> dict[str, Any]:
            return _per_worker(client, pending, served, released)

        d = drain(url, client, images, args.tasks,
                  lambda: imgq_workers(url, bundle, client, args, work, envs=envs),
                  keep=keep, inspect=by_worker)  # fmt: skip
    d["by_worker"] = d.pop("inspect")
    return {"drain": d, "paced": loads[0]}


def paced_pair(client: ImgqClient, images: list[bytes], rate: float, duration_s: float,
               served: ServedBy) -> dict[str, Any]:  # fmt: skip
    """:func:`harness.paced`, and each worker's share of it."""
    result = paced(client, images, rate, duration_s, keep_pending=True)
    pending, sent_at = result.pop("pending"), result.pop("sent_at")
    result["by_worker"] = _per_worker(client, pending, served, min(sent_at), sent_at)
    return result


def client_side(url: str, bundle: Path, images: list[bytes], args: argparse.Namespace,
                work: Path, rtt_ms: float) -> dict[str, float]:  # fmt: skip
    """``classify_many`` + ``results`` of ``--client-tasks`` tasks by a client ``rtt_ms``
    away and by one on loopback, alternating, answered by workers on loopback: medians."""
    runs: dict[str, list[tuple[float, float]]] = {"direct": [], "proxied": []}
    with DelayProxy(_target(url), rtt_ms) as proxy, ImgqClient(url, queue="net-client") as c0:
        with imgq_workers(url, bundle, c0, args, work):
            for _ in range(args.client_runs):
                for key, client_url in (("direct", url), ("proxied", _proxied(url, proxy.port))):
                    with ImgqClient(client_url, queue="net-client") as client:
                        client.classify_many(images[:10])
                        t0 = time.perf_counter()
                        pending = client.classify_many(
                            images[i % len(images)] for i in range(args.client_tasks)
                        )
                        t1 = time.perf_counter()
                        client.results(pending, timeout_s=120)
                        runs[key].append((args.client_tasks / (t1 - t0), time.perf_counter() - t1))
    return {
        f"{key}_{name}": statistics.median(r[i] for r in values)
        for key, values in runs.items()
        for i, name in enumerate(("enqueue_per_s", "results_s"))
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The figures as Markdown tables."""
    lines = [
        f"two workers on one queue, A through a proxy at 0 ms (at 0 ms: direct) and B through one "
        f"at the round trip, 1 batch thread each, small "
        f"model, {args.tasks} tasks per drain; paced {args.paced_s:g} s at 50% of the pair's "
        "drain rate",
        "",
        "| mode | round trip | drain A tasks/s | drain B tasks/s | B / A | "
        "p50 A / B ms | p99 A / B ms | B p99 - A p99 | in round trips | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in args.modes:
        for key, m in results.get(mode, {}).items():
            a, b = m["drain"]["by_worker"][_DIRECT], m["drain"]["by_worker"][_PROXIED]
            pa, pb = (m["paced"]["by_worker"][n] for n in (_DIRECT, _PROXIED))
            rtt = float(key.split("/")[0])
            extra = pb.get("p99_ms", float("nan")) - pa.get("p99_ms", float("nan"))
            lines.append(
                f"| {mode} | {key} ms | {a.get('rate', 0):.0f} | {b.get('rate', 0):.0f} | "
                f"{b.get('rate', 0) / max(1e-9, a.get('rate', 0)):.0%} | "
                f"{pa.get('p50_ms', float('nan')):.1f} / {pb.get('p50_ms', float('nan')):.1f} | "
                f"{pa.get('p99_ms', float('nan')):.1f} / {pb.get('p99_ms', float('nan')):.1f} | "
                f"{extra:+.1f} | {f'{extra / rtt:+.1f}' if rtt else '-'} | "
                f"{m['drain']['loadavg_1m']:.2f} |"
            )
    if "overlap" in results and "serial" in results:
        lines += ["", "| round trip | B / A overlap | B / A serial | A overlap / A serial "
                  "(across drains) |", "|---|---:|---:|---:|"]  # fmt: skip
        for key in results["overlap"]:
            if key not in results["serial"]:
                continue
            ratio = []
            for mode in ("overlap", "serial"):
                w = results[mode][key]["drain"]["by_worker"]
                ratio.append(w[_PROXIED].get("rate", 0) / max(1e-9, w[_DIRECT].get("rate", 0)))
            a_o = results["overlap"][key]["drain"]["by_worker"][_DIRECT].get("rate", 0)
            a_s = results["serial"][key]["drain"]["by_worker"][_DIRECT].get("rate", 0)
            lines.append(f"| {key} ms | {ratio[0]:.0%} | {ratio[1]:.0%} | "
                         f"{a_o / max(1e-9, a_s):.2f}x |")  # fmt: skip
    versus = results.get("versus") or []
    if isinstance(versus, dict):  # a --json file of one repetition
        versus = [versus]
    if versus:
        lines += ["", "loopback, both direct: A serial (before), B overlap (after), one queue", "",
                  "| drain A / B tasks/s | B / A | p50 A / B ms | p99 A / B ms |",
                  "|---:|---:|---:|---:|"]  # fmt: skip
        for v in versus:
            a, b = (v["drain"]["by_worker"][n] for n in (_DIRECT, _PROXIED))
            pa, pb = (v["paced"]["by_worker"][n] for n in (_DIRECT, _PROXIED))
            lines.append(
                f"| {a.get('rate', 0):.0f} / {b.get('rate', 0):.0f} | "
                f"{b.get('rate', 0) / max(1e-9, a.get('rate', 0)):.0%} | "
                f"{pa.get('p50_ms', float('nan')):.1f} / {pb.get('p50_ms', float('nan')):.1f} | "
                f"{pa.get('p99_ms', float('nan')):.1f} / {pb.get('p99_ms', float('nan')):.1f} |"
            )
    lines += _medians(results, args, versus)
    if results.get("client"):
        lines += ["", "| client round trip | classify_many tasks/s direct / proxied | "
                  "results after enqueue s direct / proxied |", "|---|---:|---:|"]  # fmt: skip
        for key, c in results["client"].items():
            lines.append(
                f"| {key} ms | {c['direct_enqueue_per_s']:.0f} / {c['proxied_enqueue_per_s']:.0f}"
                f" | {c['direct_results_s']:.2f} / {c['proxied_results_s']:.2f} |"
            )
    return "\n".join(lines)


def _ratio(m: dict[str, Any]) -> float:
    w = m["drain"]["by_worker"]
    return float(w[_PROXIED].get("rate", 0) / max(1e-9, w[_DIRECT].get("rate", 0)))


def _medians(results: dict[str, Any], args: argparse.Namespace, versus: list[Any]) -> list[str]:
    """With ``--repeat``: per mode and round trip, the median of B / A and of B's p99 over
    A's in round trips, across the repetitions."""
    if getattr(args, "repeat", 1) < 2:
        return []
    lines = ["", f"medians of {args.repeat} repetitions (each a pair of its own)", "",
             "| mode | round trip | B / A, each | B / A median | B p99 - A p99 in round trips, "
             "median |", "|---|---|---|---:|---:|"]  # fmt: skip
    for mode in args.modes:
        by_rtt: dict[str, list[dict[str, Any]]] = {}
        for key, m in results.get(mode, {}).items():
            by_rtt.setdefault(key.split("/")[0], []).append(m)
        for rtt, ms in by_rtt.items():
            extra = []
            for m in ms:
                pa, pb = (m["paced"]["by_worker"][n] for n in (_DIRECT, _PROXIED))
                if float(rtt) and "p99_ms" in pa and "p99_ms" in pb:
                    extra.append((pb["p99_ms"] - pa["p99_ms"]) / float(rtt))
            each = ", ".join(f"{_ratio(m):.0%}" for m in ms)
            median = statistics.median(map(_ratio, ms))
            lines.append(f"| {mode} | {rtt} ms | {each} | {median:.0%} | "
                         f"{f'{statistics.median(extra):+.1f}' if extra else '-'} |")  # fmt: skip
    if len(versus) > 1:
        each = ", ".join(f"{_ratio(v):.0%}" for v in versus)
        lines.append(f"| overlap / serial | loopback | {each} | "
                     f"{statistics.median(map(_ratio, versus)):.0%} | - |")  # fmt: skip
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtts", default="0,0.5,2,5", help="round trips to add, ms (0: the proxy's "
                   "own cost)")  # fmt: skip
    p.add_argument("--modes", default="overlap,serial", help="overlap, serial")
    p.add_argument("--tasks", type=int, default=6000, help="tasks per drain")
    p.add_argument("--paced-s", type=float, default=10.0, help="seconds of paced load")
    p.add_argument("--client-tasks", type=int, default=2000)
    p.add_argument("--client-runs", type=int, default=3)
    p.add_argument("--no-client", action="store_true", help="skip the client's own figures")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of every pair (medians)")
    p.add_argument("--no-versus", action="store_true", help="skip the loopback pair of a "
                   "serial and an overlapping worker")  # fmt: skip
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
    args.workers = 2
    server = LocalRedis(work / "redis").start()
    try:
        for rep in range(args.repeat):  # every pair again: medians of noisy pairs
            suffix = f"/{rep + 1}" if rep else ""
            if not args.no_versus:  # before and after on loopback, side by side
                m = measure_pair(server.url, bundle, images, args, work, ("serial", "overlap"),
                                 None, None)  # fmt: skip
                results.setdefault("versus", []).append(m)
                w = m["drain"]["by_worker"]
                print(f"[serial vs overlap] loopback: {w[_DIRECT].get('rate', 0):.0f} vs "
                      f"{w[_PROXIED].get('rate', 0):.0f} tasks/s", flush=True)  # fmt: skip
            for rtt in rtts:  # the modes alternate per round trip: both see the same hour
                for mode in args.modes:
                    # At 0 ms: the proxy's own cost (A direct); else A through a proxy at 0 ms,
                    # as B is at rtt: the difference is the round trips alone.
                    m = measure_pair(server.url, bundle, images, args, work, (mode, mode),
                                     None if rtt == 0 else 0.0, rtt)  # fmt: skip
                    results.setdefault(mode, {})[f"{rtt:g}{suffix}"] = m
                    w = m["drain"]["by_worker"]
                    print(f"[{mode}] {rtt:g} ms: A {w[_DIRECT].get('rate', 0):.0f}, B "
                          f"{w[_PROXIED].get('rate', 0):.0f} tasks/s (load "
                          f"{os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip
        if not args.no_client:
            results["client"] = {}
            for rtt in [r for r in rtts if r > 0]:
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
