"""The model bundle's manifest: the contract between the trainer and every worker.

A bundle is a folder::

    MODEL_DIR/
      manifest.json     this schema (JSON), written last by the trainer
      model.onnx        the model (probabilities, and penultimate features); its sha256 is in
                        the manifest
      golden/           a few encoded images whose expected probabilities are in the manifest
      novelty/          training thumbnails the review page shows beside novel inputs
      samples/          a few training thumbnails per class, for the drift report
      history.json, training_curves.png, confusion_matrix.png   (for people)

The manifest holds everything inference needs to reproduce training's input exactly (the
:class:`~shared.preprocess.PreprocessSpec`), the labels, the model's hash, the reference statistics
of the training images and of the model's outputs, the training summary and the parity results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from imgq.shared.calibration import Calibration
from imgq.shared.errors import ManifestError
from imgq.shared.novelty import NoveltyModel
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import ReferenceStats

__all__ = [
    "MANIFEST_VERSION",
    "MANIFEST_FILE",
    "READABLE_VERSIONS",
    "GoldenImage",
    "Manifest",
    "load_manifest",
    "save_manifest",
    "sha256_file",
]

#: Schema version written by this code (2: adds ``calibration``; 3: ``novelty`` and the golden
#: images' novelty); versions in :data:`READABLE_VERSIONS` load, another is an error that says so.
MANIFEST_VERSION = 3
#: Versions this code reads: a version 1 manifest loads with ``calibration`` None, versions 1
#: and 2 with ``novelty`` None (served and judged as before novelty existed).
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_FILE = "manifest.json"


@dataclasses.dataclass(frozen=True)
class GoldenImage:
    """One encoded image of the bundle and the probabilities Keras gave it at export (and its
    novelty, in bundles with a novelty model)."""

    file: str
    probs: tuple[float, ...]
    label: str | None = None
    novelty: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; ``novelty`` only when set, so an older manifest's JSON (and its
        drift id) is what it was."""
        data: dict[str, Any] = {"file": self.file, "probs": list(self.probs), "label": self.label}
        if self.novelty is not None:
            data["novelty"] = self.novelty
        return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything a worker needs to serve a model exactly as it was trained.

    Attributes:
        name: Model name shown in results and metrics.
        model_file: ONNX file name inside the bundle.
        model_sha256: Hex sha256 of ``model_file``; the worker refuses a mismatching file.
        input_name: ONNX input tensor name.
        output_name: ONNX output tensor name (probabilities, softmax applied).
        input_shape: Model input shape with ``None`` for the dynamic batch dimension.
        labels: Class names, index = output position.
        preprocess: The exact preprocessing used in training.
        reference: Reference histograms of image and output features (for drift).
        calibration: Temperature scaling of the probabilities, fitted on held-out images at
            export (for the drift windows' estimated accuracy); None in version 1 bundles.
        novelty: How far an image lies from the training classes in the model's penultimate
            features (a second ONNX output), with its threshold (``shared/novelty.py``); None in
            bundles before version 3, and in bundles whose model has no features output.
        golden: Encoded images with expected probabilities, re-checked by every worker at start.
        training: Training summary (epochs, best epoch, losses, test accuracy, per-class metrics).
        parity: Train/serve parity results measured at export.
        versions: Library versions used for training and export.
        created_at: ISO 8601 UTC time of export.
        version: Schema version.
    """

    name: str
    model_file: str
    model_sha256: str
    input_name: str
    output_name: str
    input_shape: tuple[int | None, ...]
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    reference: ReferenceStats
    golden: tuple[GoldenImage, ...] = ()
    calibration: Calibration | None = None
    novelty: NoveltyModel | None = None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created_at: str = ""
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        problems = []
        if len(self.labels) < 2:
            problems.append(f"labels needs at least 2 classes, got {list(self.labels)!r}")
        if len(set(self.labels)) != len(self.labels):
            problems.append(f"labels must be unique, got {list(self.labels)!r}")
        if len(self.model_sha256) != 64 or not all(
            c in "0123456789abcdef" for c in self.model_sha256
        ):
            problems.append(
                f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}"
            )
        expected = self.preprocess.input_shape
        shape = tuple(self.input_shape)
        if len(shape) != 4 or tuple(shape[1:]) != expected[1:]:
            problems.append(
                f"input_shape {list(shape)} does not match the preprocessing, which makes "
                f"{list(expected)} ({self.preprocess.layout}, {self.preprocess.height}x"
                f"{self.preprocess.width}); re-export the model or fix the preprocess section"
            )
        for g in self.golden:
            if len(g.probs) != len(self.labels):
                problems.append(
                    f"golden image {g.file} has {len(g.probs)} probabilities for "
                    f"{len(self.labels)} labels"
                )
        problems += self._novelty_problems()
        if problems:
            raise ManifestError("invalid manifest: " + "; ".join(problems))

    def _novelty_problems(self) -> list[str]:
        novelty = self.novelty
        if novelty is None:
            return []
        problems = []
        if self.version < 3:
            problems.append(f"novelty needs manifest version 3, this one is {self.version}")
        if novelty.means.shape[0] != len(self.labels):
            problems.append(
                f"novelty has {novelty.means.shape[0]} class means for {len(self.labels)} labels"
            )
        if novelty.output_name in (self.output_name, self.input_name):
            problems.append(f"novelty output {novelty.output_name!r} names another tensor")
        strays = sorted({g.label for g in novelty.gallery} - set(self.labels))
        if strays:
            problems.append(f"novelty gallery labels {strays} are not among the labels")
        return problems

    @property
    def short_sha(self) -> str:
        """First 12 hex digits of the model hash, for log lines."""
        return self.model_sha256[:12]

    @functools.cached_property
    def drift_id(self) -> str:
        """Names the model's drift state in Redis (``imgq:drift:<drift_id>:...``): the first 12
        hex digits of the sha256 of this manifest's canonical JSON. It names the model file's
        hash, the preprocessing, the labels and the reference statistics, so two versions of one
        ONNX file with another preprocessing or reference never share a drift window."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as written to ``manifest.json``."""
        data = {
            "version": self.version,
            "name": self.name,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_shape": list(self.input_shape),
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "reference": self.reference.to_dict(),
            "golden": [g.to_dict() for g in self.golden],
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "training": self.training,
            "parity": self.parity,
            "versions": self.versions,
            "created_at": self.created_at,
        }
        if self.version >= 3:  # an older manifest's JSON, and so its drift id, stay as they were
            data["novelty"] = None if self.novelty is None else self.novelty.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate and build from a parsed ``manifest.json``; errors say what is wrong."""
        if not isinstance(data, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ManifestError(
                f"manifest version {version!r} is not supported by this imgq (reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); re-export the bundle with `imgq "
                "train` of this version"
            )
        required = (
            "name", "model_file", "model_sha256", "input_name", "output_name",
            "input_shape", "labels", "preprocess", "reference",
        )  # fmt: skip
        missing = [k for k in required if k not in data]
        if missing:
            raise ManifestError(
                f"manifest is missing {missing}; it was not written by `imgq train`, "
                "or was edited by hand"
            )
        try:
            return cls(
                version=version,
                name=str(data["name"]),
                model_file=str(data["model_file"]),
                model_sha256=str(data["model_sha256"]),
                input_name=str(data["input_name"]),
                output_name=str(data["output_name"]),
                input_shape=tuple(data["input_shape"]),
                labels=tuple(str(x) for x in data["labels"]),
                preprocess=PreprocessSpec.from_dict(data["preprocess"]),
                reference=ReferenceStats.from_dict(data["reference"]),
                golden=tuple(
                    GoldenImage(
                        file=g["file"],
                        probs=tuple(g["probs"]),
                        label=g.get("label"),
                        novelty=None if g.get("novelty") is None else float(g["novelty"]),
                    )
                    for g in data.get("golden", [])
                ),
                calibration=(
                    Calibration.from_dict(data["calibration"])
                    if data.get("calibration") is not None
                    else None
                ),
                novelty=(
                    NoveltyModel.from_dict(data["novelty"])
                    if data.get("novelty") is not None
                    else None
                ),
                training=dict(data.get("training", {})),
                parity=dict(data.get("parity", {})),
                versions=dict(data.get("versions", {})),
                created_at=str(data.get("created_at", "")),
            )
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError) as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc")
    >>> sha256_file(p)[:16]
    'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``bundle_dir/manifest.json``.

    Raises:
        ManifestError: the file is missing, is not JSON, or fails validation; the message says
            which, and how to fix it.
    """
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"no {MANIFEST_FILE} in {bundle_dir}: point --model at a folder written by "
            "`imgq train --out`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON: {exc}") from exc
    return Manifest.from_dict(data)


def save_manifest(manifest: Manifest, bundle_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename), so a reader never sees half."""
    path = Path(bundle_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n", "utf-8")
    os.replace(tmp, path)
    return path
