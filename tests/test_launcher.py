"""imgq.launcher: starting, freezing and stopping real `imgq worker` processes."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from imgq.launcher import WorkerFleet, WorkerProcess, WorkerStartError, worker_env
from imgq.localredis import LocalRedis
from imgq.worker.client import ImgqClient
from tests.blocked_imports import run_without

pytestmark = pytest.mark.integration


def _thread_states(pid: int) -> list[str]:
    """The scheduler state letter of every thread of ``pid`` (``T``/``t``: stopped)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue  # a thread that just ended
    return states


def _worker(url: str, bundle: Path, log_dir: Path, name: str, **env: str) -> WorkerProcess:
    return WorkerProcess(
        f"{name}@%h",
        log_dir / f"{name}.log",
        options=["--model", str(bundle), "--device", "cpu"],
        env=worker_env(url, IMGQ_METRICS_PORT="0", IMGQ_DRIFT="0", **env),
    )


def test_launcher_imports_with_only_celery_and_redis() -> None:
    """imgq.launcher imports with numpy, OpenCV, onnxruntime and TensorFlow unavailable."""
    run_without(
        ["numpy", "cv2", "onnxruntime", "tensorflow", "PIL", "scipy"], "import imgq.launcher"
    )


def test_worker_env_drops_stray_imgq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's IMGQ_* settings do not reach the child unless asked for; the URL and the
    given variables always do."""
    monkeypatch.setenv("IMGQ_MAX_BATCH", "7")
    env = worker_env("redis://127.0.0.1:1/0", IMGQ_DRIFT="0")
    assert "IMGQ_MAX_BATCH" not in env and env["IMGQ_DRIFT"] == "0"
    assert env["IMGQ_BROKER_URL"] == "redis://127.0.0.1:1/0"
    assert worker_env("redis://x", keep_imgq=True)["IMGQ_MAX_BATCH"] == "7"


def test_ready_freeze_thaw_stop(redis_server: LocalRedis, bundle_dir: Path, tmp_path: Path) -> None:
    """A worker answers a ping; freeze stops every thread, thaw resumes them; SIGTERM is a
    warm shutdown with exit status 0."""
    worker = _worker(redis_server.url, bundle_dir, tmp_path, "w1")
    try:
        with ImgqClient(redis_server.url) as client:
            worker.wait_ready(client.app, timeout_s=60)
            assert worker.name == f"w1@{socket.gethostname()}"
            worker.freeze()
            assert all(state in "tT" for state in _thread_states(worker.pid))
            worker.thaw()
            deadline = time.monotonic() + 10
            while any(state in "tT" for state in _thread_states(worker.pid)):
                assert time.monotonic() < deadline, _thread_states(worker.pid)
                time.sleep(0.01)
            worker.wait_ready(client.app, timeout_s=10)  # it serves pings again
        assert worker.stop(timeout_s=30) == 0
        assert not worker.running()
    finally:
        worker.kill()


def test_kill_ends_a_frozen_worker(
    redis_server: LocalRedis, bundle_dir: Path, tmp_path: Path
) -> None:
    """kill() ends even a frozen worker at once and reaps it: status -SIGKILL."""
    worker = _worker(redis_server.url, bundle_dir, tmp_path, "w1")
    with ImgqClient(redis_server.url) as client:
        worker.wait_ready(client.app, timeout_s=60)
    worker.freeze()
    assert worker.kill() == -9
    assert not worker.running() and not Path(f"/proc/{worker.pid}").exists()


def test_worker_that_exits_fails_wait_ready_with_its_log(
    redis_server: LocalRedis, bundle_dir: Path, tmp_path: Path
) -> None:
    """A bad setting ends the worker at start; wait_ready fails at once, quoting its log."""
    worker = _worker(redis_server.url, bundle_dir, tmp_path, "bad", IMGQ_MAX_BATCH="0")
    started = time.monotonic()
    with ImgqClient(redis_server.url) as client:
        with pytest.raises(WorkerStartError, match="(?s)exited with status 2.*IMGQ_MAX_BATCH"):
            worker.wait_ready(client.app, timeout_s=120)
    assert time.monotonic() - started < 60
    assert "IMGQ_MAX_BATCH" in worker.log_tail()


def test_fleet_waits_for_all_and_stops_all(
    redis_server: LocalRedis, bundle_dir: Path, tmp_path: Path
) -> None:
    """A fleet is ready once every worker answered; leaving the block stops them all warmly."""
    with ImgqClient(redis_server.url) as client, WorkerFleet() as fleet:
        for name in ("w1", "w2"):
            fleet.add(_worker(redis_server.url, bundle_dir, tmp_path, name))
        fleet.wait_ready(client.app, timeout_s=90)
        assert sorted(r for reply in client.app.control.ping(timeout=1) for r in reply) == sorted(
            fleet.names
        )
    assert [w.process.returncode for w in fleet] == [0, 0]
