"""Type-check imgq as it is installed.

imgq.worker, imgq.shared and imgq.trainer live in the repository's worker/, shared/ and trainer/
(pyproject's package-dir), a mapping mypy cannot follow. So mypy checks a tree of symlinks laid
out as the installed package (build/typecheck/imgq/worker -> worker/, ...); its messages name
files as they are installed (imgq/worker/settings.py is worker/settings.py here).

    .venv/bin/python scripts/typecheck.py      # exit status: mypy's
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("shared", "trainer", "worker")


def build_tree(tree: Path) -> None:
    """``tree/imgq``: imgq/'s modules and the subpackages' folders, as symlinks."""
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "imgq"
    package.mkdir(parents=True)
    for module in (ROOT / "imgq").glob("*.py"):
        (package / module.name).symlink_to(module)
    for name in SUBPACKAGES:
        (package / name).symlink_to(ROOT / name, target_is_directory=True)
    (package / "py.typed").touch()


def main() -> int:
    tree = ROOT / "build" / "typecheck"
    build_tree(tree)
    command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "-p", "imgq", *sys.argv[1:]]  # fmt: skip
    env = dict(os.environ, MYPYPATH=str(tree))
    return subprocess.run(command, cwd=tree, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
