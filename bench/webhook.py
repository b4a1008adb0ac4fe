"""The drift webhook's costs (worker/drift/notify.py): what idle senders ask of Redis, how long a
page takes from the alert stream to the receiver against a bare POST to the same receiver, and a
burst of pages shared by several senders (every one delivered, none twice).

One private ``redis-server``, one local ``http.server`` receiver that answers 200 at once, and
``--senders`` notifiers as threads of this process (a worker runs exactly one such thread). The
alerts are written in the detector's stream form (``{"json": ...}``, tier ``page``).

    .venv/bin/python bench/webhook.py [--senders 4] [--alerts 200] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from imgq.localredis import LocalRedis
from imgq.worker.drift.notify import AlertNotifier, WebhookConfig
from imgq.worker.drift.webhook import post
from imgq.worker.metrics import WorkerMetrics

STREAM = "imgq:drift:0123456789ab:alerts"
SECRET = "bench-secret-0123456789"


class Receiver:
    """Answers 200 at once; records when each idempotency key arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, list[float]] = {}
        lock = threading.Lock()
        arrived = self.arrived

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = json.loads(body).get("idempotency_key", "")
                with lock:
                    arrived.setdefault(key, []).append(time.monotonic())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def alert(alert_id: int) -> dict[str, str]:
    event = {
        "type": "alert", "id": str(alert_id), "tier": "page", "model": "bench",
        "model_sha256": "01" * 32, "still_open": [], "time": "2026-01-01T00:00:00.000+00:00",
        "window": {"id": alert_id, "n_images": 200},
        "features": [{"feature": "confidence", "psi": 0.4, "p_value": 1e-9,
                      "summary": "mean 0.91 -> 0.62"}],
    }  # fmt: skip
    return {"json": json.dumps(event)}


def commands(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--alerts", type=int, default=200, help="alerts of the burst")
    p.add_argument("--latency-alerts", type=int, default=40)
    p.add_argument("--idle-s", type=float, default=10.0)
    p.add_argument("--poll-s", type=float, default=1.0, help="the senders' idle poll (default)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalRedis(tmp) as server:
        client = redis.Redis.from_url(server.url)
        receiver = Receiver()
        config = WebhookConfig(url=receiver.url, secret=SECRET, timeout_s=10.0)
        client.xadd(STREAM, alert(0))  # the stream exists, so the senders make their group
        metrics = WorkerMetrics(CollectorRegistry())
        senders = [
            AlertNotifier(client, config, lambda: [STREAM], metrics=metrics, poll_s=args.poll_s)
            for _ in range(args.senders)
        ]
        for s in senders:
            s.start()
        while "0123456789ab:0" not in receiver.arrived:
            time.sleep(0.01)

        # 1. Idle: Redis commands per second with nothing new, the senders running and then
        # stopped (the baseline: this script's own INFO calls).
        half_s = args.idle_s / 2
        start = commands(client)
        time.sleep(half_s)
        busy = (commands(client) - start) / half_s
        for s in senders:
            s.close()
        start = commands(client)
        time.sleep(half_s)
        quiet = (commands(client) - start) / half_s
        senders = [
            AlertNotifier(client, config, lambda: [STREAM], metrics=metrics, poll_s=args.poll_s)
            for _ in range(args.senders)
        ]
        for s in senders:
            s.start()
        per_sender = (busy - quiet) / args.senders

        # 2. Latency: one alert at a time, at a random moment of the senders' poll, XADD to
        # arrival, against a bare POST to the same receiver.
        latencies, bare = [], []
        rng = random.Random(0)
        for n in range(1, args.latency_alerts + 1):
            key = f"0123456789ab:{n}"
            time.sleep(rng.uniform(0, args.poll_s))
            t0 = time.monotonic()
            client.xadd(STREAM, alert(n))
            while key not in receiver.arrived:
                time.sleep(0.001)
            latencies.append(receiver.arrived[key][0] - t0)
            body = json.dumps({"idempotency_key": f"bare:{n}"}).encode()
            t0 = time.monotonic()
            post(receiver.url, body, {}, 10.0)
            bare.append(time.monotonic() - t0)

        # 3. Burst: many alerts at once, shared by the senders.
        first = args.latency_alerts + 1
        keys = [f"0123456789ab:{n}" for n in range(first, first + args.alerts)]
        pipe = client.pipeline()
        for n in range(first, first + args.alerts):
            pipe.xadd(STREAM, alert(n))
        t0 = time.monotonic()
        pipe.execute()
        while not all(k in receiver.arrived for k in keys):
            time.sleep(0.005)
        burst_s = time.monotonic() - t0
        for s in senders:
            s.close()
        duplicates = sum(len(v) - 1 for v in receiver.arrived.values())
        receiver.server.shutdown()
        client.close()
    ms = 1000.0
    print(f"senders {args.senders}, idle poll {args.poll_s:g} s")
    print(f"idle: {per_sender:.2f} Redis commands/s per sender ({busy:.1f}/s with "
          f"{args.senders} senders, {quiet:.1f}/s with none)")  # fmt: skip
    print(f"latency stream -> receiver: p50 {pct(latencies, 50) * ms:.0f} ms, p95 "
          f"{pct(latencies, 95) * ms:.0f} ms; bare POST p50 {pct(bare, 50) * ms:.1f} ms "
          f"({len(latencies)} alerts one at a time)")  # fmt: skip
    print(
        f"burst: {args.alerts} alerts in {burst_s:.2f} s ({args.alerts / burst_s:.0f}/s), "
        f"{duplicates} sent twice, {sum(k not in receiver.arrived for k in keys)} missing"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
