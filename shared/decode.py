"""Encoded bytes -> RGB uint8 array, with every limit checked on the header before any pixel work.

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

import base64
import binascii
import dataclasses
import io
import struct
import zlib
from collections.abc import Iterator

import cv2
import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from imgq.shared.errors import InvalidImage

__all__ = [
    "DecodeLimits",
    "DEFAULT_LIMITS",
    "b64decode_strict",
    "ImageInfo",
    "decode_image",
    "decode_base64",
    "probe_image",
]

#: Pillow warns above this many pixels and refuses twice as many; imgq's own limit stays below it.
_PILLOW_MAX_PIXELS = 89_478_485

#: Formats and Pillow modes that ``cv2.imdecode`` turns into the right RGB (no alpha, no palette).
_OPENCV_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})
_OPENCV_MODES = frozenset({"RGB", "L", "I;16", "I;16B", "I;16L"})

#: Magic numbers of the formats imgq reads: bytes that start like this but fail are damaged images.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

#: Pillow's mode for each PNG (bit depth, colour type); 16-bit gray+alpha is RGBA there.
_PNG_MODES = {
    (1, 0): "1", (2, 0): "L", (4, 0): "L", (8, 0): "L", (16, 0): "I;16",
    (8, 2): "RGB", (16, 2): "RGB",
    (1, 3): "P", (2, 3): "P", (4, 3): "P", (8, 3): "P",
    (8, 4): "LA", (16, 4): "RGBA",
    (8, 6): "RGBA", (16, 6): "RGBA",
}  # fmt: skip
#: PNG chunks before IDAT that the fast probe leaves to Pillow: a second IHDR, an early IEND,
#: compressed or text metadata Pillow decodes (and may refuse), and APNG animation control.
_PNG_PILLOW_CHUNKS = frozenset(
    {b"IHDR", b"IEND", b"iCCP", b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"acTL", b"fcTL", b"fdAT"}
)
#: Shortest body of the fixed-size PNG chunks Pillow parses (shorter ones make it raise).
_PNG_MIN_LENGTHS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
_PNG_CHUNK_HEAD = struct.Struct(">I4s")
_PNG_IHDR = struct.Struct(">IIBBBBB")

#: JPEG start-of-frame markers (all SOFn but DHT 0xC4, JPG 0xC8 and DAC 0xCC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Segments Pillow skips or stores unparsed: DHT, DAC, DNL, DRI, EXP, COM.
_JPEG_SKIPPED = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})
#: Pillow's JPEG mode for each component count.
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
#: (APPn marker, payload prefix, shortest payload Pillow parses without raising).
_JPEG_APP_MIN_LENGTHS = ((0xE0, b"JFIF", 7), (0xE2, b"ICC_PROFILE\0", 14), (0xEE, b"Adobe", 7))
_JPEG_SEGMENT_HEAD = struct.Struct(">HH")
_JPEG_SOF_HEAD = struct.Struct(">BHHB")

#: Pillow modes with an alpha channel (straight or premultiplied) that are composited over white.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
#: Pixels per band of rows on the Pillow path: the temporaries of any frame stay a few MB (and in
#: cache; 2**18 was the fastest of 2**16..2**20 here) instead of full-frame copies.
_BAND_PIXELS = 2**18


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Limits on an encoded image, checked on its header before any pixel is decoded.

    Args:
        max_bytes: Largest encoded payload accepted. Defaults to 20 MiB.
        max_pixels: Largest ``width * height`` accepted (decompression-bomb guard). Defaults to
            40 million, below Pillow's own bomb limit.
        max_aspect: Largest ``long side / short side``. Defaults to 20.
        min_side_px: Shortest side accepted, in pixels. Defaults to 8.

    >>> DecodeLimits(max_pixels=1_000_000).max_pixels
    1000000
    >>> DecodeLimits(max_aspect=0.5)
    Traceback (most recent call last):
    ...
    ValueError: invalid DecodeLimits: max_aspect must be in 1.0..1000.0, got 0.5
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_aspect: float = 20.0
    min_side_px: int = 8

    def __post_init__(self) -> None:
        problems = []
        for name, low, high in (
            ("max_bytes", 1, 2**30),
            ("max_pixels", 1, _PILLOW_MAX_PIXELS),
            ("min_side_px", 1, 4096),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                problems.append(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if not isinstance(self.max_aspect, int | float) or not 1.0 <= self.max_aspect <= 1000.0:
            problems.append(f"max_aspect must be in 1.0..1000.0, got {self.max_aspect!r}")
        if not problems and self.min_side_px**2 > self.max_pixels:
            problems.append(
                f"min_side_px {self.min_side_px} squared exceeds max_pixels {self.max_pixels}: "
                "no image could pass"
            )
        if problems:
            raise ValueError("invalid DecodeLimits: " + "; ".join(problems))


#: The limits used when none are given.
DEFAULT_LIMITS = DecodeLimits()


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the header says about an encoded image.

    Attributes:
        format: Pillow's format name (``"JPEG"``, ``"PNG"``, ``"WEBP"``, ...).
        width: Width in pixels, as stored (before EXIF orientation).
        height: Height in pixels, as stored.
        frames: Number of frames (1 for still images).
        mode: Pillow's pixel mode (``"RGB"``, ``"RGBA"``, ``"P"``, ``"I;16"``, ``"CMYK"``, ...).
    """

    format: str
    width: int
    height: int
    frames: int
    mode: str


def b64decode_strict(text: str | bytes) -> bytes:
    """Standard base64 (RFC 4648, no line breaks) to bytes, exactly as
    ``base64.b64decode(text, validate=True)`` decodes it, errors included.

    Every task carries its image as base64 inside a base64 message body: the standard library
    decodes that at ~100 MB/s on this machine, a fifth of a small model's cost per image;
    pybase64's SIMD decoder is 25x faster. It is stricter (it refuses surplus padding), so
    whatever it refuses goes to the standard library, which decides and words the error.

    >>> b64decode_strict("aW1n"), b64decode_strict("aW1n=")
    (b'img', b'img')
    """
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(text, validate=True)


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


def probe_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> ImageInfo:
    """Read an encoded image's header and check every limit, without decoding pixels.

    PNG and JPEG headers are parsed from the bytes (microseconds); other formats, and any PNG or
    JPEG header the fast parser does not fully understand, are read by Pillow. Both give the same
    :class:`ImageInfo` for the same file.

    Raises:
        InvalidImage: ``empty``, ``too_many_bytes``, ``undecodable`` (not an image Pillow knows),
            ``truncated`` or ``corrupt`` (a known format whose header is cut or damaged),
            ``animated`` (more than one frame), ``too_small``, ``too_many_pixels``, ``bad_aspect``.

    >>> import cv2, numpy as np
    >>> png = cv2.imencode(".png", np.zeros((20, 30, 3), np.uint8))[1].tobytes()
    >>> probe_image(png)
    ImageInfo(format='PNG', width=30, height=20, frames=1, mode='RGB')
    >>> probe_image(b"<html></html>")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    imgq.shared.errors.InvalidImage: undecodable: not an image in a format imgq reads (13 bytes ...)
    """
    _check_bytes(data, limits)
    info = _probe_fast(data) or _probe_pillow(data)
    _check_limits(info, limits)
    return info


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
        _check_limits(info, limits)
    if info.format in _OPENCV_FORMATS and info.mode in _OPENCV_MODES and not _has_alpha(data, info):
        rgb = _decode_opencv(data, info)
    else:
        rgb = _decode_pillow(data)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImage(
            "unsupported", f"{info.format} {info.mode} decoded to {rgb.dtype} {rgb.shape}"
        )
    return np.ascontiguousarray(rgb)


def _probe_pillow(data: bytes) -> ImageInfo:
    """The general header reader: Pillow opens lazily and reads only the header."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1)) if getattr(im, "is_animated", False) else 1
            return ImageInfo(format=str(im.format), width=width, height=height, frames=frames,
                             mode=im.mode)  # fmt: skip
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage("too_many_pixels", _first_line(exc)) from None
    except UnidentifiedImageError:
        raise _unreadable_header(data, "") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, Warning) as exc:
        # Warning: Pillow warns about damaged metadata; where warnings are errors, it is damage.
        raise _unreadable_header(data, _first_line(exc)) from None


def _probe_fast(data: bytes) -> ImageInfo | None:
    """The header of a well-formed PNG or JPEG, parsed from the bytes in a few microseconds.

    ``Image.open`` builds a file object and a plugin instance per call: 20-60 us on an idle core,
    ~0.9 ms in a profiled worker (more than OpenCV's decode of a small JPEG), so the two formats
    of nearly all traffic are read here, 4-6x faster. The result is exactly what Pillow
    reports (tests compare both on many files); anything this parser does not fully understand
    -- a damaged or unusual header, APNG, MPO, text/ICC/EXIF chunks of a PNG, or a size that
    Pillow would treat as a decompression bomb -- returns ``None``, and Pillow decides.
    """
    if data.startswith(_PNG_SIGNATURE):
        info = _probe_png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        info = _probe_jpeg(data)
    else:
        return None
    if info is None or info.width == 0 or info.height == 0:
        return None
    bomb = Image.MAX_IMAGE_PIXELS
    return None if bomb is not None and info.width * info.height > bomb else info


def _probe_png(data: bytes) -> ImageInfo | None:
    """Mode and size from IHDR, after checking every chunk up to the first IDAT as Pillow does
    (CRC, minimum length); ``None`` at the first chunk it leaves to Pillow."""
    width = height = 0
    mode = ""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = _PNG_CHUNK_HEAD.unpack_from(data, pos)
        if kind == b"IDAT":
            return ImageInfo("PNG", width, height, 1, mode) if mode else None
        end = pos + 12 + length
        if end > len(data) or not kind.isalpha():
            return None
        body = memoryview(data)[pos + 4 : end - 4]
        if zlib.crc32(body) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        if pos == len(_PNG_SIGNATURE):
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, _, filter_method, _ = _PNG_IHDR.unpack_from(data, pos + 8)
            mode = _PNG_MODES.get((depth, colour), "")
            if not mode or filter_method:
                return None
        elif kind in _PNG_PILLOW_CHUNKS or length < _png_min_length(kind, mode):
            return None
        pos = end
    return None


def _png_min_length(kind: bytes, mode: str) -> int:
    """Shortest body of a chunk that Pillow parses without raising (0 for chunks it skips)."""
    if kind == b"tRNS":
        return 6 if mode == "RGB" else 2 if mode in ("1", "L", "I;16") else 0
    return _PNG_MIN_LENGTHS.get(kind, 0)


def _probe_jpeg(data: bytes) -> ImageInfo | None:
    """Mode and size from the SOFn segment, walking the marker segments up to the first scan
    (SOS) and checking each the way Pillow does; ``None`` at the first thing it leaves to
    Pillow (junk between segments, an unusual marker, a second frame header, MPO)."""
    info = None
    pos = 2
    while pos + 4 <= len(data):
        marker, length = _JPEG_SEGMENT_HEAD.unpack_from(data, pos)
        start, end = pos + 4, pos + 2 + length
        if length < 2 or end > len(data) or marker >> 8 != 0xFF:
            return None
        marker &= 0xFF
        if marker == 0xDA:  # start of scan: the header is complete
            return info
        if marker in _JPEG_SOF:
            if info is not None or length < 8:
                return None
            bits, height, width, layers = _JPEG_SOF_HEAD.unpack_from(data, start)
            mode = _JPEG_MODES.get(layers)
            if bits != 8 or mode is None or length != 8 + 3 * layers:
                return None
            info = ImageInfo("JPEG", width, height, 1, mode)
        elif marker == 0xDB:
            if not _jpeg_dqt_fits(data, start, end):
                return None
        elif 0xE0 <= marker <= 0xEF:
            if not _jpeg_app_plain(data, marker, start, end):
                return None
        elif marker not in _JPEG_SKIPPED:
            return None
        pos = end
    return None


def _jpeg_dqt_fits(data: bytes, start: int, end: int) -> bool:
    """True when the quantisation tables (64 values of 1 or 2 bytes each) fill the segment."""
    while start < end:
        start += 65 if data[start] < 16 else 129
    return start == end


def _jpeg_app_plain(data: bytes, marker: int, start: int, end: int) -> bool:
    """False for an APPn segment that Pillow would read differently or fail on: an MPF index
    (Pillow may open the file as a multi-frame MPO), or a JFIF, ICC or Adobe header too short
    for Pillow to parse."""
    if marker == 0xE2 and data.startswith(b"MPF\0", start, end):
        return False
    for app, prefix, min_length in _JPEG_APP_MIN_LENGTHS:
        if marker == app and data.startswith(prefix, start, end):
            return end - start >= min_length
    return True


def _check_bytes(data: bytes, limits: DecodeLimits) -> None:
    """Raise for an empty or oversized payload."""
    if not data:
        raise InvalidImage("empty", "the payload has 0 bytes")
    if len(data) > limits.max_bytes:
        raise InvalidImage(
            "too_many_bytes", f"{len(data)} bytes is over the limit of {limits.max_bytes} bytes"
        )


def _check_limits(info: ImageInfo, limits: DecodeLimits) -> None:
    """Raise for the first limit the header breaks."""
    w, h = info.width, info.height
    if info.frames > 1:
        raise InvalidImage(
            "animated", f"{info.format} with {info.frames} frames; send one frame as a still image"
        )
    if min(w, h) < limits.min_side_px:
        raise InvalidImage(
            "too_small", f"{w}x{h} has a side under the minimum of {limits.min_side_px} pixels"
        )
    if w * h > limits.max_pixels:
        raise InvalidImage(
            "too_many_pixels",
            f"{w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels}",
        )
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise InvalidImage(
            "bad_aspect",
            f"{w}x{h} has aspect {max(w, h) / min(w, h):.1f}, over the limit of "
            f"{limits.max_aspect:g}",
        )


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
        with Image.open(io.BytesIO(data)) as im:
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


def _unreadable_header(data: bytes, why: str) -> InvalidImage:
    """``undecodable`` for bytes that are no image format at all, else truncated/corrupt."""
    if _looks_like_image(data):
        return _damaged(data, "its header cannot be read" + (f": {why}" if why else ""))
    return InvalidImage(
        "undecodable",
        f"not an image in a format imgq reads ({len(data)} bytes starting {data[:9]!r})",
    )


def _looks_like_image(data: bytes) -> bool:
    """True when the bytes start with the signature of a JPEG, PNG, GIF, TIFF, WebP or BMP."""
    if data.startswith(_SIGNATURES):
        return True
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return True
    return data.startswith(b"BM") and data[14:18] in [
        n.to_bytes(4, "little") for n in _BMP_HEADER_SIZES
    ]


def _ends_early(data: bytes, fmt: str) -> bool:
    """True when a JPEG has no end-of-image marker after its last scan, or a PNG no IEND chunk."""
    if fmt == "JPEG":
        end = data.rfind(b"\xff\xd9")
        return end == -1 or end < data.rfind(b"\xff\xda")
    if fmt == "PNG":
        return data.rfind(_PNG_IEND) == -1
    return False


def _damaged(data: bytes, what: str) -> InvalidImage:
    """``truncated`` if a JPEG/PNG lacks its end marker, else ``corrupt`` (naming a bad PNG CRC)."""
    fmt = (
        "JPEG" if data.startswith(b"\xff\xd8") else "PNG" if data.startswith(_PNG_SIGNATURE) else ""
    )
    if (fmt and _ends_early(data, fmt)) or "truncated" in what.lower():
        return InvalidImage(
            "truncated", f"the {fmt or 'image'} data ends early ({len(data)} bytes); {what}"
        )
    if fmt == "PNG":
        bad = _png_bad_crc_chunk(data)
        if bad:
            return InvalidImage("corrupt", f"PNG chunk {bad} has a bad CRC; {what}")
    return InvalidImage("corrupt", what)


def _png_bad_crc_chunk(data: bytes) -> str:
    """The type of the first PNG chunk whose CRC does not match, or ``""``."""
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        body = data[pos + 4 : pos + 8 + length]
        crc = data[pos + 8 + length : pos + 12 + length]
        if len(crc) < 4:
            return ""
        if zlib.crc32(body) != struct.unpack(">I", crc)[0]:
            return body[:4].decode("latin-1")
        pos += 12 + length
    return ""


def _first_line(exc: BaseException) -> str:
    """An exception's message, first line only (OpenCV's are multi-line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
