"""`imgq health` against a real redis-server and real `imgq worker` processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from imgq.launcher import WorkerFleet, WorkerProcess, worker_env
from imgq.localredis import LocalRedis, free_port
from imgq.shared.manifest import load_manifest
from imgq.worker.celeryapp.app import make_app
from imgq.worker.settings import WorkerSettings
from tests.tinymodel import make_tiny_bundle

#: Generous bound on one `imgq health` run: its own --timeout plus interpreter start-up.
RUN_LIMIT_S = 60
#: Generous bound on the interpreter's start-up and imports, before `imgq health`'s own
#: --timeout begins, on a busy machine.
STARTUP_ALLOWANCE_S = 20


def _env(broker_url: str) -> dict[str, str]:
    return worker_env(broker_url, IMGQ_LOG_FORMAT="text")


def _health(broker_url: str, *options: str) -> tuple[int, list[str]]:
    """Run `imgq health OPTIONS`; its exit status and output lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "imgq.cli", "health", *options],
        env=_env(broker_url), capture_output=True, text=True, timeout=RUN_LIMIT_S,
    )  # fmt: skip
    return proc.returncode, proc.stdout.splitlines()


def _timed_health(broker_url: str, timeout_s: float, *options: str) -> tuple[int, list[str]]:
    """`imgq health --timeout TIMEOUT_S OPTIONS`, checked to end within its timeout (plus the
    interpreter's start-up, which the timeout does not cover)."""
    started = time.monotonic()
    status, lines = _health(broker_url, "--timeout", f"{timeout_s:g}", *options)
    assert time.monotonic() - started < timeout_s + STARTUP_ALLOWANCE_S, lines
    assert not any("none is an imgq worker" in line for line in lines), lines
    return status, lines


def _named(line: str) -> set[str]:
    """The node names a `worker ok` or `model ok` line names."""
    return {word.strip(",;()") for word in line.split() if "@" in word}


def _start_worker(broker_url: str, bundle: Path, hostname: str) -> WorkerProcess:
    """A real `imgq worker` (its log beside the bundle), returned once it answers a ping."""
    worker = WorkerProcess(
        hostname,
        bundle.parent / f"worker-{hostname}.log",
        options=["--model", str(bundle), "--metrics-port", "0"],
        env=_env(broker_url),
    )
    app = make_app(WorkerSettings.from_env({"IMGQ_BROKER_URL": broker_url}))
    try:
        worker.wait_ready(app, timeout_s=60)
    except BaseException:
        worker.stop()
        raise
    return worker


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A tiny real bundle (onnxruntime, no TensorFlow)."""
    return make_tiny_bundle(tmp_path / "bundle")


@pytest.fixture
def local_worker(redis_server: LocalRedis, bundle: Path) -> Iterator[WorkerProcess]:
    """A worker on this host, named like the Docker image names it (`imgq@%h`)."""
    worker = _start_worker(redis_server.url, bundle, "imgq@%h")
    yield worker
    worker.stop()


def test_fails_on_redis_when_redis_is_down() -> None:
    """With nothing listening at the broker URL, the redis check fails and nothing else runs."""
    status, lines = _health(f"redis://:secret@127.0.0.1:{free_port()}/0", "--timeout", "2")
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("redis   FAIL")
    assert "secret" not in lines[0] and ":***@" in lines[0]


def test_fails_on_worker_when_none_runs(redis_server: LocalRedis) -> None:
    """Redis answers but no worker does: exit 1, naming the worker check."""
    status, lines = _health(redis_server.url, "--timeout", "1")
    assert status == 1
    assert lines[0].startswith("redis   ok")
    assert lines[1].startswith("worker  FAIL") and len(lines) == 2


@pytest.mark.integration
def test_passes_with_a_real_worker(
    redis_server: LocalRedis, bundle: Path, local_worker: WorkerProcess
) -> None:
    """A real worker with its model loaded passes all three checks, with and without --local,
    and the model line names the bundle's model, hash and provider."""
    manifest = load_manifest(bundle)
    for options in ([], ["--local"]):
        status, lines = _health(redis_server.url, "--timeout", "10", *options)
        assert status == 0, lines
        assert [line.split()[:2] for line in lines] == [
            ["redis", "ok"],
            ["worker", "ok"],
            ["model", "ok"],
            ["routing", "ok"],
        ]
        assert manifest.name in lines[2] and manifest.model_sha256[:12] in lines[2]
        assert "CPUExecutionProvider" in lines[2]
    assert local_worker.running()


def test_warns_of_imgq_tasks_in_celerys_default_queue(
    redis_server: LocalRedis, bundle: Path, local_worker: WorkerProcess
) -> None:
    """A plain Celery client that sent without queue="imgq" left its task in `celery`, where it
    stays PENDING: health says so and how to fix it, and still passes (the workers are fine), and
    the worker said it in its log at start."""
    client = Celery("service", broker=redis_server.url, backend=redis_server.url)
    client.conf.task_serializer = "json"
    for _ in range(3):
        client.send_task("imgq.classify", kwargs={"image": "aGk="})  # no queue: `celery`
    status, lines = _health(redis_server.url, "--timeout", "10")
    assert status == 0, lines
    (routing,) = [line for line in lines if line.startswith("routing")]
    assert routing.split()[1] == "WARN"
    assert "3 messages wait in queue 'celery'" in routing and "queue='imgq'" in routing
    assert "task_routes=" in routing
    late = _start_worker(redis_server.url, bundle, "late@%h")  # a worker starting now logs it
    try:
        assert "messages wait in queue 'celery'" in late.log.read_text()
    finally:
        late.stop()


@pytest.mark.integration
def test_local_ignores_workers_on_other_hosts(redis_server: LocalRedis, bundle: Path) -> None:
    """A worker named for another host serves the fleet check but not this host's --local one."""
    worker = _start_worker(redis_server.url, bundle, "imgq@elsewhere.example")
    try:
        status, lines = _health(redis_server.url, "--timeout", "10")
        assert status == 0, lines
        assert "imgq@elsewhere.example" in lines[1]
        status, lines = _health(redis_server.url, "--timeout", "2", "--local")
        assert status == 1 and lines[1].startswith("worker  FAIL")
    finally:
        worker.stop()


@pytest.fixture
def three_workers(redis_server: LocalRedis, bundle: Path) -> Iterator[WorkerFleet]:
    """Three real workers on this host, started together, each answering a ping."""
    fleet = WorkerFleet(
        WorkerProcess(
            f"w{i}@%h", bundle.parent / f"worker-w{i}.log",
            options=["--model", str(bundle), "--metrics-port", "0"], env=_env(redis_server.url),
        )
        for i in range(3)
    )  # fmt: skip
    with fleet:
        fleet.wait_ready(make_app(WorkerSettings.from_env({"IMGQ_BROKER_URL": redis_server.url})))
        yield fleet


def _names_all(broker_url: str, fleet: WorkerFleet, *options: str) -> None:
    """`imgq health` passes and names every worker of ``fleet`` on its worker and model lines."""
    status, lines = _timed_health(broker_url, 10, *options)
    assert status == 0, lines
    assert _named(lines[1]) == set(fleet.names), f"the worker line names others: {lines}"
    assert _named(lines[2]) == set(fleet.names), f"the model line names others: {lines}"
    assert lines[1].startswith("worker  ok") and lines[2].startswith("model   ok"), lines


@pytest.mark.integration
def test_names_every_imgq_worker_that_answers(
    redis_server: LocalRedis, three_workers: WorkerFleet
) -> None:
    """Issue 25: three workers answer, and the worker and model lines name all three (it named
    one); a frozen worker is left out while the two others pass within the timeout."""
    for options in ([], ["--local"]):
        _names_all(redis_server.url, three_workers, *options)
    frozen = three_workers.workers[2]
    frozen.freeze()
    try:
        status, lines = _timed_health(redis_server.url, 4)
    finally:
        frozen.thaw()
    assert status == 0, lines
    assert _named(lines[1]) == set(three_workers.names) - {frozen.name}, lines
    _names_all(redis_server.url, three_workers)


@pytest.mark.integration
def test_names_every_imgq_worker_after_a_redis_restart(
    redis_server: LocalRedis, three_workers: WorkerFleet
) -> None:
    """Issue 25: after Redis restarts under three workers, `imgq health` fails only while no
    worker has reconnected ("no imgq worker answered"), never says that the workers that
    answered are not imgq's, then passes naming all three, each run within its timeout."""
    _names_all(redis_server.url, three_workers)
    redis_server.restart()
    deadline = time.monotonic() + 120
    while True:
        status, lines = _timed_health(redis_server.url, 5)
        if status == 0 and _named(lines[1]) == set(three_workers.names):
            break
        assert status == 0 or lines[1].startswith("worker  FAIL  no imgq worker"), lines
        assert time.monotonic() < deadline, f"not every worker back after 120 s: {lines}"
    for _ in range(3):
        _names_all(redis_server.url, three_workers)


@pytest.mark.integration
def test_a_plain_celery_worker_is_no_imgq_worker(
    redis_server: LocalRedis, local_worker: WorkerProcess, tmp_path: Path
) -> None:
    """A plain `celery worker` on the same Redis answers too (with an error: it has no
    imgq_status): it is named apart and the imgq worker passes; alone, it fails the check."""
    command = [sys.executable, "-m", "celery", "-A", "tests.canvas_user", "worker", "-Q", "user",
               "--pool", "solo", "-n", "plain@%h", "--without-mingle"]  # fmt: skip
    plain = WorkerProcess(
        "plain@%h", tmp_path / "plain.log", command=command, cwd=Path(__file__).parents[1],
        env=dict(_env(redis_server.url), CANVAS_BROKER_URL=redis_server.url),
    )  # fmt: skip
    try:
        plain.wait_ready(make_app(WorkerSettings.from_env({"IMGQ_BROKER_URL": redis_server.url})))
        status, lines = _timed_health(redis_server.url, 10)
        assert status == 0, lines
        named = f"1 imgq worker answered: {local_worker.name} (not imgq: {plain.name})"
        assert lines[1] == f"worker  ok  {named}", lines
        assert _named(lines[2]) == {local_worker.name}, lines
        local_worker.stop()
        status, lines = _health(redis_server.url, "--timeout", "5")
        assert status == 1
        assert lines[1] == f"worker  FAIL  {plain.name} answered, but none is an imgq worker", lines
    finally:
        plain.kill()
