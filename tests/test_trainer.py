"""trainer/: split, shared-code tensors, augmentation, early stopping, export, parity gate, and the
bundle it writes (served without TensorFlow, re-checked by `imgq verify`). Real, small training."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from imgq.cli import main as imgq
from imgq.shared.bundle import ModelBundle
from imgq.shared.decode import decode_image
from imgq.shared.errors import ParityError
from imgq.shared.imagestats import IMAGE_FEATURES, OUTPUT_FEATURES
from imgq.shared.manifest import Manifest, load_manifest, sha256_file
from imgq.shared.preprocess import (
    PreprocessSpec,
    compute_mean_std,
    normalise_batch,
    preprocess_batch,
    resize_image,
)
from imgq.shared.reference import build_reference
from imgq.trainer.dataset import Dataset, Split, load_dataset, stratified_split
from imgq.trainer.export import (
    FEATURES_NAME,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    _parity,
    export_bundle,
    export_onnx,
    with_features,
)
from imgq.trainer.model import build_model
from imgq.trainer.novelty import fit_novelty
from imgq.trainer.sample_data import generate
from imgq.trainer.train import (
    AugmentedBatches,
    OverfitWarning,
    augment_batch,
    overfit_onset,
    train_bundle,
)

REPO = Path(__file__).resolve().parents[1]


def test_split_is_stratified_and_reproducible() -> None:
    """Each class keeps its share in every part; the same seed gives the same split."""
    y = np.repeat([0, 1, 2], [40, 20, 60])
    a = stratified_split(y, val_split=0.15, test_split=0.15, seed=3)
    b = stratified_split(y, val_split=0.15, test_split=0.15, seed=3)
    c = stratified_split(y, val_split=0.15, test_split=0.15, seed=4)
    assert all(np.array_equal(getattr(a, p), getattr(b, p)) for p in ("train", "val", "test"))
    assert not np.array_equal(a.val, c.val)
    assert sorted(np.concatenate([a.train, a.val, a.test]).tolist()) == list(range(len(y)))
    assert np.bincount(y[a.test]).tolist() == [6, 3, 9]
    assert np.bincount(y[a.val]).tolist() == [6, 3, 9]


@pytest.mark.parametrize(
    ("y", "val", "test", "message"),
    [
        (np.repeat([0, 1], 10), 0.0, 0.2, "must each be in"),
        (np.repeat([0, 1], 10), 0.5, 0.5, "sum below 1"),
        (np.array([0, 0, 1, 1, 1]), 0.2, 0.2, "class 0 has only 2 images"),
    ],
)
def test_split_refuses_impossible_parts(
    y: np.ndarray, val: float, test: float, message: str
) -> None:
    """Splits that leave a part empty are refused with what to change."""
    with pytest.raises(ValueError, match=message):
        stratified_split(y, val_split=val, test_split=test, seed=0)


def test_trainer_tensors_equal_worker_tensors(sample_data_dir: Path) -> None:
    """A file's training tensor is byte-identical to preprocess_batch([decode_image(bytes)])."""
    spec = PreprocessSpec(height=40, width=40, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    data = load_dataset(sample_data_dir, spec)
    rows = [0, 1, len(data.files) // 2, len(data.files) - 1]
    assert {data.files[r].suffix for r in range(len(data.files))} == {".jpg", ".png"}
    for row in rows:
        trainer = normalise_batch(data.images[row : row + 1], spec)
        worker = preprocess_batch([decode_image(data.files[row].read_bytes())], spec)
        assert trainer.tobytes() == worker.tobytes(), data.files[row]


def test_augmentation_works_on_uint8_and_is_seeded() -> None:
    """Augmentation keeps uint8 and shape, changes pixels, and repeats for the same seed."""
    images = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    a = augment_batch(images, np.random.default_rng(1))
    b = augment_batch(images, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert np.array_equal(a, b) and not np.array_equal(a, images)


def test_batches_without_augmentation_are_the_shared_normalisation() -> None:
    """With augment=False a training batch is exactly normalise_batch of the stored images."""
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    spec = PreprocessSpec(height=8, width=8, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    batches = AugmentedBatches(images, np.arange(10), spec, 4, augment=False)
    x, y = batches[0]
    assert len(batches) == 3
    assert x.tobytes() == normalise_batch(images[y], spec).tobytes()


def test_overfit_onset() -> None:
    """Onset is the epoch after the best validation loss once it rose while training loss fell."""
    assert overfit_onset([1.0, 0.8, 0.6, 0.5, 0.4], [0.9, 0.6, 0.65, 0.7, 0.8]) == 3
    assert overfit_onset([1.0, 0.8, 0.6, 0.5], [0.9, 0.6, 0.65, 0.7]) is None  # only 2 epochs
    assert overfit_onset([1.0, 0.8, 0.6, 0.5], [0.9, 0.6, 0.65, 0.7], rising_epochs=2) == 3
    assert overfit_onset([1.0, 0.8, 0.9, 1.0, 1.1], [0.9, 0.6, 0.65, 0.7, 0.8]) is None  # both
    assert overfit_onset([1.0, 0.8, 0.6, 0.5, 0.4], [0.9, 0.6, 0.61, 0.62, 0.62]) is None  # <5%


def test_overfit_warning_names_the_epoch_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The callback warns once, with the onset epoch, and clears the onset after a new best."""
    callback = OverfitWarning()
    losses = [(1.0, 0.9), (0.8, 0.6), (0.7, 0.7), (0.6, 0.75), (0.5, 0.8), (0.4, 0.85)]
    for epoch, (loss, val_loss) in enumerate(losses):
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss})
    err = capsys.readouterr().err
    assert err.count("WARNING: overfitting since epoch 3") == 1 and "0.6000 -> 0.8" in err
    assert callback.onset_epoch == 3
    callback.on_epoch_end(6, {"loss": 0.3, "val_loss": 0.5})
    assert callback.onset_epoch is None


def test_trained_bundle_contents(trained_bundle: Path) -> None:
    """The bundle has the model, golden set, samples, curves, and a manifest with the results."""
    m = load_manifest(trained_bundle)
    for name in ("model.onnx", "history.json", "training_curves.png", "confusion_matrix.png"):
        assert (trained_bundle / name).stat().st_size > 0, name
    assert len(m.golden) == 8 and {g.label for g in m.golden} == set(m.labels)
    assert all((trained_bundle / g.file).is_file() for g in m.golden)
    assert sorted(p.name for p in (trained_bundle / "samples").iterdir()) == sorted(m.labels)
    assert m.parity["n_images"] >= 64 and m.parity["max_abs_diff"] <= 1e-4
    assert m.parity["top1_agree"] == m.parity["n_images"]
    assert set(m.reference.features) == set(IMAGE_FEATURES) | set(OUTPUT_FEATURES)
    t = m.training
    assert 1 <= t["best_epoch"] <= t["epochs_run"] <= t["epochs_max"]
    assert set(t["per_class"]) == set(m.labels) and 0 <= t["test_accuracy"] <= 1
    history = json.loads((trained_bundle / "history.json").read_text())
    assert len(history["split"]["train"]) == t["n_train"]
    assert len(history["history"]["val_loss"]) == t["epochs_run"]
    # Drift: the output reference is every held-out image (validation and test), and so is the
    # calibration's list of confidences; the out-of-range count adds leave-one-out training.
    held_out = t["n_val"] + t["n_test"]
    assert sum(m.reference.features["confidence"].counts) == held_out
    assert m.reference.held_out_out_of_range is not None
    assert m.reference.held_out_out_of_range[1] == held_out + t["n_train"]
    assert m.calibration is not None and m.calibration.n_images == t["n_val"]
    assert len(m.calibration.held_out_confidence) == held_out
    before, after = m.calibration.nll_before, m.calibration.nll_after
    assert before is not None and after is not None and after <= before + 1e-9


def test_trained_bundle_judges_novelty_in_its_features(
    trained_bundle: Path, sample_data_dir: Path
) -> None:
    """Issue 26: the model's second output is its penultimate features (the small CNN's 192),
    the manifest's novelty model scores them with its threshold set on the held-out images,
    the parity gate compared features and novelty, each golden image records its novelty, and
    the gallery holds training images of every class."""
    m = load_manifest(trained_bundle)
    novelty = m.novelty
    assert m.version == 3 and novelty is not None and novelty.n_features == 192
    held_out = m.training["n_val"] + m.training["n_test"]
    assert novelty.held_out_novel == (3, held_out)  # at least 3 above it: a small split
    assert m.parity["features_max_rel_diff"] <= 1e-3 and m.parity["novelty_max_rel_diff"] <= 1e-3
    assert all(g.novelty is not None for g in m.golden)
    assert {g.label for g in novelty.gallery} == set(m.labels)
    assert all((trained_bundle / g.file).is_file() for g in novelty.gallery)
    bundle = ModelBundle.load(trained_bundle, device="cpu")
    assert bundle.check_golden()["novelty_max_rel_diff"] <= 1e-3
    history = json.loads((trained_bundle / "history.json").read_text())
    files = [sample_data_dir / f for f in history["split"]["val"] + history["split"]["test"]]
    _, features = bundle.features_of_images([decode_image(f.read_bytes()) for f in files])
    # The reference share, served (the threshold's own image may land either side of it).
    assert int((novelty.score(features)[0] > 1.0).sum()) in (3, 4)


def test_calibration_fits_the_validation_accuracy(trained_bundle: Path) -> None:
    """Temperature scaling at export: on the validation images it was fitted on, the mean
    calibrated confidence is near the model's accuracy (CBPE's premise). This fixture has 36
    validation images, whose accuracy alone has a sampling error of ~2.5 points, so within 6;
    bench/drift.py measures it on 600 held-out images (docs/benchmarks.md)."""
    m = load_manifest(trained_bundle)
    assert m.calibration is not None
    n_val = m.training["n_val"]
    estimated = float(np.mean(m.calibration.held_out_confidence[:n_val]))
    assert abs(estimated - m.training["best_val_accuracy"]) <= 0.06


def test_normalisation_statistics_are_from_training_split(
    trained_bundle: Path, sample_data_dir: Path
) -> None:
    """The manifest's mean/std equal compute_mean_std over the training split's resized images."""
    m = load_manifest(trained_bundle)
    train_files = json.loads((trained_bundle / "history.json").read_text())["split"]["train"]
    spec = m.preprocess
    images = [
        resize_image(decode_image((sample_data_dir / f).read_bytes()), spec) for f in train_files
    ]
    mean, std = compute_mean_std(images, spec.scale)
    np.testing.assert_allclose(spec.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(spec.std, std, rtol=1e-12)


_NO_TF_SCRIPT = """
import json, sys
for name in ("tensorflow", "keras", "tf2onnx"):
    sys.modules[name] = None  # any import of them now raises ImportError
from imgq.shared.decode import decode_image
from imgq.shared.bundle import ModelBundle
bundle = ModelBundle.load(sys.argv[1], device="cpu")
files = sys.argv[2:]
probs = bundle.classify_images([decode_image(open(f, "rb").read()) for f in files])
print(json.dumps({"probs": probs.tolist(), "golden": bundle.check_golden()["n"]}))
"""


def test_bundle_serves_in_a_process_without_tensorflow(
    trained_bundle: Path, sample_data_dir: Path
) -> None:
    """The bundle loads where TensorFlow cannot be imported and predicts as Keras and ONNX do."""
    m = load_manifest(trained_bundle)
    files = [trained_bundle / g.file for g in m.golden] + sorted(sample_data_dir.rglob("*_000*"))
    result = subprocess.run(
        [sys.executable, "-c", _NO_TF_SCRIPT, str(trained_bundle), *map(str, files)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    probs = np.asarray(out["probs"], np.float32)
    keras_golden = np.asarray([g.probs for g in m.golden], np.float32)
    np.testing.assert_allclose(probs[: len(m.golden)], keras_golden, atol=1e-4)
    here = ModelBundle.load(trained_bundle, device="cpu", check_golden=False)
    expected = here.classify_images([decode_image(f.read_bytes()) for f in files])
    np.testing.assert_array_equal(probs, expected)
    assert out["golden"] == len(m.golden)


def test_verify_passes_and_catches_tampering(
    trained_bundle: Path, sample_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`imgq verify` passes on the bundle and fails on a changed model or golden probability."""
    assert imgq(["verify", str(trained_bundle), str(sample_data_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "golden set: 8 images, top-1 agree 8/8" in out and "accuracy on" in out

    model = shutil.copytree(trained_bundle, tmp_path / "model")
    (model / "model.onnx").write_bytes((model / "model.onnx").read_bytes() + b" ")
    assert imgq(["verify", str(model), "--device", "cpu"]) == 1
    assert "sha256" in capsys.readouterr().out

    golden = shutil.copytree(trained_bundle, tmp_path / "golden")
    data = json.loads((golden / "manifest.json").read_text())
    data["golden"][2]["probs"] = np.roll(data["golden"][2]["probs"], 1).tolist()
    (golden / "manifest.json").write_text(json.dumps(data))
    assert imgq(["verify", str(golden), "--device", "cpu"]) == 1
    assert data["golden"][2]["file"] in capsys.readouterr().out


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    """On a tiny, easily overfit set training stops early, and the saved ONNX model's validation
    loss is the best epoch's, not the last one's (restore_best_weights)."""
    data_dir = generate(tmp_path / "data", classes=2, per_class=16, size=48, seed=3)
    out = train_bundle(
        data_dir, tmp_path / "model", image_size=32, epochs=40, patience=2, augment=False,
        val_split=0.25, test_split=0.25, progress=False,
    )  # fmt: skip
    m = load_manifest(out)
    history = json.loads((out / "history.json").read_text())
    val_loss = history["history"]["val_loss"]
    assert m.training["stopped_early"] and len(val_loss) < 40
    assert m.training["best_epoch"] == len(val_loss) - 2  # patience 2 after the best
    bundle = ModelBundle.load(out, device="cpu")
    files = [data_dir / f for f in history["split"]["val"]]
    probs = bundle.classify_images([decode_image(f.read_bytes()) for f in files])
    y = np.array([m.labels.index(f.parent.name) for f in files])
    saved_loss = float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1 - 1e-7))))
    assert saved_loss == pytest.approx(val_loss[m.training["best_epoch"] - 1], abs=1e-4)
    assert abs(saved_loss - val_loss[-1]) > 1e-4


@pytest.fixture(scope="module")
def quick_model(sample_data_dir: Path) -> tuple[keras.Model, Dataset, Split, PreprocessSpec]:
    """A small CNN trained for two epochs (enough for non-uniform outputs) and its data."""
    base = PreprocessSpec(height=32, width=32)
    data = load_dataset(sample_data_dir, base)
    split = stratified_split(data.y, val_split=0.15, test_split=0.15, seed=0)
    mean, std = compute_mean_std(data.images[split.train], base.scale)
    spec = dataclasses.replace(base, mean=mean, std=std)
    keras.utils.set_random_seed(0)
    model = build_model("small", (32, 32, 3), len(data.class_names))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(normalise_batch(data.images[split.train], spec), data.y[split.train], epochs=2,
              verbose=0)  # fmt: skip
    return model, data, split, spec


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"color_order": "BGR"}, "color_order: trained 'RGB', served 'BGR'"),
        # (Another mean/std is not among these: the small CNN standardises each image in its
        # first layer, so it is, by design, blind to a per-channel affine change.)
        ({"resize_mode": "center_crop"}, "resize_mode: trained 'stretch', served 'center_crop'"),
        ({"interpolation": "nearest"}, "interpolation: trained 'area', served 'nearest'"),
    ],
)
def test_parity_gate_catches_wrong_serving_preprocessing(
    quick_model: tuple[keras.Model, Dataset, Split, PreprocessSpec],
    tmp_path: Path,
    change: dict[str, object],
    message: str,
) -> None:
    """A served preprocessing other than training's fails the export, naming the field, and no
    manifest is written."""
    model, data, split, spec = quick_model
    with pytest.raises(ParityError, match=message) as info:
        export_bundle(
            model, tmp_path, name="wrong", spec=spec, dataset=data,
            parity_rows=np.concatenate([split.val, split.test, split.train[:10]]),
            reference=build_reference(data.features, IMAGE_FEATURES), training={},
            serving_spec=dataclasses.replace(spec, **change),  # type: ignore[arg-type]
        )  # fmt: skip
    assert "images differ" in str(info.value) and "Worst:" in str(info.value)
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.slow
def test_parity_gate_compares_the_features(
    quick_model: tuple[keras.Model, Dataset, Split, PreprocessSpec], tmp_path: Path
) -> None:
    """Served features that differ from Keras' (the ONNX graph's features output shifted by 0.01)
    fail the parity gate, naming features and novelty, though every probability agrees."""
    model, data, split, spec = quick_model
    path = export_onnx(model, spec, tmp_path / MODEL_FILE)
    proto = onnx.load(str(path))
    producer = next(n for n in proto.graph.node if FEATURES_NAME in n.output)
    producer.output[list(producer.output).index(FEATURES_NAME)] = "features_exact"
    shift = onnx.numpy_helper.from_array(np.array(0.01, np.float32), "shift")
    proto.graph.initializer.append(shift)
    add = onnx.helper.make_node("Add", ["features_exact", "shift"], [FEATURES_NAME])
    proto.graph.node.append(add)
    onnx.save(proto, str(path))
    both = with_features(model)
    assert both is not None
    rows = np.concatenate([split.val, split.test])
    _, train = both.predict(normalise_batch(data.images[split.train], spec), verbose=0)
    _, held = both.predict(normalise_batch(data.images[rows], spec), verbose=0)
    novelty = fit_novelty(train, data.y[split.train], held, len(data.class_names),
                          output_name=FEATURES_NAME)  # fmt: skip
    manifest = Manifest(
        name="shifted", model_file=MODEL_FILE, model_sha256=sha256_file(path),
        input_name=INPUT_NAME, output_name=OUTPUT_NAME, input_shape=spec.input_shape,
        labels=data.class_names, preprocess=spec, novelty=novelty,
        reference=build_reference(data.features, IMAGE_FEATURES),
    )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = ModelBundle(tmp_path, manifest, session)
    files = [data.files[r] for r in rows]
    with pytest.raises(ParityError, match=r"features [0-9.e-]+, novelty") as info:
        _parity(model, served, files, normalise_batch(data.images[rows], spec), spec)
    assert f"top-1 agrees on {len(files)}" in str(info.value)


def test_a_weak_calibration_is_named_at_export() -> None:
    """Few validation images, or a calibration that made the error worse: `imgq train` says
    drift's estimated accuracy is a trend there, not a level; a sound one says nothing."""
    from imgq.shared.calibration import Calibration
    from imgq.trainer.train import _calibration_note

    sound = Calibration(temperature=1.2, n_images=600, nll_before=0.3, ece_before=0.05,
                        ece_after=0.02)  # fmt: skip
    assert _calibration_note(sound) == ""
    few = Calibration(temperature=1.2, n_images=88, nll_before=0.3, ece_before=0.05,
                      ece_after=0.02)  # fmt: skip
    assert "calibrated on 88 validation images: drift's" in _calibration_note(few)
    worse = Calibration(temperature=1.2, n_images=600, nll_before=0.3, ece_before=0.07,
                        ece_after=0.12)  # fmt: skip
    assert "the calibration error got worse" in _calibration_note(worse)
