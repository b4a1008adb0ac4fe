"""The package layout docs/architecture.md describes: imports go one way. Read from the source
with ``ast`` (every import, including those inside functions and under ``TYPE_CHECKING``), so a
circle that only a lazy import hides still shows.

The graph is built in a fresh interpreter (``python tests/test_layout.py``): CPython 3.11's
parser keeps its recursion depth per interpreter, not per thread, and a parse while another
thread compiles (a worker test's leftover Celery thread) fails with "AST constructor recursion
depth mismatch".
"""

from __future__ import annotations

import ast
import collections
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Installed package -> the repository folder it lives in (pyproject's package-dir).
FOLDERS = {"imgq.shared": "shared", "imgq.trainer": "trainer", "imgq.worker": "worker"}


def modules() -> dict[str, Path]:
    """Every imgq module by its installed name."""
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    for path in (ROOT / "imgq").glob("*.py"):
        found["imgq" if path.stem == "__init__" else f"imgq.{path.stem}"] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """:func:`read_import_graph`, in a fresh interpreter (see the module docstring)."""
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True)
    return {module: set(targets) for module, targets in json.loads(out.stdout).items()}


def read_import_graph() -> dict[str, set[str]]:
    """Module -> the imgq modules it imports (a name imported from a package counts as the
    submodule when there is one of that name, else as the package)."""
    mods = modules()
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    """No two imgq modules import each other, directly or around a circle (issue 24: the
    circles app/handler/settings and handlers.classify <-> rollout.serving were broken)."""
    assert circles(import_graph()) == []


def test_circle_is_found() -> None:
    """The check finds a circle when there is one."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_one_way() -> None:
    """shared/ imports neither trainer/ nor worker/; worker/ never trainer/ (workers run without
    TensorFlow), trainer/ uses worker/ only to publish (`imgq train --publish`); the Redis side of
    delivery (worker/broker/) knows nothing of the engine, the Celery side or the commands."""
    graph = import_graph()

    def imports(prefix: str) -> set[str]:
        return {t for m, ts in graph.items() if m.startswith(prefix) for t in ts}

    assert not {t for t in imports("imgq.shared") if t.startswith(("imgq.worker", "imgq.trainer"))}
    assert not {t for t in imports("imgq.worker") if t.startswith("imgq.trainer")}
    assert {t for t in imports("imgq.trainer") if t.startswith("imgq.worker")} <= {
        "imgq.worker.commands.models"
    }
    broker_uses = imports("imgq.worker.broker")
    assert not {
        t
        for t in broker_uses
        if t.startswith(("imgq.worker.celeryapp", "imgq.worker.commands", "imgq.worker.engine"))
    }


if __name__ == "__main__":
    print(json.dumps({module: sorted(targets) for module, targets in read_import_graph().items()}))
