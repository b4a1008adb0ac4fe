"""`pip install .` with no extras, as a service that only sends tasks installs imgq: a fresh
virtual environment, the package index, a real redis-server. Needs pip to reach a package index
(marker ``network``; skipped when none answers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from imgq.localredis import LocalRedis
from imgq.worker.wire import TASK_NAME

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
#: What `pip install .` reads: the Dockerfile's build stage copies the same.
_SOURCES = ("pyproject.toml", "README.md", "imgq", "shared", "trainer", "worker")


def _index_answers() -> bool:
    """Whether pip, configured as it is here, reaches a package index."""
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "celery"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and "celery (" in probe.stdout


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh virtual environment with `pip install .` (no extras) in it."""
    if not _index_answers():
        pytest.skip("pip reaches no package index here (deselect with -m 'not network')")
    root = tmp_path_factory.mktemp("client-install")
    src = root / "src"
    src.mkdir()
    for name in _SOURCES:  # a copy: pip builds in the tree, where a stale build/ may lie
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    # This interpreter's pip installs into the new environment: no ensurepip there, same result.
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_a_client_only_install_enqueues(client_venv: Path, redis_server: LocalRedis) -> None:
    """Issue 25: with imgq installed without extras, `ImgqClient(...).classify()` puts one
    imgq.classify message on the queue (kombu 5.7's Redis transport imports `packaging`, which
    only kombu's `redis` extra declares: the client failed with ModuleNotFoundError)."""
    script = (
        "import sys\n"
        "from imgq import ImgqClient\n"
        "with ImgqClient(sys.argv[1]) as client:\n"
        "    print(client.classify(b'an image file').id)\n"
    )
    sent = subprocess.run(
        [str(client_venv), "-I", "-c", script, redis_server.url],
        capture_output=True, text=True, timeout=120, cwd=client_venv.parent,
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    queued = redis.Redis.from_url(redis_server.url).lrange("imgq", 0, -1)
    assert len(queued) == 1, queued
    headers = json.loads(queued[0])["headers"]
    assert headers["id"] == sent.stdout.strip() and headers["task"] == TASK_NAME
