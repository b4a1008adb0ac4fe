"""The `imgq` command, the README's two commands and CI's wiring."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgq.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]

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
