"""Horizontal scaling (issue 6): three `imgq worker` processes on one queue all take work, and
between them answer every task exactly once. Throughput per worker count is measured by
bench/scaling.py, not here."""

from __future__ import annotations

import time

import pytest

from imgq.localredis import free_port
from imgq.worker.client import ImgqClient
from tests.test_metrics import scrape_metrics
from tests.tinymodel import COLOURS, colour_image, encode_png
from tests.workerproc import wait_all

pytestmark = pytest.mark.integration

N_WORKERS = 3
N_TASKS = 600


def _served(port: int) -> float:
    """Tasks a worker has answered (all outcomes), from its own metrics endpoint."""
    samples = scrape_metrics(port)
    return sum(v for (name, _), v in samples.items() if name == "imgq_tasks_total")


def test_three_workers_on_one_queue_all_take_work(redis_server, workers) -> None:
    """600 tasks sent while three workers wait on one queue: each worker's metrics show it
    answered some, and their counts add up to exactly the tasks sent."""
    ports = [free_port() for _ in range(N_WORKERS)]
    started = [
        workers.start(f"w{i}", IMGQ_METRICS_PORT=str(port), IMGQ_MAX_BATCH="4")
        for i, port in enumerate(ports)
    ]
    with ImgqClient(redis_server.url) as client:
        for w in started:
            w.wait_ready(client.app)
        images = [encode_png(colour_image(COLOURS[i % 3], seed=i)) for i in range(30)]
        pending = client.classify_many(images[i % 30] for i in range(N_TASKS))
        records = wait_all(client.app, [p.id for p in pending], timeout_s=60)
    assert {r["status"] for r in records.values()} == {"SUCCESS"}
    # A task is counted just after its result is stored: wait until the counts add up.
    deadline = time.monotonic() + 10
    while sum(served := [_served(p) for p in ports]) < N_TASKS:
        assert time.monotonic() < deadline, f"served {served}, sent {N_TASKS}"
        time.sleep(0.05)
    assert sum(served) == N_TASKS
    assert all(n > 0 for n in served), f"tasks per worker: {served}"
    for w in started:
        assert w.stop() == 0
