"""Resize, colour order and normalisation: the one input path of training and serving.

Training (trainer/) and serving (worker/) both call :func:`preprocess_batch` with the
:class:`PreprocessSpec` stored in the model's manifest, so the tensors a model sees in production
are produced by the same code, with the same numbers, as the tensors it was trained on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import cv2
import numpy as np

__all__ = [
    "PreprocessSpec",
    "resize_image",
    "normalise_batch",
    "preprocess_batch",
    "compute_mean_std",
    "check_rgb_image",
]

ResizeMode = Literal["stretch", "center_crop"]
Interpolation = Literal["area", "linear", "cubic", "nearest"]
ColorOrder = Literal["RGB", "BGR"]
Layout = Literal["NHWC", "NCHW"]

_RESIZE_MODES = ("stretch", "center_crop")
_INTERPOLATIONS = ("area", "linear", "cubic", "nearest")
_COLOR_ORDERS = ("RGB", "BGR")
_LAYOUTS = ("NHWC", "NCHW")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """Everything needed to turn a decoded RGB uint8 image into the model's input tensor.

    The tensor is ``((pixel * scale) - mean[c]) / std[c]`` per channel ``c`` (channels in
    ``color_order``), resized to ``height`` x ``width`` with ``interpolation`` and ``resize_mode``,
    stacked along a leading batch axis in ``layout``.

    Args:
        height: Model input height in pixels.
        width: Model input width in pixels.
        resize_mode: ``"stretch"`` resizes to the exact size ignoring aspect; ``"center_crop"``
            scales the short side to fit and crops the centre. Defaults to ``"stretch"``.
        interpolation: OpenCV interpolation name. Defaults to ``"area"``.
        color_order: Channel order the model expects. Defaults to ``"RGB"``.
        scale: Multiplier applied to uint8 pixels first. Defaults to ``1/255``.
        mean: Per-channel mean subtracted after scaling, in ``color_order``.
        std: Per-channel standard deviation divided after subtracting the mean.
        layout: ``"NHWC"`` (Keras) or ``"NCHW"``. Defaults to ``"NHWC"``.
        dtype: Tensor dtype; only ``"float32"`` is served.

    >>> spec = PreprocessSpec(height=64, width=64)
    >>> PreprocessSpec.from_dict(spec.to_dict()) == spec
    True
    >>> spec.input_shape
    (None, 64, 64, 3)
    """

    height: int
    width: int
    resize_mode: ResizeMode = "stretch"
    interpolation: Interpolation = "area"
    color_order: ColorOrder = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: Layout = "NHWC"
    dtype: Literal["float32"] = "float32"

    def __post_init__(self) -> None:
        problems = []
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 8 <= value <= 4096:
                problems.append(f"{name} must be an integer in 8..4096, got {value!r}")
        for name, allowed in (
            ("resize_mode", _RESIZE_MODES),
            ("interpolation", _INTERPOLATIONS),
            ("color_order", _COLOR_ORDERS),
            ("layout", _LAYOUTS),
            ("dtype", ("float32",)),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append(f"mean and std need 3 values, got {self.mean!r} and {self.std!r}")
        elif any(not float(s) > 0 for s in self.std):
            problems.append(f"std values must be > 0, got {self.std!r}")
        if not float(self.scale) > 0:
            problems.append(f"scale must be > 0, got {self.scale!r}")
        if problems:
            raise ValueError("invalid PreprocessSpec: " + "; ".join(problems))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        """The model input shape this spec produces, batch dimension first (``None``)."""
        if self.layout == "NHWC":
            return (None, self.height, self.width, 3)
        return (None, 3, self.height, self.width)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in the manifest."""
        d = dataclasses.asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        """Build from the manifest's ``preprocess`` object; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocess keys {sorted(unknown)}; known: {sorted(known)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


_CV2_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def resize_image(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize one decoded RGB uint8 image to ``spec``'s size and mode; returns uint8 HxWx3.

    ``"center_crop"`` crops the source to the target's aspect ratio around its centre first and
    then resizes, which gives the same picture as scale-then-crop at a fraction of the cost.

    Args:
        rgb: ``(height, width, 3)`` uint8 array from :func:`shared.decode.decode_image`.
        spec: The model's preprocessing (size, ``resize_mode``, ``interpolation``).

    Returns:
        A new C-contiguous ``(spec.height, spec.width, 3)`` uint8 array.

    >>> spec = PreprocessSpec(height=32, width=32, resize_mode="center_crop")
    >>> img = np.zeros((40, 80, 3), np.uint8); img[:, 20:60] = 255  # white centre square
    >>> out = resize_image(img, spec)
    >>> out.shape, int(out.min())
    ((32, 32, 3), 255)
    """
    check_rgb_image(rgb)
    h, w = rgb.shape[:2]
    th, tw = spec.height, spec.width
    if spec.resize_mode == "center_crop":
        if w * th > tw * h:  # wider than the target: keep the central columns
            cw = max(1, round(h * tw / th))
            x0 = (w - cw) // 2
            rgb = rgb[:, x0 : x0 + cw]
        elif w * th < tw * h:  # taller than the target: keep the central rows
            ch = max(1, round(w * th / tw))
            y0 = (h - ch) // 2
            rgb = rgb[y0 : y0 + ch]
    if spec.interpolation == "area":
        rgb = _reduce_by_whole_factor(rgb, th, tw)
    out = cv2.resize(rgb, (tw, th), interpolation=_CV2_INTERPOLATION[spec.interpolation])
    return np.ascontiguousarray(out)


def _reduce_by_whole_factor(rgb: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Shrink by the largest whole factor ``k`` that stays at least the target size.

    OpenCV's ``INTER_AREA`` averages exact ``k x k`` blocks in a fast path but is many times
    slower for a fractional ratio such as 640x480 -> 224x224 (``docs/benchmarks.md``); doing
    the whole-factor part first leaves a ratio under 2 on a small image. The result is still an
    area (box) average. The source is centre-cropped to a multiple of ``k`` (under ``k`` pixels).
    """
    h, w = rgb.shape[:2]
    k = min(h // th, w // tw)
    if k < 2:
        return rgb
    y0, x0 = (h % k) // 2, (w % k) // 2
    rgb = rgb[y0 : y0 + h - h % k, x0 : x0 + w - w % k]
    return cv2.resize(rgb, (w // k, h // k), interpolation=cv2.INTER_AREA)


def normalise_batch(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turn an (N, H, W, 3) RGB uint8 batch into the model's float32 tensor (colour order, scale,
    mean/std, layout), contiguous.

    Each output value is a lookup in a 256-entry float32 table per channel that already holds
    ``(v * scale - mean[c]) / std[c]``: one memory pass instead of three float passes, several
    times faster than the broadcast arithmetic (bench/preprocess.py), and exactly the same
    bytes for an image whether it is normalised alone or in a batch.

    Args:
        images: ``(N, H, W, 3)`` RGB uint8 array (any ``H``, ``W``; usually the spec's size).
        spec: Colour order, scale, mean, std and layout of the model input.

    Returns:
        A C-contiguous float32 array, ``(N, H, W, 3)`` for NHWC or ``(N, 3, H, W)`` for NCHW.

    >>> spec = PreprocessSpec(height=8, width=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    ...                       color_order="BGR", layout="NCHW")
    >>> x = np.zeros((1, 8, 8, 3), np.uint8); x[..., 0] = 255  # pure red
    >>> t = normalise_batch(x, spec)
    >>> t.shape, t.dtype, t[0, :, 0, 0].tolist()  # B, G, R
    ((1, 3, 8, 8), dtype('float32'), [-1.0, -1.0, 1.0])
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"normalise_batch needs an (N, H, W, 3) uint8 array, got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    if images.dtype != np.uint8:
        raise ValueError(f"normalise_batch needs uint8 pixels, got {images.dtype}")
    n, h, w, _ = images.shape
    tables = _channel_tables(spec)
    if n * h * w == 0:
        return np.empty((n, h, w, 3) if spec.layout == "NHWC" else (n, 3, h, w), np.float32)
    if spec.layout == "NCHW":
        out = np.empty((n, 3, h, w), np.float32)
        planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        for c, src in enumerate(_source_channels(spec)):
            for i in range(n):
                cv2.LUT(planar[i, src], tables[c], dst=out[i, c])
        return out
    if spec.color_order == "BGR":
        images = images[..., ::-1]
    rows = np.ascontiguousarray(images).reshape(n * h, w, 3)
    lut = np.ascontiguousarray(tables.T.reshape(1, 256, 3))
    return cv2.LUT(rows, lut).reshape(n, h, w, 3)


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB uint8 images of any sizes -> one contiguous model input tensor of N images.

    This is *the* input path of training and serving: the trainer and the worker both call it
    with the manifest's spec, so a model sees the same tensors in production as in training.
    Stacking the single-image results gives exactly the same bytes as one call on the batch.

    Args:
        images: Decoded ``(height, width, 3)`` RGB uint8 arrays, sizes may differ.
        spec: The model's preprocessing.

    Returns:
        A float32 array of shape ``(len(images),) + spec.input_shape[1:]``.

    >>> spec = PreprocessSpec(height=16, width=16)
    >>> batch = preprocess_batch([np.zeros((30, 40, 3), np.uint8)] * 2, spec)
    >>> batch.shape, batch.dtype, batch.flags["C_CONTIGUOUS"]
    ((2, 16, 16, 3), dtype('float32'), True)
    """
    resized = np.empty((len(images), spec.height, spec.width, 3), np.uint8)
    for i, rgb in enumerate(images):
        resized[i] = resize_image(rgb, spec)
    return normalise_batch(resized, spec)


def compute_mean_std(
    images_uint8_iterable: Iterable[np.ndarray],
    spec_scale: float,
    *,
    color_order: ColorOrder = "RGB",
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and standard deviation of ``pixel * spec_scale`` over many images.

    For the trainer's normalisation statistics, computed on the training split only. Pixels are
    counted in a 256-bin histogram per channel, so the result is exact and does not depend on
    the order or sizes of the images (every pixel weighs the same).

    Args:
        images_uint8_iterable: ``(height, width, 3)`` RGB uint8 arrays (usually already resized).
        spec_scale: The spec's ``scale`` (e.g. ``1/255``).
        color_order: Order of the returned channels, the spec's ``color_order``. Defaults to RGB.

    Returns:
        ``(mean, std)``, three floats each, ready for :class:`PreprocessSpec`.

    Raises:
        ValueError: no pixels, or a channel with zero variance (cannot be normalised).

    >>> a = np.zeros((2, 2, 3), np.uint8); b = np.full((2, 2, 3), 255, np.uint8)
    >>> compute_mean_std([a, b], 1 / 255)
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    hist = np.zeros((3, 256), np.int64)
    for rgb in images_uint8_iterable:
        check_rgb_image(rgb)
        for c in range(3):
            hist[c] += np.bincount(rgb[..., c].ravel(), minlength=256)
    n = int(hist[0].sum())
    if n == 0:
        raise ValueError("compute_mean_std got no pixels; pass at least one non-empty image")
    values = np.arange(256, dtype=np.float64) * float(spec_scale)
    mean = hist @ values / n
    std = np.sqrt(hist @ values**2 / n - mean**2).clip(min=0.0)
    if not (std > 0).all():
        raise ValueError(
            f"channel std is {std.tolist()}: a constant channel cannot be normalised; "
            "check that the training images are not all identical"
        )
    order = [2, 1, 0] if color_order == "BGR" else [0, 1, 2]
    m = tuple(float(mean[c]) for c in order)
    s = tuple(float(std[c]) for c in order)
    return (m[0], m[1], m[2]), (s[0], s[1], s[2])


@functools.lru_cache(maxsize=16)
def _channel_tables(spec: PreprocessSpec) -> np.ndarray:
    """(3, 256) float32: row ``c`` maps a uint8 value to output channel ``c``'s normalised value."""
    values = np.arange(256, dtype=np.float64) * spec.scale
    return np.stack([(values - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]).astype(
        np.float32
    )


def _source_channels(spec: PreprocessSpec) -> tuple[int, int, int]:
    """The RGB input channel feeding each output channel."""
    return (2, 1, 0) if spec.color_order == "BGR" else (0, 1, 2)


def check_rgb_image(rgb: np.ndarray) -> None:
    """Refuse anything but a non-empty (H, W, 3) uint8 array, naming what was given.

    >>> check_rgb_image(np.zeros((2, 2, 3), np.uint8))
    >>> check_rgb_image(np.zeros((2, 2), np.uint8))
    Traceback (most recent call last):
    ValueError: expected an (height, width, 3) RGB uint8 array, got uint8 (2, 2)
    """
    if (
        not isinstance(rgb, np.ndarray)
        or rgb.ndim != 3
        or rgb.shape[2] != 3
        or rgb.dtype != np.uint8
    ):
        raise ValueError(
            "expected an (height, width, 3) RGB uint8 array, got "
            f"{getattr(rgb, 'dtype', type(rgb).__name__)} {getattr(rgb, 'shape', '')}"
        )
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {rgb.shape}")
