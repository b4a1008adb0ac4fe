"""Model versions published through Redis: `imgq models publish|list`, and real `imgq worker`
processes that get their bundle from Redis alone (worker/bundles.py)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from imgq.launcher import WorkerProcess, worker_env
from imgq.shared.bundle import ModelBundle
from imgq.shared.manifest import load_manifest
from imgq.worker.wire import TASK_NAME
from tests.tinymodel import COLOURS, colour_image, encode_png

pytestmark = pytest.mark.integration


def _imgq(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imgq.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "IMGQ_BROKER_URL": url, **env},
    )  # fmt: skip


def _publish(url: str, bundle: Path, *extra: str) -> str:
    """The version `imgq models publish` printed."""
    done = _imgq(url, "models", "publish", str(bundle), *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


@pytest.fixture
def client(redis_server) -> Celery:
    app = Celery("service", broker=redis_server.url, backend=redis_server.url)
    app.conf.task_routes = {TASK_NAME: {"queue": "imgq"}}
    return app


@pytest.fixture
def start(redis_server, tmp_path) -> Iterator[object]:
    """Start a worker with no bundle folder: only the Redis URL (and a private cache)."""
    started: list[WorkerProcess] = []

    def run(name: str, *options: str, cache: Path | None = None) -> WorkerProcess:
        env = worker_env(redis_server.url, IMGQ_METRICS_PORT="0", IMGQ_DRIFT="0",
                         IMGQ_MODEL_CACHE=str(cache or tmp_path / f"cache-{name}"))  # fmt: skip
        worker = WorkerProcess(f"{name}@%h", tmp_path / f"{name}.log",
                               options=["--device", "cpu", *options], env=env)  # fmt: skip
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.kill()


def _classify(client: Celery) -> dict:
    png = encode_png(colour_image(COLOURS[1], size_px=24, seed=1))
    res = client.send_task(TASK_NAME, kwargs={"image": base64.b64encode(png).decode()})
    return res.get(timeout=60)


def test_a_worker_needs_only_the_redis_url(redis_server, bundle_dir, client, start, tmp_path):
    """Publish prints the version and makes it the queue's stable one; a worker started with no
    folder fetches it, checks it, caches it and serves it; `list` shows who serves what."""
    version = _publish(redis_server.url, bundle_dir)
    assert len(version) == 12
    worker = start("w1", cache=tmp_path / "cache")
    worker.wait_ready(client)
    result = _classify(client)
    assert result["model"]["sha256"] == load_manifest(bundle_dir).model_sha256
    assert result["model"]["version"] == version
    # A worker given the folder reports the same version.
    assert ModelBundle.load(bundle_dir, device="cpu", check_golden=False).version == version
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith(version) and (cached / "manifest.json").is_file()
    listed = _imgq(redis_server.url, "models", "list", "--json")
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["version"] == version and row["stable"] and row["bytes"] > 0
    assert row["served_by"] == [worker.name]
    again = _publish(redis_server.url, bundle_dir)  # the same files: the same version
    assert again == version
    # Reviewing drift needs the Redis URL alone too.
    status = _imgq(redis_server.url, "drift", "status", IMGQ_MODEL_CACHE=str(tmp_path / "c2"))
    assert status.returncode == 0, status.stderr
    assert load_manifest(bundle_dir).name in status.stdout


def test_a_pinned_version_is_served(redis_server, bundle_dir, client, start, tmp_path) -> None:
    """Another bundle (same model, other manifest) is another version; `--model-version`
    serves it while the queue's stable version stays the first."""
    first = _publish(redis_server.url, bundle_dir)
    other = tmp_path / "other"
    shutil.copytree(bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["name"] = "tiny-renamed"
    (other / "manifest.json").write_text(json.dumps(manifest))
    second = _publish(redis_server.url, other)
    assert second != first
    worker = start("w1", "--model-version", second)
    worker.wait_ready(client)
    assert _classify(client)["model"]["name"] == "tiny-renamed"
    assert worker.stop() == 0
    rows = [
        json.loads(x)
        for x in _imgq(redis_server.url, "models", "list", "--json").stdout.split("\n")
        if x
    ]
    assert {r["version"]: r["stable"] for r in rows} == {first: True, second: False}
    # Deleting: not the stable version, then the other one (no worker serves it any more).
    refused = _imgq(redis_server.url, "models", "delete", first)
    assert refused.returncode == 1 and "is the stable version of queue 'imgq'" in refused.stderr
    deleted = _imgq(redis_server.url, "models", "delete", second)
    assert deleted.returncode == 0, deleted.stderr
    left = _imgq(redis_server.url, "models", "list", "--json").stdout.splitlines()
    assert [json.loads(line)["version"] for line in left] == [first]
    assert redis.Redis.from_url(redis_server.url).keys(f"imgq:bundle:{second}*") == []


def test_a_damaged_stored_bundle_is_refused_and_publishing_repairs_it(
    redis_server, bundle_dir, client, start
) -> None:
    """A stored file that no longer matches its sha256 stops the worker at start, saying so;
    publishing the bundle again, as the message says, repairs it."""
    version = _publish(redis_server.url, bundle_dir)
    r = redis.Redis.from_url(redis_server.url)
    (key,) = r.keys(f"imgq:bundle:{version}*")
    r.hset(key, "model.onnx", b"not a model")
    worker = start("w1")
    assert worker.process.wait(timeout=60) == 2
    assert "changed or damaged; publish it again" in worker.log_tail()
    assert _publish(redis_server.url, bundle_dir) == version
    start("w2").wait_ready(client)
    assert _classify(client)["model"]["version"] == version


def test_a_bundle_with_a_link_out_of_its_folder_is_refused(redis_server, bundle_dir, tmp_path):
    linked = tmp_path / "linked"
    shutil.copytree(bundle_dir, linked)
    golden = load_manifest(linked).golden[0].file
    (linked / golden).unlink()
    (linked / golden).symlink_to("/etc/hostname")
    refused = _imgq(redis_server.url, "models", "publish", str(linked))
    assert refused.returncode == 1 and "leads outside the bundle folder" in refused.stderr


def test_publishing_is_bounded_and_a_queue_without_a_version_says_so(
    redis_server, bundle_dir, start
) -> None:
    refused = _imgq(redis_server.url, "models", "publish", str(bundle_dir),
                    IMGQ_BUNDLE_MAX_BYTES="1000")  # fmt: skip
    assert refused.returncode == 1 and "over IMGQ_BUNDLE_MAX_BYTES=1000" in refused.stderr
    worker = start("w1")
    assert worker.process.wait(timeout=60) == 2
    assert "has no stable model version" in worker.log_tail()


def test_a_hostile_entry_in_redis_writes_nothing_outside_the_cache(
    redis_server, start, tmp_path
) -> None:
    """A stored version whose file names leave the bundle (``../``) is not a version: the
    worker refuses to start and writes nothing outside its cache."""
    r = redis.Redis.from_url(redis_server.url)
    sha = "ab" * 32
    entry = {"sha256": sha, "name": "evil", "model_sha256": "", "size": 4, "published_at": 0.0,
             "files": {"../escaped.txt": "00" * 32}}  # fmt: skip
    r.hset("imgq:bundles", sha, json.dumps(entry))
    odd = {"cd" * 32: {"files": {"a\x00b": "00" * 32}}, "ef" * 32: {"published_at": 1e300}}
    for key, change in odd.items():
        r.hset("imgq:bundles", key, json.dumps({**entry, **change, "sha256": key}))
    listed = _imgq(redis_server.url, "models", "list")
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    r.hset(f"imgq:bundle:{sha}", "../escaped.txt", b"evil")
    r.set("imgq:stable:imgq", sha)
    worker = start("w1", cache=tmp_path / "cache" / "inner")
    assert worker.process.wait(timeout=60) == 2
    assert "no published version matches" in worker.log_tail()
    assert not (tmp_path / "cache" / "escaped.txt").exists()


def test_workers_sharing_a_cache_fetch_at_once_and_a_damaged_cache_is_refetched(
    redis_server, bundle_dir, tmp_path
) -> None:
    """Several workers starting together on one cache all get one checked folder; a cached
    file changed afterwards is noticed at the next fetch and replaced."""
    from concurrent.futures import ThreadPoolExecutor

    from imgq.worker.bundles import fetch, publish

    client = redis.Redis.from_url(redis_server.url)
    version, stable = publish(client, bundle_dir, 1 << 28, "imgq")
    assert stable
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: fetch(client, version, cache, 1 << 28), range(8)))
    assert len(set(folders)) == 1 and [p.name for p in cache.iterdir()] == [version.sha256]
    folder = folders[0]
    assert ModelBundle.load(folder, device="cpu", check_golden=False).version == version.version
    (folder / "manifest.json").write_text("{}")
    assert fetch(client, version, cache, 1 << 28) == folder
    assert ModelBundle.load(folder, device="cpu", check_golden=False).version == version.version
