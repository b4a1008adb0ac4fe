"""What the webhook tests (tests/test_notify.py) build on: a real HTTP receiver in a thread whose
answers a test scripts, alerts written by the real DriftDetector, and how to read the state of
the alert stream's consumer group."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import redis
from prometheus_client import CollectorRegistry

from imgq.shared.manifest import Manifest
from imgq.worker.drift import DriftKeys, DriftRecorder
from imgq.worker.drift.notify import GROUP, WebhookConfig
from imgq.worker.metrics import WorkerMetrics
from tests.drift_synthetic import traffic

SECRET = "whsec_test_0123456789abcdef"
#: A path and query like a real receiver's (Slack's carry a token): must never be logged.
HOOK_PATH = "/hooks/T0/B1/pathtoken42?token=querytoken42"

Answer = int | str | tuple[Any, ...]


class Receiver:
    """A real HTTP server in a thread that records every request and answers as scripted:
    a status code, ``"hang"`` (no answer until the test ends), ``("redirect", status)``,
    ``("retry_after", status, seconds)``, or ``("huge", n_bytes)`` (200 and a body of that
    size). Past the script it answers 200."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Answer] = []
        self.release = threading.Event()
        self.huge_bytes_sent = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body,
                     "time": time.monotonic()}
                )  # fmt: skip
                answer = receiver.script.pop(0) if receiver.script else 200
                if answer == "hang":
                    receiver.release.wait(60)
                    return
                if isinstance(answer, tuple) and answer[0] == "redirect":
                    self.send_response(answer[1])
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if isinstance(answer, tuple) and answer[0] == "huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(answer[1]))
                    self.end_headers()
                    chunk = b"x" * 65536
                    try:
                        while receiver.huge_bytes_sent < answer[1]:
                            self.wfile.write(chunk)
                            receiver.huge_bytes_sent += len(chunk)
                    except OSError:
                        pass  # the sender closed the connection: it did not read it all
                    return
                headers: dict[str, str] = {}
                if isinstance(answer, tuple) and answer[0] == "retry_after":
                    answer, headers = answer[1], {"Retry-After": answer[2]}
                status = int(answer)  # type: ignore[arg-type]
                payload = b'{"error": "scripted"}' + b"." * 5000
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{HOOK_PATH}"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r["body"]) for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def stream_of(manifest: Manifest) -> str:
    return DriftKeys(manifest.drift_id).alerts


def judge_windows(client: redis.Redis, manifest: Manifest, shifts: list[float]) -> None:
    """Windows of traffic with these brightness shifts, closed and judged by the real
    DriftDetector: a shift opens an alert, no shift after one clears it."""
    recorder = DriftRecorder(
        client, manifest, window_size=100_000, window_s=3600.0,
        metrics=WorkerMetrics(CollectorRegistry()),
    )  # fmt: skip
    rng = np.random.default_rng(len(client.keys("*")))
    try:
        for shift in shifts:
            features, probs = traffic(rng, 200, brightness=shift)
            probs = rng.dirichlet(np.ones(len(manifest.labels)), 200) if shift else probs
            pipe = client.pipeline()
            recorder.add_to_pipeline(pipe, features, probs)
            pipe.execute()
            window_id = recorder.close_window(min_images=1)
            assert window_id is not None
            recorder.detector.evaluate(window_id)
    finally:
        recorder.close()


def add_notice(client: redis.Redis, manifest: Manifest, alert_id: str) -> None:
    """An alert of tier notice, as the tiered detector writes it (same stream, same form)."""
    feature = {"feature": "bytes_per_pixel", "summary": "mean 0.3 (ref 0.6)"}
    event = {"type": "alert", "id": alert_id, "tier": "notice", "model": manifest.name,
             "features": [feature]}  # fmt: skip
    client.xadd(stream_of(manifest), {"json": json.dumps(event)})


def config(url: str, **overrides: Any) -> WebhookConfig:
    values: dict[str, Any] = {
        "url": url, "secret": SECRET, "timeout_s": 30.0, "attempts": 4, "backoff_s": 0.05,
        "backoff_max_s": 0.2, "claim_idle_s": 60.0,
    }  # fmt: skip
    return WebhookConfig(**(values | overrides))


def pending(client: redis.Redis, manifest: Manifest) -> int:
    try:
        return int(client.xpending(stream_of(manifest), GROUP)["pending"])
    except redis.ResponseError:  # no group yet
        return -1


def settled(client: redis.Redis, manifest: Manifest, metrics: WorkerMetrics | None = None) -> bool:
    """Every entry of the stream read by the group and acknowledged; with ``metrics``, also
    counted (the notifier counts an outcome just after its ack, so an ack alone is too soon)."""
    groups = client.xinfo_groups(stream_of(manifest))
    last = client.xinfo_stream(stream_of(manifest))["last-generated-id"]
    read_all = bool(groups) and groups[0]["last-delivered-id"] == last
    if not (read_all and pending(client, manifest) == 0):
        return False
    if metrics is None:
        return True
    counted = sum(outcome(metrics, name) for name in ("delivered", "dead_letter", "skipped"))
    return counted >= client.xlen(stream_of(manifest))


def outcome(metrics: WorkerMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value("imgq_alert_webhook_total", {"outcome": name})
    return value or 0.0


class TricklingReceiver:
    """A raw TCP receiver that answers ``HTTP/1.0 200`` (the connection ends with the answer,
    so http.client lets go of its socket) and then one body byte per ``every_s`` of a
    ``body_bytes`` body; counts the bytes it got out before the sender hung up."""

    def __init__(self, body_bytes: int = 2000, every_s: float = 0.05) -> None:
        self.sent = 0
        self.hung_up = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._body_bytes, self._every_s = body_bytes, every_s
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            conn.recv(65536)  # the request (its end is not needed: the answer comes anyway)
            head = f"HTTP/1.0 200 OK\r\nContent-Length: {self._body_bytes}\r\n\r\n"
            try:
                conn.sendall(head.encode())
                while self.sent < self._body_bytes and not self._stop.wait(self._every_s):
                    conn.sendall(b"x")
                    self.sent += 1
            except OSError:
                pass
            self.hung_up.set()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
