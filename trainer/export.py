"""Export a trained Keras model as a bundle: ONNX, parity gate, golden set, manifest (written last).

The parity gate is the proof the bundle exists for: held-out images go from their *files* through
(a) Keras on the trainer's tensors and (b) onnxruntime on the tensors the worker's code path makes
(:class:`worker.bundle.ModelBundle`: ``shared/`` decode, then ``preprocess_batch`` with the
manifest's spec). Any top-1 difference, or any probability apart by more than
:data:`PARITY_ATOL`, fails the export with :class:`~shared.errors.ParityError`, and no manifest is
written, so no worker can load the bundle.
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

from imgq.shared.bundle import ModelBundle
from imgq.shared.calibration import Calibration
from imgq.shared.decode import decode_image
from imgq.shared.errors import ParityError
from imgq.shared.manifest import GoldenImage, Manifest, load_manifest, save_manifest, sha256_file
from imgq.shared.preprocess import PreprocessSpec, normalise_batch
from imgq.shared.reference import ReferenceStats
from imgq.trainer.dataset import Dataset

__all__ = [
    "INPUT_NAME",
    "MIN_PARITY_IMAGES",
    "MODEL_FILE",
    "N_GOLDEN",
    "OPSET",
    "OUTPUT_NAME",
    "PARITY_ATOL",
    "export_bundle",
    "export_onnx",
]

#: ONNX opset, pinned so a bundle does not change with the tf2onnx default.
OPSET = 17
MODEL_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
#: Largest allowed |p_keras - p_onnx| of any class probability of any parity image.
PARITY_ATOL = 1e-4
#: The parity gate runs on at least this many images (held-out first, then training images).
MIN_PARITY_IMAGES = 64
#: Encoded images copied into ``golden/`` with the probabilities Keras gave them.
N_GOLDEN = 8


def export_onnx(
    model: keras.Model, spec: PreprocessSpec, path: Path, *, opset: int = OPSET
) -> Path:
    """Convert ``model`` to ONNX with a dynamic batch dimension and softmax output.

    Uses ``tf2onnx.convert.from_function`` on a ``tf.function`` with an explicit input signature:
    ``from_keras`` fails on ``Sequential`` models with Keras 3 (``KeyError: 'keras_tensor_…'``)
    and leaves the model unusable for a second attempt; ``from_function`` works for functional,
    subclassed and MobileNetV2 models alike.

    Args:
        model: A Keras model taking NHWC float32 and returning probabilities.
        spec: The preprocessing; fixes the input's height and width.
        path: ONNX file to write (atomically).
        opset: ONNX opset. Defaults to :data:`OPSET`.
    """
    if spec.layout != "NHWC":
        raise ValueError(f"the trainer exports NHWC models, the spec says {spec.layout}")
    signature = [tf.TensorSpec(spec.input_shape, tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT_NAME: model(image, training=False)}

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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Keras on the trainer's tensors vs the served path on the files; raise on a mismatch."""
    keras_probs = model.predict(tensors, batch_size=64, verbose=0).astype(np.float32)
    served = bundle.classify_images([decode_image(f.read_bytes()) for f in files])
    diff = np.abs(keras_probs - served).max(axis=1)
    differ = np.flatnonzero(
        (keras_probs.argmax(axis=1) != served.argmax(axis=1)) | (diff > PARITY_ATOL)
    )
    figures = {
        "n_images": len(files),
        "max_abs_diff": float(diff.max()),
        "top1_agree": int((keras_probs.argmax(axis=1) == served.argmax(axis=1)).sum()),
        "atol": PARITY_ATOL,
        "provider": bundle.provider,
        "opset": OPSET,
    }
    if len(differ):
        labels = bundle.manifest.labels
        worst = differ[np.argsort(-diff[differ])][:5]
        examples = "; ".join(
            f"{files[i].name}: keras {labels[int(keras_probs[i].argmax())]} "
            f"{keras_probs[i].max():.4f}, served {labels[int(served[i].argmax())]} "
            f"{served[i].max():.4f} (|diff| {diff[i]:.2e})"
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
            f"parity gate failed: {len(differ)} of {len(files)} images differ (top-1 agrees on "
            f"{figures['top1_agree']}, max |p_keras - p_served| {figures['max_abs_diff']:.2e} > "
            f"{PARITY_ATOL:g}); {cause}. Worst: {examples}. No manifest was written."
        )
    return keras_probs, figures


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
        serving_spec: Preprocessing of the served side of the parity gate. Defaults to ``spec``;
            another value is only for proving that the gate catches a mismatch.

    Returns:
        The manifest, as written and re-loaded; the bundle has passed ``ModelBundle.load``.

    Raises:
        ParityError: the served path disagrees with Keras; the message names the differing
            preprocessing fields and the worst images.
    """
    model_path = export_onnx(model, spec, out_dir / MODEL_FILE)
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
        training=training,
        versions=_versions(),
    )
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    served = ModelBundle(
        out_dir, dataclasses.replace(manifest, preprocess=serving_spec or spec), session
    )
    files = [dataset.files[r] for r in parity_rows]
    tensors = normalise_batch(dataset.images[parity_rows], spec)
    keras_probs, parity = _parity(model, served, files, tensors, spec)

    golden_dir = out_dir / "golden"
    shutil.rmtree(golden_dir, ignore_errors=True)
    golden_dir.mkdir()
    golden: list[GoldenImage] = []
    for i in _golden_rows(dataset.y[parity_rows], N_GOLDEN):
        label = dataset.class_names[int(dataset.y[parity_rows[i]])]
        target = golden_dir / f"{len(golden):02d}_{label}{files[i].suffix.lower()}"
        shutil.copyfile(files[i], target)
        probs = tuple(float(p) for p in keras_probs[i])
        golden.append(GoldenImage(file=f"golden/{target.name}", probs=probs, label=label))

    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest = dataclasses.replace(
        manifest, golden=tuple(golden), parity=parity, created_at=created
    )
    save_manifest(manifest, out_dir)
    ModelBundle.load(out_dir, device="cpu")  # the bundle as a worker will see it
    return load_manifest(out_dir)
