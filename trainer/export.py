"""Export a trained Keras model as a bundle: ONNX, parity gate, golden set, manifest (written last).

The model has two outputs from one forward pass: the probabilities and the penultimate
features (the input of the last dense layer), which the manifest's novelty model scores.

The parity gate is the proof the bundle exists for: held-out images go from their *files* through
(a) Keras on the trainer's tensors and (b) onnxruntime on the tensors the worker's code path makes
(:class:`worker.bundle.ModelBundle`: ``shared/`` decode, then ``preprocess_batch`` with the
manifest's spec). Any top-1 difference, any probability apart by more than :data:`PARITY_ATOL`,
any feature by more than :data:`FEATURES_RTOL` or any novelty by more than
:data:`~shared.bundle.NOVELTY_RTOL` (relative) fails the export with
:class:`~shared.errors.ParityError`, and no manifest is written, so no worker can load the bundle.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
import tf2onnx

from imgq.shared.bundle import NOVELTY_RTOL, ModelBundle
from imgq.shared.calibration import Calibration
from imgq.shared.decode import decode_image
from imgq.shared.errors import ParityError
from imgq.shared.manifest import GoldenImage, Manifest, load_manifest, save_manifest, sha256_file
from imgq.shared.novelty import NoveltyModel
from imgq.shared.preprocess import PreprocessSpec, normalise_batch
from imgq.shared.reference import ReferenceStats
from imgq.trainer.dataset import Dataset

__all__ = [
    "FEATURES_NAME",
    "FEATURES_RTOL",
    "INPUT_NAME",
    "MIN_PARITY_IMAGES",
    "MODEL_FILE",
    "N_GOLDEN",
    "OPSET",
    "OUTPUT_NAME",
    "PARITY_ATOL",
    "export_bundle",
    "export_onnx",
    "with_features",
]

#: ONNX opset, pinned so a bundle does not change with the tf2onnx default.
OPSET = 17
MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
#: The second output: the penultimate features (what novelty is judged on).
FEATURES_NAME = "features"
#: Largest allowed |p_keras - p_onnx| of any class probability of any parity image.
PARITY_ATOL = 1e-4
#: Largest allowed |f_keras - f_onnx| / (1 + |f_keras|) of any feature of any parity image.
FEATURES_RTOL = 1e-3
#: The parity gate runs on at least this many images (held-out first, then training images).
MIN_PARITY_IMAGES = 64
#: Encoded images copied into ``golden/`` with the probabilities Keras gave them.
N_GOLDEN = 8


def with_features(model: keras.Model) -> keras.Model | None:
    """``model`` with two outputs, its probabilities and its penultimate features (the input of
    its last dense layer), or None when it has no dense layer."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        return None
    return keras.Model(model.inputs, [model.outputs[0], dense[-1].input])


def export_onnx(
    model: keras.Model,
    spec: PreprocessSpec,
    path: Path,
    *,
    opset: int = OPSET,
    features: bool = True,
) -> Path:
    """Convert ``model`` to ONNX with a dynamic batch dimension, the softmax output and (with
    ``features``) the penultimate features as a second output of the same graph.

    Uses ``tf2onnx.convert.from_function`` on a ``tf.function`` with an explicit input signature:
    ``from_keras`` fails on ``Sequential`` models with Keras 3 (``KeyError: 'keras_tensor_…'``)
    and leaves the model unusable for a second attempt; ``from_function`` works for functional,
    subclassed and MobileNetV2 models alike.

    Args:
        model: A Keras model taking NHWC float32 and returning probabilities.
        spec: The preprocessing; fixes the input's height and width.
        path: ONNX file to write (atomically).
        opset: ONNX opset. Defaults to :data:`OPSET`.
        features: Add the :data:`FEATURES_NAME` output (:func:`with_features`). Defaults to
            True; a model without a dense layer gets none.
    """
    if spec.layout != "NHWC":
        raise ValueError(f"the trainer exports NHWC models, the spec says {spec.layout}")
    signature = [tf.TensorSpec(spec.input_shape, tf.float32, name=INPUT_NAME)]
    both = with_features(model) if features else None

    @tf.function(input_signature=signature)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        if both is None:
            return {OUTPUT_NAME: model(image, training=False)}
        probs, penultimate = both(image, training=False)
        return {OUTPUT_NAME: probs, FEATURES_NAME: penultimate}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"  # tf2onnx names it "unk__N"
    onnx.checker.check_model(proto)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def _spec_differences(trained: PreprocessSpec, served: PreprocessSpec) -> list[str]:
    """``"color_order: trained 'RGB', served 'BGR'"`` for every field that differs."""
    a, b = dataclasses.asdict(trained), dataclasses.asdict(served)
    return [f"{k}: trained {a[k]!r}, served {b[k]!r}" for k in a if a[k] != b[k]]


def _parity(
    model: keras.Model,
    bundle: ModelBundle,
    files: list[Path],
    tensors: np.ndarray,
    trained_spec: PreprocessSpec,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Keras on the trainer's tensors vs the served path on the files, probabilities and (with
    a novelty model) features and novelty; raise on a mismatch.

    Returns:
        Keras' probabilities, Keras' novelty of each image (None without a novelty model), and
        the figures for the manifest.
    """
    decoded = [decode_image(f.read_bytes()) for f in files]
    novelty = bundle.manifest.novelty
    n = len(files)
    feature_diff, novelty_diff = np.zeros(n), np.zeros(n)
    keras_novelty = None
    both = with_features(model) if novelty is not None else None
    if novelty is None or both is None:
        keras_probs = model.predict(tensors, batch_size=64, verbose=0).astype(np.float32)
        served = bundle.classify_images(decoded)
    else:
        keras_probs, keras_features = both.predict(tensors, batch_size=64, verbose=0)
        keras_probs = keras_probs.astype(np.float32)
        served, served_features = bundle.features_of_images(decoded)
        feature_diff = (
            np.abs(keras_features - served_features) / (1.0 + np.abs(keras_features))
        ).max(axis=1)
        keras_novelty = novelty.score(keras_features)[0]
        served_novelty = novelty.score(served_features)[0]
        novelty_diff = np.abs(keras_novelty - served_novelty) / np.maximum(
            1.0, np.abs(keras_novelty)
        )
    diff = np.abs(keras_probs - served).max(axis=1)
    differ = np.flatnonzero(
        (keras_probs.argmax(axis=1) != served.argmax(axis=1))
        | (diff > PARITY_ATOL)
        | ~(feature_diff <= FEATURES_RTOL)
        | ~(novelty_diff <= NOVELTY_RTOL)
    )
    figures: dict[str, Any] = {
        "n_images": n,
        "max_abs_diff": float(diff.max()),
        "top1_agree": int((keras_probs.argmax(axis=1) == served.argmax(axis=1)).sum()),
        "atol": PARITY_ATOL,
        "provider": bundle.provider,
        "opset": OPSET,
    }
    if keras_novelty is not None:
        figures |= {
            "features_max_rel_diff": float(feature_diff.max()),
            "features_rtol": FEATURES_RTOL,
            "novelty_max_rel_diff": float(novelty_diff.max()),
            "novelty_rtol": NOVELTY_RTOL,
        }
    if len(differ):
        labels = bundle.manifest.labels
        worst = differ[np.argsort(-(diff + feature_diff + novelty_diff)[differ])][:5]
        examples = "; ".join(
            f"{files[i].name}: keras {labels[int(keras_probs[i].argmax())]} "
            f"{keras_probs[i].max():.4f}, served {labels[int(served[i].argmax())]} "
            f"{served[i].max():.4f} (|diff| {diff[i]:.2e}, features {feature_diff[i]:.2e}, "
            f"novelty {novelty_diff[i]:.2e})"
            for i in worst
        )
        changes = _spec_differences(trained_spec, bundle.manifest.preprocess)
        cause = (
            "the served preprocessing differs from training's in " + ", ".join(changes)
            if changes
            else "the preprocessing specs are identical, so the ONNX conversion "
            f"(tf2onnx opset {OPSET}) does not reproduce the Keras model"
        )
        raise ParityError(
            f"parity gate failed: {len(differ)} of {n} images differ (top-1 agrees on "
            f"{figures['top1_agree']}, max |p_keras - p_served| {figures['max_abs_diff']:.2e}, "
            f"limits: probabilities {PARITY_ATOL:g}, features {FEATURES_RTOL:g} and novelty "
            f"{NOVELTY_RTOL:g} relative); {cause}. Worst: {examples}. No manifest was written."
        )
    return keras_probs, keras_novelty, figures


def _golden_rows(y: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` positions taking classes in turn, so every class is in the golden set.

    >>> _golden_rows(np.array([0, 0, 0, 1, 1, 2]), 4)
    [0, 3, 5, 1]
    """
    queues = [list(np.flatnonzero(y == k)) for k in np.unique(y)]
    rows: list[int] = []
    while len(rows) < min(n, len(y)):
        for q in queues:
            if q and len(rows) < n:
                rows.append(int(q.pop(0)))
    return rows


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }


def export_bundle(
    model: keras.Model,
    out_dir: Path,
    *,
    name: str,
    spec: PreprocessSpec,
    dataset: Dataset,
    parity_rows: np.ndarray,
    reference: ReferenceStats,
    training: dict[str, Any],
    calibration: Calibration | None = None,
    novelty: NoveltyModel | None = None,
    serving_spec: PreprocessSpec | None = None,
) -> Manifest:
    """Write ``model.onnx``, pass the parity gate, write ``golden/`` and then ``manifest.json``.

    Args:
        model: The trained Keras model (best weights).
        out_dir: The bundle folder (exists).
        name: Model name for the manifest.
        spec: The preprocessing the model was trained with; goes into the manifest.
        dataset: The loaded data (files, labels, resized images).
        parity_rows: Rows of ``dataset`` for the parity gate; held-out images first. The golden
            set is taken from them.
        reference: Reference statistics for drift detection.
        training: Training summary for the manifest.
        calibration: Temperature scaling fitted on the validation split (drift's estimated
            accuracy). Defaults to None (no estimate).
        novelty: The novelty model of the penultimate features (``trainer/novelty.py``), its
            gallery's files already in ``out_dir``. Defaults to None: no features output, and
            drift judged without novelty.
        serving_spec: Preprocessing of the served side of the parity gate. Defaults to ``spec``;
            another value is only for proving that the gate catches a mismatch.

    Returns:
        The manifest, as written and re-loaded; the bundle has passed ``ModelBundle.load``.

    Raises:
        ParityError: the served path disagrees with Keras; the message names the differing
            preprocessing fields and the worst images.
    """
    model_path = export_onnx(model, spec, out_dir / MODEL_FILE, features=novelty is not None)
    manifest = Manifest(
        name=name,
        model_file=MODEL_FILE,
        model_sha256=sha256_file(model_path),
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        input_shape=spec.input_shape,
        labels=dataset.class_names,
        preprocess=spec,
        reference=reference,
        calibration=calibration,
        novelty=novelty,
        training=training,
        versions=_versions(),
    )
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    served = ModelBundle(
        out_dir, dataclasses.replace(manifest, preprocess=serving_spec or spec), session
    )
    files = [dataset.files[r] for r in parity_rows]
    tensors = normalise_batch(dataset.images[parity_rows], spec)
    keras_probs, keras_novelty, parity = _parity(model, served, files, tensors, spec)

    golden_dir = out_dir / "golden"
    shutil.rmtree(golden_dir, ignore_errors=True)
    golden_dir.mkdir()
    golden: list[GoldenImage] = []
    for i in _golden_rows(dataset.y[parity_rows], N_GOLDEN):
        label = dataset.class_names[int(dataset.y[parity_rows[i]])]
        target = golden_dir / f"{len(golden):02d}_{label}{files[i].suffix.lower()}"
        shutil.copyfile(files[i], target)
        probs = tuple(float(p) for p in keras_probs[i])
        novel = None if keras_novelty is None else float(keras_novelty[i])
        golden.append(
            GoldenImage(file=f"golden/{target.name}", probs=probs, label=label, novelty=novel)
        )

    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = dataclasses.replace(
        manifest, golden=tuple(golden), parity=parity, created_at=created
    )
    save_manifest(manifest, out_dir)
    ModelBundle.load(out_dir, device="cpu")  # the bundle as a worker will see it
    return load_manifest(out_dir)
