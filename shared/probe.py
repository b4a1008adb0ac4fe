"""An encoded image's header, checked against every limit before a single pixel is decoded.

The first line of defence against hostile input: :func:`probe_image` reads only the header (PNG
and JPEG headers parsed straight from the bytes; every other format, or any header that parser
does not fully understand, by Pillow, which opens lazily) and rejects empty, oversized, unknown,
animated, tiny, huge (decompression bombs) and absurdly shaped images with a reason code.
:mod:`imgq.shared.decode` decodes only what passed.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

from PIL import Image, UnidentifiedImageError

from imgq.shared.errors import InvalidImage

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_JPEG_SCANS",
    "READ_FORMATS",
    "DecodeLimits",
    "ImageInfo",
    "probe_image",
]

#: The formats Pillow may open: those imgq documents. Pillow knows dozens more (JPEG 2000, EPS,
#: ICNS, QOI, ...), each a decoder exposed to hostile bytes for no user.
READ_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
#: Most scans (SOS markers) a JPEG may have. A progressive JPEG has about ten; each scan is a pass
#: over the whole frame, and one of a few bytes can ask for it, so thousands cost seconds of CPU.
MAX_JPEG_SCANS = 100

#: Pillow warns above this many pixels and refuses twice as many; imgq's own limit stays below it.
_PILLOW_MAX_PIXELS = 89_478_485

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
        frames: 1 for a still image, 2 for an animation of two frames or more (they are not
            counted: counting walks the whole file, for some formats in quadratic time).
        mode: Pillow's pixel mode (``"RGB"``, ``"RGBA"``, ``"P"``, ``"I;16"``, ``"CMYK"``, ...).
    """

    format: str
    width: int
    height: int
    frames: int
    mode: str


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
    _check_info(data, info, limits)
    return info


def _check_info(data: bytes, info: ImageInfo, limits: DecodeLimits) -> None:
    """Raise for the first limit the header of ``data`` (read into ``info``) breaks."""
    _check_limits(info, limits)
    if info.format in ("JPEG", "MPO"):
        _check_jpeg_scans(data)


def _check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG with more than :data:`MAX_JPEG_SCANS` scans. Outside marker segments a
    0xFF byte is followed by 0x00 or a restart marker, so ``FF DA`` counts the scans (and those
    of an embedded thumbnail) without parsing."""
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise InvalidImage(
            "unsupported",
            f"a JPEG of {scans} scans, over the {MAX_JPEG_SCANS} imgq decodes (a progressive "
            "JPEG has about ten)",
        )


def _probe_pillow(data: bytes) -> ImageInfo:
    """The general header reader: Pillow opens lazily and reads only the header."""
    try:
        with Image.open(io.BytesIO(data), formats=READ_FORMATS) as im:
            width, height = im.size
            frames = 2 if getattr(im, "is_animated", False) else 1
            return ImageInfo(format=str(im.format), width=width, height=height, frames=frames,
                             mode=im.mode)  # fmt: skip
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage("too_many_pixels", _first_line(exc)) from None
    except UnidentifiedImageError:
        raise _unreadable_header(data, "") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, Warning) as exc:
        # Warning: Pillow warns about damaged metadata; where warnings are errors, it is damage.
        raise _unreadable_header(data, _first_line(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # a plugin's bug met by hostile bytes (TypeError, IndexError, ...)
        raise _unreadable_header(data, f"{type(exc).__name__}: {_first_line(exc)}") from None


def _probe_fast(data: bytes) -> ImageInfo | None:
    """The header of a well-formed PNG or JPEG, parsed from the bytes in a few microseconds.

    ``Image.open`` builds a file object and a plugin instance per call, which can cost more than
    OpenCV's decode of a small JPEG (``docs/benchmarks.md``), so the two formats of nearly all
    traffic are read here. The result is exactly what Pillow
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
            "animated", f"{info.format} with more than one frame; send one frame as a still image"
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
            f"{w}x{h} has aspect {max(w, h) / min(w, h):.4g}, over the limit of "
            f"{limits.max_aspect:g}",
        )


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
