"""Encoded bytes -> RGB uint8 array, after the header passed every limit (:mod:`imgq.shared.probe`).

The order of work is the defence against hostile input: :func:`probe_image` reads only the header
(PNG and JPEG headers parsed straight from the bytes, every other format or any header that parser
does not fully understand by Pillow, which opens lazily) and rejects empty, oversized, unknown,
animated, tiny, huge (decompression bombs) and absurdly shaped images *before* a single pixel is
decoded. Only then does :func:`decode_image` decode, with OpenCV where it is correct and fast (the
hot path: baseline JPEG, PNG, WebP, BMP, TIFF without alpha) and with Pillow where OpenCV falls
short (alpha, palettes, CMYK, GIF). Every refusal is an :class:`~shared.errors.InvalidImage` with
a reason code.
"""

from __future__ import annotations

import binascii
import io
import struct
import zlib
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image, ImageOps

from imgq.shared.b64 import b64decode_strict
from imgq.shared.errors import InvalidImage
from imgq.shared.probe import (
    DEFAULT_LIMITS,
    READ_FORMATS,
    DecodeLimits,
    ImageInfo,
    _check_bytes,
    _check_info,
    _damaged,
    _ends_early,
    _first_line,
    probe_image,
)

__all__ = [
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "b64decode_strict",
    "ImageInfo",
    "decode_image",
    "decode_base64",
    "probe_image",
]

_OPENCV_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})
_OPENCV_MODES = frozenset({"RGB", "L", "I;16", "I;16B", "I;16L"})
#: Pillow modes with an alpha channel (straight or premultiplied) that are composited over white.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
#: Pixels per band of rows on the Pillow path: the temporaries of any frame stay a few MB (and in
#: cache; 2**18 was the fastest of 2**16..2**20 here) instead of full-frame copies.
_BAND_PIXELS = 2**18


def decode_base64(text: str | bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """Decode the standard base64 (RFC 4648, no line breaks) of an encoded image.

    The length is judged from the text before decoding, so an oversized payload costs no
    allocation.

    Raises:
        InvalidImage: ``too_many_bytes`` when the text would decode to more than
            ``limits.max_bytes``; ``bad_base64`` when it is not base64; ``empty`` when it decodes
            to nothing.

    >>> decode_base64("aW1n")
    b'img'
    >>> decode_base64("not base64!")
    Traceback (most recent call last):
    ...
    imgq.shared.errors.InvalidImage: bad_base64: not valid base64: Only base64 data is allowed
    """
    max_chars = 4 * -(-limits.max_bytes // 3)
    if len(text) > max_chars:
        raise InvalidImage(
            "too_many_bytes",
            f"base64 text of {len(text)} characters decodes to more than the limit of "
            f"{limits.max_bytes} bytes",
        )
    try:
        data = b64decode_strict(text)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("bad_base64", f"not valid base64: {_first_line(exc)}") from None
    if not data:
        raise InvalidImage("empty", "the base64 text decodes to 0 bytes")
    return data


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, info: ImageInfo | None = None
) -> np.ndarray:
    """Decode an encoded image into a C-contiguous ``(height, width, 3)`` RGB uint8 array.

    EXIF orientation is applied (the array is upright as a viewer shows it). 16-bit images are
    scaled to 8 bits (``x / 256``; OpenCV rounds for TIFF, truncates for PNG). Gray and palette
    images become RGB. CMYK JPEGs are converted.
    **Alpha rule:** transparent pixels are composited over white,
    ``rgb * a/255 + 255 * (1 - a/255)``, so a logo on a transparent background looks as it does
    in a browser, and the same file always gives the same pixels.

    Memory: besides the result (3 bytes per pixel), only the decoder's own frame and a few MB of
    temporaries; the alpha, palette and 16-bit conversions work in bands of rows.

    Args:
        data: The encoded bytes (JPEG, PNG, WebP, BMP, TIFF or a single-frame GIF).
        limits: Limits checked on the header by :func:`probe_image` before decoding.
        info: What ``probe_image(data, limits)`` returned, when the caller has already called it
            (the worker does, to budget a batch's decoded pixels before decoding any): the header
            is then not read again; only the limits are checked again on it (microseconds). It
            must come from these very bytes. Defaults to ``None``: probe here.

    Raises:
        InvalidImage: any reason of :func:`probe_image`, or ``truncated`` / ``corrupt`` when the
            pixel data ends early or is damaged, or ``unsupported`` for a pixel layout imgq does
            not convert.

    >>> import cv2, numpy as np
    >>> bgr = np.zeros((16, 24, 3), np.uint8); bgr[..., 2] = 255  # pure red in OpenCV's BGR
    >>> rgb = decode_image(cv2.imencode(".png", bgr)[1].tobytes())
    >>> rgb.shape, rgb[0, 0].tolist()
    ((16, 24, 3), [255, 0, 0])
    """
    if info is None:
        info = probe_image(data, limits)
    else:
        _check_bytes(data, limits)
        _check_info(data, info, limits)
    if info.format in _OPENCV_FORMATS and info.mode in _OPENCV_MODES and not _has_alpha(data, info):
        rgb = _decode_opencv(data, info)
    else:
        rgb = _decode_pillow(data)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImage(
            "unsupported", f"{info.format} {info.mode} decoded to {rgb.dtype} {rgb.shape}"
        )
    return np.ascontiguousarray(rgb)


def _has_alpha(data: bytes, info: ImageInfo) -> bool:
    """True when the header says some pixels may be transparent (OpenCV would drop that)."""
    if info.format == "PNG":
        # A tRNS chunk gives a gray or RGB PNG a transparent colour; it precedes IDAT.
        idat = data.find(b"IDAT")
        return data.find(b"tRNS", 0, idat if idat > 0 else len(data)) != -1
    return False


def _decode_opencv(data: bytes, info: ImageInfo) -> np.ndarray:
    """The fast path: ``cv2.imdecode`` straight to RGB, after a check that the data is complete.

    Older OpenCV builds return the decoded part of a truncated JPEG or PNG with only a log line,
    so a missing end marker is refused here rather than trusted to the decoder.
    """
    if _ends_early(data, info.format):
        raise InvalidImage("truncated", f"the {info.format} data ends before its end marker")
    try:
        rgb = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    except cv2.error as exc:
        raise _damaged(data, f"OpenCV cannot decode it: {_first_line(exc)}") from None
    if rgb is None:
        raise _damaged(data, f"the {info.format} pixel data cannot be decoded")
    return rgb


def _decode_pillow(data: bytes) -> np.ndarray:
    """The general path for alpha, palettes, CMYK and GIF: Pillow decodes, :func:`_to_rgb` converts.

    Pillow's frame is the only full-size buffer besides the result, and it is freed on return:
    the orientation is applied in place (``exif_transpose`` otherwise copies the frame even when
    there is nothing to turn) and the pixels are read out band by band, never through a
    full-frame ``convert`` or ``np.asarray`` (a ``tobytes`` copy, joined from chunks: twice the
    frame). A 40-megapixel RGBA PNG of 167 kB cost 1.1 GB and 3.2 s of CPU that way; now it
    costs its 160 MB frame, the 120 MB result and 0.5 s (``bench/worst_image.py``).
    """
    try:
        with Image.open(io.BytesIO(data), formats=READ_FORMATS) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im)
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise InvalidImage(
                "truncated", f"the image data ends early: {_first_line(exc)}"
            ) from None
        raise InvalidImage("corrupt", f"the image data is damaged: {_first_line(exc)}") from None
    except (SyntaxError, ValueError, zlib.error, struct.error, EOFError, Warning) as exc:
        raise InvalidImage("corrupt", f"the image data is damaged: {_first_line(exc)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # a plugin's bug met by hostile bytes (TypeError, IndexError, ...)
        raise InvalidImage(
            "corrupt", f"the image data is damaged: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image as a new RGB uint8 array, filled band by band.

    Each pixel is what converting the whole frame at once gives: alpha (an alpha channel or a
    transparent colour) composited over white by :func:`_over_white`, a palette looked up in its
    256 final colours, 16-bit gray taken to its high byte, any other mode converted by Pillow.
    The band buffers are allocated once per frame, not once per band: in a process whose
    allocator has not yet seen large frees, glibc hands each band fresh pages to fault in
    (up to 0.5 s more for a 40-megapixel frame).
    """
    width, height = im.size
    out = np.empty((height, width, 3), np.uint8)
    bands = list(_row_bands(height, width))
    rows = bands[0][1] if bands else 0
    alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode == "P":
        palette = _palette_colours(im, alpha)
        indices = np.empty((rows, width, 3), np.uint8)
        for y0, y1 in bands:
            index_rows = np.asarray(im.crop((0, y0, width, y1)))
            cv2.cvtColor(index_rows, cv2.COLOR_GRAY2RGB, dst=indices[: y1 - y0])
            cv2.LUT(indices[: y1 - y0], palette, dst=out[y0:y1])
    elif alpha:
        over_white = _OverWhite(rows, width)
        for y0, y1 in bands:
            band = im.crop((0, y0, width, y1))
            over_white(
                np.asarray(band if band.mode == "RGBA" else band.convert("RGBA")), out[y0:y1]
            )
    elif im.mode.startswith("I;16"):
        high = np.empty((rows, width), np.uint8)
        for y0, y1 in bands:
            gray16_rows = np.asarray(im.crop((0, y0, width, y1)))
            np.right_shift(gray16_rows, 8, out=high[: y1 - y0], casting="unsafe")
            cv2.cvtColor(high[: y1 - y0], cv2.COLOR_GRAY2RGB, dst=out[y0:y1])
    else:
        for y0, y1 in bands:
            band = im.crop((0, y0, width, y1))
            out[y0:y1] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
    return out


def _palette_colours(im: Image.Image, alpha: bool) -> np.ndarray:
    """The ``(256, 1, 3)`` RGB that each index of a ``P`` image becomes (over white if ``alpha``),
    found by converting the 256 indices with Pillow itself, palette and transparency included."""
    indices = im.crop((0, 0, 256, 1))  # a crop keeps the palette and the transparency
    indices.putdata(range(256))
    if alpha:
        colours = _over_white(np.asarray(indices.convert("RGBA")))
    else:
        colours = np.asarray(indices.convert("RGB"))
    return colours.reshape(256, 1, 3)


def _row_bands(height: int, width: int) -> Iterator[tuple[int, int]]:
    """``(first, end)`` rows of consecutive bands of about :data:`_BAND_PIXELS` pixels.

    >>> list(_row_bands(5, 2**17))
    [(0, 2), (2, 4), (4, 5)]
    """
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for first in range(0, height, rows):
        yield first, min(first + rows, height)


def _over_white(rgba: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Composite an RGBA uint8 array over white, rounding to nearest:
    ``(rgb * a + 255 * (255 - a) + 127) // 255``.

    Works in bands of rows (:class:`_OverWhite`) into ``out`` (a new ``(h, w, 3)`` uint8 array
    when not given), so the temporaries are a few MB whatever the size of the frame.

    >>> _over_white(np.array([[[255, 0, 0, 128], [10, 20, 30, 0]]], np.uint8)).tolist()
    [[[255, 127, 127], [255, 255, 255]]]
    """
    height, width = rgba.shape[:2]
    if out is None:
        out = np.empty((height, width, 3), np.uint8)
    bands = list(_row_bands(height, width))
    over_white = _OverWhite(bands[0][1] if bands else 0, width)
    for y0, y1 in bands:
        over_white(rgba[y0:y1], out[y0:y1])
    return out


class _OverWhite:
    """Composites bands of up to ``rows`` RGBA rows over white, with one set of buffers.

    The integer of :func:`_over_white` is computed as ``255 - round((255 - rgb) * a / 255)``,
    with the exact rounded division by 255 of a uint16 ``x``: ``(x + 128 + ((x + 128) >> 8)) >>
    8``. OpenCV only moves bytes (drops or repeats a channel, inverts), which numpy does 5x
    slower on interleaved channels; a 40-megapixel frame takes ~0.1 s, not 2.3 s.
    """

    def __init__(self, rows: int, width: int) -> None:
        self._inverse, self._alpha = np.empty((2, rows, width, 3), np.uint8)
        self._alpha_plane = np.empty((rows, width), np.uint8)
        self._mixed, self._high = np.empty((2, rows, width, 3), np.uint16)

    def __call__(self, rgba: np.ndarray, out: np.ndarray) -> None:
        """Write the composite of ``rgba`` (at most ``rows`` rows) into ``out``."""
        n = rgba.shape[0]
        rgba = np.ascontiguousarray(rgba)
        inverse, alpha_plane, alpha = self._inverse[:n], self._alpha_plane[:n], self._alpha[:n]
        mixed, high = self._mixed[:n], self._high[:n]
        cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=inverse)
        cv2.bitwise_not(inverse, dst=inverse)
        cv2.extractChannel(rgba, 3, dst=alpha_plane)
        cv2.cvtColor(alpha_plane, cv2.COLOR_GRAY2RGB, dst=alpha)
        np.multiply(inverse, alpha, out=mixed, dtype=np.uint16)
        mixed += 128
        np.right_shift(mixed, 8, out=high)
        mixed += high
        mixed >>= 8
        np.subtract(255, mixed, out=out, casting="unsafe")
