"""Synthetic production shifts: what a new camera, a new compression or a new class mix does to
images. The drift benchmark, the worker drift tests and the demo apply the very same ones.

>>> sorted(SHIFTS)
['blur', 'colour_cast', 'darken', 'jpeg_q15', 'low_resolution']
>>> sorted(HARMFUL)
['night', 'occlude_half', 'zoom_corner']
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin

from imgq.shared.decode import decode_image

__all__ = ["SHIFTS", "BENIGN", "HARMFUL", "EXPECTED", "shift_image", "reencode_like"]

_Pixels = Callable[[np.ndarray], np.ndarray]


def _darken(rgb: np.ndarray) -> np.ndarray:
    return (rgb * 0.6).round().astype(np.uint8)


def _low_resolution(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _blur(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), 2.0)


def _colour_cast(rgb: np.ndarray) -> np.ndarray:
    """A warm cast, as from a wrong white balance: red up 15%, blue down 25%."""
    return np.clip(rgb * np.array([1.15, 1.0, 0.75]), 0, 255).round().astype(np.uint8)


def _flip(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


def _zoom_corner(rgb: np.ndarray) -> np.ndarray:
    """A camera zoomed 2x onto the top-left corner: the object is mostly cut off."""
    h, w = rgb.shape[:2]
    return cv2.resize(rgb[: h // 2, : w // 2], (w, h), interpolation=cv2.INTER_LINEAR)


def _occlude_half(rgb: np.ndarray) -> np.ndarray:
    """The right half covered (black)."""
    out = rgb.copy()
    out[:, rgb.shape[1] // 2 :] = 0
    return out


def _night(rgb: np.ndarray) -> np.ndarray:
    """A fifth of the light and a quarter of the resolution: darker than any training image."""
    return (_low_resolution(rgb) * 0.2).round().astype(np.uint8)


#: Pixel shifts (re-encoded like the original, so only the pixels change), plus ``jpeg_q15``
#: (the pixels are re-encoded at JPEG quality 15).
SHIFTS: dict[str, _Pixels | None] = {
    "darken": _darken,
    "low_resolution": _low_resolution,
    "blur": _blur,
    "colour_cast": _colour_cast,
    "jpeg_q15": None,
}
#: Changes that must not alert.
BENIGN: dict[str, _Pixels] = {"flip": _flip}
#: Changes that must page: the first two cost the sample model half its accuracy or more;
#: ``night`` leaves it right but puts inputs outside the training range.
HARMFUL: dict[str, _Pixels] = {
    "zoom_corner": _zoom_corner,
    "occlude_half": _occlude_half,
    "night": _night,
}
#: The features each shift is about: an alert is "right" when one of these is among its top two.
EXPECTED: dict[str, frozenset[str]] = {
    "darken": frozenset({"brightness", "dark_fraction"}),
    "low_resolution": frozenset({"sharpness"}),
    "blur": frozenset({"sharpness"}),
    "colour_cast": frozenset({"mean_r", "mean_b", "saturation"}),
    "jpeg_q15": frozenset({"bytes_per_pixel"}),
    "class_mix": frozenset({"predicted_class"}),
}


def reencode_like(original: bytes, rgb: np.ndarray) -> bytes:
    """Encode ``rgb`` as ``original`` was: a JPEG with the original's quantisation tables and
    chroma subsampling, else a PNG as ``imgq sample-data`` writes them."""
    if original[:2] == b"\xff\xd8":
        with Image.open(io.BytesIO(original)) as im:
            assert isinstance(im, JpegImagePlugin.JpegImageFile)
            qtables, sampling = im.quantization, JpegImagePlugin.get_sampling(im)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", qtables=qtables, subsampling=sampling)
        return buf.getvalue()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()


def shift_image(name: str, data: bytes) -> bytes:
    """The encoded image ``data`` with shift ``name`` (a key of :data:`SHIFTS`,
    :data:`BENIGN` or :data:`HARMFUL`) applied, encoded again."""
    rgb = decode_image(data)
    if name == "jpeg_q15":
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 15])[1].tobytes()
    pixels = SHIFTS.get(name) or BENIGN.get(name) or HARMFUL.get(name)
    if pixels is None:
        raise ValueError(f"unknown shift {name!r}; use one of {[*SHIFTS, *BENIGN, *HARMFUL]}")
    return reencode_like(data, pixels(rgb))
