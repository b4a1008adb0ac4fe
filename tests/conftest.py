"""Fixtures that start real things: a private redis-server, sample images, a trained bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from imgq.localredis import LocalRedis

if TYPE_CHECKING:
    from tests.workerproc import Workers


class _InstalledNamesOnly:
    """The repository's worker/, shared/ and trainer/ are imgq.worker, imgq.shared and
    imgq.trainer; run from the repository root, Python could also import them as top-level
    packages, a second copy of every module (a monkeypatch of one would miss the other)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name in ("worker", "shared", "trainer"):
            raise ImportError(f"import imgq.{name}, not {name}: that is the installed name")
        return None


sys.meta_path.insert(0, _InstalledNamesOnly())

# Keep TensorFlow and BLAS polite on the 2-core CI machine, and TensorFlow quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests unless onnxruntime offers the CUDA execution provider."""
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs onnxruntime-gpu and a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedis]:
    """A fresh redis-server on a free 127.0.0.1 port, append-only, stopped after the test."""
    server = LocalRedis(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ONNX bundle built directly (no TensorFlow): fast worker tests, made once."""
    from tests.tinymodel import make_tiny_bundle

    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture
def workers(redis_server: LocalRedis, bundle_dir: Path, tmp_path: Path) -> Iterator[Workers]:
    """Start `imgq worker` processes with ``workers.start(name, **env)``; all killed after."""
    from tests.workerproc import Workers

    fleet = Workers(bundle_dir, redis_server.url, tmp_path)
    yield fleet
    fleet.kill_all()


@pytest.fixture(scope="session")
def sample_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled data set from `imgq sample-data` (4 classes x 150 images), made once."""
    from imgq.trainer.sample_data import generate

    out = tmp_path_factory.mktemp("sample-data") / "shapes"
    return Path(generate(out, classes=4, per_class=150, size=96, seed=1))


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory, sample_data_dir: Path) -> Path:
    """A real bundle trained by `imgq train` on `sample_data_dir`, made once: 32x32 input, about
    a minute on 2 cores, ~97% test accuracy (measured), so class-mix drift is judged on a model
    that can tell the classes apart."""
    from imgq.trainer.train import train_bundle

    out = tmp_path_factory.mktemp("bundle") / "model"
    return Path(
        train_bundle(
            sample_data_dir, out, image_size=32, epochs=40, patience=8, seed=0, progress=False
        )
    )
