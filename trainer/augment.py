"""Training batches: shuffled each epoch, augmented on the decoded uint8 images, normalised by
``shared/`` (the worker's own code), so the model's input path stays exactly the manifest's."""

from __future__ import annotations

import math

import cv2
import keras
import numpy as np

from imgq.shared.preprocess import PreprocessSpec, normalise_batch

__all__ = ["AugmentedBatches", "augment_batch"]


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, crop (85-100% of each side, resized back) and brightness/contrast
    on an (N, H, W, 3) uint8 batch; returns a new uint8 batch of the same shape.

    It works on decoded pixels, before ``shared.preprocess.normalise_batch``, so the model's
    input path is still exactly the manifest's.
    """
    n, h, w, _ = images.shape
    out = np.empty_like(images)
    for i in range(n):
        img = images[i, :, ::-1] if rng.random() < 0.5 else images[i]
        side = rng.uniform(0.85, 1.0)
        ch, cw = max(1, round(h * side)), max(1, round(w * side))
        y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out[i] = cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_LINEAR)
    gain = rng.uniform(0.75, 1.25, (n, 1, 1, 1)).astype(np.float32)
    offset = rng.uniform(-20, 20, (n, 1, 1, 1)).astype(np.float32)
    return np.clip(out * gain + offset, 0, 255).astype(np.uint8)


class AugmentedBatches(keras.utils.PyDataset):
    """Training batches: shuffled each epoch, augmented on uint8, normalised by ``shared/``.

    Args:
        images: (N, H, W, 3) uint8 images, already resized by ``shared.preprocess.resize_image``.
        y: Class index per image.
        spec: The preprocessing (with the training split's mean/std).
        batch_size: Images per batch.
        augment: Apply :func:`augment_batch`. Defaults to True.
        seed: Seed of the shuffling and augmentation. Defaults to 0.
    """

    def __init__(
        self,
        images: np.ndarray,
        y: np.ndarray,
        spec: PreprocessSpec,
        batch_size: int,
        *,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.images, self.y, self.spec = images, y, spec
        self.batch_size, self.augment = batch_size, augment
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(y))

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        batch = self.images[rows]
        if self.augment:
            batch = augment_batch(batch, self._rng)
        return normalise_batch(batch, self.spec), self.y[rows]

    def on_epoch_end(self) -> None:
        self._order = self._rng.permutation(len(self.y))
