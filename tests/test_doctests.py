"""The examples in imgq's docstrings run as tests, imported under their installed names
(``imgq.worker.settings``, not ``worker.settings``: one copy of each module)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

#: Modules that import TensorFlow or OpenTelemetry (optional extras), or that need a GPU, are
#: skipped where those are missing.
_OPTIONAL = ("tensorflow", "tf2onnx", "matplotlib", "opentelemetry")


#: imgq's packages; the last three live in the repository's worker/, shared/ and trainer/.
_PACKAGES = ("imgq", "imgq.shared", "imgq.trainer", "imgq.worker")


def _modules() -> list[str]:
    names = set(_PACKAGES)
    for package in _PACKAGES:
        path = importlib.import_module(package).__path__
        names |= {info.name for info in pkgutil.walk_packages(path, f"{package}.")}
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    """Every example in the module's docstrings gives the output it shows."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] in _OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}"
