"""Cheap per-image statistics and the reference histograms that drift detection compares against.

The trainer computes :func:`image_features` on every training image and stores
:func:`build_reference` of them in the manifest; the worker computes the same features on every
image it serves (from the batch of model inputs it already made: no second decode, no second
resize) and adds :func:`bin_counts` of them into Redis. Counts on fixed bins merge by
addition, so the counts of any number of workers sum to the counts of their combined traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from imgq.shared.preprocess import PreprocessSpec, resize_image

__all__ = [
    "IMAGE_FEATURES",
    "IMAGE_FEATURES_VERSION",
    "OUTPUT_FEATURES",
    "PIXEL_FEATURES",
    "image_features",
    "decoded_image_features",
    "output_features",
]

#: Version of :func:`image_features`' definitions; raise it whenever a value it computes for the
#: same image changes (2: pixel features on a 64 x 64 copy instead of 96 x 96; 3: on the model's
#: input, as the model sees the image, block-averaged to at most 64 pixels a side, with
#: sharpness over rows 1 to H-2).
IMAGE_FEATURES_VERSION = 3

#: Per-image input features, in column order of :func:`image_features`.
IMAGE_FEATURES: tuple[str, ...] = (
    "brightness",  # mean luminance, 0..1
    "contrast",  # std of luminance, 0..1
    "mean_r",  # mean red, 0..1
    "mean_g",
    "mean_b",
    "saturation",  # mean HSV saturation, 0..1
    "dark_fraction",  # share of pixels with luminance < 0.1
    "bright_fraction",  # share of pixels with luminance > 0.9
    "sharpness",  # log1p of Laplacian variance of luminance at the model's input size
    "width",  # original width, pixels
    "height",  # original height, pixels
    "aspect",  # width / height
    "bytes_per_pixel",  # encoded bytes / (width * height): compression level
)

#: The image features computed on the model's input (what the model sees), not on the
#: original's size and encoding: the drift page tier's out-of-range share counts only these.
PIXEL_FEATURES: tuple[str, ...] = IMAGE_FEATURES[: IMAGE_FEATURES.index("sharpness") + 1]

#: Per-image model-output features, in column order of :func:`output_features`.
OUTPUT_FEATURES: tuple[str, ...] = (
    "predicted_class",  # categorical: index of the top-1 label
    "confidence",  # top-1 probability
    "margin",  # top-1 minus top-2 probability
)


#: Largest uint8 luminance counted as dark (< 0.1 of full scale) and smallest counted as bright
#: (> 0.9 of full scale).
_DARK_MAX = 25
_BRIGHT_MIN = 230
#: Most pixels per image whose uint8 sums fit OpenCV's int32 row sums (255 * pixels < 2**31).
_INT32_SUM_MAX_PX = (2**31 - 1) // 255
#: Largest side :func:`image_features` computes pixel features on (larger inputs: block means).
_MAX_SIDE_PX = 64
#: Most pixels :func:`image_features` handles in one pass (~100 MB of float64 temporaries).
_CHUNK_PX = 1 << 22


def image_features(inputs: np.ndarray, originals: np.ndarray) -> np.ndarray:
    """The :data:`IMAGE_FEATURES` of a batch of images, as an (N, F) float64 array.

    Pixel features describe what the model sees: ``inputs`` are the images as
    :func:`shared.preprocess.resize_image` made them for the model (the trainer's reference and
    the worker use the same arrays they feed the model, so the features cost no resize of their
    own), before colour order and normalisation. Blur or lost resolution that survives the resize
    to the model's size shows in ``sharpness``; what the resize erases cannot hurt the model
    either. Size and compression come from the original (``originals``). An input larger than
    64 pixels a side is first reduced by the smallest whole factor ``k`` that brings it to 64 or
    less, as the mean of each ``k x k`` block (MobileNetV2's 224 -> 56; a side that ``k`` does
    not divide loses its ``side % k`` outer pixels, half on each edge): far less work at 224,
    and sharpness measured at a scale comparable across models.

    The whole batch is one tall image for each OpenCV call (each call has a fixed cost whatever
    its size), and every sum is exact in integers or float64, so an image's features do not
    depend on
    its batch-mates: one image alone gives the same bytes. Sharpness is ``log1p`` of the variance
    of the Laplacian of luminance (0..255 scale) over each image's rows 1 to H-2 (the outer rows
    would see the neighbouring image in the tall stack). Every feature is invariant to a
    horizontal flip.

    Args:
        inputs: ``(N, H, W, 3)`` RGB uint8 model inputs, ``H, W >= 3``.
        originals: ``(N, 3)`` width, height and encoded byte length of each original image.

    Returns:
        An ``(N, len(IMAGE_FEATURES))`` float64 array, columns in :data:`IMAGE_FEATURES` order.

    >>> white = np.full((1, 32, 32, 3), 255, np.uint8)
    >>> f = dict(zip(IMAGE_FEATURES, image_features(white, np.array([[80, 40, 800]]))[0].tolist()))
    >>> f["brightness"], f["bright_fraction"], f["sharpness"], f["aspect"], f["bytes_per_pixel"]
    (1.0, 1.0, 0.0, 2.0, 0.25)
    """
    inputs, originals = _check_batch(inputs, originals)
    n, h, w, _ = inputs.shape
    if n == 0:
        return np.empty((0, len(IMAGE_FEATURES)))
    px = h * w
    chunk = max(1, _CHUNK_PX // px)
    if n > chunk:  # bounded temporaries for a whole training set; the values do not change
        return np.concatenate(
            [
                image_features(inputs[i : i + chunk], originals[i : i + chunk])
                for i in range(0, n, chunk)
            ]
        )
    inputs = _block_means(inputs)
    n, h, w, _ = inputs.shape
    px = h * w
    # Per-pixel steps see one image per row (OpenCV's cost is per row as much as per pixel).
    wide = inputs.reshape(n, px, 3)
    rows = cv2.cvtColor(wide, cv2.COLOR_RGB2GRAY)
    luma_mean = _row_sums(rows) / px
    # Squares of uint8 fit int32 and so do their sums (at most 64 x 64 of 255**2): exact.
    luma_var = np.square(rows, dtype=np.int32).sum(axis=1) / px - luma_mean * luma_mean
    red, green, blue = cv2.split(wide)
    saturation = _row_sums(_saturation(red, green, blue))
    # int16 holds the Laplacian of uint8 exactly; float64 sums of its squares stay exact. The
    # kernel and the border are symmetric: the Laplacian of the transposed tall stack,
    # transposed back, is the same numbers in half the time (32 long rows, not 1,024 short).
    lap_t = cv2.Laplacian(cv2.transpose(rows.reshape(n * h, w)), cv2.CV_16S)
    lap = cv2.transpose(lap_t).reshape(n, h, w)[:, 1:-1].reshape(n, -1)
    lap_f = lap.astype(np.float64)
    m = lap_f.shape[1]
    lap_var = _row_squares(lap_f) / m - (lap_f.sum(axis=1) / m) ** 2
    width, height, encoded = originals.T
    return np.column_stack(
        [
            luma_mean / 255.0,
            np.sqrt(np.maximum(luma_var, 0.0)) / 255.0,
            _row_sums(red) / px / 255.0,
            _row_sums(green) / px / 255.0,
            _row_sums(blue) / px / 255.0,
            saturation / px / 255.0,
            # Integer thresholds: luma < 0.1 * 255 and luma > 0.9 * 255 on uint8 values; the
            # comparison masks are 255 where true. (OpenCV takes a scalar; its stubs do not say.)
            _row_sums(cv2.compare(rows, _DARK_MAX, cv2.CMP_LE)) / 255.0 / px,  # type: ignore[call-overload]
            _row_sums(cv2.compare(rows, _BRIGHT_MIN, cv2.CMP_GE)) / 255.0 / px,  # type: ignore[call-overload]
            np.log1p(np.maximum(lap_var, 0.0)),
            width,
            height,
            width / height,
            encoded / (width * height),
        ]
    )


def decoded_image_features(
    images: Sequence[np.ndarray], encoded_bytes: Sequence[int], spec: PreprocessSpec
) -> np.ndarray:
    """:func:`image_features` of decoded originals, each resized as the model's ``spec`` says:
    for callers that hold full-size images (benchmarks, tests, reference builders).

    >>> spec = PreprocessSpec(height=8, width=8)
    >>> decoded_image_features([np.zeros((20, 10, 3), np.uint8)], [50], spec)[0, -4:].tolist()
    [10.0, 20.0, 0.5, 0.25]
    """
    if len(images) != len(encoded_bytes):
        raise ValueError(f"{len(images)} images but {len(encoded_bytes)} encoded lengths")
    originals = np.array(
        [(rgb.shape[1], rgb.shape[0], b) for rgb, b in zip(images, encoded_bytes, strict=True)],
        np.float64,
    ).reshape(-1, 3)
    inputs = np.empty((len(images), spec.height, spec.width, 3), np.uint8)
    for i, rgb in enumerate(images):
        inputs[i] = resize_image(rgb, spec)
    return image_features(inputs, originals)


def output_features(probs: np.ndarray) -> np.ndarray:
    """The :data:`OUTPUT_FEATURES` of an (N, K) probability batch, as an (N, 3) float64 array.

    >>> output_features(np.array([[0.1, 0.7, 0.2]]))[0].round(3).tolist()
    [1.0, 0.7, 0.5]
    """
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"output_features needs an (N, K >= 2) array, got shape {probs.shape}")
    top2 = -np.partition(-probs, 1, axis=1)[:, :2]
    return np.stack([probs.argmax(axis=1), top2[:, 0], top2[:, 0] - top2[:, 1]], axis=1)


def _check_batch(inputs: np.ndarray, originals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_features`' arguments, validated: a contiguous uint8 batch and float64 sizes."""
    if not isinstance(inputs, np.ndarray) or inputs.ndim != 4 or inputs.shape[3] != 3:
        raise ValueError(
            "image_features needs an (N, H, W, 3) uint8 array of model inputs, got "
            f"{getattr(inputs, 'shape', type(inputs).__name__)}"
        )
    if inputs.dtype != np.uint8:
        raise ValueError(f"image_features needs uint8 pixels, got {inputs.dtype}")
    if inputs.shape[1] < 3 or inputs.shape[2] < 3:
        raise ValueError(f"image_features needs images of at least 3 x 3, got {inputs.shape}")
    originals = np.asarray(originals, np.float64)
    if originals.shape != (inputs.shape[0], 3) or not (originals > 0).all():
        raise ValueError(
            f"image_features needs ({inputs.shape[0]}, 3) positive original widths, heights and "
            f"encoded lengths, got shape {originals.shape}"
        )
    return np.ascontiguousarray(inputs), originals


def _block_means(inputs: np.ndarray) -> np.ndarray:
    """``inputs`` reduced by the smallest whole factor ``k`` that brings both sides to at most
    ``_MAX_SIDE_PX`` (keeping at least 3 pixels), as the means of ``k x k`` blocks: one
    ``INTER_AREA`` of the tall stack, whose whole factor makes blocks that never cross images."""
    n, h, w, _ = inputs.shape
    k = min(-(-max(h, w) // _MAX_SIDE_PX), min(h, w) // 3)
    if k <= 1:
        return inputs
    y0, x0 = (h % k) // 2, (w % k) // 2
    inputs = np.ascontiguousarray(inputs[:, y0 : y0 + h - h % k, x0 : x0 + w - w % k])
    hk, wk = (h - h % k) // k, (w - w % k) // k
    tall = inputs.reshape(n * hk * k, wk * k, 3)
    return cv2.resize(tall, (wk, n * hk), interpolation=cv2.INTER_AREA).reshape(n, hk, wk, 3)


#: OpenCV's 8-bit HSV saturation is ``(diff * sdiv[v] + 2**11) >> 12`` (``v`` the largest
#: channel, ``diff`` it minus the smallest, ``sdiv[v] = round(255 * 2**12 / v)``;
#: ``color_hsv.simd.hpp``), here as a table of every ``(v, diff)``: the same integers without
#: the hue, at a fifth of ``cvtColor``'s cost.
_SDIV = np.zeros(256, np.int64)
_SDIV[1:] = np.rint((255 << 12) / np.arange(1, 256))
_SATURATION = ((np.arange(256)[None, :] * _SDIV[:, None] + (1 << 11)) >> 12).clip(0, 255)
_SATURATION = _SATURATION.astype(np.uint8).ravel()  # index v * 256 + diff


def _saturation(red: np.ndarray, green: np.ndarray, blue: np.ndarray) -> np.ndarray:
    """Each pixel's HSV saturation (0..255) exactly as ``cv2.cvtColor(..., COLOR_RGB2HSV)``
    gives it, as uint8 of the channels' shape.

    >>> rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    >>> hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    >>> bool((_saturation(*cv2.split(rgb)) == hsv).all())
    True
    """
    top = cv2.max(cv2.max(red, green), blue)
    index = top.astype(np.uint16)
    index <<= 8
    index |= np.asarray(cv2.subtract(top, cv2.min(cv2.min(red, green), blue)), np.uint8)
    return _SATURATION.take(index)  # take: a quarter faster than indexing


def _row_squares(rows: np.ndarray) -> np.ndarray:
    """Sum of squares of each row of a 2-D integer-valued array, as float64: a batched matrix
    product (faster than ``einsum``), exact because every partial sum is an integer
    below 2**53 (at most 64 x 64 values of at most 1020**2)."""
    f = rows.astype(np.float64, copy=False)
    return np.matmul(f[:, None, :], f[:, :, None])[:, 0, 0]


def _row_sums(rows: np.ndarray) -> np.ndarray:
    """Sum of each row of a 2-D uint8 array, as float64 (exact: integer sums)."""
    if rows.shape[1] <= _INT32_SUM_MAX_PX:
        return cv2.reduce(rows, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[:, 0].astype(np.float64)
    return rows.sum(axis=1, dtype=np.int64).astype(np.float64)
