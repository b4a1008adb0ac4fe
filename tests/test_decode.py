"""shared.decode: real encoded images of every format and layout, and hostile input (issue 2)."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, PngImagePlugin

from imgq.shared.decode import (
    DEFAULT_LIMITS,
    DecodeLimits,
    ImageInfo,
    _decode_pillow,
    decode_base64,
    decode_image,
    probe_image,
)
from imgq.shared.decode import _over_white as _over_white_in_bands
from imgq.shared.errors import IMAGE_REASONS, InvalidImage
from imgq.shared.probe import MAX_JPEG_SCANS, _probe_fast, _probe_pillow

# Four flat colour quadrants: lossy codecs reproduce them closely, lossless ones exactly.
_QUADRANT_COLOURS = [(200, 30, 40), (20, 180, 60), (30, 60, 210), (240, 220, 20)]


def _quadrants(h: int = 32, w: int = 48) -> np.ndarray:
    rgb = np.empty((h, w, 3), np.uint8)
    for i, colour in enumerate(_QUADRANT_COLOURS):
        rgb[(i // 2) * h // 2 : (i // 2 + 1) * h // 2, (i % 2) * w // 2 : (i % 2 + 1) * w // 2] = (
            colour
        )
    return rgb


def _alpha() -> np.ndarray:
    """Alpha 0 on the left third, 128 in the middle, 255 on the right."""
    a = np.full((32, 48), 255, np.uint8)
    a[:, :16], a[:, 16:32] = 0, 128
    return a


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.floor(rgb * a + 255 * (1 - a) + 0.5).astype(np.uint8)


def _pil(arr: np.ndarray, fmt: str, mode: str | None = None, **kw: object) -> bytes:
    im = Image.fromarray(arr)
    if mode == "P":  # an exact palette: the image has four colours
        im = im.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _cv(ext: str, arr: np.ndarray, params: tuple[int, ...] = ()) -> bytes:
    ok, buf = cv2.imencode(ext, arr, list(params))
    assert ok
    return buf.tobytes()


def _gray(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _grad16(channels: int) -> np.ndarray:
    g = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 41 % 65536).astype(np.uint16)
    return g if channels == 1 else np.dstack([g, g // 2, 65535 - g])


RGB = _quadrants()
BGR = RGB[..., ::-1].copy()
GRAY = _gray(RGB)

# (encode, expected RGB, largest mean absolute error allowed)
CASES: dict[str, tuple[Callable[[], bytes], Callable[[], np.ndarray], float]] = {
    "png_rgb": (lambda: _cv(".png", BGR), lambda: RGB, 0),
    "png_gray8": (lambda: _cv(".png", GRAY), lambda: np.dstack([GRAY] * 3), 0),
    "png_gray16": (lambda: _cv(".png", _grad16(1)), lambda: np.dstack([_grad16(1) >> 8] * 3), 0),
    "png_rgb16": (
        lambda: _cv(".png", _grad16(3)[..., ::-1].copy()),
        lambda: (_grad16(3) >> 8).astype(np.uint8),
        0,
    ),
    "png_rgba": (
        lambda: _cv(".png", np.dstack([BGR, _alpha()])),
        lambda: _over_white(RGB, _alpha()),
        0,
    ),
    "png_gray_alpha": (
        lambda: _pil(np.dstack([GRAY, _alpha()]), "PNG", "LA"),
        lambda: _over_white(np.dstack([GRAY] * 3), _alpha()),
        0,
    ),
    "png_palette": (lambda: _pil(RGB, "PNG", "P"), lambda: RGB, 0),
    "png_palette_transparent": (
        lambda: _pil(RGB, "PNG", "P", transparency=0),
        lambda: np.where(
            (np.asarray(Image.open(io.BytesIO(_pil(RGB, "PNG", "P")))) == 0)[..., None],
            np.uint8(255),
            RGB,
        ),
        0,
    ),
    "jpeg_rgb": (lambda: _cv(".jpg", BGR, (cv2.IMWRITE_JPEG_QUALITY, 95)), lambda: RGB, 5),
    "jpeg_gray": (lambda: _cv(".jpg", GRAY), lambda: np.dstack([GRAY] * 3), 3),
    "jpeg_cmyk": (lambda: _pil(RGB, "JPEG", "CMYK", quality=95), lambda: RGB, 6),
    "jpeg_progressive": (lambda: _pil(RGB, "JPEG", quality=95, progressive=True), lambda: RGB, 5),
    "webp_lossless": (lambda: _pil(RGB, "WEBP", lossless=True), lambda: RGB, 0),
    "webp_lossy": (lambda: _cv(".webp", BGR, (cv2.IMWRITE_WEBP_QUALITY, 95)), lambda: RGB, 4),
    "webp_rgba": (
        lambda: _pil(np.dstack([RGB, _alpha()]), "WEBP", lossless=True, exact=True),
        lambda: _over_white(RGB, _alpha()),
        0,
    ),
    "bmp_rgb": (lambda: _cv(".bmp", BGR), lambda: RGB, 0),
    "bmp_palette": (lambda: _pil(RGB, "BMP", "P"), lambda: RGB, 0),
    "tiff_rgb": (lambda: _cv(".tiff", BGR), lambda: RGB, 0),
    "tiff_gray16": (lambda: _cv(".tiff", _grad16(1)), lambda: np.dstack([_grad16(1) >> 8] * 3), 0),
    "tiff_rgb16": (  # OpenCV rounds x / 256 here instead of taking the high byte
        lambda: _cv(".tiff", _grad16(3)[..., ::-1].copy()),
        lambda: (_grad16(3) >> 8).astype(np.uint8),
        0.5,
    ),
    "tiff_rgba": (
        lambda: _pil(np.dstack([RGB, _alpha()]), "TIFF"),
        lambda: _over_white(RGB, _alpha()),
        0,
    ),
    "gif_single_frame": (lambda: _pil(RGB, "GIF"), lambda: RGB, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decodes_each_format_and_layout_to_expected_rgb(case: str) -> None:
    """Each format and channel layout decodes to the expected RGB uint8 array."""
    encode, expected, tolerance = CASES[case]
    rgb = decode_image(encode())
    want = expected()
    assert rgb.dtype == np.uint8 and rgb.flags["C_CONTIGUOUS"]
    assert rgb.shape == want.shape
    err = np.abs(rgb.astype(np.int16) - want.astype(np.int16)).mean()
    assert err <= tolerance, f"{case}: mean abs error {err:.2f} > {tolerance}"


@pytest.mark.parametrize("orientation,turn", [(3, 2), (6, -1), (8, 1)])
def test_jpeg_exif_orientation_is_applied(orientation: int, turn: int) -> None:
    """A JPEG with an EXIF Orientation tag decodes upright, as a viewer shows it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    rgb = decode_image(_pil(RGB, "JPEG", quality=95, exif=exif.tobytes()))
    want = np.rot90(RGB, turn)
    assert rgb.shape == want.shape
    assert np.abs(rgb.astype(np.int16) - want).mean() < 5


def _over_white_formula(rgba: np.ndarray) -> np.ndarray:
    """The alpha rule as first written: whole-frame uint16 arithmetic, rounding to nearest."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    mixed = rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127
    return (mixed // 255).astype(np.uint8)


def _decode_pillow_whole_frame(data: bytes) -> np.ndarray:
    """The Pillow path before it worked in bands: every conversion on the whole frame."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        if upright.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in upright.info:
            return _over_white_formula(np.asarray(upright.convert("RGBA")))
        if upright.mode.startswith("I;16"):
            return np.repeat((np.asarray(upright) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        return np.asarray(upright.convert("RGB"))


def test_over_white_is_exact_for_every_colour_and_alpha() -> None:
    """shared.decode._over_white gives the formula's value for all 256 x 256 (colour, alpha)."""
    colour, alpha = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgba = np.dstack([colour, 255 - colour, colour[:, ::-1], alpha])
    assert np.array_equal(_over_white_in_bands(rgba), _over_white_formula(rgba))


@pytest.mark.parametrize("band_pixels", [2**18, 100])
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 333), (333, 1), (7, 13), (9, 100), (11, 101), (601, 437), (3, 2**18 + 3)]
)
def test_over_white_matches_the_formula_on_any_shape_and_band_size(
    shape: tuple[int, int], band_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random RGBA of odd shapes (one row, one column, bands ending mid-frame) match exactly."""
    monkeypatch.setattr("imgq.shared.decode._BAND_PIXELS", band_pixels)
    rgba = np.random.default_rng(shape[0] * shape[1]).integers(0, 256, (*shape, 4), np.uint8)
    want = _over_white_formula(rgba)
    assert np.array_equal(_over_white_in_bands(rgba), want)
    out = np.zeros_like(want)
    assert _over_white_in_bands(rgba, out) is out and np.array_equal(out, want)
    strided = np.repeat(rgba, 2, axis=1)[:, ::2]  # not C-contiguous
    assert np.array_equal(_over_white_in_bands(strided), want)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _grad(h: int = 23, w: int = 37) -> np.ndarray:
    """Every pixel different: odd sizes so that bands end mid-frame."""
    y, x = np.mgrid[:h, :w]
    return np.dstack([x * 7 % 256, y * 11 % 256, (x * y) % 256, (x + 3 * y) * 5 % 256]).astype(
        np.uint8
    )


_G = _grad()
_GRAY16 = (_G[..., 0].astype(np.uint16) << 8) | _G[..., 1]

# Images for _decode_pillow in every mode it converts (some would normally go to OpenCV).
PILLOW_PATH: dict[str, Callable[[], bytes]] = {
    "png_rgba": lambda: _cv(".png", _G),
    "png_rgba16": lambda: _cv(".png", _G.astype(np.uint16) * 257 + 3),
    "png_gray_alpha": lambda: _pil(_G[..., [0, 3]], "PNG"),
    "png_rgb_transparent_colour": lambda: _pil(
        _G[..., :3], "PNG", transparency=tuple(_G[0, 0, :3].tolist())
    ),
    "png_gray_transparent_value": lambda: _pil(_G[..., 0], "PNG", transparency=int(_G[0, 1, 0])),
    "png_gray16": lambda: _cv(".png", _GRAY16),
    "png_gray16_transparent_value": lambda: _pil(_GRAY16, "PNG", transparency=int(_GRAY16[0, 1])),
    "png_bilevel": lambda: _pil(_G[..., 0], "PNG", "1"),
    "png_palette": lambda: _pil(_G[..., :3], "PNG", "P"),
    "png_palette_one_transparent": lambda: _pil(_G[..., :3], "PNG", "P", transparency=3),
    "png_palette_alphas": lambda: _pil(
        _G[..., :3], "PNG", "P", transparency=bytes(range(0, 256, 3))
    ),
    "png_rgba_exif_rotated": lambda: _pil(_G, "PNG", exif=_exif(6)),
    "jpeg_exif_rotated": lambda: _pil(_G[..., :3], "JPEG", quality=90, exif=_exif(8)),
    "jpeg_cmyk": lambda: _pil(_G[..., :3], "JPEG", "CMYK", quality=90),
    "gif": lambda: _pil(_G[..., :3], "GIF"),
    "gif_transparent": lambda: _pil(_G[..., :3], "GIF", "P", transparency=5),
    "bmp_palette": lambda: _pil(_G[..., :3], "BMP", "P"),
    "tiff_rgba": lambda: _pil(_G, "TIFF"),
    "webp_rgba": lambda: _pil(_G, "WEBP", lossless=True, exact=True),
}


@pytest.mark.parametrize("band_pixels", [2**18, 50])
@pytest.mark.parametrize("case", sorted(PILLOW_PATH))
def test_pillow_path_in_bands_equals_the_whole_frame_conversion(
    case: str, band_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (a 167 kB 40-megapixel RGBA PNG took 1.1 GB and 3 s): converting in bands of
    rows gives exactly the pixels of the former whole-frame conversion, in every Pillow mode."""
    monkeypatch.setattr("imgq.shared.decode._BAND_PIXELS", band_pixels)
    data = PILLOW_PATH[case]()
    want = _decode_pillow_whole_frame(data)
    got = _decode_pillow(data)
    assert got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
    assert got.shape == want.shape and np.array_equal(got, want)


def test_large_flat_rgba_png_decodes_without_full_frame_temporaries() -> None:
    """A 10-megapixel RGBA PNG of a few kB decodes with only the result and band buffers traced.

    Pillow's own 40 MB frame is not traced (its allocator is not Python's), so the traced peak
    is the 30 MB result plus a few MB: one more full-frame copy (``np.asarray`` of the RGBA
    frame, 40 MB) or uint16 temporary (60 MB) would break the bound.
    """
    h, w = 2500, 4000
    bgra = np.empty((h, w, 4), np.uint8)
    bgra[..., :3] = (40, 30, 200)
    bgra[..., 3] = np.arange(w) % 256
    data = _cv(".png", bgra, (cv2.IMWRITE_PNG_COMPRESSION, 9))
    del bgra
    assert len(data) < 1_000_000
    tracemalloc.start()
    try:
        rgb = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    first_row = np.dstack([np.full((1, w, 3), (200, 30, 40), np.uint8), np.arange(w) % 256])
    assert np.array_equal(rgb, np.broadcast_to(_over_white_formula(first_row), rgb.shape))
    assert peak < rgb.nbytes + 16 * 2**20, f"traced peak {peak / 2**20:.0f} MB"


def test_decode_uses_the_info_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """With probe_image's result passed in, decode_image reads no header and gives the same
    pixels; the limits are still checked on it."""
    data = _cv(".png", np.dstack([BGR, _alpha()]))
    info = probe_image(data)
    want = decode_image(data)

    def no_second_probe(_: bytes) -> None:
        raise AssertionError("the header was probed again")

    monkeypatch.setattr("imgq.shared.probe._probe_fast", no_second_probe)
    monkeypatch.setattr("imgq.shared.probe._probe_pillow", no_second_probe)
    assert np.array_equal(decode_image(data, DEFAULT_LIMITS, info), want)
    assert np.array_equal(decode_image(data, info=info), want)
    with pytest.raises(InvalidImage, match="too_many_pixels"):
        decode_image(data, DecodeLimits(max_pixels=1000), info)
    with pytest.raises(InvalidImage, match="too_many_bytes"):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1), info)


def test_probe_reads_the_header_only() -> None:
    """probe_image reports format, size, frames and mode."""
    assert probe_image(_pil(RGB, "PNG", "P")) == ImageInfo("PNG", 48, 32, 1, "P")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose IHDR claims any size and pixel layout; its tiny IDAT never fills it."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _flip_byte(data: bytes, pos: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 0xFF
    return bytes(out)


def _idat_crc_pos(png: bytes) -> int:
    i = png.find(b"IDAT")
    return i + 4 + struct.unpack(">I", png[i - 4 : i])[0]


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


_JPEG = _cv(".jpg", np.ascontiguousarray(np.tile(BGR, (4, 4, 1))))
_PNG = _cv(".png", np.ascontiguousarray(np.tile(BGR, (4, 4, 1))))

BAD_INPUTS: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "empty"),
    "over_byte_limit": (lambda: b"\xff" * (DEFAULT_LIMITS.max_bytes + 1), "too_many_bytes"),
    "random_bytes": (lambda: np.random.default_rng(1).bytes(4096), "undecodable"),
    "text": (lambda: b"hello, this is plainly not an image\n" * 10, "undecodable"),
    "html": (lambda: b"<!doctype html><html><body><img src=x></body></html>", "undecodable"),
    "text_starting_like_bmp": (
        lambda: b"BMW and Audi are car makers, not images." * 3,
        "undecodable",
    ),
    "riff_wave_audio": (lambda: b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64), "undecodable"),
    "webp_damaged_header": (lambda: b"RIFF\x24\x00\x00\x00WEBPVP8X" + bytes(64), "corrupt"),
    "truncated_jpeg": (lambda: _JPEG[: len(_JPEG) // 2], "truncated"),
    "jpeg_without_end_marker": (lambda: _JPEG[:-2], "truncated"),
    "jpeg_cut_in_header": (lambda: _JPEG[:120], "truncated"),
    "truncated_png": (lambda: _PNG[: len(_PNG) // 2], "truncated"),
    "png_bad_idat_crc": (lambda: _flip_byte(_PNG, _idat_crc_pos(_PNG)), "corrupt"),
    "png_bad_ihdr_crc": (lambda: _flip_byte(_PNG, 29), "corrupt"),
    "png_damaged_stream": (lambda: _flip_byte(_PNG, _PNG.find(b"IDAT") + 6), "corrupt"),
    "png_50000x50000_header": (lambda: _png_header_only(50_000, 50_000), "too_many_pixels"),
    "png_10000x10000_header": (lambda: _png_header_only(10_000, 10_000), "too_many_pixels"),
    "png_7000x7000_header": (lambda: _png_header_only(7_000, 7_000), "too_many_pixels"),
    "one_by_one": (lambda: _cv(".png", np.zeros((1, 1, 3), np.uint8)), "too_small"),
    "zero_height_header": (lambda: _png_header_only(64, 0), "corrupt"),
    "extreme_aspect": (lambda: _cv(".png", np.zeros((10, 400, 3), np.uint8)), "bad_aspect"),
    "animated_gif": (lambda: _animated("GIF"), "animated"),
    "animated_webp": (lambda: _animated("WEBP"), "animated"),
    "animated_png": (lambda: _animated("PNG"), "animated"),
    "multi_page_tiff": (lambda: _animated("TIFF"), "animated"),
    # Formats Pillow knows but imgq does not read: their decoders never see hostile bytes.
    **{
        f"{fmt.lower()}_image": (lambda fmt=fmt: _pil(RGB, fmt), "undecodable")
        for fmt in ("JPEG2000", "PPM", "QOI", "ICO", "TGA", "SGI", "PCX")
    },
    "jpeg_of_150_scans": (lambda: _many_scans(150), "unsupported"),
}


def _many_scans(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has ``scans`` scans."""
    data = _pil(RGB, "JPEG", progressive=True)
    last = data.rfind(b"\xff\xda")
    extra = scans - data.count(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + b"\xff\xd9"


def test_a_jpeg_of_many_scans_is_refused_before_decoding() -> None:
    """Each scan is a pass over the whole frame that a few bytes can ask for: past
    MAX_JPEG_SCANS the JPEG is refused, also when the caller probed the header itself."""
    ordinary = _pil(RGB, "JPEG", progressive=True)
    assert 1 < ordinary.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert decode_image(ordinary).shape == (32, 48, 3)
    assert decode_image(_many_scans(MAX_JPEG_SCANS)).shape == (32, 48, 3)
    data = _many_scans(MAX_JPEG_SCANS + 1)
    info = _probe_fast(data)
    assert info is not None
    with pytest.raises(InvalidImage, match=rf"unsupported: a JPEG of {MAX_JPEG_SCANS + 1} scans"):
        decode_image(data, info=info)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_its_reason(case: str) -> None:
    """Each kind of bad input is refused with its own specific reason code."""
    make, reason = BAD_INPUTS[case]
    with pytest.raises(InvalidImage) as info:
        decode_image(make())
    assert info.value.reason == reason, str(info.value)
    assert str(info.value).startswith(f"{reason}: ")


def test_bad_input_table_covers_most_reasons() -> None:
    """The table exercises at least 12 kinds of input and every header/data reason."""
    reasons = {reason for _, reason in BAD_INPUTS.values()}
    assert len(BAD_INPUTS) >= 12
    assert reasons >= set(IMAGE_REASONS) - {"bad_base64", "unsupported"}


def test_pixel_bomb_is_refused_before_allocation() -> None:
    """A 50,000 x 50,000 header is refused from the header: no pixel buffer is ever allocated."""
    data = _png_header_only(50_000, 50_000)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidImage, match="too_many_pixels"):
            decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def _png_with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """``png`` with extra chunks inserted right after its IHDR."""
    return png[:33] + b"".join(chunks) + png[33:]


def _png_text() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made by a test")
    return _pil(RGB, "PNG", pnginfo=info)


def _mpo() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, "MPO", save_all=True, append_images=[Image.fromarray(255 - RGB)])
    return buf.getvalue()


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil(RGB, "JPEG", exif=exif.tobytes())


def _sof_length_off(jpeg: bytes) -> bytes:
    """``jpeg`` with one stray byte at the end of its frame header (SOF0) segment."""
    i = jpeg.find(b"\xff\xc0")
    length = int.from_bytes(jpeg[i + 2 : i + 4], "big")
    return (
        jpeg[: i + 2]
        + (length + 1).to_bytes(2, "big")
        + jpeg[i + 4 : i + 2 + length]
        + b"\1"
        + (jpeg[i + 2 + length :])
    )


# The (bit depth, colour type) pairs the PNG standard allows; Pillow reads each of them.
_PILLOW_PNG_LAYOUTS = {(1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3),
                       (4, 3), (8, 3), (8, 4), (16, 4), (8, 6), (16, 6)}  # fmt: skip

_GAMA_SRGB_CHRM = (
    _png_chunk(b"gAMA", struct.pack(">I", 45455)),
    _png_chunk(b"sRGB", b"\0"),
    _png_chunk(b"cHRM", bytes(32)),
    _png_chunk(b"bKGD", bytes(6)),  # a chunk Pillow does not parse
)

# encode, and whether the fast parser reads it itself (True) or leaves it to Pillow (False)
PROBE_FILES: dict[str, tuple[Callable[[], bytes], bool]] = {
    **{
        f"case_{name}": (encode, name.startswith(("png_", "jpeg_")))
        for name, (encode, _, _) in CASES.items()
    },
    "png_1bit": (lambda: _pil(RGB, "PNG", "1"), True),
    "png_4bit_palette": (lambda: _pil(RGB, "PNG", "P", bits=4), True),
    "png_dpi_phys": (lambda: _pil(RGB, "PNG", dpi=(300, 300)), True),
    "png_gama_srgb_chrm": (lambda: _png_with_chunks(_cv(".png", BGR), *_GAMA_SRGB_CHRM), True),
    "png_rgb_trns": (lambda: _pil(RGB, "PNG", transparency=(200, 30, 40)), True),
    "png_text_chunk": (_png_text, False),
    "png_short_gama": (
        lambda: _png_with_chunks(_cv(".png", BGR), _png_chunk(b"gAMA", b"\0\1")),
        False,
    ),
    "png_bad_ancillary_crc": (
        lambda: _flip_byte(_png_with_chunks(_cv(".png", BGR), *_GAMA_SRGB_CHRM), 33 + 15),
        False,
    ),
    "apng_two_frames": (lambda: _animated("PNG"), False),
    "png_50000x50000_header": (lambda: _png_header_only(50_000, 50_000), False),
    "png_9000x9000_header": (lambda: _png_header_only(9_000, 9_000), True),
    "jpeg_exif_orientation": (_exif_jpeg, True),
    "jpeg_comment": (lambda: _pil(RGB, "JPEG", comment=b"made by a test"), True),
    "jpeg_icc_profile": (lambda: _pil(RGB, "JPEG", icc_profile=b"\0" * 300), True),
    "jpeg_restart_interval": (lambda: _cv(".jpg", BGR, (cv2.IMWRITE_JPEG_RST_INTERVAL, 2)), True),
    "jpeg_optimized_huffman": (lambda: _cv(".jpg", BGR, (cv2.IMWRITE_JPEG_OPTIMIZE, 1)), True),
    **{
        f"png_header_depth{depth}_colour{colour}": (
            lambda depth=depth, colour=colour: _png_header_only(48, 32, depth, colour),
            (depth, colour) in _PILLOW_PNG_LAYOUTS,
        )
        for depth in (1, 2, 4, 8, 16)
        for colour in (0, 2, 3, 4, 6)
    },
    "jpeg_mpo_two_frames": (_mpo, False),
    "jpeg_sof_length_off": (lambda: _sof_length_off(_JPEG), False),
    "jpeg_junk_before_frame": (lambda: _JPEG[:2] + b"\xff\xff" + _JPEG[2:], False),
}


@pytest.mark.parametrize("name", sorted(PROBE_FILES))
def test_fast_probe_agrees_with_pillow(name: str) -> None:
    """The fast PNG/JPEG header parser gives exactly Pillow's ImageInfo, or defers to Pillow."""
    make, fast_reads_it = PROBE_FILES[name]
    data = make()
    fast = _probe_fast(data)
    assert (fast is not None) == fast_reads_it, fast
    if fast is not None:
        assert fast == _probe_pillow(data)


def _pillow_outcome(data: bytes) -> ImageInfo | str:
    """Pillow's ImageInfo for ``data``, or the reason it refuses the header."""
    try:
        return _probe_pillow(data)
    except InvalidImage as exc:
        return exc.reason


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from(
        [
            "png_rgb",
            "png_palette_transparent",
            "png_gray16",
            "jpeg_rgb",
            "jpeg_cmyk",
            "jpeg_progressive",
        ]
    ),  # fmt: skip
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), min_size=1, max_size=3),
    cut=st.one_of(st.just(0), st.integers(1, 5000)),
)
def test_fast_probe_never_accepts_what_pillow_reads_otherwise(
    base: str, edits: list[tuple[int, int]], cut: int
) -> None:
    """Damaged headers (bytes flipped near the start, data cut short): the fast parser defers
    to Pillow or gives Pillow's own answer; it never accepts a header Pillow reads otherwise."""
    data = bytearray(CASES[base][0]())
    for pos, xor in edits:
        data[pos % len(data)] ^= xor
    damaged = bytes(data[: max(8, len(data) - cut)])
    fast = _probe_fast(damaged)
    assert fast is None or fast == _pillow_outcome(damaged)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_fast_probe_defers_or_agrees_on_bad_input(case: str) -> None:
    """On every kind of bad input the fast parser defers to Pillow or gives Pillow's answer."""
    data = BAD_INPUTS[case][0]()
    fast = _probe_fast(data)
    assert fast is None or fast == _pillow_outcome(data)


def test_limits_are_settings() -> None:
    """Tighter limits refuse what the defaults accept, naming the limit."""
    data = _cv(".png", BGR)
    with pytest.raises(InvalidImage, match=r"too_many_pixels: 48x32 = 1536 pixels .* 1000"):
        decode_image(data, DecodeLimits(max_pixels=1000))
    with pytest.raises(InvalidImage, match="too_many_bytes"):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(InvalidImage, match="bad_aspect"):
        decode_image(data, DecodeLimits(max_aspect=1.2))
    with pytest.raises(InvalidImage, match="too_small"):
        decode_image(data, DecodeLimits(min_side_px=33))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_bytes": 0}, "max_bytes must be an integer in 1..1073741824, got 0"),
        ({"max_pixels": 10**9}, "max_pixels must be an integer in 1..89478485, got 1000000000"),
        ({"max_aspect": 0.5}, "max_aspect must be in 1.0..1000.0, got 0.5"),
        ({"min_side_px": 0}, "min_side_px must be an integer in 1..4096, got 0"),
        ({"min_side_px": 100, "max_pixels": 5000}, "no image could pass"),
    ],
)
def test_decode_limits_validate(kwargs: dict[str, float], message: str) -> None:
    """DecodeLimits refuses bad values with the value and the allowed range."""
    with pytest.raises(ValueError, match=message):
        DecodeLimits(**kwargs)  # type: ignore[arg-type]


def test_decode_base64_round_trip() -> None:
    """Base64 text (str or bytes) decodes to the same image bytes."""
    data = _cv(".png", BGR)
    text = base64.b64encode(data)
    assert decode_base64(text) == data
    assert decode_base64(text.decode()) == data


@pytest.mark.parametrize(
    "text,reason",
    [
        ("not base64!", "bad_base64"),
        ("aW1n\n", "bad_base64"),
        ("aW1", "bad_base64"),
        ("ïmage", "bad_base64"),
        ("", "empty"),
        ("A" * (4 * 35), "too_many_bytes"),
    ],
)
def test_decode_base64_refuses(text: str, reason: str) -> None:
    """Bad base64, empty text, and text too long for the byte limit each get their reason."""
    with pytest.raises(InvalidImage) as info:
        decode_base64(text, DecodeLimits(max_bytes=100))
    assert info.value.reason == reason


def test_base64_length_is_judged_before_decoding() -> None:
    """Over-long text is refused as too_many_bytes even when it is not valid base64."""
    with pytest.raises(InvalidImage, match="too_many_bytes"):
        decode_base64("!" * 1000, DecodeLimits(max_bytes=100))


_SIGNATURES = [
    b"",
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"RIFF\0\0\0\0WEBPVP8 ",
    b"BM",
]


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from(_SIGNATURES), body=st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(prefix: bytes, body: bytes) -> None:
    """Random bytes, even behind a real format signature, give an array or InvalidImage only."""
    try:
        rgb = decode_image(prefix + body)
    except InvalidImage as exc:
        assert exc.reason in IMAGE_REASONS
    else:
        assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


def test_shared_imports_no_tensorflow_celery_or_redis() -> None:
    """shared/ stays importable in the worker's and the trainer's environments alike."""
    code = (
        "import sys, shared; heavy = {'tensorflow', 'celery', 'redis', 'keras'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
