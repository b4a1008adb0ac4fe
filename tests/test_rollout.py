"""Model rollout on running workers (worker/rollout/): real redis-server, real `imgq worker`
processes started with only the Redis URL, real onnxruntime; canary, promote, abort, shadow,
and a candidate that fails its checks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from celery import Celery

from imgq.launcher import WorkerProcess, worker_env
from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_image
from imgq.shared.preprocess import preprocess_batch
from imgq.worker.bundles import publish
from imgq.worker.celeryapp.status import STATUS_COMMAND
from imgq.worker.rollout.state import Rollout, in_share, read_rollout, stats_key
from imgq.worker.rollout.tally import read_stats
from imgq.worker.wire import TASK_NAME
from tests.tinymodel import colour_image, encode_png, make_tiny_bundle
from tests.workerproc import Published, wait_for

pytestmark = pytest.mark.integration


def _imgq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgq.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "IMGQ_BROKER_URL": url},
    )  # fmt: skip


def _publish(url: str, bundle: Path, *extra: str) -> str:
    done = _imgq(url, "models", "publish", str(bundle), *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


@pytest.fixture(scope="module")
def candidate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model (12 px input: another ONNX file) whose labels b and c are swapped: it
    agrees with the tiny bundle on red images only."""
    return make_tiny_bundle(tmp_path_factory.mktemp("v2") / "bundle", labels=("a", "c", "b"),
                            size=12)  # fmt: skip


@pytest.fixture
def client(redis_server) -> Iterator[Celery]:
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_routes = {TASK_NAME: {"queue": "imgq"}}
    yield app
    app.close()


@pytest.fixture
def start(redis_server, tmp_path) -> Iterator[object]:
    """Start a worker given only the Redis URL: it follows the queue's rollout."""
    started: list[WorkerProcess] = []

    def run(name: str, **env: str) -> WorkerProcess:
        env = worker_env(redis_server.url, **{"IMGQ_METRICS_PORT": "0", "IMGQ_DRIFT": "0",
                         "IMGQ_MODEL_CACHE": str(tmp_path / f"cache-{name}"), **env})  # fmt: skip
        worker = WorkerProcess(f"{name}@%h", tmp_path / f"{name}.log",
                               options=["--device", "cpu"], env=env)  # fmt: skip
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.kill()


def _images(n: int, seed: int) -> list[str]:
    """``n`` images of random colours (each class's colour often enough)."""
    rng = np.random.default_rng(seed)
    return [
        base64.b64encode(
            encode_png(colour_image(tuple(int(c) for c in rng.integers(10, 246, 3)), 20, seed=i))
        ).decode()
        for i in range(n)
    ]


def _serving(client: Celery) -> dict[str, tuple[str, str | None]]:
    """Node -> (stable version, candidate version) from every worker's imgq_status."""
    out = {}
    for reply in client.control.broadcast(STATUS_COMMAND, reply=True, timeout=1.0):
        for node, status in reply.items():
            if isinstance(status, dict) and status.get("loaded"):
                out[node] = (status["version"], status.get("candidate"))
    return out


def _all_serve(client: Celery, nodes: set[str], want: tuple[str, str | None]) -> bool:
    serving = _serving(client)
    return set(serving) >= nodes and all(serving[n] == want for n in nodes)


def _rollout(url: str) -> Rollout:
    rollout = read_rollout(redis.Redis.from_url(url), "imgq")
    assert rollout is not None
    return rollout


def _send(client: Celery, images: list[str]) -> list:
    return [client.send_task(TASK_NAME, kwargs={"image": image}) for image in images]


def test_canary_share_then_promote_with_a_worker_killed_mid_switch(
    redis_server, bundle_dir, candidate_dir, client, start
) -> None:
    """Two workers with only the Redis URL; a 25% canary answers 20-30% of tasks, each task by
    the version its id routes it to; promote while a worker is SIGKILLed: every task answered
    once, and once every live worker switched, every answer is v2."""
    v1 = _publish(redis_server.url, bundle_dir)
    v2 = _publish(redis_server.url, candidate_dir)
    w1, w2 = start("w1"), start("w2")
    w1.wait_ready(client)
    w2.wait_ready(client)
    published = Published(client)
    try:
        started = _imgq(redis_server.url, "rollout", "start", v2, "--canary", "25")
        assert started.returncode == 0, started.stderr
        rollout = _rollout(redis_server.url)
        wait_for(lambda: _all_serve(client, {w1.name, w2.name}, (v1, v2)))
        images = _images(3000, seed=1)
        canary = _send(client, images)
        answers = {r.id: r.get(timeout=120)["model"]["version"] for r in canary}
        share = sum(v == v2 for v in answers.values()) / len(answers)
        assert 0.20 <= share <= 0.30, share
        for task_id, version in answers.items():
            assert version == (v2 if in_share(rollout.id, task_id, 25.0) else v1), task_id
        status = _imgq(redis_server.url, "rollout", "status", "--json")
        report = json.loads(status.stdout)
        assert report["state"] == "running" and report["versions"]["candidate"]["version"] == v2
        assert sorted(report["versions"]["candidate"]["served_by"]) == sorted([w1.name, w2.name])

        during = _send(client, images[:1500])
        promoted = _imgq(redis_server.url, "rollout", "promote")
        assert promoted.returncode == 0, promoted.stderr
        w1.kill()  # mid-switch, holding a batch or not
        w3 = start("w3")
        w3.wait_ready(client)
        for r in during:  # none lost: the killed worker's batch is redelivered
            assert r.get(timeout=120)["model"]["version"] in (v1, v2)
        wait_for(lambda: _all_serve(client, {w2.name, w3.name}, (v2, None)))
        after = _send(client, images[:500])
        assert {r.get(timeout=120)["model"]["version"] for r in after} == {v2}
        assert published.duplicates() == {}  # no task answered twice
    finally:
        published.close()
    assert _rollout(redis_server.url).state == "promoted"
    listed = _imgq(redis_server.url, "models", "list", "--json")
    stable = [json.loads(line)["version"] for line in listed.stdout.splitlines()
              if json.loads(line)["stable"]]  # fmt: skip
    assert stable == [v2]


def test_abort_returns_to_the_stable_version(
    redis_server, bundle_dir, candidate_dir, client, start
) -> None:
    v1 = _publish(redis_server.url, bundle_dir)
    v2 = _publish(redis_server.url, candidate_dir)
    w1 = start("w1", IMGQ_DRIFT="1", IMGQ_DRIFT_WINDOW="20")
    w1.wait_ready(client)
    assert _imgq(redis_server.url, "rollout", "start", v2, "--canary", "50").returncode == 0
    wait_for(lambda: _all_serve(client, {w1.name}, (v1, v2)))
    mixed = {r.get(timeout=60)["model"]["version"] for r in _send(client, _images(100, 2))}
    assert mixed == {v1, v2}

    def judged() -> dict | None:  # a drift window of each version, against its own reference
        report = json.loads(_imgq(redis_server.url, "rollout", "status", "--json").stdout)
        versions = [report["versions"][role] for role in ("stable", "candidate")]
        counted = sum(v["tasks"] for v in versions) == 100  # each version's tasks, flushed
        return (
            report
            if counted and all((v["drift"] or {}).get("last_window") for v in versions)
            else None
        )

    wait_for(judged)
    refused = _imgq(redis_server.url, "models", "delete", v2)
    assert refused.returncode == 1 and "candidate of the rollout running on imgq" in refused.stderr
    aborted = _imgq(redis_server.url, "rollout", "abort", "--reason", "looks wrong")
    assert aborted.returncode == 0, aborted.stderr
    wait_for(lambda: _all_serve(client, {w1.name}, (v1, None)))
    assert {r.get(timeout=60)["model"]["version"] for r in _send(client, _images(200, 3))} == {v1}
    status = _imgq(redis_server.url, "rollout", "status")
    assert "aborted" in status.stdout and "looks wrong" in status.stdout
    again = _imgq(redis_server.url, "rollout", "abort")
    assert again.returncode == 1 and "no rollout is running" in again.stderr


def test_shadow_agreement_equals_the_offline_agreement(
    redis_server, bundle_dir, candidate_dir, client, start
) -> None:
    """At 100% shadow every answer is the stable version's, and the agreement, the confusion
    and the task counts in `status` are those computed offline from the two bundles."""
    v1 = _publish(redis_server.url, bundle_dir)
    v2 = _publish(redis_server.url, candidate_dir)
    w1 = start("w1")
    w1.wait_ready(client)
    started = _imgq(redis_server.url, "rollout", "start", v2, "--canary", "0", "--shadow", "100")
    assert started.returncode == 0, started.stderr
    rollout = _rollout(redis_server.url)
    wait_for(lambda: _all_serve(client, {w1.name}, (v1, v2)))
    images = _images(300, seed=4)
    answers = [r.get(timeout=60) for r in _send(client, images)]
    assert {a["model"]["version"] for a in answers} == {v1}

    decoded = [decode_image(base64.b64decode(image)) for image in images]
    labels = []
    for folder in (bundle_dir, candidate_dir):
        bundle = ModelBundle.load(folder, device="cpu", check_golden=False)
        probs = bundle.predict(preprocess_batch(decoded, bundle.manifest.preprocess))
        labels.append([bundle.manifest.labels[k] for k in probs.argmax(axis=1)])
    agree = sum(a == b for a, b in zip(*labels, strict=True))
    assert 0 < agree < len(images)  # the two models do disagree
    assert [a["label"] for a in answers] == labels[0]

    r = redis.Redis.from_url(redis_server.url)
    stats = wait_for(lambda: (s := read_stats(r, "imgq", rollout))["shadow"]["n"] == 300 and s)
    assert stats["shadow"]["agree"] == agree
    assert stats["shadow"]["agreement"] == agree / 300
    offline: dict[str, dict[str, int]] = {}
    for a, b in zip(*labels, strict=True):
        offline.setdefault(a, {}).setdefault(b, 0)
        offline[a][b] += 1
    assert stats["shadow"]["confusion"] == offline
    assert stats["versions"][v1]["tasks"] == 300 and stats["shadow"]["runs"] == 300
    assert stats["versions"][v2].get("tasks", 0) == 0 and stats["versions"][v2]["shadow"] == 300
    status = _imgq(redis_server.url, "rollout", "status")
    assert f"top-1 agreement {agree / 300:.2%}" in status.stdout, status.stdout


def test_a_candidate_failing_its_golden_check_is_never_served(
    redis_server, bundle_dir, candidate_dir, client, start, tmp_path
) -> None:
    """A candidate whose golden set does not reproduce on the worker is refused there, never
    answers a task, and the rollout aborts itself with the reason."""
    v1 = _publish(redis_server.url, bundle_dir)
    bad = tmp_path / "bad"
    make_tiny_bundle(bad, labels=("a", "c", "b"), size=12)
    manifest = json.loads((bad / "manifest.json").read_text())
    for golden in manifest["golden"]:
        golden["probs"] = list(reversed(golden["probs"]))  # not what the model gives
    (bad / "manifest.json").write_text(json.dumps(manifest))
    r = redis.Redis.from_url(redis_server.url)
    version, _ = publish(r, bad, 1 << 30, "imgq", check=False)  # as if checked elsewhere
    w1 = start("w1")
    w1.wait_ready(client)
    before = _send(client, _images(50, 5))
    started = _imgq(redis_server.url, "rollout", "start", version.version, "--canary", "100")
    assert started.returncode == 0, started.stderr
    rollout = wait_for(lambda: (x := _rollout(redis_server.url)).state == "aborted" and x)
    assert "failed its checks on worker" in rollout.reason and "golden" in rollout.reason
    after = _send(client, _images(50, 6))
    assert {res.get(timeout=60)["model"]["version"] for res in before + after} == {v1}
    assert _serving(client)[w1.name] == (v1, None)
    status = _imgq(redis_server.url, "rollout", "status")
    assert "aborted" in status.stdout and "golden" in status.stdout
    assert w1.process.poll() is None  # the worker serves on


def test_the_failure_threshold_aborts_through_the_tally(redis_server) -> None:
    """The candidate's model failures over the threshold, counted and flushed as a worker does,
    are a reason to abort; failures of the input are not."""
    from prometheus_client import CollectorRegistry

    from imgq.shared.errors import InvalidTask
    from imgq.worker.handler import Failure, Success
    from imgq.worker.metrics import WorkerMetrics
    from imgq.worker.rollout.tally import Tally

    r = redis.Redis.from_url(redis_server.url)
    rollout = Rollout("r1", "b" * 64, "a" * 64, 10.0, 0.0, min_tasks=20, max_failure_rate=0.1)
    tally = Tally(r, "imgq", WorkerMetrics(CollectorRegistry()))
    bad_input = Failure(InvalidTask("bad_argument", "x"))
    tally.count(rollout, "b" * 12, [Success({})] * 15 + [bad_input] * 10, 5.0)
    tally.flush()
    assert tally.failing(rollout) is None  # bad inputs are the client's, not the model's
    tally.count(rollout, "b" * 12, [Failure(RuntimeError("onnx"))] * 3, 1.0)
    tally.flush()
    reason = tally.failing(rollout)
    assert reason is not None and "failed 3 of 28 tasks" in reason
    assert r.ttl(stats_key("imgq", "r1")) > 0
    # Shadow runs count too: a candidate failing only in the shadow is aborted as well.
    shadowed = Rollout("r3", "b" * 64, "a" * 64, 0.0, 100.0, min_tasks=20, max_failure_rate=0.1)
    tally.shadow(shadowed, "b" * 12, [], [Success({})] * 15 + [Failure(RuntimeError())] * 5, 1.0)
    tally.flush()
    reason = tally.failing(shadowed)
    assert reason is not None and "failed 5 of 20 tasks" in reason


def test_a_task_the_candidate_cannot_answer_stays_with_the_stable_version(
    redis_server, bundle_dir, client, start, tmp_path
) -> None:
    """A candidate with two labels takes every task at --canary 100 but those asking for the
    top 3, which the stable version answers: no task is refused by the rollout."""
    v1 = _publish(redis_server.url, bundle_dir)
    v2 = _publish(redis_server.url, make_tiny_bundle(tmp_path / "two", labels=("a", "b")))
    w1 = start("w1")
    w1.wait_ready(client)
    assert _imgq(redis_server.url, "rollout", "start", v2, "--canary", "100").returncode == 0
    wait_for(lambda: _all_serve(client, {w1.name}, (v1, v2)))
    images = _images(40, seed=7)
    top3 = [client.send_task(TASK_NAME, kwargs={"image": i, "top_k": 3}) for i in images]
    top1 = _send(client, images)
    assert {r.get(timeout=60)["model"]["version"] for r in top3} == {v1}
    assert {r.get(timeout=60)["model"]["version"] for r in top1} == {v2}


def test_hostile_rollout_state_and_refused_commands(redis_server, bundle_dir, candidate_dir):
    """What the rollout commands refuse, and entries in Redis that are not what they claim."""
    from imgq.worker.bundles import BUNDLES_KEY, stable_key
    from imgq.worker.rollout.state import RolloutError, promote, stable_version, start

    r = redis.Redis.from_url(redis_server.url)
    publish(r, bundle_dir, 1 << 30, "imgq")
    v2, _ = publish(r, candidate_dir, 1 << 30, "imgq")
    with pytest.raises(RolloutError, match="--min-tasks is a count"):
        start(r, "imgq", v2.version, canary=10, min_tasks=-1)
    with pytest.raises(RolloutError, match="percentage from 0 to 100"):
        start(r, "imgq", v2.version, canary=float("nan"))
    start(r, "imgq", v2.version, canary=10)
    with pytest.raises(RolloutError, match="is running on queue"):
        start(r, "imgq", v2.version, canary=10)
    r.hdel(BUNDLES_KEY, v2.sha256)  # deleted behind the rollout's back
    with pytest.raises(RolloutError, match="no longer published"):
        promote(r, "imgq")
    assert stable_version(r, "imgq") != v2.sha256
    for junk in (b"\xff\xfe garbage", b"0" * 63, b"../" * 30):
        r.set(stable_key("imgq"), junk)
        assert stable_version(r, "imgq") is None
    r.set("imgq:rollout:imgq", b'{"id": "x", "candidate": 5}')
    assert read_rollout(r, "imgq") is None
    r.set("imgq:rollout:imgq", "\xff".encode("latin-1") * 100)
    assert read_rollout(r, "imgq") is None


def test_counts_are_added_once_when_redis_refuses_a_field(redis_server) -> None:
    """A field of the stats hash that is not a number (hostile) loses its own counts; the
    others are added once, not again at every flush."""
    from prometheus_client import CollectorRegistry

    from imgq.worker.handler import Success
    from imgq.worker.metrics import WorkerMetrics
    from imgq.worker.rollout.tally import Tally

    r = redis.Redis.from_url(redis_server.url)
    rollout = Rollout("r2", "b" * 64, "a" * 64, 10.0, 0.0)
    r.hset(stats_key("imgq", "r2"), "bbbbbbbbbbbb:ms", "bogus")
    tally = Tally(r, "imgq", WorkerMetrics(CollectorRegistry()))
    tally.count(rollout, "b" * 12, [Success({})] * 7, 3.0)
    tally.flush()
    tally.flush()
    assert read_stats(r, "imgq", rollout)["versions"]["bbbbbbbbbbbb"]["tasks"] == 7


def test_a_stable_key_that_is_no_full_sha256_stops_a_worker_saying_so(
    redis_server, bundle_dir, start
) -> None:
    """A stable key holding a short prefix (written by hand) resolves for a fetch but is no
    version to follow: the worker exits 2 with the fix instead of an assertion."""
    from imgq.worker.bundles import stable_key

    r = redis.Redis.from_url(redis_server.url)
    version, _ = publish(r, bundle_dir, 1 << 30, "imgq")
    r.set(stable_key("imgq"), version.version)  # 12 hex digits, not 64
    worker = start("w1")
    assert worker.process.wait(timeout=120) == 2
    assert "is not a full sha256" in worker.log_tail()
