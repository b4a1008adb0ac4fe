"""The `imgq` command, the README's two commands and CI's wiring."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgq.cli import ORT_TELEMETRY_OFF, build_parser
from imgq.launcher import WorkerProcess, worker_env
from imgq.localredis import LocalRedis
from imgq.worker.celeryapp.app import make_app
from imgq.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
#: What onnxruntime prints when it cannot keep its telemetry device id under $HOME (issue 25).
DEVICE_ID_WARNING = "Failed to persist telemetry device ID"
#: Variables under which onnxruntime keeps quiet anyway (its own switches; the CI markers newer
#: versions honour): left out, so that the test sees what a container's process sees.
_QUIETING = (*ORT_TELEMETRY_OFF, "ORT_RUNNING_UNIT_TESTS", "CI", "TF_BUILD", "GITHUB_ACTIONS",
             "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID", "BUILDKITE",
             "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
             "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI")  # fmt: skip

SUBCOMMANDS = ["sample-data", "train", "verify", "worker", "classify", "drift", "health", "demo"]


def test_parser_has_every_subcommand() -> None:
    """Every documented subcommand parses its minimal arguments."""
    parser = build_parser()
    minimal = {
        "sample-data": ["out"],
        "train": ["data", "--out", "m"],
        "verify": ["m"],
        "worker": [],
        "classify": ["x.jpg"],
        "drift": ["status"],
        "health": [],
        "demo": [],
    }
    for name in SUBCOMMANDS:
        args = parser.parse_args([name, *minimal[name]])
        assert args.command == name and callable(args.func)


@pytest.mark.parametrize(
    "module", ["imgq", "imgq.cli", "imgq.worker", "imgq.worker.client", "imgq.shared"]
)
def test_light_imports_do_not_load_tensorflow(module: str) -> None:
    """Importing the command line, the worker package or shared/ never loads TensorFlow."""
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "print([m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    """The README's first code block is the demo and the test command; .ci/run runs the latter."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```[a-z]*\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


@pytest.mark.slow
def test_a_plain_install_has_one_namespace(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not editable) installs the package imgq and nothing top-level
    named worker, shared or trainer: a service with its own `worker` module can use imgq's
    client (issue 16). Installed into a folder of its own, which comes first on the path."""
    target, src = tmp_path / "site", tmp_path / "src"
    # From a copy without build/: pip builds in the tree, and a stale build/lib would fill in
    # whatever the package list forgets.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo-output"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    packages = {p.name for p in target.iterdir()} - {"bin"}  # bin: the `imgq` command
    assert {p for p in packages if not p.endswith(".dist-info")} == {"imgq"}
    # Every module of the source folders is in the wheel, subpackages included (imports below
    # cannot tell: the test's own interpreter has the editable install on its path too).
    source = {
        f"imgq/{sub}{p.relative_to(ROOT / folder)}"
        for folder, sub in (("imgq", ""), ("worker", "worker/"), ("shared", "shared/"),
                            ("trainer", "trainer/"))
        for p in (ROOT / folder).rglob("*.py")
    }  # fmt: skip
    installed = {str(p.relative_to(target)) for p in (target / "imgq").rglob("*.py")}
    assert source - installed == set()
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run(
        [sys.executable, "-c", "import imgq.worker.settings as s; print(s.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where == str(target / "imgq" / "worker" / "settings.py")
    for name in ("worker", "shared", "trainer"):
        found = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, env=env,
                               capture_output=True)  # fmt: skip
        assert found.returncode != 0, f"`import {name}` works after pip install ."
    client = subprocess.run([sys.executable, "-c", "from imgq import ImgqClient, TASK_NAME"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)  # fmt: skip
    assert client.returncode == 0, client.stderr


def _unwritable_home(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """``env`` with HOME below a regular file, which no user can create (root included: the
    kernel answers ENOTDIR), as in a read-only container, and without :data:`_QUIETING`."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {k: v for k, v in env.items() if k not in _QUIETING} | {"HOME": str(blocker / "home")}


@pytest.mark.integration
def test_commands_that_load_onnxruntime_do_not_print_its_telemetry_warning(
    tmp_path: Path, bundle_dir: Path, redis_server: LocalRedis
) -> None:
    """Issue 25: with a HOME nobody can write, `imgq verify` (a session on the bundle) and
    `imgq worker` print no "Failed to persist telemetry device ID", which onnxruntime itself
    prints there (checked first: this onnxruntime build keeps a device id)."""
    env = _unwritable_home(tmp_path, dict(os.environ))
    bare = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    if DEVICE_ID_WARNING not in bare.stderr + bare.stdout:
        pytest.skip("this onnxruntime build keeps no telemetry device id: nothing to silence")

    verify = subprocess.run(
        [sys.executable, "-m", "imgq.cli", "verify", str(bundle_dir), "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert DEVICE_ID_WARNING not in verify.stdout + verify.stderr

    worker = WorkerProcess(
        "quiet@%h", tmp_path / "worker.log", options=["--model", str(bundle_dir),
        "--metrics-port", "0"], env=_unwritable_home(tmp_path, worker_env(redis_server.url)),
    )  # fmt: skip
    try:
        worker.wait_ready(make_app(WorkerSettings.from_env({"IMGQ_BROKER_URL": redis_server.url})))
    finally:
        worker.stop()
    log = worker.log.read_text()
    assert "model loaded" in log and DEVICE_ID_WARNING not in log, log[-3000:]
