"""A tiny, real model bundle for fast worker tests, built without TensorFlow.

The ONNX graph is ``NHWC float input -> ReduceMean over H, W -> MatMul -> Softmax``: it classifies
an image by its mean colour, with fixed weights, so a test knows the answer in advance (a red
image is class 0, green class 1, blue class 2). The manifest, reference statistics and golden
set are made with ``shared/`` exactly as the trainer makes them, so ``ModelBundle.load`` runs
every real check (hash, signature, golden set through onnxruntime) on it. With ``novelty``, the
mean colour is also the model's ``features`` output, and the manifest carries a novelty model
fitted on it as ``imgq train`` fits one (``trainer/novelty.py``): a grey or yellow image, unlike
every class, is novel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from imgq.shared.decode import decode_image
from imgq.shared.imagestats import (
    IMAGE_FEATURES,
    OUTPUT_FEATURES,
    decoded_image_features,
    output_features,
)
from imgq.shared.manifest import GoldenImage, Manifest, save_manifest, sha256_file
from imgq.shared.novelty import GalleryImage, NoveltyModel
from imgq.shared.preprocess import PreprocessSpec, preprocess_batch
from imgq.shared.reference import build_reference
from imgq.trainer.novelty import fit_novelty, with_gallery

__all__ = ["COLOURS", "colour_image", "encode_png", "make_tiny_bundle"]

#: A colour per class index (RGB): the tiny model's class ``k`` is the image whose mean colour
#: is closest to ``COLOURS[k]`` in direction.
COLOURS: tuple[tuple[int, int, int], ...] = ((220, 30, 30), (30, 220, 30), (30, 30, 220))
_LOGIT_SCALE = 8.0
_OPSET = 17


def colour_image(colour: Sequence[int], size_px: int = 24, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image of ``colour`` with mild noise, so statistics are not degenerate."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(-20, 21, size=(size_px, size_px, 3))
    return np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return data.tobytes()


def _weights(n_labels: int) -> np.ndarray:
    """(3, K) weights: class k responds to colour direction k (cycled for K > 3)."""
    w = np.zeros((3, n_labels), np.float32)
    for k in range(n_labels):
        w[k % 3, k] = _LOGIT_SCALE * (1.0 + 0.1 * (k // 3))
    return w


def _model(size_px: int, n_labels: int, features: bool = False) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_labels])]
    if features:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]))
    graph = helper.make_graph(
        nodes=[
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
            *([helper.make_node("Identity", ["mean"], ["features"])] if features else []),
        ],
        name="tiny",
        inputs=[
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", size_px, size_px, 3]
            )
        ],
        outputs=outputs,
        initializer=[numpy_helper.from_array(_weights(n_labels), "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_tiny_bundle(
    out_dir: str | Path,
    labels: Sequence[str] = ("a", "b", "c"),
    size: int = 16,
    *,
    novelty: bool = False,
) -> Path:
    """Write a complete bundle (model.onnx, manifest.json, golden/) to ``out_dir``.

    Args:
        out_dir: Bundle folder; created if missing.
        labels: Class names, one per output.
        size: Model input side in pixels.
        novelty: Add the ``features`` output (the mean colour), a novelty model of it and a
            gallery of two images per class (``novelty/``).

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    (out / "golden").mkdir(parents=True, exist_ok=True)
    model_path = out / "model.onnx"
    onnx.save(_model(size, len(labels), features=novelty), model_path)
    spec = PreprocessSpec(height=size, width=size)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    # Reference statistics from a few synthetic images of every class, in varied sizes.
    encoded = [
        encode_png(colour_image(COLOURS[i % 3], size_px=16 + 4 * (i % 5), seed=i))
        for i in range(60)
    ]
    images = [decode_image(data) for data in encoded]
    probs = session.run(["probs"], {"input": preprocess_batch(images, spec)})[0]
    feats = decoded_image_features(images, [len(data) for data in encoded], spec)
    novelty_model = _novelty(out, session, spec, images, encoded, labels) if novelty else None

    reference = build_reference(
        np.hstack([feats, output_features(probs)]),
        IMAGE_FEATURES + OUTPUT_FEATURES,
        categorical={"predicted_class": len(labels)},
    )

    golden = []
    for k in range(min(len(labels), 3)):
        name = f"golden/{labels[k]}.png"
        (out / name).write_bytes(encoded[k])
        novel = None
        if novelty_model is not None:
            features = session.run(["features"], {"input": preprocess_batch([images[k]], spec)})
            novel = float(novelty_model.score(features[0])[0][0])
        golden.append(
            GoldenImage(
                file=name, probs=tuple(float(p) for p in probs[k]), label=labels[k], novelty=novel
            )
        )

    manifest = Manifest(
        name="tiny",
        model_file=model_path.name,
        model_sha256=sha256_file(model_path),
        input_name="input",
        output_name="probs",
        input_shape=(None, size, size, 3),
        labels=tuple(labels),
        preprocess=spec,
        reference=reference,
        golden=tuple(golden),
        novelty=novelty_model,
    )
    save_manifest(manifest, out)
    return out


def _novelty(
    out: Path,
    session: ort.InferenceSession,
    spec: PreprocessSpec,
    images: list[np.ndarray],
    encoded: list[bytes],
    labels: Sequence[str],
) -> NoveltyModel:
    """A novelty model of the mean colour: fitted on the reference images (class ``i % 3``),
    its threshold from 30 more of them, a gallery of two per class."""
    held = [colour_image(COLOURS[i % 3], size_px=18, seed=100 + i) for i in range(30)]
    train, held_out = (
        session.run(["features"], {"input": preprocess_batch(batch, spec)})[0]
        for batch in (images, held)
    )
    y = np.arange(len(images)) % 3
    model = fit_novelty(train, y, held_out, len(labels), output_name="features")
    (out / "novelty").mkdir(exist_ok=True)
    gallery = []
    for i in range(6):
        name = f"novelty/{i:02d}_{labels[i % 3]}.png"
        (out / name).write_bytes(encoded[i])
        gallery.append(GalleryImage(file=name, label=labels[i % 3]))
    return with_gallery(model, gallery, train[:6])
