"""The labelled files of a data folder, their stratified split, and their pixels, via ``shared/``.

Every image is read from its file and decoded by :func:`shared.decode.decode_image` and resized
by :func:`shared.preprocess.resize_image` exactly once; training then normalises batches of those
uint8 arrays with :func:`shared.preprocess.normalise_batch`. So a training tensor is, byte for
byte, the tensor a worker makes from the same file with
``preprocess_batch([decode_image(data)], spec)``.

The folder layout itself is read by :func:`imgq.shared.labelled.list_labelled_files`, which
``imgq verify`` uses in a worker's environment too. Several folders train together, classes
merged by name (:func:`list_training_files`): the old data, then e.g. the labelled samples of a
drift alert (``imgq drift samples``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from imgq.shared.decode import decode_image
from imgq.shared.errors import InvalidImage
from imgq.shared.imagestats import image_features
from imgq.shared.labelled import IMAGE_SUFFIXES, list_labelled_files
from imgq.shared.preprocess import PreprocessSpec, resize_image

__all__ = [
    "Dataset",
    "Split",
    "list_training_files",
    "load_dataset",
    "stratified_split",
]


@dataclasses.dataclass(frozen=True)
class Split:
    """Row indices of the training, validation and test parts."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def stratified_split(y: np.ndarray, *, val_split: float, test_split: float, seed: int) -> Split:
    """Split rows so every class keeps its share in each part, reproducibly for ``seed``.

    Each class gives ``round(n * test_split)`` rows (at least one) to the test part and
    ``round(n * val_split)`` (at least one) to validation; the rest train.

    >>> s = stratified_split(np.repeat([0, 1], 10), val_split=0.2, test_split=0.2, seed=0)
    >>> len(s.train), len(s.val), len(s.test)
    (12, 4, 4)
    >>> np.bincount(np.repeat([0, 1], 10)[s.val]).tolist()
    [2, 2]
    """
    if not (0 < val_split < 1 and 0 < test_split < 1 and val_split + test_split < 1):
        raise ValueError(
            f"val_split and test_split must each be in (0, 1) with a sum below 1, got "
            f"{val_split} and {test_split}"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for k in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == k))
        n_test = max(1, round(len(rows) * test_split))
        n_val = max(1, round(len(rows) * val_split))
        if len(rows) - n_test - n_val < 1:
            raise ValueError(
                f"class {k} has only {len(rows)} images: too few for a training, a validation "
                "and a test part; add images or lower --val-split/--test-split"
            )
        parts["test"].append(rows[:n_test])
        parts["val"].append(rows[n_test : n_test + n_val])
        parts["train"].append(rows[n_test + n_val :])
    return Split(**{name: np.sort(np.concatenate(rows)) for name, rows in parts.items()})


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data folder loaded once through ``shared/``.

    Attributes:
        files: Image files, sorted by class then name.
        y: Class index of each file (into ``class_names``).
        class_names: Class folder names, sorted.
        images: (N, H, W, 3) RGB uint8, resized by ``shared.preprocess.resize_image``.
        features: (N, F) ``shared.imagestats.image_features`` of ``images`` (and of the
            originals' sizes), as the worker computes them on what it serves.
    """

    files: list[Path]
    y: np.ndarray
    class_names: tuple[str, ...]
    images: np.ndarray
    features: np.ndarray


DataDirs = str | Path | Sequence[str | Path]


def list_training_files(data_dirs: DataDirs) -> tuple[list[Path], list[str]]:
    """The image files of one or several labelled folders, and each file's class name.

    The first folder defines the classes (every class folder must hold an image). Each later
    folder adds images to those classes by folder name; a class folder there left empty (every
    image moved out while labelling) is skipped. A class the first folder does not have is
    refused: a class trained on a handful of production samples alone would be a guess.

    Raises:
        ValueError: a folder's layout is wrong, or a later folder has a class the first lacks.
    """
    dirs = [Path(d) for d in ([data_dirs] if isinstance(data_dirs, str | Path) else data_dirs)]
    if not dirs:
        raise ValueError("no data folder given")
    files, labels = list_labelled_files(dirs[0])
    classes = set(labels)
    for extra in dirs[1:]:
        if not extra.is_dir():
            raise ValueError(f"{extra} is not a folder; expected one sub-folder per class")
        for folder in sorted(p for p in extra.iterdir() if p.is_dir()):
            if folder.name.startswith("."):
                continue
            found = sorted(
                p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if found and folder.name not in classes:
                known = ", ".join(sorted(classes))
                raise ValueError(
                    f"class folder {folder} is not a class of {dirs[0]} ({known}): "
                    f"move its images into one of those, or add the class to {dirs[0]} with "
                    "enough images of its own to train and test it"
                )
            files += found
            labels += [folder.name] * len(found)
    return files, labels


def load_dataset(data_dirs: DataDirs, spec: PreprocessSpec) -> Dataset:
    """Decode every image of ``data_dirs`` (one folder, or several: :func:`list_training_files`)
    once, keep it resized to ``spec``'s size.

    Raises:
        ValueError: the folder layout is wrong, there are fewer than 2 classes, or a file cannot
            be decoded (the message names it, with the decoder's reason).
    """
    files, labels = list_training_files(data_dirs)
    class_names = tuple(sorted(set(labels)))
    if len(class_names) < 2:
        raise ValueError(
            f"{data_dirs} has {len(class_names)} class folder; a classifier needs >= 2"
        )
    images = np.empty((len(files), spec.height, spec.width, 3), np.uint8)
    originals = np.empty((len(files), 3), np.float64)  # width, height, encoded bytes
    for i, path in enumerate(files):
        data = path.read_bytes()
        try:
            rgb = decode_image(data)
        except InvalidImage as exc:
            raise ValueError(f"cannot train on {path}: {exc}; fix or remove the file") from exc
        originals[i] = rgb.shape[1], rgb.shape[0], len(data)
        images[i] = resize_image(rgb, spec)
    return Dataset(
        files=files,
        y=np.asarray([class_names.index(label) for label in labels], dtype=np.int64),
        class_names=class_names,
        images=images,
        features=image_features(images, originals),
    )


def thumbnail_jpeg(path: Path, max_side_px: int) -> bytes | None:
    """A training image as a JPEG of at most ``max_side_px`` a side (None if OpenCV cannot
    encode it), for the bundle's ``samples/`` and novelty gallery."""
    rgb = decode_image(path.read_bytes())
    scale = min(1.0, max_side_px / max(rgb.shape[:2]))
    thumb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))
    return buf.tobytes() if ok else None
