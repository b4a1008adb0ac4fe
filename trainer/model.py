"""The model architectures `imgq train --arch` offers; each ends in softmax probabilities."""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["ARCHITECTURES", "build_model"]

#: Names accepted by ``--arch``.
ARCHITECTURES = ("small", "mobilenetv2")


class PerImageStandardization(keras.layers.Layer):
    """Subtract each image's per-channel mean and divide by its per-channel std, inside the model.

    The manifest's normalisation uses fixed statistics of the whole training set; objects and
    backgrounds of any colour under any lighting still differ in offset and contrast from image
    to image. Removing that in the first layer lets a small CNN learn shapes in a few epochs.
    Being part of the graph, it is exported to ONNX and runs identically in the worker.
    """

    def call(self, x: Any) -> Any:
        mean = keras.ops.mean(x, axis=(1, 2), keepdims=True)
        std = keras.ops.std(x, axis=(1, 2), keepdims=True)
        return (x - mean) / (std + 1e-3)


def _conv(x: Any, filters: int, kernel: int, strides: int, name: str) -> Any:
    x = keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)  # fmt: skip
    # momentum 0.9: a few hundred steps are enough for the moving statistics to settle.
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _small(input_shape: tuple[int, int, int], n_classes: int) -> keras.Model:
    """A compact CNN: per-image standardisation, a strided 5x5 stem, three conv blocks, global
    pooling, dropout, softmax. About 0.1 GFLOP per 64x64 image, so it trains on a CPU in minutes.

    Functional, not Sequential: tf2onnx and Keras 3 export functional models cleanly.
    """
    inputs = keras.Input(input_shape, name="image")
    x = PerImageStandardization(name="standardize")(inputs)
    x = _conv(x, 32, 5, 2, "stem")
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = _conv(x, 64, 3, 1, "block1")
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = _conv(x, 128, 3, 1, "block2")
    x = _conv(x, 192, 3, 1, "block3")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def build_model(arch: str, input_shape: tuple[int, int, int], n_classes: int) -> keras.Model:
    """A new, untrained model.

    Args:
        arch: ``"small"`` (compact CNN, fast on a CPU) or ``"mobilenetv2"``
            (``keras.applications.MobileNetV2`` with random weights: nothing may be downloaded).
        input_shape: ``(height, width, 3)``.
        n_classes: Number of output classes.

    Returns:
        A compiled-ready Keras model whose output is softmax probabilities.
    """
    if arch == "small":
        return _small(input_shape, n_classes)
    if arch == "mobilenetv2":
        return keras.applications.MobileNetV2(
            input_shape=input_shape, weights=None, classes=n_classes,
            classifier_activation="softmax",
        )  # fmt: skip
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
