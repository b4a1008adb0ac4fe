"""trainer/sample_data.py: the offline data set of the demo and the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgq.cli import main as imgq
from imgq.shared.decode import decode_image
from imgq.shared.labelled import list_labelled_files
from imgq.trainer.sample_data import CLASS_NAMES, generate


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_same_seed_same_files(tmp_path: Path) -> None:
    """A seed fixes every byte of every file; another seed gives other images."""
    a = _contents(generate(tmp_path / "a", classes=3, per_class=4, size=48, seed=7))
    b = _contents(generate(tmp_path / "b", classes=3, per_class=4, size=48, seed=7))
    c = _contents(generate(tmp_path / "c", classes=3, per_class=4, size=48, seed=8))
    assert a == b
    assert len(a) == 12
    assert all(a[name] != c.get(name) for name in a)


def test_layout_formats_and_sizes(tmp_path: Path) -> None:
    """One folder per class, JPEG and PNG files, sizes spread around --size with varied aspect."""
    files, labels = list_labelled_files(generate(tmp_path, classes=4, per_class=25, size=64))
    assert sorted(set(labels)) == sorted(CLASS_NAMES[:4])
    assert {p.suffix for p in files} == {".jpg", ".png"}
    shapes = np.array([decode_image(p.read_bytes()).shape[:2] for p in files])
    assert shapes.min() >= 0.6 * 64 * 0.85 and shapes.max() <= 1.6 * 64 * 1.16
    aspects = shapes[:, 1] / shapes[:, 0]
    assert aspects.min() < 0.9 and aspects.max() > 1.1


def test_not_separable_by_mean_colour(tmp_path: Path) -> None:
    """Per-class mean colours overlap: nearest-class-mean on (R, G, B) means is near chance."""
    files, labels = list_labelled_files(generate(tmp_path, classes=4, per_class=40, size=48))
    means = np.array([decode_image(p.read_bytes()).reshape(-1, 3).mean(axis=0) for p in files])
    y = np.unique(labels, return_inverse=True)[1]
    fit, held = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    centres = np.stack([means[fit & (y == k)].mean(axis=0) for k in range(4)])
    predicted = np.linalg.norm(means[held, None] - centres[None], axis=2).argmin(axis=1)
    assert (predicted == y[held]).mean() < 0.45  # chance is 0.25; the model reaches > 0.9
    brightness = means.mean(axis=1)
    ranges = [(np.percentile(brightness[y == k], 10), np.percentile(brightness[y == k], 90))
              for k in range(4)]  # fmt: skip
    assert max(lo for lo, _ in ranges) < min(hi for _, hi in ranges)  # all classes overlap


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes must be 2..8"),
        ({"classes": 9}, "classes must be 2..8"),
        ({"per_class": 0}, "per_class must be >= 1"),
        ({"size": 8}, "size must be 32..1024"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    """Out-of-range arguments are refused with the allowed range."""
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **kwargs)


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`imgq sample-data` writes the files and says how many, where."""
    assert imgq(["sample-data", str(tmp_path), "--classes", "2", "--per-class", "3"]) == 0
    assert "wrote 6 images (3 per class: circle, square)" in capsys.readouterr().out
    assert imgq(["sample-data", str(tmp_path), "--classes", "12"]) == 2
