"""docker-compose.yml run for real, as an operator would, where a Docker engine answers (skipped
where none does: CI has none). Built with `docker-compose build`; a model trained and published
by the trainer service; `up -d --scale worker=3` with the exporter, Prometheus and Alertmanager
(Grafana has no local stand-in image: the other services are named, as docs/operations.md says);
500 tasks answered with one worker killed while it holds a batch, nothing lost; then a stream in
which half the images are shapes the model never saw raises a drift page (their novelty) that
reaches a webhook receiver through Prometheus' rule and Alertmanager's routing, and the killed
worker's loss reaches it as a warning.

Alertmanager is given a copy of docker/alertmanager.yml whose receivers point at the test's
receiver (tests/compose/stack-test.yml): everything else is the shipped configuration. The
stack runs under a project name of its own, on free host ports, and is removed with its volumes
(`down -v`) whatever happens.

    .venv/bin/python -m pytest tests/test_compose_stack.py -s    # ~10 min on 2 cores, builds
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from imgq.localredis import free_port
from imgq.worker.broker.fleet import observe
from imgq.worker.broker.intake import LANES_KEY
from imgq.worker.client import ImgqClient

ROOT = Path(__file__).resolve().parents[1]
OVERRIDE = ROOT / "tests" / "compose" / "stack-test.yml"
WORKERS = 3
TASKS = 500
#: Drift windows are IMGQ_DRIFT_WINDOW (200) images fleet-wide: three, half of unseen shapes.
DRIFT_TASKS = 600
#: What the stack is started with: everything but Grafana.
SERVICES = ("worker", "exporter", "prometheus", "alertmanager", "alert-receiver")
_DEPLOYMENT = ("IMGQ_", "REDIS_", "FLOWER_", "PROMETHEUS_", "GPU_", "TRAIN_", "ALERTMANAGER_",
               "GRAFANA_", "COMPOSE_", "TEST_")  # fmt: skip


def _docker_answers() -> bool:
    docker, compose = shutil.which("docker"), shutil.which("docker-compose")
    if docker is None or compose is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # the builds alone take 5-10 minutes on 2 cores
    pytest.mark.skipif(not _docker_answers(), reason="no Docker engine answers `docker info`"),
]


def _say(started: float, what: str) -> None:
    print(f"[{time.monotonic() - started:6.1f} s] {what}", flush=True)


class Stack:
    """docker-compose.yml plus the test's override, under a project of its own."""

    def __init__(self, workdir: Path) -> None:
        self.project = f"imgqstack{os.getpid()}"
        self.redis_port, self.prometheus_port = free_port(), free_port()
        alertmanager = workdir / "alertmanager.yml"
        shipped = (ROOT / "docker" / "alertmanager.yml").read_text()
        assert "alert-receiver.invalid:8080" in shipped
        alertmanager.write_text(
            shipped.replace("alert-receiver.invalid:8080", "alert-receiver:8080")
        )
        alertmanager.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DEPLOYMENT)}
        self.env = env | {
            "REDIS_PORT": str(self.redis_port),
            "PROMETHEUS_PORT": str(self.prometheus_port),
            "ALERTMANAGER_PORT": str(free_port()),
            "TRAIN_DATA_DIR": str(workdir / "train"),
            "TRAIN_MODEL_NAME": "shapes",
            "TEST_ALERTMANAGER_CONFIG": str(alertmanager),
        }
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"

    def compose(self, *args: str, timeout_s: float = 900, check: bool = True) -> str:
        """Run ``docker-compose ARGS`` on the stack; its output (stdout, then stderr)."""
        proc = subprocess.run(
            ["docker-compose", "-p", self.project, "-f", "docker-compose.yml", "-f", str(OVERRIDE),
             *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        out = proc.stdout + proc.stderr
        assert not check or proc.returncode == 0, f"docker-compose {' '.join(args)}:\n{out[-4000:]}"
        return out

    def received(self) -> list[dict[str, Any]]:
        """Every notification the receiver has printed: ``{"path", "body"}``."""
        lines = self.compose("logs", "--no-color", "alert-receiver").splitlines()
        found = []
        for line in lines:
            _, bar, text = line.partition("| ")
            if bar and text.startswith("{"):
                found.append(json.loads(text))
        return found

    def prometheus(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.prometheus_port}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]


def _wait(what: Callable[[], Any], timeout_s: float, step_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout_s} s: {what}"
        time.sleep(step_s)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Images the trainer container (user 10001) can read: not under pytest's private tmp."""
    path = Path(tempfile.mkdtemp(prefix="imgq-stack-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(workdir: Path) -> Iterator[Stack]:
    from imgq.trainer.sample_data import generate

    generate(workdir / "train", classes=4, per_class=200, size=96, seed=0)
    generate(workdir / "held-out", classes=4, per_class=TASKS // 4, size=96, seed=7)
    generate(workdir / "unseen", classes=8, per_class=DRIFT_TASKS // 8, size=96, seed=54321)
    s = Stack(workdir)
    try:
        yield s
    finally:
        out = s.compose("down", "-v", "--remove-orphans", check=False)
        print(out[-1500:])


def _held_out(workdir: Path) -> list[tuple[bytes, str]]:
    files = sorted((workdir / "held-out").glob("*/*"))
    return [(f.read_bytes(), f.parent.name) for f in files]


def test_the_stack_serves_survives_a_killed_worker_and_pages(stack: Stack, workdir: Path) -> None:
    started = time.monotonic()
    stack.compose("--profile", "train", "build", "worker", "trainer", timeout_s=3600)
    _say(started, "built imgq-worker and imgq-trainer")
    stack.compose("up", "-d", "redis")
    r = redis.Redis.from_url(stack.url)
    _wait(lambda: _pings(r), 120)
    trained = stack.compose("--profile", "train", "run", "--rm", "trainer", timeout_s=1800)
    # `imgq models publish` prints "VERSION  NAME  SIZE bytes  stable for queue imgq".
    published = [ln for ln in trained.splitlines() if re.match(r"[0-9a-f]{6,64}  \S+  \d+ b", ln)]
    assert published, trained[-3000:]
    _say(started, f"trained and published: {published[-1]}")

    stack.compose("up", "-d", "--scale", f"worker={WORKERS}", *SERVICES)
    _wait(lambda: observe(r).live == WORKERS, 600)
    _say(started, f"{WORKERS} workers hold a lease")

    images = _held_out(workdir)
    assert len(images) == TASKS
    with ImgqClient(stack.url) as client:
        # All paused while the tasks are sent; one let go and killed as soon as it holds a
        # batch (however fast the machine, the rest of the load is still queued); then the
        # others serve everything, the killed worker's batches once its lease has lapsed.
        victim, *others = stack.compose("ps", "-q", "worker").split()
        stack.compose("pause", "worker")
        pending = client.classify_many([image for image, _ in images])
        _docker("unpause", victim)
        lane = f"imgq:inflight:imgq@{victim[:12]}:".encode()
        _wait(lambda: _holds(r, lane), 120, step_s=0.005)
        _docker("kill", victim)
        held = sum(r.llen(k) for k in r.hkeys(LANES_KEY) if k.startswith(lane))
        queued = r.llen("imgq")
        _docker("unpause", *others)
        _say(started, f"killed worker {victim[:12]} holding {held} tasks; {queued} still queued")
        assert queued > 0 and held > 0
        results = client.results(pending, timeout_s=600)
        answered = [res for res in results if isinstance(res, dict)]
        correct = sum(res["label"] == label for res, (_, label) in zip(results, images, strict=True)
                      if isinstance(res, dict))  # fmt: skip
        _say(started, f"{len(answered)}/{TASKS} answered, {correct} correctly")
        assert len(answered) == TASKS, [res for res in results if not isinstance(res, dict)][:3]
        backlog = _backlog(stack.url)
        assert backlog["ready"] + backlog["in_flight"] + backlog["due"] == 0, backlog

        stream = _half_unseen(workdir, [image for image, _ in images], DRIFT_TASKS)
        drifted = client.results(client.classify_many(stream), timeout_s=600)
        assert all(isinstance(res, dict) for res in drifted)
        novel = sum(bool(res.get("drift", {}).get("novel")) for res in drifted[::2])
        _say(started, f"{len(drifted)} tasks answered, {novel} of the unseen shapes novel")

    def exported_states() -> bool:  # once Prometheus has scraped the exporter (every 15 s)
        query = 'imgq_queue_backlog{job="imgq-exporter"}'
        exported = stack.prometheus("/api/v1/query", query=query)["result"]
        return {m["metric"]["state"] for m in exported} == {"ready", "in_flight", "due",
                                                             "scheduled"}  # fmt: skip

    _wait(exported_states, 120, step_s=2)
    try:
        page = _wait(lambda: _notified(stack, "/imgq/pages", "ImgqDriftPage"), 600, step_s=5)
        _say(started, f"the receiver got the page: {json.dumps(page['labels'])}")
        lost = _wait(lambda: _notified(stack, "/imgq/ops", "ImgqWorkerDown"), 300, step_s=5)
        _say(started, f"the receiver got the lost worker's warning: {json.dumps(lost['labels'])}")
    except BaseException:  # also a timeout: say why, then fail
        alerts = stack.prometheus("/api/v1/alerts")["alerts"]
        print("Prometheus alerts:", json.dumps(alerts)[:3000])
        print(_drift_alerts(stack.url))
        print(stack.compose("logs", "--no-color", "--tail", "40", "alertmanager"))
        raise
    assert page["labels"]["model"] == "shapes" and page["labels"]["severity"] == "page"


def _docker(*args: str) -> None:
    subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.RedisError:
        return False


def _holds(r: redis.Redis, prefix: bytes) -> bool:
    """Whether a lane of the worker whose ids start with ``prefix`` holds a message."""
    return any(r.llen(lane) for lane in r.hkeys(LANES_KEY) if lane.startswith(prefix))


def _half_unseen(workdir: Path, images: list[bytes], count: int) -> list[bytes]:
    """``count`` images, every other one a shape of a class the model was not trained on."""
    from imgq.trainer.sample_data import CLASS_NAMES

    unseen = [f.read_bytes() for name in CLASS_NAMES[4:8]
              for f in sorted((workdir / "unseen" / name).iterdir())]  # fmt: skip
    pairs = zip(itertools.cycle(unseen), itertools.cycle(images), strict=False)
    return [image for pair in itertools.islice(pairs, count // 2) for image in pair]


def _imgq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    return subprocess.run(
        [sys.executable, "-m", "imgq.cli", *args], env=env | {"IMGQ_BROKER_URL": url},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _backlog(url: str) -> dict[str, Any]:
    out = _imgq(url, "backlog", "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def _drift_alerts(url: str) -> str:
    out = _imgq(url, "drift", "alerts", "--all")
    return out.stdout + out.stderr


def _notified(stack: Stack, path: str, alertname: str) -> dict[str, Any] | None:
    """The first alert named ``alertname`` the receiver got firing on ``path``, or None."""
    for note in stack.received():
        if note["path"] != path or note.get("body", {}).get("status") != "firing":
            continue
        for alert in note["body"].get("alerts", []):
            if alert.get("labels", {}).get("alertname") == alertname:
                return dict(alert)
    return None
