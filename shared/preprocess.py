"""Resize, colour order and normalisation: the one input path of training and serving.

Training (trainer/) and serving (worker/) both call :func:`preprocess_batch` with the
:class:`PreprocessSpec` stored in the model's manifest, so the tensors a model sees in production
are produced by the same code, with the same numbers, as the tensors it was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "PreprocessSpec",
    "resize_image",
    "normalise_batch",
    "preprocess_batch",
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


def resize_image(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize one decoded RGB uint8 image to ``spec``'s size and mode; returns uint8 HxWx3."""
    raise NotImplementedError


def normalise_batch(images: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turn an (N, H, W, 3) RGB uint8 batch into the model's float32 tensor (colour order, scale,
    mean/std, layout), contiguous."""
    raise NotImplementedError


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB uint8 images of any sizes -> one contiguous model input tensor of N images."""
    raise NotImplementedError
