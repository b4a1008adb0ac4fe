"""shared.manifest: the manifest round-trips, and each invalid manifest says what is wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgq.shared.calibration import Calibration
from imgq.shared.errors import ManifestError
from imgq.shared.imagestats import IMAGE_FEATURES
from imgq.shared.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    GoldenImage,
    Manifest,
    load_manifest,
    save_manifest,
    sha256_file,
)
from imgq.shared.preprocess import PreprocessSpec
from imgq.shared.reference import build_reference

SHA = "ab" * 32


def _manifest(**changes: Any) -> Manifest:
    values = np.random.default_rng(0).random((50, len(IMAGE_FEATURES)))
    fields: dict[str, Any] = dict(
        name="demo",
        model_file="model.onnx",
        model_sha256=SHA,
        input_name="input",
        output_name="probs",
        input_shape=(None, 3, 32, 32),
        labels=("cat", "dog", "owl"),
        preprocess=PreprocessSpec(
            height=32,
            width=32,
            layout="NCHW",
            mean=(0.4, 0.5, 0.6),
            std=(0.2, 0.25, 0.3),
            resize_mode="center_crop",
        ),  # fmt: skip
        reference=build_reference(values, IMAGE_FEATURES),
        golden=(GoldenImage("golden/0.png", (0.1, 0.7, 0.2), "dog"),),
        training={"best_epoch": 3, "test_accuracy": 0.97},
        parity={"max_abs_diff": 1e-6, "top1_mismatches": 0},
        versions={"numpy": np.__version__},
        created_at="2025-01-01T00:00:00Z",
    )
    fields.update(changes)
    return Manifest(**fields)


def _saved_dict(tmp_path: Path) -> dict[str, Any]:
    save_manifest(_manifest(), tmp_path)
    data: dict[str, Any] = json.loads((tmp_path / MANIFEST_FILE).read_text())
    return data


def _write(tmp_path: Path, data: dict[str, Any]) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))


def test_manifest_round_trips_through_json(tmp_path: Path) -> None:
    """save_manifest then load_manifest gives an equal manifest, reference and spec included."""
    manifest = _manifest()
    path = save_manifest(manifest, tmp_path)
    assert path == tmp_path / MANIFEST_FILE
    assert not list(tmp_path.glob("*.tmp"))
    json.loads(path.read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity tokens
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.version == MANIFEST_VERSION and loaded.short_sha == SHA[:12]


def test_drift_id_names_the_model_with_its_contract(tmp_path: Path) -> None:
    """The same manifest read back has the same drift id; the same model file with another
    preprocessing or other labels has another one (its own drift windows)."""
    manifest = _manifest()
    save_manifest(manifest, tmp_path)
    assert load_manifest(tmp_path).drift_id == manifest.drift_id
    assert len(manifest.drift_id) == 12 and manifest.drift_id != manifest.short_sha
    other_spec = _manifest(preprocess=dataclasses.replace(manifest.preprocess, mean=(0.5,) * 3))
    other_labels = _manifest(labels=("cat", "dog", "emu"))
    ids = {manifest.drift_id, other_spec.drift_id, other_labels.drift_id}
    assert len(ids) == 3 and other_spec.short_sha == manifest.short_sha


def test_calibration_round_trips_and_a_version_1_manifest_has_none(tmp_path: Path) -> None:
    """Version 2 stores the temperature scaling fitted at export (NaN figures as null);
    a version 1 manifest, written before it, still loads, with calibration None (drift then
    reports no estimated accuracy)."""
    calibration = Calibration(
        temperature=1.7, n_images=36, nll_before=0.4, held_out_confidence=(0.9, 0.55)
    )
    save_manifest(_manifest(calibration=calibration), tmp_path)
    data = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert data["version"] >= 2 and data["calibration"]["method"] == "temperature"
    assert data["calibration"]["ece_after"] is None
    assert load_manifest(tmp_path).calibration == calibration
    del data["calibration"]
    _write(tmp_path, data | {"version": 1})
    old = load_manifest(tmp_path)
    assert old.version == 1 and old.calibration is None
    _write(tmp_path, data | {"calibration": {"temperature": 99.0, "n_images": 3}})
    with pytest.raises(ManifestError, match="temperature must be in"):
        load_manifest(tmp_path)


def test_wrong_version_is_refused(tmp_path: Path) -> None:
    """Another schema version is refused with the fix: re-export."""
    _write(tmp_path, _saved_dict(tmp_path) | {"version": 99})
    with pytest.raises(ManifestError, match=r"manifest version 99 is not supported .* re-export"):
        load_manifest(tmp_path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    """A missing required key is named in the error."""
    data = _saved_dict(tmp_path)
    del data["labels"]
    _write(tmp_path, data)
    with pytest.raises(ManifestError, match=r"manifest is missing \['labels'\]"):
        load_manifest(tmp_path)


def test_shape_mismatch_is_explained(tmp_path: Path) -> None:
    """An input shape that disagrees with the preprocessing says both shapes."""
    _write(tmp_path, _saved_dict(tmp_path) | {"input_shape": [None, 32, 32, 3]})
    with pytest.raises(ManifestError, match=r"input_shape \[None, 32, 32, 3\] does not match the "
                       r"preprocessing, which makes \[None, 3, 32, 32\]"):  # fmt: skip
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"labels": ["only"]}, "labels needs at least 2 classes"),
        ({"labels": ["a", "a", "b"]}, "labels must be unique"),
        ({"model_sha256": "XYZ"}, "model_sha256 must be 64 lowercase hex digits"),
        ({"preprocess": {"height": 32, "width": 32, "colour": "RGB"}}, "unknown preprocess keys"),
        ({"preprocess": {"height": 2, "width": 32}}, "height must be an integer in 8..4096"),
        ({"reference": {"n_images": 1, "features": {"x": {"name": "x"}}}}, "invalid manifest"),
        ({"golden": [{"file": "g.png", "probs": [1.0]}]}, "golden image g.png has 1 probabilities"),
    ],
)
def test_invalid_fields_are_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    """Each invalid field raises ManifestError naming the problem."""
    _write(tmp_path, _saved_dict(tmp_path) | change)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    """No manifest, or one that is not JSON, is a ManifestError that says so."""
    with pytest.raises(ManifestError, match="no manifest.json in .*`imgq train --out`"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="is not readable JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(ManifestError, match="must be a JSON object, got list"):
        load_manifest(tmp_path)


def test_sha256_file(tmp_path: Path) -> None:
    """sha256_file hashes the whole file, across read chunks."""
    data = bytes(range(256)) * 9000
    (tmp_path / "m.onnx").write_bytes(data)
    assert sha256_file(tmp_path / "m.onnx") == hashlib.sha256(data).hexdigest()
