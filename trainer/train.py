"""`imgq train`: train a classifier on a folder of images and export a checked model bundle.

Every pixel the model sees comes from ``shared/`` (decode, resize, normalise), the worker's own
code; augmentation works on the decoded uint8 images before that normalisation, so the inference
path stays exactly the one written into the manifest. Early stopping keeps the weights of the
epoch with the lowest validation loss, and a warning says when overfitting began. The export
(:mod:`trainer.export`) then refuses to write a bundle whose served answers differ from Keras'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from imgq.shared.calibration import Calibration, calibrated_top1, fit_temperature
from imgq.shared.errors import ImgqError
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    OUTPUT_FEATURES,
    PIXEL_FEATURES,
    output_features,
)
from imgq.shared.manifest import MANIFEST_FILE
from imgq.shared.preprocess import PreprocessSpec, compute_mean_std, normalise_batch
from imgq.shared.reference import (
    RangeCheck,
    ReferenceStats,
    build_reference,
    leave_one_out_outside,
)
from imgq.trainer.augment import AugmentedBatches, augment_batch
from imgq.trainer.dataset import (
    DataDirs,
    Dataset,
    Split,
    load_dataset,
    stratified_split,
    thumbnail_jpeg,
)
from imgq.trainer.export import FEATURES_NAME, MIN_PARITY_IMAGES, export_bundle, with_features
from imgq.trainer.model import ARCHITECTURES, build_model
from imgq.trainer.novelty import bundle_novelty, describe_novelty
from imgq.trainer.plots import plot_confusion_matrix, plot_training_curves

__all__ = [
    "AugmentedBatches",
    "OverfitWarning",
    "augment_batch",
    "main",
    "overfit_onset",
    "train_bundle",
]

#: Training thumbnails per class written to ``samples/`` for the drift report.
_SAMPLES_PER_CLASS = 4
_THUMBNAIL_PX = 128


def overfit_onset(
    loss: list[float], val_loss: list[float], *, rising_epochs: int = 3, min_rise: float = 0.05
) -> int | None:
    """The 1-based epoch where overfitting began, or None.

    Overfitting here means: for at least ``rising_epochs`` epochs since its minimum, validation
    loss stayed above that minimum and now exceeds it by more than ``min_rise`` (relative),
    while training loss kept falling below its value at that epoch. Three epochs and 5% keep
    the epoch-to-epoch noise of a small validation set from raising the alarm.

    >>> overfit_onset([1.0, 0.8, 0.6, 0.4, 0.3], [1.0, 0.7, 0.8, 0.9, 0.9])
    3
    >>> overfit_onset([1.0, 0.8, 0.6, 0.4, 0.3], [1.0, 0.7, 0.6, 0.5, 0.4]) is None
    True
    """
    best = int(np.argmin(val_loss))
    if len(val_loss) - 1 - best < rising_epochs:
        return None
    if val_loss[-1] > val_loss[best] * (1 + min_rise) and loss[-1] < loss[best]:
        return best + 2
    return None


class OverfitWarning(keras.callbacks.Callback):
    """Warn, once per episode, when validation loss rises while training loss falls.

    Early stopping acts on it later (after ``patience`` epochs); this says when it began, so the
    curves can be read with that in mind. :attr:`onset_epoch` (1-based) is the onset of the
    episode still open at the end, or None when validation loss reached a new best since.

    Args:
        rising_epochs: Epochs of rising validation loss before warning. Defaults to 3.
    """

    def __init__(self, rising_epochs: int = 3) -> None:
        super().__init__()
        self.rising_epochs = rising_epochs
        self.onset_epoch: int | None = None
        self._loss: list[float] = []
        self._val_loss: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = logs or {}
        if "val_loss" not in logs:
            return
        self._loss.append(float(logs["loss"]))
        self._val_loss.append(float(logs["val_loss"]))
        onset = overfit_onset(self._loss, self._val_loss, rising_epochs=self.rising_epochs)
        previous, self.onset_epoch = self.onset_epoch, onset  # None again after a new best
        if onset is None or onset == previous:
            return
        b = onset - 2
        print(
            f"\nWARNING: overfitting since epoch {onset}: validation loss rose "
            f"{self._val_loss[b]:.4f} -> {self._val_loss[-1]:.4f} while training loss fell "
            f"{self._loss[b]:.4f} -> {self._loss[-1]:.4f} (best weights so far: epoch {b + 1})",
            file=sys.stderr,
            flush=True,
        )


def _class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, labels: tuple[str, ...]
) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Confusion matrix (rows true, columns predicted) and precision/recall/support per class."""
    k = len(labels)
    matrix = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    per_class = {}
    for i, label in enumerate(labels):
        predicted, support = matrix[:, i].sum(), matrix[i].sum()
        per_class[label] = {
            "precision": float(matrix[i, i] / predicted) if predicted else 0.0,
            "recall": float(matrix[i, i] / support) if support else 0.0,
            "support": int(support),
        }
    return matrix, per_class


def _reference(data: Dataset, split: Split, held_out_probs: np.ndarray) -> ReferenceStats:
    """Drift reference: image features of the training split; model outputs on the held-out
    images (validation and test: the model is over-confident on what it was trained on, and
    both splits together halve the reference's sampling noise); and how many held-out images
    have a pixel feature outside the training range (the page tier's out-of-range share)."""
    held_out = np.concatenate([split.val, split.test])
    images = build_reference(data.features[split.train], IMAGE_FEATURES)
    outputs = build_reference(
        output_features(held_out_probs),
        OUTPUT_FEATURES,
        categorical={"predicted_class": len(data.class_names)},
    )
    pixels = RangeCheck(images, PIXEL_FEATURES)
    n_pixel = len(PIXEL_FEATURES)
    outside = pixels.count(data.features[held_out][:, :n_pixel])
    # Each training image against the range of the others: a held-out sample too, and three
    # times the validation and test splits, so a window's share is judged against ~1,000
    # images instead of ~300 (Fisher's test pays for a small reference in power).
    outside += leave_one_out_outside(data.features[split.train][:, :n_pixel])
    return ReferenceStats(
        features={**images.features, **outputs.features},
        n_images=images.n_images,
        held_out_out_of_range=(outside, len(held_out) + len(split.train)),
    )


def _calibration(
    val_probs: np.ndarray, y_val: np.ndarray, held_out_probs: np.ndarray
) -> Calibration:
    """Temperature scaling fitted on the validation split, with every held-out image's
    calibrated confidence (the drift detector's estimated-accuracy reference)."""
    fitted = fit_temperature(val_probs, y_val)
    confidence = calibrated_top1(held_out_probs, fitted.temperature)
    return dataclasses.replace(
        fitted, held_out_confidence=tuple(round(float(c), 6) for c in confidence)
    )


def _write_samples(data: Dataset, split: Split, out: Path) -> None:
    """A few training images per class, shrunk, into ``samples/<class>/`` for the drift report."""
    for k, label in enumerate(data.class_names):
        folder = out / "samples" / label
        folder.mkdir(parents=True, exist_ok=True)
        for row in split.train[data.y[split.train] == k][:_SAMPLES_PER_CLASS]:
            path = data.files[row]
            jpeg = thumbnail_jpeg(path, _THUMBNAIL_PX)
            if jpeg is not None:
                (folder / f"{path.stem}.jpg").write_bytes(jpeg)


def _predict(model: keras.Model, data: Dataset, rows: np.ndarray, spec: PreprocessSpec) -> Any:
    """``model``'s outputs for dataset rows, normalised a chunk at a time (a training set at
    224 pixels as one float32 tensor would take gigabytes)."""
    chunks = [
        model.predict(normalise_batch(data.images[rows[i : i + 512]], spec), verbose=0)
        for i in range(0, len(rows), 512)
    ]
    if isinstance(chunks[0], list):
        return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]
    return np.concatenate(chunks)


def _relative(path: Path, roots: list[Path]) -> str:
    """A data file as ``history.json`` names it: inside the first folder relative to it, as
    before; a later folder's file with that folder's path as given."""
    return str(path.relative_to(roots[0]) if path.is_relative_to(roots[0]) else path)


def _parity_rows(split: Split) -> np.ndarray:
    """Held-out rows (validation, test), topped up with training rows to the gate's minimum."""
    held_out = np.concatenate([split.val, split.test])
    extra = max(0, MIN_PARITY_IMAGES - len(held_out))
    return np.concatenate([held_out, split.train[:extra]])


def _check_args(image_size: int, arch: str, epochs: int, patience: int, batch_size: int) -> None:
    problems = []
    if arch not in ARCHITECTURES:
        problems.append(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if not 16 <= image_size <= 1024:
        problems.append(f"image_size must be 16..1024 pixels, got {image_size}")
    if arch == "mobilenetv2" and image_size < 32:
        problems.append(f"mobilenetv2 needs image_size >= 32, got {image_size}")
    for name, value in (("epochs", epochs), ("patience", patience), ("batch_size", batch_size)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if problems:
        raise ValueError("; ".join(problems))


def train_bundle(
    data_dir: DataDirs,
    out_dir: str | Path,
    *,
    image_size: int = 32,
    arch: str = "small",
    epochs: int = 40,
    patience: int = 8,
    batch_size: int = 32,
    val_split: float = 0.15,
    test_split: float = 0.15,
    augment: bool = True,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> Path:
    """Train on ``data_dir`` (one sub-folder per class; or several such folders, classes merged
    by name, the first defining them) and write a checked bundle to ``out_dir``.

    Writes ``model.onnx``, ``manifest.json`` (last), ``golden/``, ``samples/``, ``history.json``,
    ``training_curves.png`` and ``confusion_matrix.png``.

    Args:
        data_dir: Folder with one sub-folder of images per class, or a list of them (the old
            data first, then e.g. labelled drift samples: ``trainer.dataset.list_training_files``).
        out_dir: Bundle folder to write (created; a previous manifest is removed first, so a
            failed run never leaves a loadable, stale bundle).
        image_size: Model input side in pixels. Defaults to 32, enough for `imgq sample-data`
            (accuracy and training time by size in ``docs/benchmarks.md``).
        arch: ``"small"`` or ``"mobilenetv2"``. Defaults to ``"small"``.
        epochs: Most epochs to train. Defaults to 40.
        patience: Epochs without a lower validation loss before stopping. Defaults to 8.
        batch_size: Images per training step. Defaults to 32.
        val_split: Share of each class for validation. Defaults to 0.15.
        test_split: Share of each class for the test. Defaults to 0.15.
        augment: Flip/crop/brightness augmentation of training images. Defaults to True.
        seed: Seed of the split, the weights and the augmentation. Defaults to 0.
        name: Model name. Defaults to the (first) data folder's name.
        progress: Show Keras' progress and print a summary. Defaults to True.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: bad arguments or data (the message says which).
        ParityError: the exported model does not reproduce Keras on the served path.
    """
    _check_args(image_size, arch, epochs, patience, batch_size)
    started = time.perf_counter()
    roots = [Path(d) for d in ([data_dir] if isinstance(data_dir, str | Path) else data_dir)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    say = print if progress else (lambda *a, **k: None)

    base = PreprocessSpec(height=image_size, width=image_size)
    data = load_dataset(roots, base)
    split = stratified_split(data.y, val_split=val_split, test_split=test_split, seed=seed)
    mean, std = compute_mean_std(data.images[split.train], base.scale)
    spec = dataclasses.replace(base, mean=mean, std=std)
    x_val, y_val = normalise_batch(data.images[split.val], spec), data.y[split.val]
    x_test, y_test = normalise_batch(data.images[split.test], spec), data.y[split.test]
    say(
        f"{len(data.files)} images, {len(data.class_names)} classes {list(data.class_names)}: "
        f"train {len(split.train)}, validation {len(split.val)}, test {len(split.test)}; "
        f"{arch} at {image_size}x{image_size}, loaded in {time.perf_counter() - started:.1f} s"
    )

    keras.utils.set_random_seed(seed)
    model = build_model(arch, (image_size, image_size, 3), len(data.class_names))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )
    overfit = OverfitWarning()
    callbacks = [
        stopper,
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=max(1, patience // 2), min_lr=1e-5
        ),
        overfit,
    ]
    batches = AugmentedBatches(
        data.images[split.train], data.y[split.train], spec, batch_size, augment=augment, seed=seed
    )
    verbose = (1 if sys.stdout.isatty() else 2) if progress else 0
    fit_started = time.perf_counter()
    fit = model.fit(
        batches, validation_data=(x_val, y_val), epochs=epochs, callbacks=callbacks,
        verbose=verbose,
    )  # fmt: skip
    fit_s = time.perf_counter() - fit_started
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    epochs_run = len(history["loss"])
    best_epoch = stopper.best_epoch + 1

    both = with_features(model)
    if both is None:  # no dense layer: no features to judge novelty on
        test_probs = model.predict(x_test, batch_size=64, verbose=0)
        val_probs = model.predict(x_val, batch_size=64, verbose=0)
        novelty = None
    else:
        test_probs, test_features = both.predict(x_test, batch_size=64, verbose=0)
        val_probs, val_features = both.predict(x_val, batch_size=64, verbose=0)
        _, train_features = _predict(both, data, split.train, spec)
        novelty = bundle_novelty(
            data,
            split,
            {"train": train_features, "val": val_features, "test": test_features},
            out,
            output_name=FEATURES_NAME,
        )
    matrix, per_class = _class_metrics(y_test, test_probs.argmax(axis=1), data.class_names)
    test_accuracy = float(np.trace(matrix) / matrix.sum())
    curves = plot_training_curves(
        history, out / "training_curves.png", best_epoch=best_epoch,
        overfit_epoch=overfit.onset_epoch,
    )  # fmt: skip
    plot_confusion_matrix(matrix, data.class_names, out / "confusion_matrix.png")
    held_out_probs = np.concatenate([val_probs, test_probs])
    calibration = _calibration(val_probs, y_val, held_out_probs)
    _write_samples(data, split, out)

    training: dict[str, Any] = {
        "arch": arch,
        "image_size": image_size,
        "epochs_max": epochs,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch,
        "stopped_early": epochs_run < epochs,
        "overfit_epoch": overfit.onset_epoch,
        "best_val_loss": history["val_loss"][best_epoch - 1],
        "best_val_accuracy": history["val_accuracy"][best_epoch - 1],
        "test_accuracy": test_accuracy,
        "per_class": per_class,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "augment": augment,
        "batch_size": batch_size,
        "seed": seed,
        "fit_s": round(fit_s, 1),
    }
    relative = [_relative(f, roots) for f in data.files]
    (out / "history.json").write_text(
        json.dumps(
            {
                "history": history,
                "best_epoch": best_epoch,
                "overfit_epoch": overfit.onset_epoch,
                "split": {
                    part: [relative[r] for r in getattr(split, part)]
                    for part in ("train", "val", "test")
                },
            },
            indent=1,
        )
        + "\n",
        "utf-8",
    )
    manifest = export_bundle(
        model,
        out,
        name=name or roots[0].resolve().name,
        spec=spec,
        dataset=data,
        parity_rows=_parity_rows(split),
        reference=_reference(data, split, held_out_probs),
        calibration=calibration,
        novelty=novelty,
        training=training,
    )
    p = manifest.parity
    say(
        f"best epoch {best_epoch} of {epochs_run} (val loss {training['best_val_loss']:.4f}); "
        f"test accuracy {test_accuracy:.4f} on {len(split.test)} images\n"
        + "".join(
            f"  {label:<16} precision {m['precision']:.3f}  recall {m['recall']:.3f}\n"
            for label, m in per_class.items()
        )
        + f"training curves: {curves}\n"
        f"confusion matrix: {out / 'confusion_matrix.png'}\n"
        f"calibration: temperature {calibration.temperature:.3g} (validation NLL "
        f"{calibration.nll_before:.4f} -> {calibration.nll_after:.4f}, ECE "
        f"{calibration.ece_before:.4f} -> {calibration.ece_after:.4f})\n"
        + _calibration_note(calibration)
        + describe_novelty(manifest.novelty)
        + f"parity (Keras vs served ONNX, {p['n_images']} images from their files): top-1 agree "
        f"{p['top1_agree']}/{p['n_images']}, max |diff| {p['max_abs_diff']:.2e} "
        f"(limit {p['atol']:g})"
        + (
            f"; features {p['features_max_rel_diff']:.2e}, novelty "
            f"{p['novelty_max_rel_diff']:.2e} relative"
            if "novelty_max_rel_diff" in p
            else ""
        )
        + "\n"
        f"bundle: {out} (sha256 {manifest.short_sha}), {time.perf_counter() - started:.0f} s in all"
    )
    return out


def _calibration_note(calibration: Calibration) -> str:
    """A warning when drift's estimated accuracy will be a trend rather than a level: few
    validation images, or a calibration that made the validation error worse."""
    before, after = calibration.ece_before, calibration.ece_after
    worse = before is not None and after is not None and after > before
    if calibration.n_images >= 200 and not worse:
        return ""
    return (
        f"  note: calibrated on {calibration.n_images} validation images"
        + (", and the calibration error got worse" if worse else "")
        + ": drift's estimated accuracy is a trend, not a level (docs/drift.md)\n"
    )


def main(args: argparse.Namespace) -> int:
    """`imgq train DATA_DIR [DATA_DIR ...] --out MODEL_DIR [...]`; exit 1 with the reason when
    it fails."""
    try:
        train_bundle(
            args.data_dir, args.out, image_size=args.image_size, arch=args.arch,
            epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
            val_split=args.val_split, test_split=args.test_split, augment=args.augment,
            seed=args.seed, name=args.name,
        )  # fmt: skip
    except (ValueError, ImgqError) as exc:
        print(f"imgq train: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "publish", False):  # for the fleet: `imgq rollout start VERSION` next
        from imgq.worker.commands.models import publish_main

        return publish_main(argparse.Namespace(bundle=args.out, queue=args.queue, stable=False))
    return 0
