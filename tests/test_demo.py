"""Issue 8: the README's demo command works from a fresh clone and leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _processes_inside(folder: Path) -> list[str]:
    """Command lines of live processes whose working directory is inside `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd == str(folder) or cwd.startswith(str(folder) + os.sep):
            found.append(cmdline)
    return found


def _installed_layout(checkout: Path) -> Path:
    """``checkout`` made importable as pyproject's package-dir installs it (``imgq.worker`` is
    ``worker/``, ...): links inside its ``imgq/``, so that the clone's code wins from its own
    folder (the current directory of ``python -m``) and from PYTHONPATH alike."""
    for sub in ("worker", "shared", "trainer"):
        (checkout / "imgq" / sub).symlink_to(Path("..") / sub)
    return checkout


@pytest.mark.slow
@pytest.mark.integration
def test_readme_demo_command_from_a_fresh_clone(tmp_path: Path) -> None:
    """`bash scripts/demo.sh` in a fresh clone prints the summary and a drift alert, stops all."""
    clone = tmp_path / "imgq"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # Reuse this checkout's environment (a second pip install of TensorFlow proves nothing new)
    # but run the clone's code, laid out as installed and first on PYTHONPATH (the editable
    # install stays pointed at this checkout, not at a clone that is deleted).
    env = dict(
        os.environ,
        IMGQ_VENV=str(Path(sys.prefix)),
        IMGQ_SKIP_INSTALL="1",
        PYTHONPATH=str(_installed_layout(clone)),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("IMGQ_BROKER_URL", None)
    where = subprocess.run(
        [sys.executable, "-c", "import imgq.worker.engine as e; print(e.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert Path(where.strip()).resolve() == (clone / "worker" / "engine.py").resolve()
    small = ["--per-class", "150", "--tasks", "300", "--drift-tasks", "400", "--epochs", "15"]
    proc = subprocess.run(
        ["bash", "scripts/demo.sh", *small],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "SUMMARY " in output, output[-3000:]
    assert "DRIFT ALERT " in output, output[-3000:]
    assert (clone / "demo-output" / "model" / "training_curves.png").is_file()
    assert any((clone / "demo-output" / "drift-report").glob("*.png"))
    assert _processes_inside(clone) == []
